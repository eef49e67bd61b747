"""Shards on a real S3 endpoint (moto server on loopback) stream back exactly what the same shards on disk give."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from multimae_core.data.loader import ShardDataSource
from multimae_core.data.shards import ShardDataError, iter_shard_samples, read_manifest
from multimae_core.data.synth import write_synth

BUCKET = "mmae-data"


@pytest.fixture
def bucket(s3_endpoint):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    return s3


def test_s3_and_local_shards_stream_identical_samples(bucket, tmp_path):
    local, remote = str(tmp_path / "train"), f"s3://{BUCKET}/synth/train"
    m_local = write_synth(local, 30, size=32, seed=5, samples_per_shard=8, num_workers=2)
    m_remote = write_synth(remote, 30, size=32, seed=5, samples_per_shard=8, num_workers=2)
    assert [s.sha256 for s in m_local.shards] == [s.sha256 for s in m_remote.shards]
    keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET, Prefix="synth/train/")["Contents"]]
    assert sorted(keys) == ["synth/train/manifest.json"] + [f"synth/train/shard-00000{i}.tar" for i in range(4)]
    assert read_manifest(remote) == read_manifest(local)

    for (k1, a), (k2, b) in zip(iter_shard_samples(local), iter_shard_samples(remote), strict=True):
        assert k1 == k2
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])

    # The training loader: same batches (augmentation included) from S3, with 2 DataLoader worker processes.
    opts = dict(per_worker_batch_size=4, image_size=32, seed=1, shuffle_buffer=8, world_size=2, rank=1)
    got_local = list(ShardDataSource(local, num_workers=2, **opts).epoch_batches(2))
    got_remote = list(ShardDataSource(remote, num_workers=2, **opts).epoch_batches(2))
    assert len(got_local) == len(got_remote) == 30 // 8
    for x, y in zip(got_local, got_remote, strict=True):
        assert set(x) == set(y) == {"rgb", "depth", "semseg", "normal", "cls"}
        for name in x:
            torch.testing.assert_close(x[name], y[name], rtol=0, atol=0)


def test_altered_s3_object_is_caught_by_the_checksum(bucket):
    url = f"s3://{BUCKET}/ds"
    write_synth(url, 6, size=16, seed=0, samples_per_shard=3, num_workers=1)
    key = "ds/shard-000001.tar"
    data = bytearray(bucket.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[-3000] ^= 0x01
    bucket.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    with pytest.raises(ShardDataError, match=r"shard shard-000001.tar: sha256 .*\(altered shard\)"):
        list(iter_shard_samples(url))
    bucket.put_object(Bucket=BUCKET, Key=key, Body=bytes(data[:-512]))
    with pytest.raises(ShardDataError, match=r"shard shard-000001.tar: size \d+ bytes differs"):
        list(ShardDataSource(url, per_worker_batch_size=2, image_size=16).epoch_batches(0))


def test_cli_synth_and_inspect_on_s3(bucket, tmp_path, capsys):
    from orchestrator.cli.app import main

    def run(*argv: str) -> int:
        try:
            main(list(argv))
        except SystemExit as exit:
            return exit.code or 0
        return 0

    url = f"s3://{BUCKET}/cli/train"
    assert run("data", "synth", "--out", url, "--num", "12", "--size", "32", "--shard-size", "5") == 0
    capsys.readouterr()
    assert run("data", "inspect", url, "--json", "--scan", "--grid", f"s3://{BUCKET}/cli/grid.png", "--num", "3") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 12 and report["num_read"] == 12 and report["num_shards"] == 3
    png = bucket.get_object(Bucket=BUCKET, Key="cli/grid.png")["Body"].read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert run("data", "inspect", f"s3://{BUCKET}/nothing-here") == 2
    assert "no manifest.json" in capsys.readouterr().err
