"""Every config error exits with code 2 and one line that names the key and the fix, never a traceback."""

from pathlib import Path

import pytest

from lorafair.cli import main, parse


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--federation.roundz", "3"], "unknown config key 'federation.roundz'; did you mean federation.rounds"),
        (["--bogus", "1"], "unknown config key 'bogus'"),
        (["--lora.r", "abc"], "lora.r: expected a value of type int, got 'abc'"),
        (["--lora.r", "0"], "lora.r: must be a positive integer, got 0"),
        (["--data.name", "digits", "--client.lr", "-0.1"], "client.lr: must be > 0, got -0.1"),
        (["--data.name", "digits", "--federation.rounds", "0"], "federation.rounds: must be > 0"),
        (["--data.name", "digits", "--lora.dropout", "1.5"], "lora.dropout: must be in [0, 1)"),
        (["--server.method", "fedavg"], "server.method: 'fedavg' is not valid; choose one of fedit, ffa_lora"),
        (["--data.root", "x", "--data.on_bad_image", "maybe"], "data.on_bad_image: 'maybe' is not valid"),
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
    assert "federation.clients_per_rond; did you mean federation.clients_per_round" in capsys.readouterr().err.replace(
        "'", ""
    )


def test_help_lists_every_section(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("--federation.rounds", "--federation.clients_per_round", "--server.method", "--server.lam", "--seed",
                "--out_dir", "--resume", "--lora.r", "--data.root"):
        assert key in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["export"], "lorafair export needs --run; see `lorafair export --help`"),
        (["predict", "--run", "runs/demo"], "lorafair predict needs images; see `lorafair predict --help`"),
        (["evaluate", "--run", "r", "--data.nme", "x"], "unknown config key 'data.nme'; did you mean data.name"),
        (["predict", "--run", "runs/demo", "a.png", "--top_k", "many"], "top_k: expected a value of type int"),
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
        "run": Path("r"), "round": 2, "out": None, "overwrite": True}
    assert parse(["export", "--run", "r", "--overwrite", "false"])[1]["overwrite"] is False
    _, kwargs = parse(["evaluate", "--run", "r", "--data.eval_batch_size=7", "--data.domains", "[rotated]"])
    assert kwargs["data"] == {"domains": ["rotated"], "eval_batch_size": 7}
    assert parse(["evaluate", "--run", "r"])[1]["data"] == {}
