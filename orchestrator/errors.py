"""Errors meant for the person at the keyboard (as opposed to bugs).

`UserError` carries one clear line. The CLI entry point (`orchestrator.cli.app.main`) prints it as
``error: <message>`` on stderr and exits with code 2, without a traceback unless ``MMAE_DEBUG=1``.
"""

from __future__ import annotations

__all__ = ["USER_ERROR_EXIT_CODE", "UserError"]

USER_ERROR_EXIT_CODE = 2
"""Exit code of the CLI for bad input (the same code Click uses for usage errors)."""


class UserError(Exception):
    """Bad input the user can fix: a missing file, an invalid job, an unknown run. The message is one line."""

    def __init__(self, message: str) -> None:
        # Multi-line messages would break the one-line contract; keep the first line and fold the rest in.
        super().__init__(" ".join(part.strip() for part in str(message).splitlines() if part.strip()))

    @property
    def message(self) -> str:
        """The one-line message."""
        return str(self.args[0]) if self.args else ""
