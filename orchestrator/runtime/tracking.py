"""MLflow run identity and bookkeeping for training jobs (the driver side of the tracking contract).

A job's run is found again by its *run key* (tag ``mmae.run_key``): the same job relaunched with the same command
gets the same key, so the driver reopens the same MLflow run and Ray Train finds the same checkpoints under
``<checkpoint.storage_url>/<run_key>``. Everything here talks to MLflow through ``MlflowClient`` with explicit run
ids (no fluent active-run state), so it is safe to call from the driver while workers log to the same run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.spec import flatten, job_hash, render
from orchestrator.spec import run_name as spec_run_name

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from orchestrator.spec import JobSpec

logger = logging.getLogger(__name__)

__all__ = [
    "RESOLVED_JOB_ARTIFACT",
    "FINAL_WEIGHTS_ARTIFACT",
    "TrackedRun",
    "config_hash",
    "error_summary",
    "experiment_name",
    "flat_params",
    "mark_failed",
    "mark_finished",
    "open_run",
    "resolve_run_key",
    "run_name",
    "total_steps",
]

RESOLVED_JOB_ARTIFACT = "job/resolved_job.yaml"
FINAL_WEIGHTS_ARTIFACT = "weights/final.safetensors"

# Parameter names (last dotted component) that must never reach MLflow.
_SECRET = re.compile(r"(^|_)(secret|password|passwd|token|credentials?|api_?key|access_?key|private_?key)(_|$)",
                     re.IGNORECASE)
_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_UNFINISHED = ("RUNNING", "SCHEDULED", "FAILED", "KILLED")
_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
_MAX_ERROR_TAG = 4000


def config_hash(job: JobSpec) -> str:
    """Short hash of the resolved training config (`spec.job_hash`; resources and tracking left out)."""
    return job_hash(job)


def run_name(job: JobSpec) -> str:
    """MLflow run name: ``tracking.run_name`` or ``<job name>-<short config hash>``."""
    return spec_run_name(job)


def experiment_name(job: JobSpec) -> str:
    """``tracking.experiment``, else ``multimae/<stage>``."""
    return job.tracking.experiment or f"multimae/{job.stage}"


def _sanitize_key(key: str) -> str:
    key = _KEY_CHARS.sub("-", key).strip("-.")
    if not key:
        raise ValueError("run key is empty after removing characters other than letters, digits, '.', '_', '-'")
    return key[:120]


def resolve_run_key(job: JobSpec, *, fresh: bool = False, env: Mapping[str, str] | None = None) -> str:
    """The stable run key of a job launch.

    ``MMAE_RUN_KEY`` overrides; otherwise ``<job name>-<short config hash>``, plus a digest of ``SKYPILOT_TASK_ID`` on
    SkyPilot managed jobs (that id is stable across recoveries). ``fresh`` appends a new unique suffix, so the launch
    gets a new MLflow run and an empty checkpoint folder.
    """
    env = os.environ if env is None else env
    key = env.get("MMAE_RUN_KEY") or f"{job.name}-{job_hash(job)}"
    if not env.get("MMAE_RUN_KEY") and env.get("SKYPILOT_MANAGED_JOB_ID") and env.get("SKYPILOT_TASK_ID"):
        key += "-" + hashlib.sha256(env["SKYPILOT_TASK_ID"].encode()).hexdigest()[:8]
    if fresh:
        key += time.strftime("-%Y%m%dT%H%M%S", time.gmtime()) + secrets.token_hex(2)
    return _sanitize_key(key)


def flat_params(job: JobSpec) -> dict[str, str]:
    """MLflow params: `spec.flatten` (dotted keys as ``--set`` spells them), secret-looking names dropped."""
    out: dict[str, str] = {}
    for key, value in flatten(job).items():
        if _SECRET.search(key.rsplit(".", 1)[-1]):
            continue
        out[key] = value[:_MAX_PARAM_VALUE]
    return out


def total_steps(job: JobSpec) -> int | None:
    """Optimizer steps of the whole run: ``train.max_steps``, else ``train.epochs`` x the steps per epoch from the
    training shards' manifest (samples // global batch, as `fit` counts them); None when the manifest is
    unreadable."""
    if job.train.max_steps is not None:
        return job.train.max_steps
    try:
        from multimae_core.data.shards import read_manifest

        samples = read_manifest(job.data.train_url).num_samples
    except Exception as err:  # noqa: BLE001 - only a tag and a progress bar depend on it
        logger.debug("cannot count the training samples of %s: %s", job.data.train_url, err)
        return None
    return job.train.epochs * (samples // job.train.global_batch_size)


def ensure_experiment(client: MlflowClient, name: str, *, artifact_location: str | None = None) -> str:
    """Id of the experiment ``name``; created (with ``artifact_location`` if given) or restored when deleted."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created concurrently by another launcher
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def find_run(client: MlflowClient, experiment_id: str, run_key: str):
    """The run tagged with ``run_key``: the newest unfinished one, else the newest finished one, else None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mmae.run_key` = '{run_key}'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    if not runs:
        return None
    for run in runs:
        if run.info.status in _UNFINISHED:
            return run
    return runs[0]


def _launch_tags(job: JobSpec, run_key: str, *, launch: str) -> dict[str, str]:
    tags = {
        **job.tracking.tags,
        "mmae.run_key": run_key,
        "mmae.stage": job.stage,
        "mmae.job_name": job.name,
        "mmae.config_hash": config_hash(job),
        "mmae.launch": launch,
    }
    steps = total_steps(job)
    if steps is not None:
        tags["mmae.total_steps"] = str(steps)
    info = os.environ.get("SKYPILOT_CLUSTER_INFO")
    if info:
        try:
            tags["mmae.sky_cluster"] = str(json.loads(info).get("cluster_name", ""))
        except ValueError:
            pass
    job_id = os.environ.get("SKYPILOT_MANAGED_JOB_ID") or os.environ.get("SKYPILOT_INTERNAL_JOB_ID")
    if job_id:
        tags["mmae.sky_job_id"] = job_id
    return {k: v for k, v in tags.items() if v}


@dataclass(frozen=True)
class TrackedRun:
    """The MLflow run of a launch."""

    run_id: str
    run_key: str
    experiment_id: str
    tracking_uri: str
    reused: bool
    """True when an existing run with this key was reopened."""


def open_run(job: JobSpec, run_key: str, *, launch: str, artifact_location: str | None = None,
             client: MlflowClient | None = None) -> TrackedRun:
    """Create the run for ``run_key`` or reopen the existing one; log params, tags and the resolved job.

    Params that an existing run already holds with another value are left as they are (MLflow params are immutable)
    and a warning names them.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    client = client or MlflowClient()
    exp_id = ensure_experiment(client, experiment_name(job), artifact_location=artifact_location)
    existing = find_run(client, exp_id, run_key)
    tags = _launch_tags(job, run_key, launch=launch)
    params = flat_params(job)
    if existing is None:
        run = client.create_run(exp_id, tags=tags, run_name=run_name(job))
        run_id, reused = run.info.run_id, False
    else:
        run_id, reused = existing.info.run_id, True
        client.update_run(run_id, status="RUNNING")
        old = existing.data.params
        changed = sorted(k for k, v in params.items() if k in old and old[k] != v)
        if changed:
            logger.warning("run %s keeps its earlier values of params %s", run_id, ", ".join(changed))
        params = {k: v for k, v in params.items() if k not in old}
        if "mmae.error" in existing.data.tags:
            client.delete_tag(run_id, "mmae.error")
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100], synchronous=True)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
    client.log_text(run_id, render(job), RESOLVED_JOB_ARTIFACT)
    return TrackedRun(run_id=run_id, run_key=run_key, experiment_id=exp_id, tracking_uri=client.tracking_uri,
                      reused=reused)


def mark_finished(run_id: str, *, client: MlflowClient | None = None) -> None:
    from mlflow import MlflowClient

    (client or MlflowClient()).set_terminated(run_id, status="FINISHED")


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning)\b")


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if _EXC_LINE.match(last) else f"{type(error).__name__}: {last}".rstrip(": ")


def error_summary(error: BaseException | str) -> str:
    """One line per failure: the final line of each worker's traceback (Ray Train wraps them), else of the error."""
    if isinstance(error, str):
        return error
    failures = getattr(error, "worker_failures", None)
    if failures:
        return f"{type(error).__name__}: " + "; ".join(f"rank {rank}: {_last_line(exc)}"
                                                       for rank, exc in sorted(failures.items()))
    inner = getattr(error, "controller_failure", None)
    if isinstance(inner, BaseException):
        return f"{type(error).__name__}: {_last_line(inner)}"
    return _last_line(error)


def mark_failed(run_id: str, error: BaseException | str, *, status: str = "FAILED",
                client: MlflowClient | None = None) -> None:
    """Terminate the run as FAILED (or KILLED): the error's summary as the tag ``mmae.error``, its full text as the
    artifact ``error/traceback.txt``."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    try:
        client.set_tag(run_id, "mmae.error", error_summary(error)[:_MAX_ERROR_TAG] or status)
        if isinstance(error, BaseException):
            client.log_text(run_id, f"{type(error).__name__}: {error}", "error/traceback.txt")
    except Exception as err:  # noqa: BLE001 - the status below matters more
        logger.warning("could not record the error of run %s: %s", run_id, err)
    finally:
        client.set_terminated(run_id, status=status)
