"""One source for methods: a method registered from outside the package shows up in --help, configs and compare."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from lorafair.aggregation import display_name, registered_methods, user_options
from lorafair.config import ServerConfig
from tests.helpers import tiny_args

PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass
    from typing import ClassVar

    from lorafair.aggregation import register_method
    from lorafair.aggregation.base import Aggregator, GroupResult, check_option


    @register_method
    @dataclass
    class HalfB(Aggregator):
        shrink: float = 0.5
        """Factor on the averaged B."""

        name: ClassVar[str] = "half_b"
        display_name: ClassVar[str] = "Half-B"

        def __post_init__(self):
            check_option(self.name, "shrink", self.shrink, 0 < self.shrink <= 1, "in (0, 1]")

        def combine(self, group):
            return GroupResult(lora=(group.A_bar, self.shrink * group.B_bar))
''')

SCRIPT = textwrap.dedent('''
    import sys
    import half_b  # registers before lorafair.config is imported
    from lorafair.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def _lorafair_with_plugin(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "half_b.py").write_text(PLUGIN)
    (tmp_path / "run.py").write_text(SCRIPT)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(tmp_path / "run.py"), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})


def test_the_server_config_is_the_registry():
    options = user_options()
    assert [f for f in ServerConfig.__dataclass_fields__] == ["method", *options]
    assert registered_methods() == ("fedit", "ffa_lora", "flora", "flexlora", "lorafair", "florana", "fedex_lora",
                                    "fedsa_lora", "rolora", "fedsvd", "hetlora",
                                    "frlora", "feddpa", "fed_sb")
    assert [display_name(m) for m in registered_methods()] == ["FedIT", "FFA-LoRA", "FLoRA", "FlexLoRA", "LoRA-FAIR",
                                                                "FLoRA-NA", "FedEx-LoRA", "FedSA-LoRA", "RoLoRA",
                                                                "FedSVD", "HetLoRA", "FRLoRA", "FedDPA", "Fed-SB"]
    assert options["sweeps"].methods == ("florana",) and options["lam"].default == 0.01
    assert (options["svd_period"].default, options["svd_warmup"].default) == (1, 0)
    assert options["init_batches"].methods == ("fed_sb",) and options["init_batches"].default == 4


def test_a_registered_method_is_in_help_configs_and_compare_tables(tmp_path):
    helped = _lorafair_with_plugin(tmp_path, "fit", "--help")
    assert "--server.shrink SHRINK" in helped.stdout and "half_b: Factor on the averaged B." in " ".join(
        helped.stdout.split())
    config = tmp_path / "half.yaml"
    config.write_text("server:\n  method: half_b\n  shrink: 2.0\n")
    refused = _lorafair_with_plugin(tmp_path, "fit", "--config", str(config), "--data.name", "digits")
    assert refused.returncode == 2 and refused.stderr == "lorafair: error: server.shrink: must be in (0, 1], got 2.0\n"

    out_dir = tmp_path / "cmp"
    done = _lorafair_with_plugin(tmp_path, "compare", "--methods", "half_b",
                                 *tiny_args(out_dir, "--federation.rounds", "1", "--server.shrink", "0.25"))
    assert done.returncode == 0, done.stderr[-2000:]
    table = (out_dir / "comparison.md").read_text()
    assert "| Half-B |" in table
