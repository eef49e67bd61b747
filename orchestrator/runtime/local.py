"""Local mode: `mmae launch JOB --local` runs the cluster code path on this machine.

It joins the Ray cluster in ``RAY_ADDRESS`` or starts a local one, runs the same Ray Train job as a cloud launch
(at least one real worker, so checkpoints persist and resume), tracks it in MLflow — by default a SQLite store in
``./.mmae/`` — and ends with a summary line: the run id and the command that opens it in the MLflow UI.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.runtime.entry import Scaling, forwarded_env, init_ray, run_training

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

logger = logging.getLogger(__name__)

__all__ = ["LOCAL_DIR", "default_tracking", "local_scaling", "open_command", "run_local", "worker_threads_env"]

LOCAL_DIR = ".mmae"
"""Project-local folder of local mode: the MLflow SQLite store and its artifacts."""


def default_tracking(cwd: Path | None = None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments): ``MLFLOW_TRACKING_URI`` when set, else a SQLite
    store ``<cwd>/.mmae/mlflow.db`` with artifacts in ``<cwd>/.mmae/mlartifacts`` (MLflow 3.17 refuses the old
    ``./mlruns`` file store, and SQLite would otherwise put artifacts in ``./mlruns``)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    root = (cwd or Path.cwd()).resolve() / LOCAL_DIR
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()


def local_scaling(job: JobSpec, *, gpus: float, cpus: float) -> Scaling:
    """One worker by default (``resources.max_workers`` and ``resources.min_workers`` override), on the GPU when
    the cluster has one, else on the CPU."""
    use_gpu = gpus >= 1
    high = job.resources.max_workers or 1
    low = min(job.resources.min_workers or high, high)
    if use_gpu:
        high, low = min(high, int(gpus)), min(low, int(gpus))
    cpus_per_worker = min(job.resources.cpus_per_worker, max(cpus / high, 0.1)) if cpus else 1.0
    return Scaling(min_workers=low, max_workers=high, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker)


def worker_threads_env(scaling: Scaling, *, cpus: float) -> dict[str, str]:
    """``OMP_NUM_THREADS`` for local CPU workers: this machine's cores split evenly over the workers.

    Ray sets a worker's thread count to the CPUs it reserves (``resources.cpus_per_worker``, 1 by default, kept so
    that Ray Data ingest has CPUs to schedule on), which on a laptop leaves the other cores idle: one CPU worker on 2
    cores trained at about half the speed of the same step in a plain process (bench/train_step.py --mode ray).
    Empty on GPU workers and when the user set ``OMP_NUM_THREADS`` (which Ray and this respect).
    """
    if scaling.use_gpu or "OMP_NUM_THREADS" in os.environ:
        return {}
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    if cpus:
        cores = min(cores, int(cpus))
    return {"OMP_NUM_THREADS": str(max(1, cores // max(scaling.max_workers, 1)))}


def open_command(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """What opens the run: ``mlflow ui --backend-store-uri ...`` for a local store, the run's URL for a server."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def _echo(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def run_local(job: JobSpec, *, fresh: bool = False) -> str:
    """Run ``job`` on this machine through Ray Train and return the MLflow run id.

    Relaunching the same job resumes its run (same MLflow run, latest checkpoint); ``fresh`` starts a new run.
    """
    import ray

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # start/stop chatter under the bar
    tracking_uri, artifact_location = default_tracking()
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # A local cluster without token auth (Ray >= 2.59 would otherwise enable it for later `ray start`s).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    debug = bool(os.environ.get("MMAE_DEBUG"))
    started = init_ray(address, env_vars=forwarded_env({"MLFLOW_TRACKING_URI": tracking_uri}),
                       log_to_driver=debug)
    try:
        resources = ray.cluster_resources()
        scaling = local_scaling(job, gpus=resources.get("GPU", 0.0), cpus=resources.get("CPU", 0.0))
        result = run_training(job, scaling=scaling, fresh=fresh, launch="local", tracking_uri=tracking_uri,
                              artifact_location=artifact_location, progress=True, echo=_echo,
                              worker_env=worker_threads_env(scaling, cpus=resources.get("CPU", 0.0)))
    finally:
        if started:
            ray.shutdown()
    _echo(f"MLflow run {result.run_id} (run key {result.run_key}, step {result.final_step}); to open it: "
          f"{open_command(result.tracking_uri, result.experiment_id, result.run_id)}")
    return result.run_id
