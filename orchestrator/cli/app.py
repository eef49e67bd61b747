"""Root `mmae` app: wires the command groups together and turns user errors into one line on stderr.

Adding a command group is one entry in ``_GROUPS``: a module ``orchestrator/cli/<module>.py`` that defines
``app = typer_factory(...)`` and imports only stdlib, typer and ``orchestrator.cli.*`` at module level.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Annotated

import typer

from orchestrator.cli import console
from orchestrator.cli.options import typer_factory

app = typer_factory(
    name="mmae",
    help="MultiMAE pretraining and fine-tuning, from a laptop to multi-node GPU clusters.\n\n"
    "Jobs are YAML files (see jobs/); change any field with --set key.path=value.",
)

_GROUPS: tuple[tuple[str, str | None], ...] = (
    # (module in orchestrator.cli, group name; None puts the module's commands at the top level)
    ("jobs", None),  # launch, status, logs, down
    ("finetune", None),  # finetune, eval, export
    ("data", "data"),
    ("config", "config"),
)


def _register_groups(root: typer.Typer) -> None:
    for module_name, group in _GROUPS:
        module = importlib.import_module(f"orchestrator.cli.{module_name}")
        if group is None:
            root.add_typer(module.app)
        else:
            root.add_typer(module.app, name=group)


def _version(value: bool) -> None:
    if value:
        from orchestrator import __version__

        console.out(f"mmae {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """MultiMAE pretraining and fine-tuning, from a laptop to multi-node GPU clusters."""


_register_groups(app)


def _configure_logging() -> None:
    # Third-party libraries stay at WARNING; our own modules log progress at INFO (MMAE_LOG_LEVEL changes that).
    level = os.environ.get("MMAE_LOG_LEVEL", "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        level = "INFO"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("orchestrator", "multimae_core"):
        logging.getLogger(name).setLevel(level)


def _user_error(err: BaseException) -> Exception | None:
    """The UserError an exception stands for, or None when it is a bug (which keeps its traceback)."""
    from orchestrator.errors import UserError

    if isinstance(err, UserError):
        return err
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(err, pydantic.ValidationError):
        from orchestrator import spec

        return UserError(spec.format_validation_error(err))
    return None


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`mmae`). Bad input exits with code 2 and one ``error:`` line; MMAE_DEBUG=1 adds the
    traceback."""
    _configure_logging()
    try:
        app(args=argv, prog_name="mmae")
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        if os.environ.get("MMAE_DEBUG", "") not in ("", "0"):
            import traceback

            traceback.print_exception(err, file=sys.stderr)
        console.error(str(user_error))
        from orchestrator.errors import USER_ERROR_EXIT_CODE

        sys.exit(USER_ERROR_EXIT_CODE)
