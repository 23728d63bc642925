"""The documentation holds: the MkDocs site builds with --strict (every page, link and anchor resolves), every
`lorafair ...` command written in README.md and docs/*.md parses with lorafair's own command line (without running),
and the README's demo table is the one the demo test pins."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

from lorafair import cli
from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "text"}
"""Fenced blocks whose lines are read as shell commands (python, toml, yaml blocks are not)."""
PLACEHOLDER = re.compile(r"\.\.\.|\[--")
"""An inline command that sketches its arguments instead of giving them (`fit ...`, `--run RUN [--round N]`)."""


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def lorafair_argv(tokens: list[str]) -> list[str] | None:
    """The arguments lorafair's parser receives from one shell command, or None if it runs no lorafair command."""
    while tokens and re.fullmatch(r"\w+=.*", tokens[0]):  # VAR=value before the command
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "lorafair":
        return tokens[1:]
    for i, token in enumerate(tokens):
        if token == "-m" and tokens[i + 1:i + 2] == ["lorafair"]:  # python -m lorafair, torchrun ... -m lorafair
            return tokens[i + 2:]
        if token.endswith("launch/torchrun_single_node.sh") and len(tokens) > i + 1:  # NPROC ARGS...
            return ["fit", *tokens[i + 2:], "--resume", "auto"]
        if token.endswith("launch/slurm_multi_node.sbatch"):  # ARGS...: fit ARGS --num_nodes N --resume auto
            nodes = next((t.split("=", 1)[1] for t in tokens[:i] if t.startswith("--nodes=")), "1")
            return ["fit", *tokens[i + 1:], "--num_nodes", nodes, "--resume", "auto"]
    if tokens[:2] == ["flwr", "run"] and "--run-config" in tokens:  # the app parses fit --config CONFIG ARGS
        settings = dict(item.split("=", 1) for item in shlex.split(tokens[tokens.index("--run-config") + 1]))
        config = ["--config", settings["config"]] if settings.get("config") else []
        return ["fit", *config, *shlex.split(settings.get("args", ""))]
    return None


def shell_commands(tokens: list[str]) -> list[list[str]]:
    """A token list split at &&, ||, ; and |."""
    commands, current = [], []
    for token in tokens:
        if token in {"&&", "||", ";", "|"}:
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [*commands, current]


def fenced_commands(page: str, lines: list[str]) -> list[Command]:
    """Every lorafair command in the page's shell-like fenced blocks: `$ ` prompts and comments dropped, lines
    ending in a backslash joined."""
    found, fence, pending, start = [], None, "", 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip().lower()
            continue
        if fence not in SHELL_FENCES:
            continue
        if not pending:
            start = number
            stripped = stripped.removeprefix("$ ")
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text, pending = pending + stripped, ""
        try:
            tokens = shlex.split(text, comments=True)
        except ValueError:  # not shell (a table, JSON): no command
            continue
        for command in shell_commands(tokens):
            argv = lorafair_argv(command)
            if argv is not None:
                found.append(Command(page, start, text, tuple(argv)))
    return found


def inline_commands(page: str, text: str) -> list[Command]:
    """Every lorafair command written as inline code outside fenced blocks (a span may break across lines), except a
    command's bare name (`lorafair fit`) and commands that sketch their arguments (`fit ...`, `[--round N]`)."""
    outside = re.sub(r"^\s*```.*?^\s*```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)
    found = []
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", outside):
        span = " ".join(match.group(1).split())
        try:
            tokens = shlex.split(span)
        except ValueError:
            continue
        argv = lorafair_argv(tokens)
        if argv is None or len(argv) < 2 or any(PLACEHOLDER.search(token) for token in argv):
            continue
        found.append(Command(page, outside.count("\n", 0, match.start()) + 1, span, tuple(argv)))
    return found


def documented_commands() -> list[Command]:
    commands = []
    for path in PAGES:
        text = path.read_text()
        name = path.relative_to(ROOT).as_posix()
        commands += fenced_commands(name, text.splitlines()) + inline_commands(name, text)
    return commands


def parse_error(argv: tuple[str, ...]) -> str | None:
    """Why lorafair's parser refuses argv (None if it takes it); --help and --print_config print and exit 0."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli.parse(list(argv))
    except SystemExit as err:
        return None if err.code in (0, None) else f"exit code {err.code}"
    except Exception as err:
        return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return None


def test_every_documented_lorafair_command_parses(tmp_path, monkeypatch):
    """Each command is parsed as `lorafair` would parse it, without running it, in a folder that holds the
    repository's configs/ and a run folder `out_dir` (its config.yaml, which the docs pass back to --config); other
    files it names (a dataset root, a run, images) need not exist. One parser serves every command (building it is
    most of the time a parse takes)."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "out_dir").mkdir()
    (tmp_path / "out_dir" / "config.yaml").write_text((ROOT / "configs" / "demo.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "build_parser", functools.cache(cli.build_parser))
    commands = documented_commands()
    pages = {command.page for command in commands}
    assert len(commands) >= 45 and {"README.md", "docs/training.md", "docs/compare.md"} <= pages, commands
    failures = [f"{command}\n    -> {error}" for command in commands if (error := parse_error(command.argv))]
    assert not failures, f"{len(failures)} documented command(s) do not parse:\n" + "\n".join(failures)


def test_the_site_builds_strictly_and_every_link_resolves(tmp_path):
    """`mkdocs build --strict`: a missing page, a broken link or another page's missing anchor is a warning, and
    strict turns warnings into failure. Beside it, what strict leaves unchecked: anchors within a page (`#name`)
    and the README's links into docs/, each held to the pages and the ids of the built site."""
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(site)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr

    def html(page: str) -> str:
        built = site / ("index.html" if page == "index.md" else f"{page.removesuffix('.md')}/index.html")
        assert built.is_file(), f"{page} was not built"
        return built.read_text()

    missing = []
    for path in PAGES:
        name = path.relative_to(ROOT).as_posix()
        for match in re.finditer(r"\]\(([^)\s]*)\)", path.read_text()):
            target = match.group(1)
            if re.match(r"\w+://", target):
                continue
            page, _, anchor = target.partition("#")
            if path.name == "README.md":
                if not page.startswith("docs/"):
                    continue
                if not (ROOT / page).is_file():
                    missing.append(f"{name}: {target}: no such file")
                    continue
                page = page.removeprefix("docs/")
            elif page:
                continue  # mkdocs checked it
            else:
                page = name.removeprefix("docs/")
            if anchor and page.endswith(".md") and f'id="{anchor}"' not in html(page):
                missing.append(f"{name}: {target}: no anchor #{anchor} in {page}")
    assert not missing, "\n".join(missing)
