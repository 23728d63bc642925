"""Every config error exits with code 2 and one line that names the key and the fix, never a traceback: lorafair's
own checks word it, or jsonargparse's parser (with the close match of an unknown key and where to look)."""

from pathlib import Path

import pytest

from lorafair.cli import main, parse


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--federation.roundz", "3"], "unknown key federation.roundz: did you mean --federation.rounds?; see "
                                       "`lorafair fit --help`"),
        (["--bogus", "1"], "unrecognized arguments: --bogus 1; see `lorafair fit --help`"),
        (["--lora.r", "abc"], "Parser key \"lora.r\": Expected a <class 'int'>. Got value: abc"),
        (["--lora.r", "0"], "lora.r: must be a positive integer, got 0"),
        (["--data.name", "digits", "--client.lr", "-0.1"], "client.lr: must be > 0, got -0.1"),
        (["--data.name", "digits", "--federation.rounds", "0"], "federation.rounds: must be > 0"),
        (["--data.name", "digits", "--lora.dropout", "1.5"], "lora.dropout: must be in [0, 1)"),
        (["--server.method", "fedavg"], "server.method: 'fedavg' is not valid; choose one of fedit, ffa_lora"),
        (["--data.root", "x", "--data.on_bad_image", "maybe"],
         "Parser key \"data.on_bad_image\": Expected a typing.Literal['error', 'skip']. Got value: maybe"),
        ([], "data.root: is required for data.name=domainnet"),
        (["--data.name", "digits", "--resume", "nowhere.ckpt"], "resume: must be 'auto' or an existing checkpoint"),
    ],
)
def test_config_errors_are_one_line(capsys, args, expected):
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unknown_key_in_yaml_is_named(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("federation:\n  rounds: 2\n  clients_per_rond: 3\n")
    assert main(["fit", "--config", str(config)]) == 2
    assert "unknown key federation.clients_per_rond: did you mean --federation.clients_per_round" in (
        capsys.readouterr().err)


def test_help_lists_every_section(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("--federation.rounds", "--federation.clients_per_round", "--server.method", "--server.lam", "--seed",
                "--out_dir", "--resume", "--export", "--lora.r", "--data.root"):
        assert key in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["export"], "the following arguments are required: export.run; see `lorafair export --help`"),
        (["predict", "--run", "runs/demo"],
         "the following arguments are required: predict.images; see `lorafair predict --help`"),
        (["evaluate", "--run", "r", "--data.nme", "x"], "unknown key data.nme: did you mean --data.name?"),
        (["predict", "--run", "runs/demo", "a.png", "--top_k", "many"],
         "Parser key \"top_k\": Expected a <class 'int'>. Got value: many"),
    ],
)
def test_model_command_errors_are_one_line(capsys, args, expected):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_model_command_arguments():
    """Keyword-only parameters are required flags, a list is positional with several values, a bool flag alone is
    true, and only the --data.* settings typed reach evaluate (they override the run's own)."""
    _, kwargs = parse(["predict", "a.png", "photos/", "--run", "runs/demo", "--top_k", "3"])
    assert kwargs == {"images": [Path("a.png"), Path("photos")], "run": Path("runs/demo"), "round": None, "top_k": 3,
                      "output": None, "batch_size": 64}
    assert parse(["export", "--run", "r", "--overwrite", "--round", "2"])[1] == {
        "run": Path("r"), "round": 2, "out": None, "overwrite": True, "client": None}
    assert parse(["export", "--run", "r", "--overwrite", "false"])[1]["overwrite"] is False
    assert parse(["export", "--run", "r", "--client", "3"])[1]["client"] == 3
    _, kwargs = parse(["evaluate", "--run", "r", "--data.eval_batch_size=7", "--data.domains", "[rotated]"])
    assert kwargs["data"] == {"domains": ["rotated"], "eval_batch_size": 7}
    assert parse(["evaluate", "--run", "r"])[1]["data"] == {}


TINY = ["--data.name", "digits", "--data.num_workers", "0", "--model.name", "vit_base_patch16_224",
        "--model.kwargs", "{depth: 2, embed_dim: 32, num_heads: 2, img_size: 16, patch_size: 4}"]


@pytest.mark.parametrize(
    ("args", "yaml", "expected"),
    [
        (["--data.image_size", "0"], "", "data.image_size: must be > 0 pixels or null"),
        (["--data.image_size", "-3"], "", "data.image_size: must be > 0 pixels or null"),
        ([], "client:\n  lr: .nan\n", "client.lr: must be a finite number, got nan"),
        ([], "client:\n  lr: .inf\n", "client.lr: must be a finite number, got inf"),
        ([], "server:\n  lam: .inf\n", "server.lam: must be a number >= 0, got inf"),
        ([], "lora:\n  alpha: .nan\n", "lora.alpha: must be a finite number, got nan"),
        (["--client.local_epochs", "0"], "", "client.local_epochs: must be > 0, got 0"),
        (["--federation.clients_per_round", "0"], "", "federation.clients_per_round: must be > 0, got 0"),
        (["--federation.partition", "iid", "--federation.num_clients", "100000"], "",
         "federation.num_clients=100000 is more than the 1234 training samples"),
        (["--lora.r", "100000"], "", "lora.r: 100000 is larger than the smallest adapted layer (blocks.0.attn.proj, "
                                     "32 x 32); use at most 32"),
        (["--lora.r", "4", "--lora.client_ranks", "[2, 8]"], "",
         "lora.client_ranks: every rank must be an integer in [1, lora.r = 4]"),
        (["--lora.client_ranks", "[0, 4]"], "", "lora.client_ranks: every rank must be an integer in [1, lora.r"),
        (["--lora.client_ranks", "[]"], "", "lora.client_ranks: must be null, a non-empty list or a mapping"),
        ([], "lora:\n  client_ranks: {plain: 2, nowhere: 4}\n",
         "lora.client_ranks: unknown domain(s) nowhere; the domains are plain, inverted"),
    ],
)
def test_values_that_cannot_be_right_are_one_line(tmp_path, capsys, args, yaml, expected):
    config = tmp_path / "config.yaml"
    config.write_text(yaml or "seed: 0\n")
    assert main(["fit", "--config", str(config), *TINY, "--out_dir", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ctrl_c_is_one_line_and_the_same_command_continues(tmp_path):
    """SIGINT in the middle of training: no traceback, exit code 130, and the checkpoints of finished rounds are
    there for the same command to continue from."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import tiny_args

    command = [sys.executable, "-m", "lorafair", "fit", *tiny_args(tmp_path, "--federation.rounds", "50")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((tmp_path / "checkpoints").glob("round_*.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("lorafair: interrupted")
    assert list((tmp_path / "checkpoints").glob("round_*.ckpt"))


TINY_VIT = "{depth: 2, embed_dim: 32, num_heads: 2, img_size: 16, patch_size: 4"
HOSTILE_VALUES = {
    "huge timeout": (["--federation.timeout", "1e300"], "federation.timeout: must be > 0 and at most 604800 seconds"),
    "huge seed": (["--seed", "99999999999999999999999"], "seed: must be in 0..4294967295, got 9999"),
    "no domains": (["--data.domains", "[]"], "data.domains: must list at least one domain, or be null"),
    "bad act_layer": (["--model.kwargs", TINY_VIT + ", act_layer: bogus}"],
                      "model.kwargs: vit_base_patch16_224 does not accept {"),
    "checkpoint_path": (["--model.kwargs", TINY_VIT + ", checkpoint_path: /x.pth}"],
                        "model.kwargs: checkpoint_path cannot be set here: load a weight file with model.weights"),
    "pretrained_cfg_overlay": (["--model.kwargs", TINY_VIT + ", pretrained_cfg_overlay: {file: /x.pth}}"],
                               "model.kwargs: pretrained_cfg_overlay cannot be set here"),
    "4096 threads": (["--cpu_threads", "4096"], "cpu_threads: must be in 1.."),
    "clients_per_domain ignored": (["--federation.clients_per_domain", "40", "--federation.partition", "feature"],
                                   "federation.clients_per_domain: 40 applies to partition feature_label only"),
    "unknown template field": (["--data.name", "arithmetic", "--text.prompt_template", "{bogus}"],
                               "text.prompt_template: '{bogus}' uses bogus; only {instruction} and {input}"),
    "unbalanced template": (["--data.name", "arithmetic", "--text.prompt_template", "{input"],
                            "text.prompt_template: '{input' is not a valid template"),
    "bad answer regex": (["--data.name", "arithmetic", "--text.answer_pattern", "("],
                         "text.answer_pattern: '(' is not a valid regex"),
    "answer regex without a group": (["--data.name", "arithmetic", "--text.answer_pattern", "#+"],
                                     "text.answer_pattern: '#+' has no group"),
}
"""Values a hostile or careless user passes: each was a traceback or silently ignored, each is one line naming the
key, the value and the fix, before any training."""


@pytest.mark.parametrize("case", list(HOSTILE_VALUES))
def test_hostile_values_are_one_line_naming_the_key(tmp_path, capsys, case):
    from tests.helpers import tiny_args

    args, expected = HOSTILE_VALUES[case]
    assert main(["fit", *tiny_args(tmp_path / "run", *args)]) == 2
    captured = capsys.readouterr()
    assert expected in captured.err, captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_flower_apps_read_settings_without_the_command_layer():
    """lorafair.flower.app parses a deployed run's settings with lorafair.config_parse, below the commands: it never
    imports lorafair.cli (which imports the commands, one of which imports the Flower apps)."""
    import subprocess
    import sys

    code = ("import sys, types\n"
            "from lorafair.flower.app import run_config_to_fit_config\n"
            "context = types.SimpleNamespace(run_config={'config': 'demo', 'args': '--federation.rounds 2'})\n"
            "assert run_config_to_fit_config(context).federation.rounds == 2\n"
            "print(sorted(m for m in sys.modules if m == 'lorafair.cli' or m.startswith('lorafair.commands')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
