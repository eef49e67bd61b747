"""`mmae config ...`: check job files, print the resolved job, print the JSON Schema of job files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli import console
from orchestrator.cli.options import FormatOpt, JobArg, OutputFormat, SetOpt, typer_factory

app = typer_factory(name="config", help="Check, resolve and describe job files.")


@app.command("render")
def config_render(job: JobArg, sets: SetOpt = None, fmt: FormatOpt = OutputFormat.yaml) -> None:
    """Print the resolved job as YAML or JSON.

    Schema defaults < job file < --set. The YAML output is itself a complete job file.
    """
    from orchestrator import spec

    resolved = spec.load_job(job, sets or [])
    console.out(spec.render(resolved, fmt.value))


@app.command("validate")
def config_validate(
    jobs: Annotated[list[Path], typer.Argument(metavar="JOB...", help="Job YAML files.", show_default=False)],
    sets: SetOpt = None,
) -> None:
    """Check job files against the schema.

    Prints each job's name and config hash; stops at the first invalid file with its error.
    """
    from orchestrator import spec

    for path in jobs:
        resolved = spec.load_job(path, sets or [])
        console.out(f"ok  {path}  {resolved.name}  {spec.job_hash(resolved)}")


@app.command("schema")
def config_schema(
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write to this file instead of stdout (jobs/schema.json).", dir_okay=False),
    ] = None,
) -> None:
    """Print the JSON Schema of job files.

    Every field carries its documentation; jobs/schema.json is this output (--out jobs/schema.json).
    """
    from orchestrator import spec

    text = spec.schema_json()
    if out is None:
        console.out(text)
        return
    from orchestrator.errors import UserError

    try:
        out.write_text(text, encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from None
    console.info(f"wrote {out}")
