"""Ray Data ingest on a local Ray cluster: every sample once per epoch, with 2 Ray Train workers and then 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from multimae_core.data.loader import ShardDataSource
from multimae_core.data.synth import write_synth

N, SIZE, BATCH = 24, 16, 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ray-data")
    urls = {"train": str(root / "train"), "val": str(root / "val")}
    write_synth(urls["train"], N, size=SIZE, seed=0, samples_per_shard=4, num_workers=1)
    write_synth(urls["val"], 8, size=SIZE, seed=1, samples_per_shard=4, num_workers=1)
    return urls


@pytest.fixture(scope="module")
def ray_session(ray_local):
    import sys

    import ray

    ray.init(address=ray_local, ignore_reinit_error=True)
    # Ray Train workers cannot import this test module; ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_dataset_epochs_cover_all_samples_and_share_the_torch_transform(ray_session, folders):
    from orchestrator.runtime.ingest import SAMPLE_ID, build_dataset

    ds = build_dataset(folders["train"], image_size=SIZE, seed=0)
    orders = []
    for _ in range(2):
        ids = [int(r[SAMPLE_ID]) for r in ds.select_columns([SAMPLE_ID]).iter_rows()]
        assert sorted(ids) == list(range(N))
        orders.append(ids)
    batch = ds.take_batch(4)
    assert batch["rgb"].shape == (4, 3, SIZE, SIZE) and batch["rgb"].dtype == np.float32
    assert batch["depth"].shape == (4, 1, SIZE, SIZE) and batch["normal"].shape == (4, 3, SIZE, SIZE)
    assert batch["semseg"].shape == (4, SIZE // 4, SIZE // 4) and batch["semseg"].dtype == np.int64
    assert batch["cls"].shape == (4,)
    np.testing.assert_allclose(np.median(batch["depth"].reshape(4, -1), axis=1), 0, atol=1.0)

    # Evaluation transform (no randomness): Ray's samples equal the plain loader's, sample by sample.
    ray_rows = {int(r[SAMPLE_ID]): r for r in build_dataset(folders["val"], image_size=SIZE, train=False).iter_rows()}
    torch_src = ShardDataSource({"val": folders["val"]}, per_worker_batch_size=8, image_size=SIZE)
    (torch_batch,) = list(torch_src.epoch_batches(0, split="val"))
    assert sorted(ray_rows) == list(range(8))
    for i in range(8):
        for key in ("rgb", "depth", "semseg", "normal", "cls"):
            np.testing.assert_array_equal(ray_rows[i][key], torch_batch[key][i].numpy(), err_msg=key)


def _train_fn(config):
    import ray.train

    from orchestrator.runtime.ingest import SAMPLE_ID, worker_data_source
    from orchestrator.spec import JobSpec

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    job = JobSpec.model_validate(config["job"])
    src = worker_data_source(job, rank=rank, world_size=world)
    src.keep_sample_ids = True
    for epoch in range(config["epochs"]):
        ids, sizes = [], []
        for batch in src.epoch_batches(epoch):
            ids += batch[SAMPLE_ID].tolist()
            sizes.append(len(batch["rgb"]))
            assert set(batch) == {"rgb", "depth", "semseg", "cls", SAMPLE_ID}, set(batch)
        val = [len(b["rgb"]) for b in src.epoch_batches(epoch, split="val")]
        out = Path(config["out"]) / f"{config['tag']}-e{epoch}-r{rank}.json"
        out.write_text(json.dumps({"ids": ids, "sizes": sizes, "val": val, "num_batches": src.num_batches()}))


def _job(folders, ingest="loader"):
    from orchestrator.spec import validate_job

    return validate_job({
        "name": "ingest",
        "model": {"preset": "tiny", "image_size": SIZE, "patch_size": 8},
        "modalities": {"inputs": ["rgb", "depth", "semseg"], "outputs": ["rgb"]},
        "masking": {"num_encoded_tokens": 4},
        "data": {"train_url": folders["train"], "val_url": folders["val"], "shuffle_buffer": 8, "ingest": ingest},
        "train": {"global_batch_size": BATCH, "per_worker_batch_size": BATCH, "seed": 3},
    })


def _fit(job, folders, tmp_path, *, workers: int, epochs: int, tag: str) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator.runtime.ingest import trainer_datasets

    kwargs = trainer_datasets(job)
    assert set(kwargs) == {"datasets", "dataset_config"}
    TorchTrainer(
        _train_fn,
        train_loop_config={"job": job.model_dump(mode="json"), "epochs": epochs, "out": str(tmp_path), "tag": tag},
        scaling_config=ray.train.ScalingConfig(num_workers=workers),
        run_config=ray.train.RunConfig(name=f"ingest-{tag}", storage_path=str(tmp_path / "results")),
        **kwargs,
    ).fit()


@pytest.mark.slow
def test_train_workers_see_every_sample_once_per_epoch_2_then_1(ray_session, folders, tmp_path):
    from orchestrator.runtime.ingest import trainer_datasets

    assert trainer_datasets(_job(folders)) == {}  # the plain loader unless asked for
    job = _job(folders, ingest="ray")
    assert set(trainer_datasets(job)) == {"datasets", "dataset_config"}
    _fit(job, folders, tmp_path, workers=2, epochs=2, tag="w2")
    _fit(job, folders, tmp_path, workers=1, epochs=1, tag="w1")

    def load(tag, epoch, rank):
        return json.loads((tmp_path / f"{tag}-e{epoch}-r{rank}.json").read_text())

    orders = []
    for epoch in range(2):
        r0, r1 = load("w2", epoch, 0), load("w2", epoch, 1)
        assert not set(r0["ids"]) & set(r1["ids"])
        assert sorted(r0["ids"] + r1["ids"]) == list(range(N)), epoch
        assert r0["sizes"] == r1["sizes"] == [BATCH] * (N // 2 // BATCH) and r0["num_batches"] == N // 2 // BATCH
        assert r0["val"] == r1["val"] == [4]  # 8 val samples over 2 ranks, plain loader
        orders.append(r0["ids"] + r1["ids"])
    assert orders[0] != orders[1]  # reshuffled per epoch
    one = load("w1", 0, 0)
    assert sorted(one["ids"]) == list(range(N)) and one["sizes"] == [BATCH] * (N // BATCH)
    assert one["val"] == [4, 4]


def test_dataset_streams_from_s3_through_an_fsspec_filesystem(ray_session, s3_endpoint, folders):
    import boto3

    from orchestrator.runtime.ingest import SAMPLE_ID, build_dataset

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="mmae-ray")
    url = "s3://mmae-ray/train"
    write_synth(url, N, size=SIZE, seed=0, samples_per_shard=4, num_workers=1)
    # The Ray workers were started without AWS_* in their environment: the filesystem carries the endpoint and
    # credentials (Ray wraps the s3fs filesystem for pyarrow and ships it to the read tasks).
    opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    remote = build_dataset(url, image_size=SIZE, train=False, storage_options=opts)
    local = build_dataset(folders["train"], image_size=SIZE, train=False)
    got = {int(r[SAMPLE_ID]): r for r in remote.iter_rows()}
    want = {int(r[SAMPLE_ID]): r for r in local.iter_rows()}
    assert sorted(got) == sorted(want) == list(range(N))
    for i in range(N):
        for key in ("rgb", "depth", "semseg", "normal", "cls"):
            np.testing.assert_array_equal(got[i][key], want[i][key])
