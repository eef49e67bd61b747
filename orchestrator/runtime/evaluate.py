"""`mmae eval`: the validation metrics of a fine-tuned run's weights, computed here, without training.

The weights are resolved and checked like `mmae finetune` does (they must include the job's head), the job's
validation split is read with the fine-tuning data pipeline in this process (the local GPU or the CPU), and the
metrics go to a new MLflow run in the experiment ``multimae/eval``, tagged as a child of the evaluated run
(``mmae.parent_run_id``, ``mlflow.parentRunId``) with ``mmae.stage=eval``, plus a figure of predictions.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.errors import UserError
from orchestrator.runtime import pretrained, tracking

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

__all__ = ["EVAL_EXPERIMENT", "EvalResult", "run_eval"]

logger = logging.getLogger(__name__)

EVAL_EXPERIMENT = "multimae/eval"
"""MLflow experiment of evaluation runs."""


@dataclass(frozen=True)
class EvalResult:
    """What `run_eval` leaves behind."""

    run_id: str
    """The MLflow run holding the metrics."""
    parent_run_id: str
    metrics: dict[str, float]
    """Validation metrics without the ``val/`` prefix (top1, miou, delta1, loss/total, ...)."""
    weights: str
    """Where the weights came from (one line)."""


def run_eval(job: JobSpec, *, from_run: str, checkpoint_step: int | None = None,
             device: str | None = None) -> EvalResult:
    """Evaluate the weights of ``from_run`` on ``job``'s validation split and record them in MLflow."""
    from multimae_core.data.tasks import FinetuneDataSource
    from multimae_core.training.loop import evaluate_only
    from multimae_core.training.reporting import MemoryReporter

    if job.data.val_url is None:
        raise UserError(f"{job.name}: data.val_url is null, so there is nothing to evaluate on")
    staged, described = pretrained.prepare_finetune(job, from_run=from_run, checkpoint_step=checkpoint_step,
                                                    require_head=True)
    uri = pretrained.tracking_uri()
    reporter = MemoryReporter()
    with tempfile.TemporaryDirectory(prefix="mmae-eval-") as tmp:
        local = pretrained.localize_init(staged, tmp, uri=uri)
        try:
            data = FinetuneDataSource.from_config(local)
            metrics = evaluate_only(local, data, reporter=reporter, device=device)
        except ValueError as err:
            raise UserError(f"evaluation of run {from_run} failed: {err}") from None
    if not metrics:
        raise UserError(f"{job.name}: the validation split at {job.data.val_url} has no batches")

    # MLflow writes "View run ... at" lines to stdout; the CLI's stdout carries only the metrics.
    with contextlib.redirect_stdout(sys.stderr):
        run_id = _record(job, staged, from_run, metrics, reporter.images, described, uri)
    return EvalResult(run_id=run_id, parent_run_id=from_run, metrics=metrics, weights=described)


def _record(job: JobSpec, staged: JobSpec, from_run: str, metrics: dict[str, float], images: list,
            described: str, uri: str) -> str:
    """A finished MLflow run in EVAL_EXPERIMENT holding the metrics, the figure and the resolved job."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from orchestrator.spec import render

    client = MlflowClient(tracking_uri=uri)
    exp_id = tracking.ensure_experiment(client, EVAL_EXPERIMENT)
    key = f"eval-{job.name}-{from_run[:8]}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    tags = {**staged.tracking.tags, "mmae.run_key": key, "mmae.stage": "eval", "mmae.job_name": job.name,
            "mmae.config_hash": tracking.config_hash(staged), "mmae.launch": "local"}
    run = client.create_run(exp_id, run_name=f"eval-{tracking.run_name(staged)}", tags=tags)
    run_id = run.info.run_id
    try:
        params = [Param(k, v) for k, v in tracking.flat_params(staged).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100], synchronous=True)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"val/{k}", float(v), now, 0) for k, v in metrics.items()],
                         tags=[RunTag("mmae.weights", described[:5000])], synchronous=True)
        client.log_text(run_id, render(staged), tracking.RESOLVED_JOB_ARTIFACT)
        for step, image_key, image in images:
            client.log_image(run_id, image, key=image_key, step=step, synchronous=True)
    except BaseException as err:
        tracking.mark_failed(run_id, err, client=client)
        raise
    tracking.mark_finished(run_id, client=client)
    return run_id
