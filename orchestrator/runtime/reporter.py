"""The `Reporter` that `multimae_core.training.fit` talks to inside a Ray Train worker.

* Checkpoints go through `ray.train.report` (a barrier: every rank calls it once per checkpoint; rank 0 hands over
  the directory, the others None), so Ray Train persists them to ``checkpoint.storage_url`` and restores the latest
  one on restart, resize or relaunch. Rank 0 goes on only once Ray Train has registered the checkpoint, so a failure
  after it never resumes from an older one.
* Metrics, images and checkpoint tags go to MLflow from rank 0 only, with a plain `MlflowClient` on the run id the
  driver created. They are buffered and sent by a background thread, so the training step never waits on the
  tracking server (a checkpoint flushes the buffer before Ray Train registers it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["MlflowLogger", "RayReporter", "checkpoint_dir_name"]

RUN_INFO_FILE = "mmae_run.json"
_MAX_METRICS_PER_BATCH = 1000


def checkpoint_dir_name(step: int) -> str:
    """Folder name of the checkpoint at ``step``: sortable by step, unique per write (a checkpoint rewritten after a
    restart never lands in a folder Ray Train already tracks)."""
    return f"checkpoint_{step:09d}_{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}_{int(time.time() * 1e3) % 1000:03d}"


class MlflowLogger:
    """Asynchronous MLflow writer for one run: metrics, tags and images are queued and sent by a daemon thread.

    Failures to reach the tracking server are logged as warnings and the data is dropped: tracking never stops
    training.
    """

    def __init__(self, run_id: str, tracking_uri: str | None = None, *, flush_interval_s: float = 2.0):
        from mlflow import MlflowClient

        self.run_id = run_id
        self._client = MlflowClient(tracking_uri)
        self._interval = flush_interval_s
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: list[tuple[str, Any]] = []
        self._submitted = 0
        self._done = 0
        self._closed = False
        self._flush_requested = False
        self._thread = threading.Thread(target=self._loop, name="mmae-mlflow", daemon=True)
        self._thread.start()

    def _put(self, kind: str, payload: Any) -> None:
        with self._cond:
            if self._closed:
                return
            self._pending.append((kind, payload))
            self._submitted += 1

    def metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, int(step)) for k, v in metrics.items() if _is_number(v)]
        if items:
            self._put("metrics", items)

    def tags(self, tags: Mapping[str, str]) -> None:
        self._put("tags", dict(tags))

    def image(self, step: int, key: str, image: np.ndarray) -> None:
        self._put("image", (int(step), key, np.asarray(image)))

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Send everything queued so far; True when it went out (or was dropped after an error) within ``timeout``."""
        with self._cond:
            target = self._submitted
            self._flush_requested = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._done >= target, timeout=timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Flush, then stop the sender thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._cond:
                # Wake up every interval (sending what piled up meanwhile), at once on flush and close.
                self._cond.wait_for(lambda: self._closed or self._flush_requested, timeout=self._interval)
                self._flush_requested = False
                batch, self._pending = self._pending, []
                if not batch:
                    if self._closed:
                        return
                    continue
            self._send(batch)
            with self._cond:
                self._done += len(batch)
                self._cond.notify_all()

    def _send(self, batch: list[tuple[str, Any]]) -> None:
        from mlflow.entities import RunTag

        metrics = [m for kind, payload in batch if kind == "metrics" for m in payload]
        tags = {}
        for kind, payload in batch:
            if kind == "tags":
                tags.update(payload)
        try:
            for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=metrics[i:i + _MAX_METRICS_PER_BATCH], synchronous=True)
            if tags:
                self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()],
                                       synchronous=True)
        except Exception as err:  # noqa: BLE001 - tracking must not stop training
            logger.warning("could not log %d metrics / %d tags to MLflow run %s: %s", len(metrics), len(tags),
                           self.run_id, err)
        for kind, payload in batch:
            if kind != "image":
                continue
            step, key, image = payload
            try:
                self._client.log_image(self.run_id, image, key=key, step=step, synchronous=True)
            except Exception as err:  # noqa: BLE001
                logger.warning("could not log image %r at step %d to MLflow run %s: %s", key, step, self.run_id, err)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class RayReporter:
    """`multimae_core.training.Reporter` on Ray Train V2 + MLflow.

    Every rank constructs one; only rank 0 talks to MLflow (``run_id`` is None disables MLflow entirely).
    ``progress`` is an optional Ray actor handle with an ``update(step, metrics)`` method that the driver polls for
    its progress bar.
    """

    def __init__(self, *, run_id: str | None, tracking_uri: str | None = None, run_key: str = "",
                 storage_url: str = "", progress: Any = None, flush_interval_s: float = 2.0):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.run_id = run_id
        self.run_key = run_key
        self.storage_url = storage_url.rstrip("/")
        self._progress = progress if self.rank == 0 else None
        self._last: dict[str, float] = {}
        self._mlflow = (MlflowLogger(run_id, tracking_uri, flush_interval_s=flush_interval_s)
                        if run_id and self.rank == 0 else None)

    # -- Reporter protocol -------------------------------------------------------------------------------------
    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        values = {str(k): float(v) for k, v in metrics.items() if _is_number(v)}
        self._last.update(values)  # train and val metrics of a step arrive in separate calls
        if self.rank != 0:
            return
        if self._mlflow is not None:
            self._mlflow.metrics(step, values)
        if self._progress is not None:
            try:
                self._progress.update.remote(int(step), values)
            except Exception as err:  # noqa: BLE001 - the progress bar is cosmetic
                logger.debug("progress update failed: %s", err)
                self._progress = None

    def log_image(self, step: int, key: str, image_HW3_uint8: np.ndarray) -> None:
        if self.rank == 0 and self._mlflow is not None:
            self._mlflow.image(step, key, image_HW3_uint8)

    def save_checkpoint(self, step: int, write: Callable[[str], None]) -> None:
        """Persist a checkpoint through Ray Train (a barrier: every rank calls this at the same steps).

        ``write`` gets a path that does not exist yet; on rank 0 it creates the checkpoint folder there, elsewhere it
        creates nothing and this rank reports no checkpoint.
        """
        import ray.train

        metrics = {"step": int(step), **self._last}
        if self._mlflow is not None:
            # Metrics up to this step go out before the checkpoint counts: a restart resumes after this step and never
            # logs them again, and Ray Train may stop the workers right after registering it (elastic resize).
            self._mlflow.flush(timeout=30)
        parent = tempfile.mkdtemp(prefix="mmae-ckpt-")
        path = os.path.join(parent, "checkpoint")
        name = checkpoint_dir_name(step)
        try:
            write(path)
            checkpoint = None
            if os.path.isdir(path):
                info = {"run_id": self.run_id, "run_key": self.run_key, "step": int(step),
                        "world_size": self.world_size}
                with open(os.path.join(path, RUN_INFO_FILE), "w") as f:
                    json.dump(info, f)
                checkpoint = ray.train.Checkpoint.from_directory(path)
            # Rank 0's folder name is broadcast to all ranks by Ray Train.
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        finally:
            shutil.rmtree(parent, ignore_errors=True)
        if checkpoint is not None:
            # `report` returns once the checkpoint is uploaded, but Ray Train registers it (the run snapshot a restart
            # resumes from) only when the controller next polls the workers, up to one health-check interval later; a
            # worker dying meanwhile would send the restart back to the checkpoint before. Waiting here makes every
            # checkpoint count before training goes on; the other ranks wait for rank 0 in their next collective.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if self._mlflow is not None and checkpoint is not None:
            uri = f"{self.storage_url}/{self.run_key}/{name}" if self.storage_url else name
            self._mlflow.tags({"mmae.checkpoint_uri": uri, "mmae.checkpoint_step": str(int(step))})
            self._mlflow.flush(timeout=30)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield path

    def should_stop(self) -> bool:
        return False

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Send what is still queued to MLflow."""
        if self._mlflow is not None:
            self._mlflow.close()
