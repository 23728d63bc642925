"""YAML files that attack or confuse the parser end as one line naming the file, exit code 2, quickly."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from lorafair import config_hub
from lorafair.cli import main
from lorafair.config_file import MAX_NODES, expanded_size


def _alias_bomb(levels: int, width: int) -> str:
    """`levels` anchors, each a list of `width` aliases of the previous one: width**levels leaves."""
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _walked_size(value) -> int:
    """Nodes of a loaded YAML value counted by walking it (every shared object visited again)."""
    if isinstance(value, list):
        return 1 + sum(_walked_size(item) for item in value)
    if isinstance(value, dict):
        return 1 + sum(_walked_size(key) + _walked_size(item) for key, item in value.items())
    return 1


@pytest.mark.parametrize("text", [_alias_bomb(3, 3), _alias_bomb(4, 2), "a: 1\nb: {c: [1, 2], d: null}\n", "[]"])
def test_the_expanded_size_equals_walking_the_loaded_value(text):
    assert expanded_size(yaml.compose(text, Loader=yaml.SafeLoader)) == _walked_size(yaml.safe_load(text))


def test_a_hand_counted_bomb():
    # l0: list of 3 scalars = 4 nodes; l1: list of 3 copies of l0 = 13; mapping: 1 + (1 + 4) + (1 + 13) = 20
    assert expanded_size(yaml.compose(_alias_bomb(2, 3), Loader=yaml.SafeLoader)) == 20


@pytest.mark.parametrize("spelling", ["--config PATH", "--config=PATH", "a second --config"])
def test_every_config_flag_is_checked_whatever_its_spelling(tmp_path, capsys, spelling):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("seed: 1\n")
    bad.write_text("federation: 5\n")
    args = {"--config PATH": ["--config", str(bad)], "--config=PATH": [f"--config={bad}"],
            "a second --config": ["--config", str(good), "--config", str(bad)]}[spelling]
    assert main(["fit", *args, "--data.name", "digits"]) == 2
    assert f"config {bad}: federation: expected a mapping" in capsys.readouterr().err


def test_a_config_given_by_name_is_checked_as_the_file_it_resolves_to(tmp_path, capsys, monkeypatch):
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "bomb.yaml").write_text(_alias_bomb(7, 9))
    monkeypatch.setattr(config_hub, "config_root", lambda: tmp_path)
    assert main(["fit", "--config", "paper/bomb", "--data.name", "digits"]) == 2
    assert f"config {tmp_path / 'paper' / 'bomb.yaml'} expands to" in capsys.readouterr().err


def test_an_alias_bomb_is_refused_within_seconds(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb(10, 9))  # 9**10 values if expanded
    done = subprocess.run([sys.executable, "-m", "lorafair", "fit", "--config", str(bomb), "--data.name", "digits"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"config {bomb} expands to" in done.stderr and f"over the limit of {MAX_NODES}" in done.stderr


HOSTILE = {
    "federation: 5": (b"federation: 5\n", "federation: expected a mapping of federation.* settings"),
    "list at top": (b"- federation\n- rounds\n", "expected a mapping of settings at the top level"),
    "empty": (b"", "got an empty file"),
    "list section": (b"data:\n  - digits\n", "data: expected a mapping of data.* settings"),
    "over the size limit": (b"seed: 0\n" + b"#" * (1 << 21), "byte limit of a config file"),
    "not utf-8": (b"seed: \xff\xfe\n", "is not UTF-8 text"),
    "broken yaml": (b"federation:\n  rounds: [1, 2\n", "is not valid YAML"),
    "too deep": (b"[" * 50_000, "nested too deeply"),
}
"""Each case: (file content, what the one line must say)."""


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_malformed_config_file_is_one_line_naming_it(tmp_path, capsys, case):
    config = tmp_path / "config.yaml"
    content, expected = HOSTILE[case]
    config.write_bytes(content)
    assert main(["fit", "--config", str(config), "--data.name", "digits"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorafair: error: config {config}") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def _flow_bomb(levels: int, width: int) -> str:
    """The alias bomb as one flow-style mapping, the way a flag value carries it."""
    return "{" + ", ".join(_alias_bomb(levels, width).splitlines()) + "}"


@pytest.mark.parametrize("spelling", ["--model.kwargs VALUE", "--model.kwargs=VALUE", "flower run config"])
def test_an_alias_bomb_in_a_flag_value_is_refused_like_one_in_a_file(capsys, spelling):
    bomb = _flow_bomb(7, 9)  # 9**7 values if expanded, in a few hundred bytes
    assert expanded_size(yaml.compose(bomb, Loader=yaml.SafeLoader)) > MAX_NODES
    if spelling == "flower run config":
        from lorafair.errors import UserError
        from lorafair.flower.app import run_config_to_fit_config

        context = SimpleNamespace(run_config={"config": "", "args": f"--data.name digits --model.kwargs '{bomb}'"})
        with pytest.raises(UserError, match=r"--model.kwargs: the value expands to \d+ values"):
            run_config_to_fit_config(context)
        return
    args = ["--model.kwargs", bomb] if spelling == "--model.kwargs VALUE" else [f"--model.kwargs={bomb}"]
    assert main(["fit", "--data.name", "digits", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model.kwargs: the value expands to" in err and str(MAX_NODES) in err
    assert main(["fit", "--data.name", "digits", "--model.kwargs", "{a: &a [1, 2], b: *a}",
                 "--federation.rounds", "0"]) == 2  # a small alias is fine: the config error that follows is another
    assert "expands to" not in capsys.readouterr().err
