"""The Ray Train driver: ``python -m orchestrator.runtime.entry --job resolved_job.yaml [--fresh]``.

It runs where the Ray cluster's head is (the SkyPilot head node, or the laptop through `orchestrator.runtime.local`):

1. resolves the run key (`tracking.resolve_run_key`) and creates or reopens the MLflow run *before* any worker
   starts (params, tags, the resolved job), and enables system metrics for the driver's node;
2. says whether the run resumes and from which step (read from Ray Train's checkpoint snapshot in storage);
3. runs a `TorchTrainer` whose workers run `orchestrator.runtime.worker.train_fn`, with the run key as the Ray Train
   run name under ``checkpoint.storage_url``, so restarts, resizes and relaunches find the same checkpoints;
4. logs the final weights as ``weights/final.safetensors`` and marks the run FINISHED (FAILED with the error as the
   tag ``mmae.error``, KILLED on Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.runtime import tracking

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

logger = logging.getLogger(__name__)

__all__ = ["LaunchResult", "Scaling", "forwarded_env", "init_ray", "main", "run_training", "storage_path"]

# Environment passed on to the Ray Train controller and workers (object-store credentials, tracking server, ...).
# Values are never logged.
_FORWARD_PREFIXES = ("AWS_", "MLFLOW_", "MMAE_", "FSSPEC_", "AZURE_STORAGE_", "GOOGLE_APPLICATION_CREDENTIALS",
                     "HF_HOME", "HF_HUB_OFFLINE")
_NOT_FORWARDED = ("MLFLOW_RUN_ID",)
_SNAPSHOT = "checkpoint_manager_snapshot.json"
MODEL_FILE = "model.safetensors"


def forwarded_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables the workers need from the launching process (values are never logged)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARD_PREFIXES) and k not in _NOT_FORWARDED}
    env.update(extra or {})
    return env


def init_ray(address: str | None, *, env_vars: Mapping[str, str], log_to_driver: bool = True) -> bool:
    """Connect to the Ray cluster at ``address`` (None: the one ``RAY_ADDRESS`` names or a new local one).

    ``env_vars`` become the job's runtime environment, so the Train controller (which opens ``s3://`` storage) and
    every worker see them. Returns True when this call connected (the caller then shuts Ray down), False when Ray
    was already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, runtime_env={"env_vars": dict(env_vars)}, log_to_driver=log_to_driver,
             logging_level=logging.WARNING)
    return True


def _local_path(url: str | None) -> str | None:
    """Absolute form of a local relative path (workers run in another working directory); URLs unchanged."""
    if url is None or "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


def worker_job(job: JobSpec) -> JobSpec:
    """The job as workers get it: local data folders made absolute against the driver's working directory.

    Ray Train starts workers in their own working directory, so ``data/synth/train`` must become an absolute path;
    the MLflow params keep the job as written.
    """
    data = job.data.model_copy(update={"train_url": _local_path(job.data.train_url),
                                       "val_url": _local_path(job.data.val_url)})
    checkpoint = job.checkpoint.model_copy(update={"storage_url": storage_path(job.checkpoint.storage_url)})
    return job.model_copy(update={"data": data, "checkpoint": checkpoint})


def storage_path(url: str) -> str:
    """Ray Train ``storage_path`` for ``checkpoint.storage_url``: URLs unchanged, local folders absolute."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url:
        return url.rstrip("/")
    return str(Path(url).expanduser().resolve())


@dataclass(frozen=True)
class Scaling:
    """Ray Train worker group: a fixed count or elastic (min, max) bounds, and what each worker reserves."""

    min_workers: int
    max_workers: int
    use_gpu: bool
    cpus_per_worker: float = 1.0
    resize_interval_s: float | None = None
    """How often an elastic run checks whether more workers fit (Ray Train's default, 60 s, when None)."""

    def scaling_config(self):
        import ray.train

        elastic = self.min_workers != self.max_workers
        workers: int | tuple[int, int] = (self.min_workers, self.max_workers) if elastic else self.max_workers
        resources: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = 1
        extra = {"elastic_resize_monitor_interval_s": self.resize_interval_s} if elastic and self.resize_interval_s \
            else {}
        return ray.train.ScalingConfig(num_workers=workers, use_gpu=self.use_gpu, resources_per_worker=resources,
                                       **extra)

    def describe(self) -> str:
        fixed = self.min_workers == self.max_workers
        count = str(self.max_workers) if fixed else f"{self.min_workers}-{self.max_workers}"
        return f"{count} {'GPU' if self.use_gpu else 'CPU'} worker{'' if self.max_workers == 1 else 's'}"


def cluster_scaling(job: JobSpec) -> Scaling:
    """Workers from ``job.resources``: GPU workers when the job asks for accelerators, else CPU workers."""
    low, high = job.resources.worker_bounds
    return Scaling(min_workers=low, max_workers=high, use_gpu=bool(job.resources.accelerators),
                   cpus_per_worker=job.resources.cpus_per_worker)


def stored_checkpoint(storage: str, run_key: str) -> tuple[int | None, str] | None:
    """(step, URI) of the newest checkpoint Ray Train recorded for ``run_key`` under ``storage``, or None.

    Reads Ray Train's run snapshot (``<storage>/<run_key>/checkpoint_manager_snapshot.json``), the file the
    controller restores from, so what this says is what the workers will resume from.
    """
    import pyarrow.fs

    try:
        fs, base = pyarrow.fs.FileSystem.from_uri(storage)
        with fs.open_input_stream(f"{base.rstrip('/')}/{run_key}/{_SNAPSHOT}") as f:
            snapshot = json.loads(f.read().decode())
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - only used for a message; Ray Train does the real restore
        logger.debug("cannot read the checkpoint snapshot of %s under %s: %s", run_key, storage, err)
        return None
    latest = snapshot.get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    if not name:
        return None
    step = (latest.get("metrics") or {}).get("step")
    return (int(step) if step is not None else None), f"{storage.rstrip('/')}/{run_key}/{name}"


@dataclass(frozen=True)
class LaunchResult:
    """What a finished launch leaves behind."""

    run_id: str
    run_key: str
    experiment_id: str
    tracking_uri: str
    resumed_from_step: int | None
    """Step of the checkpoint the run resumed from; None when it started from scratch."""
    final_step: int | None
    """Step of the last checkpoint (the final weights)."""
    checkpoint_uri: str | None


class _Progress:
    """Latest step and metrics, pushed by rank 0, polled by the driver's progress bar (a Ray actor)."""

    def __init__(self) -> None:
        self.step = 0
        self.metrics: dict[str, float] = {}

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if step >= self.step:
            self.step = step
            self.metrics.update(metrics)

    def get(self) -> tuple[int, dict[str, float]]:
        return self.step, self.metrics


class _ProgressBar:
    """A tqdm bar on stderr fed by polling the `_Progress` actor from a daemon thread."""

    def __init__(self, actor, *, total: int | None, initial: int, desc: str, interval_s: float = 0.5) -> None:
        from tqdm.auto import tqdm

        self._actor = actor
        tty = sys.stderr.isatty()
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True,
                         mininterval=0.1 if tty else 30.0)
        self._stop = threading.Event()
        self._interval = interval_s
        self._thread = threading.Thread(target=self._loop, name="mmae-progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import ray

        while not self._stop.wait(self._interval):
            try:
                step, metrics = ray.get(self._actor.get.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - cosmetic
                continue
            self._show(step, metrics)

    def _show(self, step: int, metrics: Mapping[str, float]) -> None:
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        shown = {"loss": f"{metrics['train/loss/total']:.4g}"} if "train/loss/total" in metrics else {}
        if "images_per_s" in metrics:
            shown["img/s"] = f"{metrics['images_per_s']:.3g}"
        if shown:
            self._bar.set_postfix(shown, refresh=False)

    def write(self, message: str) -> None:
        self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=15)
        try:
            self._show(*ray.get(self._actor.get.remote(), timeout=10))
        except Exception:  # noqa: BLE001
            pass
        self._bar.close()


def _system_metrics(job: JobSpec, tracked: tracking.TrackedRun):
    """Start MLflow's system metrics monitor for the driver's node on the run (None when disabled or unavailable)."""
    if not job.tracking.log_system_metrics:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(tracked.run_id, resume_logging=tracked.reused,
                                       tracking_uri=tracked.tracking_uri)
        monitor.start()
    except Exception as err:  # noqa: BLE001 - optional
        logger.warning("system metrics disabled: %s", err)
        return None
    return monitor


def _final_weights(result, run_id: str, client) -> str | None:
    """Log the latest checkpoint's model weights as ``weights/final.safetensors``; its artifact path, or None."""
    checkpoint = getattr(result, "checkpoint", None)
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        source = Path(path) / MODEL_FILE
        if not source.is_file():
            logger.warning("checkpoint %s has no %s; no final weights logged", checkpoint.path, MODEL_FILE)
            return None
        with tempfile.TemporaryDirectory(prefix="mmae-final-") as tmp:
            target = Path(tmp) / Path(tracking.FINAL_WEIGHTS_ARTIFACT).name
            shutil.copyfile(source, target)
            client.log_artifact(run_id, str(target), str(Path(tracking.FINAL_WEIGHTS_ARTIFACT).parent))
    client.set_tag(run_id, "mmae.final_weights", tracking.FINAL_WEIGHTS_ARTIFACT)
    return tracking.FINAL_WEIGHTS_ARTIFACT


def run_training(job: JobSpec, *, scaling: Scaling, fresh: bool = False, launch: str = "sky",
                 tracking_uri: str | None = None, artifact_location: str | None = None, progress: bool = False,
                 echo: Callable[[str], None] | None = None, worker_env: Mapping[str, str] | None = None,
                 ) -> LaunchResult:
    """Run one launch of ``job`` on the connected Ray cluster and return its MLflow run.

    Ray must be initialised (see `init_ray`); ``tracking_uri`` None takes MLflow's (``MLFLOW_TRACKING_URI``).
    ``artifact_location`` applies when the experiment is created here. ``echo`` receives the human-readable lines
    (resume or fresh start, the final step); ``progress`` shows a progress bar on stderr. ``worker_env``: extra
    environment variables of the Ray Train workers (e.g. ``OMP_NUM_THREADS``, see `local.worker_threads_env`).
    Raises what the training raised, after marking the run FAILED (KILLED on KeyboardInterrupt).
    """
    import ray
    import ray.train
    from mlflow import MlflowClient
    from ray.train.torch import TorchTrainer

    from orchestrator.runtime import worker

    say = echo or logger.info
    client = MlflowClient(tracking_uri)
    run_key = tracking.resolve_run_key(job, fresh=fresh)
    storage = storage_path(job.checkpoint.storage_url)
    tracked = tracking.open_run(job, run_key, launch=launch, artifact_location=artifact_location, client=client)
    stored = stored_checkpoint(storage, run_key)
    resumed_from = stored[0] if stored else None
    where = f"MLflow run {tracked.run_id} ({'reopened' if tracked.reused else 'new'}), run key {run_key}"
    if stored:
        say(f"Resuming from step {resumed_from if resumed_from is not None else '?'} (checkpoint {stored[1]}); "
            f"{where}")
    else:
        say(f"Starting from step 0 (no checkpoint under {storage}/{run_key}); {where}")
    say(f"Training on {scaling.describe()}")

    monitor = actor = bar = None
    status = "FAILED"
    try:
        job_for_workers = worker_job(job)
        monitor = _system_metrics(job, tracked)
        actor = ray.remote(num_cpus=0)(_Progress).remote()
        if progress:
            bar = _ProgressBar(actor, total=tracking.total_steps(job), initial=resumed_from or 0, desc=job.name)
            if echo is None:
                say = bar.write
        trainer = TorchTrainer(
            worker.train_fn,
            train_loop_config={
                "job": job_for_workers.model_dump(mode="json"),
                "run_id": tracked.run_id,
                "run_key": run_key,
                "tracking_uri": tracked.tracking_uri,
                "storage_url": storage,
                "progress": actor,
            },
            scaling_config=scaling.scaling_config(),
            run_config=ray.train.RunConfig(
                name=run_key,
                storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=job.resources.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.checkpoint.keep),
                worker_runtime_env={"env_vars": forwarded_env({"MLFLOW_TRACKING_URI": tracked.tracking_uri,
                                                               **(worker_env or {})})},
            ),
            **worker.trainer_datasets(job_for_workers),
        )
        result = trainer.fit()
        if bar is not None:
            bar.close()
            bar = None
        final_step = (result.metrics or {}).get("step")
        checkpoint_uri = stored[1] if stored else None
        if result.checkpoint is not None:
            checkpoint_uri = _checkpoint_uri(storage, run_key, result.checkpoint.path)
            client.set_tag(tracked.run_id, "mmae.checkpoint_uri", checkpoint_uri)
        weights = _final_weights(result, tracked.run_id, client)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit) as err:  # Ctrl-C (Ray Train's SIGINT handler exits with SystemExit)
        status = "KILLED"
        tracking.mark_failed(tracked.run_id, f"interrupted ({type(err).__name__})", status="KILLED", client=client)
        raise
    except BaseException as err:
        tracking.mark_failed(tracked.run_id, err, client=client)
        raise
    finally:
        if bar is not None:
            bar.close()
        if monitor is not None:
            try:
                monitor.finish()
            except Exception as err:  # noqa: BLE001
                logger.debug("system metrics monitor: %s", err)
        if actor is not None:
            ray.kill(actor, no_restart=True)
        if status != "FINISHED":
            say(f"Run {tracked.run_id} ({run_key}) ended {status}")
    tracking.mark_finished(tracked.run_id, client=client)
    say(f"Finished at step {final_step}; final weights {'logged as ' + weights if weights else 'not logged'}")
    return LaunchResult(run_id=tracked.run_id, run_key=run_key, experiment_id=tracked.experiment_id,
                        tracking_uri=tracked.tracking_uri, resumed_from_step=resumed_from,
                        final_step=int(final_step) if final_step is not None else None, checkpoint_uri=checkpoint_uri)


def _checkpoint_uri(storage: str, run_key: str, path: str) -> str:
    """URI of a persisted checkpoint: ``<storage>/<run_key>/<folder>`` (Ray's ``path`` drops the scheme)."""
    return f"{storage.rstrip('/')}/{run_key}/{Path(path).name}"


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.runtime.entry --job resolved_job.yaml [--fresh]`` (what a SkyPilot head runs)."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.runtime.entry", description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="resolved job YAML (mmae config render output)")
    parser.add_argument("--fresh", action="store_true", help="start a new run instead of resuming this job's run")
    parser.add_argument("--launch", default=os.environ.get("MMAE_LAUNCH", "sky"),
                        help="value of the mmae.launch tag (local | sky | sky-managed)")
    args = parser.parse_args(argv)
    # SkyPilot cancels with SIGTERM: unwind like Ctrl-C so the run is marked KILLED (and resumed on relaunch).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from orchestrator.errors import UserError
    from orchestrator.spec import load_job

    try:
        job = load_job(args.job)
    except UserError as err:
        logger.error("%s", err)
        return 2
    started = init_ray(os.environ.get("RAY_ADDRESS") or None, env_vars=forwarded_env())
    try:
        result = run_training(job, scaling=cluster_scaling(job), fresh=args.fresh, launch=args.launch,
                              progress=True)
    finally:
        if started:
            import ray

            ray.shutdown()
    logger.info("MLflow run %s (run key %s) finished at step %s", result.run_id, result.run_key, result.final_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
