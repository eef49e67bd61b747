"""What each Ray Train worker runs: rebuild the job, pick the device, build the data source, call `fit`.

`train_fn` is the ``train_loop_per_worker`` of the `TorchTrainer` built in `orchestrator.runtime.entry`. Ray Train
has already created the process group (gloo on CPU, NCCL on GPU); `multimae_core.training` reuses it. On a restart
(worker failure, resize, relaunch) the function starts again and `fit` resumes from the checkpoint that
`RayReporter.latest_checkpoint` hands it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multimae_core.training.reporting import DataSource
    from orchestrator.spec import JobSpec

logger = logging.getLogger(__name__)

__all__ = ["build_data_source", "train_fn", "trainer_datasets"]


def trainer_datasets(job: JobSpec) -> dict[str, Any]:
    """Extra `TorchTrainer` keyword arguments for Ray Data ingest (``datasets=...``), or {} for the shard loader.

    Uses ``orchestrator.runtime.ingest.trainer_datasets(job)`` when the ingest module provides it; workers then read
    their shard with ``ray.train.get_dataset_shard`` (see `build_data_source`). Fine-tuning always uses the shard
    loader (its batches carry the task targets).
    """
    if job.stage == "finetune":
        return {}
    try:
        from orchestrator.runtime import ingest
    except ImportError:
        return {}
    make = getattr(ingest, "trainer_datasets", None)
    return dict(make(job)) if make is not None else {}


def build_data_source(job: JobSpec, *, rank: int, world_size: int) -> DataSource:
    """This worker's `DataSource`: the Ray Data shard when the trainer was given datasets, else the plain shard
    loader over ``data.train_url`` / ``data.val_url`` split by world rank (with the task targets when fine-tuning)."""
    import ray.train

    if job.stage == "finetune":
        from multimae_core.data.tasks import FinetuneDataSource

        return FinetuneDataSource.from_config(job, rank=rank, world_size=world_size)

    try:
        shard = ray.train.get_dataset_shard("train")
    except (KeyError, ValueError, RuntimeError):
        shard = None
    if shard is not None:
        from orchestrator.runtime import ingest

        return ingest.worker_data_source(job, rank=rank, world_size=world_size)
    from multimae_core.data.loader import ShardDataSource

    return ShardDataSource.from_config(job, rank=rank, world_size=world_size)


def train_fn(config: dict[str, Any]) -> None:
    """Ray Train worker entry. ``config``: ``job`` (JobSpec as JSON data), ``run_id``, ``run_key``,
    ``tracking_uri``, ``storage_url`` and ``progress`` (driver's progress actor or None)."""
    import ray.train
    import ray.train.torch

    from multimae_core.training.loop import fit
    from orchestrator.runtime.reporter import RayReporter
    from orchestrator.spec import JobSpec

    job = JobSpec.model_validate(config["job"])
    init_dir = None
    if job.init.checkpoint_url is not None and ray.train.get_checkpoint() is None:
        # A fresh run starts from init.checkpoint_url; MLflow artifact URIs are fetched here (a resumed run reads its
        # own checkpoint instead and never needs them).
        import tempfile

        from orchestrator.runtime.pretrained import localize_init

        init_dir = tempfile.TemporaryDirectory(prefix="mmae-init-")
        job = localize_init(job, init_dir.name, uri=config.get("tracking_uri"))
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if rank == 0:
        logger.info("run %s: %d worker(s) on %s", config.get("run_key"), world_size, device)
    data = build_data_source(job, rank=rank, world_size=world_size)
    reporter = RayReporter(run_id=config.get("run_id"), tracking_uri=config.get("tracking_uri"),
                           run_key=config.get("run_key", ""), storage_url=config.get("storage_url", ""),
                           progress=config.get("progress"))
    try:
        fit(job, reporter, data, device=device)
    finally:
        reporter.close()
        if init_dir is not None:
            init_dir.cleanup()
