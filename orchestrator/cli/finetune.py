"""`mmae finetune`, `eval`, `export`: transfer a pretraining run (or released weights) to a downstream task.

Commands are thin: weights are resolved and checked in `orchestrator.runtime.pretrained`, evaluation and export run
in `orchestrator.runtime.evaluate` / `orchestrator.runtime.export`, launching is `mmae launch`'s
(`orchestrator.cli.jobs.launch_resolved`); all imported inside the command bodies.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli import console
from orchestrator.cli.jobs import DetachOpt, FreshOpt, ManagedOpt, launch_resolved
from orchestrator.cli.options import DryRunOpt, JobArg, JsonOpt, LocalOpt, SetOpt, YesOpt, typer_factory

app = typer_factory()  # no name: top-level commands (mmae finetune, mmae eval, mmae export)


class ExportFormat(enum.StrEnum):
    """Layout of an exported state dict."""

    timm = "timm"
    original = "original"


FromRunOpt = Annotated[
    str | None,
    typer.Option("--from-run", metavar="RUN_ID", help="MLflow run whose weights to start from (see `mmae status`).",
                 show_default=False),
]
FromCheckpointOpt = Annotated[
    str | None,
    typer.Option("--from-checkpoint", metavar="PATH|URL",
                 help="Weights file or URL instead of a run: the original's released MultiViT or timm checkpoints, "
                 "MAE / timm ViT weights (rgb adapter and encoder filled, the rest initialised), or mmae weights.",
                 show_default=False),
]
StepOpt = Annotated[
    int | None,
    typer.Option("--checkpoint-step", metavar="N", min=1, help="Use the run's stored checkpoint of step N instead "
                 "of its final weights.", show_default=False),
]
RunIdOpt = Annotated[
    str, typer.Option("--from-run", metavar="RUN_ID", help="MLflow run whose weights to use.", show_default=False)
]


def _user_error(err: Exception) -> Exception | None:
    from orchestrator.runtime.pretrained import as_user_error

    return as_user_error(err)


@app.command("finetune")
def finetune(
    job: JobArg,
    from_run: FromRunOpt = None,
    from_checkpoint: FromCheckpointOpt = None,
    checkpoint_step: StepOpt = None,
    sets: SetOpt = None,
    local: LocalOpt = False,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    detach: DetachOpt = False,
    fresh: FreshOpt = False,
    managed: ManagedOpt = False,
) -> None:
    """Fine-tune from a pretraining run's weights (or a checkpoint file) on the task of a finetune job.

    Resolves the run's final weights through MLflow (or its checkpoint of --checkpoint-step N), checks that they
    fit the job (modalities, sizes, the task's labels), then launches like `mmae launch` (--local: on this machine).
    The fine-tuning run records its parent (tags mmae.parent_run_id and mlflow.parentRunId), so `mmae status`
    shows the lineage. --dry-run prints the resolved job (with --local) or the SkyPilot task and launches nothing.
    """
    from orchestrator import spec
    from orchestrator.errors import UserError
    from orchestrator.runtime.pretrained import MLFLOW_SCHEMES, prepare_finetune

    resolved = spec.load_job(job, sets or [])
    prepared, described = prepare_finetune(resolved, from_run=from_run, from_checkpoint=from_checkpoint,
                                           checkpoint_step=checkpoint_step)
    url = prepared.init.checkpoint_url or ""
    if not local and "://" not in url and not url.startswith(MLFLOW_SCHEMES):
        raise UserError(f"the weights at {url} are on this machine, out of the cluster's reach: fine-tune with "
                        f"--local, or put them in a bucket (s3://...) and pass that URL")
    console.info(f"{prepared.name}: {prepared.finetune.kind if prepared.finetune else '?'} fine-tuning from "
                 f"{described}")
    if dry_run and local:
        console.out(spec.render(prepared))
        console.info("dry run: nothing launched")
        return
    try:
        launch_resolved(prepared, dry_run=dry_run, detach=detach, yes=yes, local=local, fresh=fresh,
                        managed=managed)
    except Exception as err:
        user = _user_error(err)
        if user is None:
            raise
        raise user from err


@app.command("eval")
def evaluate(
    job: JobArg,
    from_run: RunIdOpt,
    checkpoint_step: StepOpt = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a fine-tuning run's weights on the job's validation split, without training.

    Runs here (the local GPU or the CPU) and prints the task metrics (top-1/top-5; mIoU and pixel accuracy;
    delta1/2/3, RMSE and AbsRel); they are also recorded as a child run of RUN_ID in the MLflow experiment
    multimae/eval, with a figure of predictions next to targets.
    """
    from orchestrator import spec
    from orchestrator.runtime.evaluate import run_eval

    resolved = spec.load_job(job, sets or [])
    result = run_eval(resolved, from_run=from_run, checkpoint_step=checkpoint_step)
    if as_json:
        console.print_json({"run_id": result.run_id, "parent_run_id": result.parent_run_id,
                            "weights": result.weights, "metrics": result.metrics})
    else:
        rows = [{"metric": k, "value": v} for k, v in result.metrics.items()]
        console.out(console.table(rows, ["metric", "value"]))
    console.info(f"evaluated {result.weights}; metrics recorded in MLflow run {result.run_id}")


@app.command("export")
def export(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="File to write.", show_default=False, dir_okay=False)],
    from_run: RunIdOpt,
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="timm: the encoder as a timm ViT state dict "
                                              "(safetensors); original: the whole model in the original MultiMAE "
                                              "key layout.", case_sensitive=False)] = ExportFormat.timm,
    checkpoint_step: StepOpt = None,
) -> None:
    """Export a run's weights as a timm ViT state dict or in the original MultiMAE layout.

    timm: the rgb adapter and encoder (and a fine-tuned classifier) as a safetensors file that loads strictly into
    the printed timm.create_model(...) call and gives the same features. original: {"model": state_dict} as the
    original's checkpoints are (load_original reads it back); a .safetensors OUT writes plain safetensors.
    """
    from orchestrator.runtime.export import export_run

    result = export_run(from_run, fmt.value, out, checkpoint_step=checkpoint_step)
    console.info(f"wrote {result.num_tensors} tensors to {result.path} ({result.format} layout)")
    call = result.timm_call()
    if call:
        console.info(f"load it with: model = {call}; model.load_state_dict(safetensors.torch.load_file(OUT))")
    console.out(result.path)
