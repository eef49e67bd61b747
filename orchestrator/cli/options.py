"""Shared building blocks of the `mmae` commands: the Typer app factory and reusable ``Annotated`` option aliases.

Options describe the *invocation* only; job fields are changed with ``--set key.path=value`` and never get flags
of their own.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = [
    "DryRunOpt",
    "FormatOpt",
    "JobArg",
    "JsonOpt",
    "LocalOpt",
    "OutputFormat",
    "SetOpt",
    "YesOpt",
    "typer_factory",
]


def typer_factory(**kwargs: Any) -> typer.Typer:
    """A Typer app with the project's settings: plain-text help (no rich import, so start-up stays fast),
    ``-h``/``--help``, help when called without a command, and no pretty tracebacks (errors are handled in
    ``orchestrator.cli.app.main``)."""
    settings: dict[str, Any] = {
        "rich_markup_mode": None,
        "no_args_is_help": True,
        "add_completion": False,
        "pretty_exceptions_enable": False,
        "context_settings": {"help_option_names": ["-h", "--help"], "max_content_width": 110},
    }
    settings.update(kwargs)
    return typer.Typer(**settings)


class OutputFormat(enum.StrEnum):
    """Format of a resolved job on stdout."""

    yaml = "yaml"
    json = "json"


JobArg = Annotated[
    Path,
    typer.Argument(metavar="JOB", help="Job YAML file, for example jobs/pretrain_tiny.yaml.", show_default=False),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a job field by its dotted path, e.g. --set optim.blr=2.0e-4 or "
        "--set modalities.inputs=[rgb,depth]. Repeatable; applied left to right after the file.",
        show_default=False,
    ),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would be done and do nothing.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
LocalOpt = Annotated[
    bool,
    typer.Option("--local", help="Run on this machine (a local Ray; the local GPU or the CPU) instead of a cloud."),
]
FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.", case_sensitive=False)]
