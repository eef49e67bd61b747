"""CLI output: data goes to stdout, messages to stderr, ``--json`` for machines, plain-text tables for people.

Commands print only through these helpers, so piping ``mmae config render JOB > job.yaml`` or
``mmae status --json | jq`` never picks up a progress message.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import typer

__all__ = ["confirm", "error", "info", "out", "print_json", "print_table", "table", "warn"]


def out(text: str) -> None:
    """Write data to stdout, ending with exactly one newline."""
    typer.echo(text.rstrip("\n"))


def info(message: str) -> None:
    """A progress or status message for people (stderr)."""
    typer.echo(message, err=True)


def warn(message: str) -> None:
    """A warning (stderr), prefixed ``warning:``."""
    typer.echo(f"warning: {message}", err=True)


def error(message: str) -> None:
    """An error line (stderr), prefixed ``error:``."""
    typer.echo(f"error: {message}", err=True)


def print_json(data: Any) -> None:
    """Write ``data`` as indented JSON to stdout; non-JSON values (datetimes, paths) become strings."""
    out(json.dumps(data, indent=2, default=str))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("\n", " ")


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *, empty: str = "(none)") -> str:
    """Rows as an aligned plain-text table; headers are the column keys in upper case, numbers are right-aligned.

    ``columns`` picks and orders the keys (default: the keys of the first row). None shows as ``-``.
    """
    if not rows:
        return empty
    keys = list(columns) if columns is not None else list(rows[0])
    cells = [[_cell(row.get(key)) for key in keys] for row in rows]
    numeric = [
        all(isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool) for row in rows)
        for key in keys
    ]
    headers = [key.upper() for key in keys]
    widths = [max(len(headers[i]), *(len(line[i]) for line in cells)) for i in range(len(keys))]

    def fmt(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([fmt(headers), *(fmt(line) for line in cells)])


def print_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *, as_json: bool = False
) -> None:
    """Print rows as a table, or as a JSON list of objects with ``as_json`` (the ``--json`` flag)."""
    if as_json:
        keys = list(columns) if columns is not None else None
        print_json([{k: row.get(k) for k in keys} if keys else dict(row) for row in rows])
    else:
        out(table(rows, columns))


def confirm(question: str, *, yes: bool) -> bool:
    """Ask a yes/no question on stderr; ``yes`` (the ``--yes`` flag) answers it. Without a terminal to ask on,
    refuses rather than guessing: the caller should tell the user to pass ``--yes``."""
    if yes:
        return True
    if not sys.stdin.isatty():
        return False
    return typer.confirm(question, default=False, err=True)
