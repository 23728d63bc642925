"""The text client in the round loop: every method on a reduced text demo, resume after a kill, two ranks under
torchrun, the response-only loss against a dense reference, a classifier's head as extra state, bf16 with gradient
checkpointing, and a round's cost independent of the clients not sampled."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorafair.aggregation import registered_methods
from lorafair.data.text import (
    IGNORE_INDEX,
    TextDataset,
    encode_classification,
    encode_instruction,
    encode_prompt,
)
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from lorafair.fit import fit
from lorafair.models.text import TextLoraModel
from tests.helpers import (
    REDUCED_DEMO,
    ROOT,
    SEVERAL_PROCESSES,
    TINY_LLAMA,
    assert_same_trajectory,
    fit_in_subprocess,
    glue_file,
    parse_fit_args,
    run_on_two_ranks,
)

pytestmark = SEVERAL_PROCESSES


def _reduced(out_dir: Path, *extra: str) -> list[str]:
    return [*REDUCED_DEMO, "--out_dir", str(out_dir), *extra]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> dict:
    """The reduced text demo with lorafair, run once in this process."""
    return fit(parse_fit_args(_reduced(tmp_path_factory.mktemp("text_run"))))


def _lora_bytes(layers: int, modules_in_out: list[tuple[int, int]], r: int) -> int:
    """float32 bytes of the A (r x in) and B (out x r) factors of every adapted layer."""
    return 4 * layers * sum(r * (fan_in + fan_out) for fan_in, fan_out in modules_in_out)


@pytest.mark.slow
@pytest.mark.parametrize("method", registered_methods())
def test_every_method_runs_the_text_demo(text_run, tmp_path, method):
    results = text_run if method == "lorafair" else fit(parse_fit_args(_reduced(tmp_path, "--server.method", method)))
    assert [r["round"] for r in results["rounds"]] == [1, 2] and results["final"]["round"] == 2
    assert results["domains"] == ["word_problem", "garden", "savings", "bakery", "scores"]
    for record in results["rounds"]:
        assert len(record["clients"]) == 4 and not record["bad_updates"]
        assert all(torch.isfinite(torch.tensor(loss)) for loss in record["train_loss"].values())
        assert all(0 <= accuracy <= 1 for accuracy in record["accuracy"].values())
    # the demo LM: 3 layers; q, k, v and o_proj 64 -> 64, gate and up_proj 64 -> 192, down_proj 192 -> 64; rank 8;
    # a causal LM sends no extra tensors
    modules = [(64, 64)] * 4 + [(64, 192), (64, 192), (192, 64)]
    if method in ("fedit", "lorafair", "florana", "flexlora", "feddpa"):  # FedDPA: its global adapter only
        assert results["rounds"][0]["bytes_up"] == _lora_bytes(3, modules, 8)
    if method == "ffa_lora":  # B only: r x fan_out per module
        assert results["rounds"][0]["bytes_up"] == _lora_bytes(3, [(0, fan_out) for _, fan_out in modules], 8)
    if method == "fedsa_lora":  # A only (r x fan_in per module)
        assert results["rounds"][0]["bytes_up"] == _lora_bytes(3, [(fan_in, 0) for fan_in, _ in modules], 8)
    if method == "rolora":  # B only in round 1 (r x fan_out per module), A only in round 2
        assert results["rounds"][0]["bytes_up"] == _lora_bytes(3, [(0, fan_out) for _, fan_out in modules], 8)
        assert results["rounds"][1]["bytes_up"] == _lora_bytes(3, [(fan_in, 0) for fan_in, _ in modules], 8)
    if method == "fed_sb":  # the r x r core of A only: r^2 per module, as an A of fan_in r and no B
        assert results["rounds"][0]["bytes_up"] == _lora_bytes(3, [(8, 0) for _ in modules], 8)
    # each client's own model, scored on its own domain, where clients keep factors of their own
    assert ("personalised" in results) == (method in ("fedsa_lora", "feddpa"))


@pytest.mark.slow
def test_a_killed_text_run_resumes_exactly(text_run, tmp_path):
    killed = fit_in_subprocess(_reduced(tmp_path), LORAFAIR_FAIL_AT="2:train")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = fit(parse_fit_args(_reduced(tmp_path, "--resume", "auto")))
    assert_same_trajectory(resumed, text_run)


@pytest.mark.slow
def test_two_ranks_under_torchrun_match_one_process_on_text(text_run, tmp_path):
    run_on_two_ranks(_reduced(tmp_path))
    distributed = json.loads((tmp_path / "results.json").read_text())
    assert sorted(set(distributed["rounds"][0]["processes"].values())) == [0, 1]
    assert [r["clients"] for r in distributed["rounds"]] == [r["clients"] for r in text_run["rounds"]]
    for mine, theirs in zip(distributed["rounds"], text_run["rounds"], strict=True):
        for client, loss in theirs["train_loss"].items():
            assert mine["train_loss"][client] == pytest.approx(loss, rel=1e-5)
        for domain, accuracy in theirs["accuracy"].items():
            assert abs(mine["accuracy"][domain] - accuracy) <= 1 / 6 + 1e-9  # one test problem of six at most


def test_every_demo_client_lowers_its_own_loss_within_round_1(tmp_path, monkeypatch):
    """The demo's local recipe goes downhill on each client's own data: over a client's 20 steps of round 1 the mean
    loss of the last 5 is below that of the first 5 (at lr 0.2 it rose within the round)."""
    losses: list[list[float]] = []
    original = TextLoraModel.training_step

    def recording(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        if batch_idx == 0:
            losses.append([])
        losses[-1].append(loss.item())
        return loss

    monkeypatch.setattr(TextLoraModel, "training_step", recording)
    fit(parse_fit_args(["--config", str(ROOT / "configs" / "demo_text.yaml"), "--federation.rounds", "1",
                        "--text.test_per_kind", "2", "--data.eval_batch_size", "10", "--out_dir", str(tmp_path)]))
    assert [len(steps) for steps in losses] == [20] * 5
    for steps in losses:
        assert sum(steps[-5:]) < sum(steps[:5]), steps


@pytest.fixture(scope="module")
def demo_model() -> TextLoraModel:
    torch.manual_seed(0)
    return TextLoraModel(parse_fit_args(["--config", str(ROOT / "configs" / "demo_text.yaml")]), 1)


def test_the_training_loss_is_the_cross_entropy_of_the_response_tokens(demo_model):
    tokenizer = demo_model.tokenizer
    items = [encode_instruction(tokenizer, "Add: 1 + 2\nA: ", "#### 3", 48),
             encode_instruction(tokenizer, "Solve: Ann has 4 pens and gets 5 more.\nA: ", "#### 9", 48)]
    inputs, labels = torch.stack([i for i, _ in items]), torch.stack([lab for _, lab in items])
    demo_model.eval()
    with torch.no_grad():
        loss = demo_model.training_step((inputs, labels), 0)
        logits = demo_model.backbone(input_ids=inputs[:, 0], attention_mask=inputs[:, 1]).logits  # untrimmed
    predicted, target = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    response = target != IGNORE_INDEX
    assert response.sum() == 2 * len("#### 3") + 2  # two responses and their EOS
    assert loss.item() == pytest.approx(F.cross_entropy(predicted[response], target[response]).item(), rel=1e-5)
    everything = F.cross_entropy(predicted[inputs[:, 1, 1:].reshape(-1).bool()],
                                 inputs[:, 0, 1:].reshape(-1)[inputs[:, 1, 1:].reshape(-1).bool()])
    assert abs(loss.item() - everything.item()) > 1e-3  # the prompt tokens would change it


def test_a_representation_is_the_last_layers_state_at_the_last_real_token_whatever_the_padding(demo_model):
    """FedDPA's per-input weight compares these: the same prompt, left-padded (a test item) or right-padded (the
    first rows of a training item), gives the last hidden state the unpadded prompt gives at its last token."""
    tokenizer = demo_model.tokenizer
    prompts = ["Add: 1 + 2\nA: ", "Solve: Ann has 4 pens and gets 5 more.\nA: "]
    left = torch.stack([encode_prompt(tokenizer, prompt, 64) for prompt in prompts])
    right = torch.stack([torch.cat([encode_classification(tokenizer, prompt, None, 64),
                                    torch.zeros(1, 64, dtype=torch.long)]) for prompt in prompts])  # a third row
    demo_model.eval()
    with torch.no_grad():
        by_left, by_right = demo_model.representations(left), demo_model.representations(right)
        for row, prompt in enumerate(prompts):
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            alone = demo_model.backbone(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
            torch.testing.assert_close(by_left[row], alone, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(by_right[row], alone, rtol=1e-4, atol=1e-5)


def test_bf16_weights_and_gradient_checkpointing_train_float32_lora(tmp_path):
    cfg = parse_fit_args(["--config", str(ROOT / "configs" / "demo_text.yaml"), "--model.dtype", "bfloat16",
                          "--model.gradient_checkpointing", "true"])
    torch.manual_seed(0)
    model = TextLoraModel(cfg, 1)
    assert model.backbone.is_gradient_checkpointing
    base = dict(model.backbone.named_parameters())
    assert base["model.layers.0.mlp.down_proj.base_layer.weight"].dtype == torch.bfloat16
    assert all(a.dtype == b.dtype == torch.float32 for a, b in model.get_lora().values())
    inputs, labels = encode_instruction(model.tokenizer, "Add: 1 + 2\nA: ", "#### 3", 32)
    model.train()
    loss = model.training_step((inputs[None], labels[None]), 0)
    loss.backward()
    trained = {name for name, p in model.backbone.named_parameters() if p.grad is not None}
    assert trained and all(".lora_" in name for name in trained)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_roberta_classifier_trains_its_head_as_extra_state(tmp_path):
    train = glue_file(tmp_path / "train.tsv", 40)
    cfg = parse_fit_args(["--data.name", "text_classification", "--model.name", "roberta", "--model.tokenizer",
                          "lorafair/assets/demo_text_lm", "--model.kwargs",
                          "{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
                          "max_position_embeddings: 80}", "--text.train_files", f"[{train}]", "--text.text_columns",
                          "[sentence]", "--text.domain_column", "task", "--text.max_length", "24",
                          "--federation.rounds", "1", "--client.max_local_steps", "2", "--data.batch_size", "4",
                          "--data.num_workers", "0", "--lora.r", "2", "--server.method", "fedit",
                          "--out_dir", str(tmp_path / "run")])
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    layers = trainer.model.layer_names
    assert layers == ["roberta.encoder.layer.0.attention.self.query", "roberta.encoder.layer.0.attention.self.value"]
    start = trainer.global_state.extra
    assert sorted(start) == ["classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias",
                             "classifier.out_proj.weight"]
    results = [trainer.client.train(client, trainer.global_state, 1) for client in trainer.data.clients]
    answer = trainer.aggregate(1, results, [client.id for client in trainer.data.clients])
    weights = [r.update.weight for r in results]
    expected = sum(w * r.update.extra["classifier.out_proj.weight"] for w, r in zip(weights, results, strict=True))
    assert torch.allclose(answer.extra["classifier.out_proj.weight"], expected / sum(weights), atol=1e-6)
    assert not torch.equal(answer.extra["classifier.out_proj.weight"], start["classifier.out_proj.weight"])


def _task_file(path: Path, tasks: int) -> Path:
    """Natural-Instructions-like: `tasks` tasks of 3 rows each (one is held out for the test set)."""
    records = [{"instruction": f"Task {t}: add one.", "input": str(i), "output": f"#### {i + 1}", "task": f"t{t}"}
               for t in range(tasks) for i in range(3)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _round_reads(tmp_path: Path, tasks: int) -> tuple[int, int, list[int]]:
    """(training items read, test items read, steps per sampled client) in round 1 of `tasks` clients, 10 sampled."""
    tmp_path.mkdir()
    cfg = parse_fit_args([*TINY_LLAMA, "--data.name", "instruction", "--text.domain_column", "task",
                          "--text.train_files", f"[{_task_file(tmp_path / 'tasks.jsonl', tasks)}]",
                          "--text.max_length", "32", "--data.test_fraction", "0.3", "--federation.rounds", "2",
                          "--federation.eval_every", "2", "--federation.clients_per_round", "10",
                          "--client.local_epochs", "1", "--data.batch_size", "2", "--data.num_workers", "0",
                          "--lora.r", "2", "--server.method", "fedit", "--out_dir", str(tmp_path / "run")])
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    assert len(trainer.data.clients) == tasks
    train: TextDataset = trainer.data.clients[0].dataset.dataset
    tests = list(trainer.data.test.values())
    trainer.start_or_resume()
    record = trainer.run_round(1)
    return train.reads, sum(test.reads for test in tests), list(record.server.train_steps.values())


@pytest.mark.slow
def test_a_round_of_1000_clients_reads_what_10_clients_read(tmp_path):
    """FlexLoRA's setting, one client per task: a round reads only the sampled clients' examples (tokenized when
    read), so 1,000 clients with 10 sampled cost what 10 clients cost."""
    many = _round_reads(tmp_path / "many", 1000)
    few = _round_reads(tmp_path / "few", 10)
    assert many == few == (10 * 2, 0, [1] * 10)  # 10 clients x 2 training rows, one batch of 2 each, no test read
