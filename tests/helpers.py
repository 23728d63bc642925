"""Builders shared by the tests: paths, the tiny federated job, processes and ports, aggregation rounds, run
folders and data files. Fixtures live in conftest.py."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from lorafair.aggregation import ClientUpdate, build_aggregator, registered_methods
from lorafair.cli import parse
from lorafair.config import FitConfig, ModelConfig
from lorafair.federated.launch import launch_fabric
from lorafair.federated.loop import FederatedTrainer
from lorafair.keys import LOCAL, unpack_pairs

# ---- paths and the tiny job ----------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
"""The repository."""

TINY_ARGS = [
    "--data.name", "digits", "--data.batch_size", "16", "--data.eval_batch_size", "64", "--data.num_workers", "0",
    "--model.name", "vit_base_patch16_224",
    "--model.kwargs", "{depth: 2, embed_dim: 32, num_heads: 2, img_size: 16, patch_size: 4}",
    "--lora.r", "4", "--federation.rounds", "2", "--federation.clients_per_round", "5",
    "--client.local_epochs", "1", "--client.max_local_steps", "3", "--client.lr", "0.05",
    "--server.method", "lorafair", "--server.steps", "50",
]
"""6 digit domains, one client each, 5 sampled per round: sampling, uneven rank loads and padding all happen."""


def parse_fit_args(args: list[str]) -> FitConfig:
    """A FitConfig exactly as `lorafair fit ARGS` would build it."""
    _, kwargs = parse(["fit", *args])
    return kwargs["cfg"]


def tiny_args(out_dir: Path, *extra: str) -> list[str]:
    return [*TINY_ARGS, "--out_dir", str(out_dir), *extra]


def tiny_config(out_dir: Path, *extra: str) -> FitConfig:
    return parse_fit_args(tiny_args(out_dir, *extra))


def items_right_by_hand(trainer, lora: dict, extra: dict) -> dict[str, list[int]]:
    """1/0 per test item, per domain, of a FederatedTrainer's backbone holding (lora, extra): a plain evaluation
    loop, one test set as one batch."""
    model = trainer.model
    model.set_lora(lora)
    model.set_extra(extra)
    model.eval()
    right = {}
    with torch.no_grad():
        for domain, test in trainer.data.test.items():
            images, labels = zip(*(test[i] for i in range(len(test))), strict=True)
            predicted = model(torch.stack(images)).argmax(-1)
            right[domain] = [int(int(p) == label) for p, label in zip(predicted, labels, strict=True)]
    return right


# ---- processes and ports -------------------------------------------------------------------------------------------

SEVERAL_PROCESSES = pytest.mark.xdist_group("several_processes")
"""The mark of the modules whose tests start several processes (ranks under torchrun or by hand, Ray, Flower's
SuperLink and SuperNodes): under pytest-xdist (`make test`) they run on one worker, one after another, so no two
such jobs share the cores at once."""


PORTS_PER_WORKER = 200
"""Each pytest-xdist worker (gw0, gw1, ...) picks ports from its own range of this many, starting at 20000 (below
the ports Linux hands out for outgoing connections), so two workers never pick the same port, and no connection
takes one between its choice and its use."""


def free_ports(count: int) -> list[int]:
    """`count` ports of this worker's range, drawn at random, that nothing on 127.0.0.1 is bound to now."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    base = 20000 + PORTS_PER_WORKER * (worker % 60)
    ports = []
    for port in random.sample(range(base, base + PORTS_PER_WORKER), PORTS_PER_WORKER):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"fewer than {count} free ports in {base}-{base + PORTS_PER_WORKER - 1}")


def free_port() -> int:
    return free_ports(1)[0]


def python_environment(**settings: str) -> dict[str, str]:
    """This environment for a child process: this interpreter as the launch scripts' PYTHON, one thread per
    process, and `settings`."""
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **settings}


def fit_in_subprocess(args: list[str], **settings: str) -> subprocess.CompletedProcess:
    """`lorafair fit ARGS` in a child process, to its end (environment: `python_environment(**settings)`)."""
    return subprocess.run([sys.executable, "-m", "lorafair", "fit", *args], env=python_environment(**settings),
                          capture_output=True, text=True, timeout=300)


def two_rank_command(args: list[str]) -> list[str]:
    """`lorafair fit ARGS` on 2 gloo ranks through the launch script (torchrun --standalone, --resume auto)."""
    return ["bash", str(ROOT / "launch" / "torchrun_single_node.sh"), "2", *args]


def run_on_two_ranks(args: list[str], **settings: str) -> subprocess.CompletedProcess:
    """`two_rank_command(args)` run to its successful end (environment: `python_environment(**settings)`)."""
    done = subprocess.run(two_rank_command(args), capture_output=True, text=True, timeout=300,
                          env=python_environment(**settings))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def assert_same_trajectory(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["final"] == uninterrupted["final"]
    for mine, theirs in zip(resumed["rounds"], uninterrupted["rounds"], strict=True):
        for key in ("round", "clients", "train_loss", "accuracy", "bad_updates"):
            assert mine[key] == theirs[key]


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("lorafair: error: ") and "Traceback" not in err
    return err


# ---- aggregation rounds --------------------------------------------------------------------------------------------

SHAPES = {"blocks.0.attn.proj": (12, 10), "blocks.0.mlp.fc2": (12, 17), "blocks.1.attn.proj": (12, 10)}
"""name -> (out, in); two layers share a shape so they run as one batch."""


RANK = 3


WEIGHTS = (1.0, 2.5, 0.5, 4.0)


CASES = [
    ("fedit", {}),
    ("ffa_lora", {}),
    ("flora", {}),
    ("flexlora", {}),
    *[("lorafair", {"objective": objective, "residual_on": side})
      for objective in ("cosine", "column_cosine", "frobenius") for side in ("B", "A")],
    ("lorafair", {"objective": "cosine", "lr": 0.5, "steps": 50, "lam": 0.1}),
    *[("lorafair", {"objective": objective, "relative": False}) for objective in ("cosine", "column_cosine")],
    ("florana", {}),
    ("florana", {"sweeps": 4}),
    ("fedex_lora", {}),
]


FLOAT64 = {"atol": 1e-9, "rtol": 1e-7}
"""Tolerances of float64 results that differ from their reference by rounding only."""


def make_updates(weights=WEIGHTS, dtype=torch.float64, seed=0, shared_A=False, shared_B=False):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    shared = {name: randn(RANK, fan_in) for name, (_, fan_in) in SHAPES.items()}
    shared_b = {name: randn(fan_out, RANK) for name, (fan_out, _) in SHAPES.items()}
    return [ClientUpdate(weight=weight,
                         lora={name: (shared[name].clone() if shared_A else randn(RANK, fan_in),
                                      shared_b[name].clone() if shared_B else randn(fan_out, RANK))
                               for name, (fan_out, fan_in) in SHAPES.items()},
                         extra={"head.weight": randn(5, 7), "head.bias": randn(5)})
            for weight in weights]


def finish_in_two_groups(aggregator, updates: list, **start):
    """The round of four `updates` folded by two states, clients {0, 2} and {1, 3} in their slots, whose
    accumulators are then summed (what an all_reduce SUM across two ranks does) and finished."""
    first, second = (aggregator.start(updates[0], clients=4, **start) for _ in range(2))
    for slot in (0, 2):
        first.add(updates[slot], slot=slot)
    for slot in (1, 3):
        second.add(updates[slot], slot=slot)
    for mine, theirs in zip(first.accumulators(), second.accumulators(), strict=True):
        mine.add_(theirs)
    return first.finish()


def shared_for(method, round_index=1):
    """make_updates' arguments for a round of `method`: every factor its client rule freezes that round is the
    same on every client, as the server gave it."""
    frozen = build_aggregator(method).client_rule(round_index).frozen
    return {"shared_A": "A" in frozen, "shared_B": "B" in frozen}


def product(pair):
    A, B = pair
    return B @ A


def dense_ideal(updates, name):
    total = sum(u.weight for u in updates)
    return sum(u.weight / total * product(u.lora[name]) for u in updates)


def averaged(updates, name, factor):
    total = sum(u.weight for u in updates)
    return sum(u.weight / total * u.lora[name][factor] for u in updates)


def assert_matches_reference(method, out, reference, atol=1e-9, rtol=1e-7):
    assert (out.lora is None) == (reference.lora is None)
    assert (out.merge is None) == (reference.merge is None)
    for name in SHAPES:
        if reference.lora is not None:
            if method in ("flexlora", "fedsvd"):  # singular vectors are defined up to sign: compare the product
                torch.testing.assert_close(product(out.lora[name]), product(reference.lora[name]), atol=atol,
                                           rtol=rtol)
            else:
                torch.testing.assert_close(out.lora[name], reference.lora[name], atol=atol, rtol=rtol)
        if reference.merge is not None:
            torch.testing.assert_close(product(out.merge[name]), reference.merge[name], atol=atol, rtol=rtol)


# ---- run folders, reports and comparisons --------------------------------------------------------------------------

REPORT_DOMAINS = ["clipart", "infograph", "sketch"]


REPORT_SEEDS = [0, 1]


REPORT_ROUNDS = 3


def write_run(folder: Path, method: str, seed: int, *, finished: bool = True, lam: float = 0.01,
              bytes_down: int = 4000, eval_loss: bool = False) -> dict[str, float]:
    """A results.json as `lorafair fit` writes it; returns the final per-domain accuracies (with `eval_loss`, a
    language model's run: the final per-domain eval losses)."""
    rng = random.Random(f"{method}-{seed}-{lam}")
    rounds = []
    for t in range(1, REPORT_ROUNDS + 1):
        entry = {"round": t, "bytes_up": 4000, "bytes_down": bytes_down, "seconds": {"train": 1.0},
                 "aggregation": {"cos_avg_mean": rng.uniform(0.9, 1.0)}}
        if method == "lorafair":
            entry["aggregation"]["cos_factor_mean"] = rng.uniform(0.5, 1.0)
        if t != 2:  # round 2 without evaluation, as with eval_every > 1
            accuracy = {domain: rng.uniform(0.2, 0.9) for domain in REPORT_DOMAINS}
            entry.update(accuracy=accuracy, mean_accuracy=statistics.fmean(accuracy.values()))
            if eval_loss:
                losses = {domain: rng.uniform(0.5, 3.0) for domain in REPORT_DOMAINS}
                entry.update(eval_loss=losses, mean_eval_loss=statistics.fmean(losses.values()))
        rounds.append(entry)
    results = {"method": method, "seed": seed, "rounds": rounds,
               "config": {"seed": seed, "out_dir": str(folder), "resume": None, "federation": {"rounds": REPORT_ROUNDS},
                          "server": {"method": method, "lam": lam}, "lora": {"r": 16}}}
    if finished:
        results["final"] = {key: rounds[-1][key] for key in ("accuracy", "mean_accuracy", "eval_loss",
                                                             "mean_eval_loss") if key in rounds[-1]}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return rounds[-1]["eval_loss" if eval_loss else "accuracy"]


def markdown_rows(text: str, heading: str) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    start = next(i for i in range(lines.index(heading), len(lines)) if lines[i].startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table[0], table[2:]


class FakeTrainer:
    """Stands in for lorafair.fit: writes what fit writes, and can crash in the middle of a run."""

    def __init__(self, crash_on_call: int | None = None) -> None:
        self.calls: list[FitConfig] = []
        self.crash_on_call = crash_on_call

    def fit(self, cfg: FitConfig) -> dict:
        self.calls.append(cfg)
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        (cfg.out_dir / "checkpoints").mkdir(exist_ok=True)
        (cfg.out_dir / "checkpoints" / "last.pt").write_bytes(b"state")
        if len(self.calls) == self.crash_on_call:
            raise KeyboardInterrupt
        method_rank = registered_methods().index(cfg.server.method)
        accuracy = {"a": 0.5 + 0.01 * cfg.seed + 0.1 * method_rank, "b": 0.4 + 0.02 * cfg.seed}
        record = {"round": 1, "accuracy": accuracy, "mean_accuracy": sum(accuracy.values()) / 2,
                  "bytes_up": 100, "bytes_down": 200}
        results = {"method": cfg.server.method, "seed": cfg.seed, "rounds": [record],
                   "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                   "final": {"accuracy": accuracy, "mean_accuracy": record["mean_accuracy"]}}
        (cfg.out_dir / "results.json").write_text(json.dumps(results))
        return results


BAD_RESULTS = {
    "empty list": (b"[]", "holds [] instead of an object"),
    "null": (b"null", "holds null instead of an object"),
    "truncated": (b'{"method": "fedit", "rounds": [{"round": 1', "is not valid JSON"),
    "not utf-8": (b'{"method": "\xff\xfe"}', "is not UTF-8 text"),
    "no rounds": (b'{"method": "fedit", "final": null}', "'rounds' is missing"),
    "final without accuracy": (b'{"rounds": [], "final": {"mean_accuracy": 0.5}}', "'final' has no 'accuracy'"),
    "final without mean": (b'{"rounds": [], "final": {"accuracy": {"a": 0.5}}}', "no 'mean_accuracy'"),
}
"""Each case: (content of results.json, what the one line must say)."""


# ---- image data ----------------------------------------------------------------------------------------------------

DIGITS_VIT = ModelConfig(name="vit_base_patch16_224", kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2,
                                                            "img_size": 32})


DATA_CONFIG = {"input_size": (3, 16, 16), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
               "std": (0.5, 0.5, 0.5), "crop_pct": 0.9, "crop_mode": "center"}


# label -> class folder. Labels are not in sorted-name order, the names mix case, and 120 and 150 are above the
# paper's 100-class cut.
DOMAINNET_CLASSES = {0: "zebra", 1: "Aircraft_Carrier", 2: "bat", 120: "yoga", 150: "Apple"}


def write_jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (value, 255 - value, 40)).save(path, format="JPEG")


def make_domainnet(root: Path, domains=("clipart", "sketch"), per_class=(6, 2), flat_layout=False) -> None:
    """Official layout: <root>/splits/<domain>_<split>.txt (or <root>/<domain>_<split>.txt with flat_layout)."""
    split_dir = root if flat_layout else root / "splits"
    split_dir.mkdir(parents=True, exist_ok=True)
    for domain in domains:
        for split, count in zip(("train", "test"), per_class, strict=True):
            lines = []
            for label, name in DOMAINNET_CLASSES.items():
                for i in range(count):
                    relative = f"{domain}/{name}/{domain}_{label:03d}_{split}{i:03d}.jpg"
                    write_jpeg(root / relative, (label * 7 + i) % 256)
                    lines.append(f"{relative} {label}")
            (split_dir / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")


def png_bomb(side: int = 100_000) -> bytes:
    """A PNG of a few bytes whose header declares side x side pixels (PIL refuses it as a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, side, side)  # IHDR width and height, after the signature and chunk header
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # the IHDR checksum
    return bytes(data)


# ---- text data -----------------------------------------------------------------------------------------------------

DEMO_LM = "lorafair/assets/demo_text_lm"


TINY_LLAMA = ["--model.name", "llama", "--model.tokenizer", DEMO_LM, "--model.kwargs",
              "{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
              "num_key_value_heads: 2}"]


REDUCED_DEMO = ["--config", str(ROOT / "configs" / "demo_text.yaml"), "--text.examples_per_kind", "12",
                "--text.test_per_kind", "6", "--federation.rounds", "2", "--federation.eval_every", "1",
                "--federation.clients_per_round", "4", "--client.max_local_steps", "2", "--data.batch_size", "4",
                "--data.eval_batch_size", "16", "--server.steps", "20", "--text.max_length", "80",
                "--text.max_new_tokens", "5"]
"""configs/demo_text.yaml at a few seconds' size: 5 kinds, 4 sampled per round, 2 rounds of 2 local steps."""


def glue_file(path: Path, rows: int) -> Path:
    tasks = ["sst2", "cola"]
    lines = ["sentence\tlabel\ttask"] + [f"{'good' if i % 2 else 'bad'} film {i}\t{i % 2}\t{tasks[i % 4 // 2]}"
                                         for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


class Spy:
    """Per (round, client): the model's LoRA parameters at the client's first step (`start`; of its last phase where
    it trains a local adapter first) and its update (`end`), its local adapter at its first step and the one it
    returned (`local`, `local_end`, where it has one); per round: the server's answer (`answers`), the global state
    after it (`states`) and the model's frozen weights after it (`bases`, round 0 before any); per client: its
    weight."""

    def __init__(self, trainer: FederatedTrainer) -> None:
        self.start, self.end, self.answers, self.states, self.weights = {}, {}, {}, {}, {}
        self.local, self.local_end = {}, {}
        self.bases = {0: trainer.model.base_state()}
        train, step, apply = trainer.client.train, trainer.model.training_step, trainer.apply
        current = {}

        def training(client, start, round_index, *args, **kwargs):
            current["key"] = (round_index, client.id)
            result = train(client, start, round_index, *args, **kwargs)
            self.end[round_index, client.id] = {n: (a.clone(), b.clone()) for n, (a, b) in result.update.lora.items()}
            self.weights[client.id] = result.update.weight
            if result.local:
                self.local_end[round_index, client.id] = unpack_pairs(result.local, LOCAL)
            return result

        def stepping(batch, batch_idx):
            if batch_idx == 0:
                self.start[current["key"]] = trainer.model.get_lora()
                if getattr(trainer.model, "local_factors", None) is not None and current["key"] not in self.local:
                    self.local[current["key"]] = trainer.model.get_local_lora()
            return step(batch, batch_idx)

        def applying(round_index, answer):
            apply(round_index, answer)
            self.answers[round_index] = {n: (a.clone(), b.clone()) for n, (a, b) in answer.lora.items()}
            self.states[round_index] = trainer.global_state
            self.bases[round_index] = trainer.model.base_state()

        trainer.client.train, trainer.model.training_step, trainer.apply = training, stepping, applying


def spied_run(cfg) -> tuple[FederatedTrainer, Spy, dict]:
    trainer = FederatedTrainer(cfg, launch_fabric(cfg))
    spy = Spy(trainer)
    return trainer, spy, trainer.run()
