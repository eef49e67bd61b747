"""Ray Data ingest of shard folders into Ray Train workers.

Pipeline (one streaming execution per epoch): `read_binary_files` over the tar shards, with the shard order
reshuffled every execution from the job seed (`FileShuffleConfig(seed, reseed_after_execution=True)`) ->
`flat_map` verifies each shard's sha256 against the manifest and splits it into raw sample records -> `map_batches`
decodes and jointly augments them on CPU with the same `SampleProcessor` as the plain PyTorch loader (augmentation
seeded by (seed, execution index, sample id)) -> Ray Train's `streaming_split(world_size, equal=True)` hands every
worker an equal share -> `iter_torch_batches(drop_last=True, local_shuffle_buffer_size=...)` in each worker.

Coverage: each execution reads every shard once and streaming_split gives each row to exactly one worker, so every
sample is seen once per epoch (minus fewer than world_size rows that equal=True drops, and the partial last batch
per worker). The split is rebuilt whenever Ray Train (re)starts the worker group, so this holds for any number of
workers, also when it changes between epochs. When a restart happens inside an epoch, the loop's `skip` drops that
many batches of the restarted epoch (with another world size, as many samples in all); that is approximate: the
restarted execution streams samples in another order, so some of the epoch may be repeated or left out.
Validation reads the val folder with the plain loader (deterministic, every sample, same on every ingest path).

Select it with `data.ingest: ray` in the job (`--set data.ingest=ray`; default `loader`, the plain PyTorch loader,
which is bit-reproducible and resumes inside an epoch without decoding the skipped batches).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from multimae_core.data.shards import (
    Manifest,
    ShardDataError,
    check_shard_bytes,
    iter_records,
    open_folder,
    read_manifest,
)
from multimae_core.data.transforms import JointTransform, SampleProcessor, collate_numpy

if TYPE_CHECKING:
    import ray.data
    import torch

    from orchestrator.spec import JobSpec

__all__ = ["RayDataSource", "build_dataset", "trainer_datasets", "use_ray_ingest", "worker_data_source"]

logger = logging.getLogger(__name__)

"""Environment variable choosing the training ingest under Ray Train: `loader` (default) or `ray`."""
SAMPLE_ID = "sample_id"
"""Column carrying each sample's index in manifest order (for coverage checks); dropped from training batches."""


def _explode(row: dict[str, Any], *, infos: Mapping[str, Any], first_ids: Mapping[str, int],
             verify: bool) -> list[dict[str, Any]]:
    """One tar shard (a row of read_binary_files) -> one row per sample with its raw files."""
    name = str(row["path"]).rsplit("/", 1)[-1]
    data = row["bytes"]
    info = infos[name]
    if verify:
        check_shard_bytes(info, data)
    rows = [{"key": key, "shard": name, SAMPLE_ID: first_ids[name] + pos, "suffixes": list(files),
             "blobs": list(files.values())} for pos, (key, files) in enumerate(iter_records(data, name))]
    if len(rows) != info.num_samples:
        raise ShardDataError(name, None, f"holds {len(rows)} samples, the manifest says {info.num_samples}")
    return rows


def _empty_like(manifest: Manifest, modalities: Sequence[str], out_hw: tuple[int, int],
                with_cls: bool) -> dict[str, np.ndarray]:
    from multimae_core.modalities import get_modality

    out: dict[str, np.ndarray] = {}
    for m in modalities:
        spec = get_modality(m)
        h, w = out_hw[0] // spec.stride_level, out_hw[1] // spec.stride_level
        if spec.kind == "dense_classes":
            out[m] = np.zeros((0, h, w), np.int64)
        else:
            out[m] = np.zeros((0, spec.num_channels, h, w), np.float32)
    if with_cls:
        out["cls"] = np.zeros((0,), np.int64)
    return out


def _decode_batch(batch: dict[str, np.ndarray], *, manifest: Manifest, modalities: Sequence[str],
                  image_size: int, train: bool, crop_scale: tuple[float, float], hflip: float, seed: int,
                  skip_bad: bool) -> dict[str, np.ndarray]:
    """Raw records -> decoded, jointly augmented, normalised arrays (the plain loader's SampleProcessor)."""
    from ray.data import DataContext

    epoch = int(getattr(DataContext.get_current(), "_execution_idx", 0))
    processor = SampleProcessor(manifest, modalities, JointTransform(image_size, train=train, scale=crop_scale,
                                                                      hflip=hflip),
                                with_cls=manifest.has_cls, seed=seed, skip_bad=skip_bad)
    samples, ids = [], []
    for i in range(len(batch["key"])):
        files = dict(zip((str(s) for s in batch["suffixes"][i]), (bytes(b) for b in batch["blobs"][i]),
                         strict=True))
        sample = processor(str(batch["key"][i]), files, shard=str(batch["shard"][i]),
                           sample_id=int(batch[SAMPLE_ID][i]), epoch=epoch)
        if sample is not None:
            samples.append(sample)
            ids.append(int(batch[SAMPLE_ID][i]))
    if not samples:
        out = _empty_like(manifest, modalities, processor.transform.out_hw, manifest.has_cls)
    else:
        out = collate_numpy(samples)
    out[SAMPLE_ID] = np.asarray(ids, dtype=np.int64)
    return out


def build_dataset(url: str, *, modalities: Sequence[str] | None = None, image_size: int = 224, seed: int = 0,
                  train: bool = True, crop_scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5,
                  skip_bad: bool = False, verify: bool = True, decode_batch_size: int = 32,
                  storage_options: Mapping[str, Any] | None = None) -> ray.data.Dataset:
    """A Ray Dataset of decoded, augmented samples of the shard folder at `url` (columns: one per modality, `cls`
    when the shards carry labels, and `sample_id`)."""
    import ray.data

    manifest = read_manifest(url, storage_options=storage_options)
    mods = tuple(modalities) if modalities is not None else manifest.modalities
    missing = [m for m in mods if m not in manifest.modalities]
    if missing:
        raise ValueError(f"{url}: shards hold modalities {list(manifest.modalities)}, missing {missing}")
    fs, root = open_folder(url, storage_options)
    paths = [f"{root}/{s.name}" for s in manifest.shards]
    first_ids = dict(zip((s.name for s in manifest.shards),
                         np.cumsum([0] + [s.num_samples for s in manifest.shards])[:-1].tolist(), strict=True))
    shuffle = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True) if train else None
    # Local folders go to Ray's own filesystem; any other fsspec filesystem (s3fs, gcsfs, ...) is handed over and
    # Ray wraps it for pyarrow (PyFileSystem(FSSpecHandler(fs))). Tasks unpickle it, so credentials must come from
    # storage_options or the workers' environment. memory:// is per process and cannot be read by Ray workers.
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    filesystem = None if "file" in protocols else fs
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=filesystem, shuffle=shuffle,
                                    override_num_blocks=len(paths))
    ds = ds.flat_map(_explode, fn_kwargs={"infos": {s.name: s for s in manifest.shards}, "first_ids": first_ids,
                                          "verify": verify})
    return ds.map_batches(
        _decode_batch, batch_size=decode_batch_size, batch_format="numpy",
        fn_kwargs={"manifest": manifest, "modalities": mods, "image_size": image_size, "train": train,
                   "crop_scale": tuple(crop_scale), "hflip": hflip, "seed": seed, "skip_bad": skip_bad},
    )


def _job_modalities(job: JobSpec) -> list[str]:
    from multimae_core.modalities import get_modality

    return list(dict.fromkeys([*job.modalities.inputs,
                               *(get_modality(o).target_name for o in job.modalities.outputs)]))


def use_ray_ingest(job: JobSpec) -> bool:
    """Whether the job streams its pretraining train split through Ray Data (`data.ingest: ray`)."""
    return job.stage == "pretrain" and job.data.ingest == "ray"


def trainer_datasets(job: JobSpec) -> dict[str, Any]:
    """`TorchTrainer` keyword arguments for Ray Data ingest of the train split, or {} for the plain loader."""
    if not use_ray_ingest(job):
        return {}
    import ray.train

    ds = build_dataset(job.data.train_url, modalities=_job_modalities(job), image_size=job.model.image_size,
                       seed=job.train.seed, train=True, crop_scale=job.data.crop_scale, hflip=job.data.hflip)
    return {"datasets": {"train": ds}, "dataset_config": ray.train.DataConfig(datasets_to_split=["train"])}


class RayDataSource:
    """DataSource of one Ray Train worker: train batches from its Ray Data shard, val from the plain loader.

    Train batches hold exactly `batch_size` samples (drop_last); `skip` consumes and discards batches.
    """

    def __init__(self, shard, *, batch_size: int, num_train_samples: int, world_size: int, val=None,
                 shuffle_buffer: int = 0, seed: int = 0, prefetch_batches: int = 2, keep_sample_ids: bool = False):
        self.shard, self.batch_size, self.val, self.keep_sample_ids = shard, batch_size, val, keep_sample_ids
        self.num_train_samples, self.world_size = num_train_samples, world_size
        self.shuffle_buffer, self.seed, self.prefetch_batches = shuffle_buffer, seed, prefetch_batches

    def num_batches(self, split: str = "train") -> int | None:
        if split == "train":
            return self.num_train_samples // self.world_size // self.batch_size
        return self.val.num_batches(split) if self.val is not None else 0

    def epoch_batches(self, epoch: int, *, split: str = "train", skip: int = 0,
                      skip_world_size: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """`skip` batches per worker of `skip_world_size` workers were consumed: this worker discards its share of
        as many samples (approximate: the resplit stream is not the one the old workers read)."""
        if split != "train":
            if self.val is not None:
                yield from self.val.epoch_batches(epoch, split=split, skip=skip, skip_world_size=skip_world_size)
            return
        if skip_world_size is not None:
            skip = skip * skip_world_size // self.world_size
        if skip:
            logger.info("resuming inside epoch %d: discarding %d already used batches", epoch, skip)
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size, drop_last=True, prefetch_batches=self.prefetch_batches,
            local_shuffle_buffer_size=self.shuffle_buffer or None,
            local_shuffle_seed=(self.seed * 1_000_003 + epoch) if self.shuffle_buffer else None,
        )
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            if not self.keep_sample_ids:
                batch.pop(SAMPLE_ID, None)
            yield batch


def worker_data_source(job: JobSpec, *, rank: int, world_size: int) -> RayDataSource:
    """The DataSource a Ray Train worker builds when the trainer was given `trainer_datasets(job)`."""
    import ray.train

    from multimae_core.data.loader import ShardDataSource

    val = None
    if job.data.val_url:
        val = ShardDataSource({"val": job.data.val_url}, per_worker_batch_size=job.train.per_worker_batch_size,
                              image_size=job.model.image_size, modalities=_job_modalities(job), rank=rank,
                              world_size=world_size, seed=job.train.seed, num_workers=0)
    return RayDataSource(
        ray.train.get_dataset_shard("train"), batch_size=job.train.per_worker_batch_size,
        num_train_samples=read_manifest(job.data.train_url).num_samples, world_size=world_size, val=val,
        shuffle_buffer=job.data.shuffle_buffer, seed=job.train.seed,
    )
