"""`--help` of every `mmae` command works and shows its documentation (Typer's CliRunner, in-process)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from orchestrator import __version__
from orchestrator.cli.app import app

REPO = Path(__file__).resolve().parents[3]
runner = CliRunner()


def command_paths() -> list[tuple[tuple[str, ...], object]]:
    """Every command and group below the root, as (argv path, click command)."""
    found: list[tuple[tuple[str, ...], object]] = []

    def walk(command: object, path: tuple[str, ...]) -> None:
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            found.append(((*path, name), sub))
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


COMMANDS = command_paths()


def test_the_expected_commands_are_there() -> None:
    paths = {path for path, _ in COMMANDS}
    assert {("config",), ("config", "render"), ("config", "schema"), ("config", "validate")} <= paths


def test_root_help() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: mmae [OPTIONS] COMMAND [ARGS]...")
    for path, _ in COMMANDS:
        if len(path) == 1:
            assert f"\n  {path[0]} " in result.stdout
    assert runner.invoke(app, ["-h"]).stdout == result.stdout


def test_no_arguments_shows_help() -> None:
    result = runner.invoke(app, [])
    assert "Usage: mmae [OPTIONS] COMMAND [ARGS]..." in result.output


def test_version_matches_the_package_metadata() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"mmae {project['version']}\n"
    assert __version__ == project["version"]


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_command_help(path: tuple[str, ...], command: object) -> None:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: mmae {' '.join(path)} ")
    summary = (getattr(command, "help", None) or "").strip()
    assert summary, f"`mmae {' '.join(path)}` has no help text: give the command (or group) a docstring"
    first_line = summary.splitlines()[0]
    assert " ".join(first_line.split()) in " ".join(result.stdout.split())
    assert result.stderr == ""


def test_render_help_documents_the_override_and_format_options() -> None:
    text = " ".join(runner.invoke(app, ["config", "render", "--help"]).stdout.split())
    for needle in ("JOB", "-s, --set KEY=VALUE", "--set modalities.inputs=[rgb,depth]", "-f, --format", "yaml|json"):
        assert needle in text
