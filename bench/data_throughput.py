"""Data pipeline throughput: decode + joint augmentation per core, and streaming from S3 against local disk.

Renders a synthetic shard folder once, copies it to a local folder and to an S3 endpoint (a moto server started
here on loopback, or --s3-endpoint), then measures in one run:
  1. decode and decode+augment+normalise samples/s in one process (one core), records already in memory;
  2. ShardDataSource epochs (DataLoader workers, shuffle buffer, checksums) from local disk and from S3, samples/s,
     and their ratio (target: S3 >= 0.8 x local).
Prints a Markdown table and writes JSON with --json.

    python bench/data_throughput.py --num 512 --size 224 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in its own process (so serving does not compete with the decoder for this GIL)."""
    port = _free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return proc, url
        except Exception:  # noqa: BLE001 - still starting
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def _per_core(url: str, *, size: int, repeats: int) -> dict[str, float]:
    from multimae_core.data.shards import decode_record, iter_records, open_folder, read_manifest, read_shard_bytes
    from multimae_core.data.transforms import JointTransform, SampleProcessor

    manifest = read_manifest(url)
    fs, root = open_folder(url)
    records = [(info.name, key, files) for info in manifest.shards
               for key, files in iter_records(read_shard_bytes(fs, root, info), info.name)]
    mods = manifest.modalities
    t0 = time.perf_counter()
    for _ in range(repeats):
        for shard, key, files in records:
            decode_record(key, files, manifest, mods, shard=shard, with_cls=True)
    t_decode = time.perf_counter() - t0
    proc = SampleProcessor(manifest, mods, JointTransform(size), with_cls=True, seed=0)
    t0 = time.perf_counter()
    for r in range(repeats):
        for i, (shard, key, files) in enumerate(records):
            proc(key, files, shard=shard, sample_id=i, epoch=r)
    t_all = time.perf_counter() - t0
    n = len(records) * repeats
    return {"decode_per_s": n / t_decode, "decode_augment_per_s": n / t_all,
            "augment_ms": 1000 * (t_all - t_decode) / n, "decode_ms": 1000 * t_decode / n}


def _stream(url: str, *, size: int, batch: int, workers: int, epochs: int, storage_options=None) -> float:
    from multimae_core.data.loader import ShardDataSource

    src = ShardDataSource(url, per_worker_batch_size=batch, image_size=size, num_workers=workers,
                          shuffle_buffer=64, storage_options=storage_options)
    for _ in src.epoch_batches(0):  # warm-up: worker start, imports, page cache
        pass
    n, t0 = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        for b in src.epoch_batches(epoch):
            n += len(b["rgb"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=512, help="samples in the synthetic set")
    p.add_argument("--size", type=int, default=224, help="image side")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the streaming runs")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="passes of the per-core measurement")
    p.add_argument("--jpg", action="store_true", help="store rgb as JPEG")
    p.add_argument("--s3-endpoint", default=None, help="use this S3 endpoint instead of starting moto")
    p.add_argument("--per-core-only", action="store_true",
                   help="only the one-core decode/augment measurement (no S3 server, no streaming runs)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    from multimae_core.data.synth import write_synth

    if args.per_core_only:
        _main_per_core(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="mmae-bench-"))
    moto = None
    try:
        if args.s3_endpoint:
            endpoint = args.s3_endpoint
        else:
            moto, endpoint = _start_moto()
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        import boto3

        bucket = f"mmae-bench-{os.getpid()}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        local = str(tmp / "synth")
        t0 = time.perf_counter()
        manifest = write_synth(local, args.num, size=args.size, seed=0, samples_per_shard=args.shard_size,
                               rgb_format="jpg" if args.jpg else "png")
        t_synth = time.perf_counter() - t0
        remote = f"s3://{bucket}/synth"
        opts = {"endpoint_url": endpoint}
        import fsspec

        fs = fsspec.filesystem("s3", **opts)
        fs.put(local, remote.removeprefix("s3://"), recursive=True)

        per_core = _per_core(local, size=args.size, repeats=args.repeats)
        rates = {}
        for name, url, so in [("local", local, None), ("s3", remote, opts), ("local (again)", local, None)]:
            rates[name] = _stream(url, size=args.size, batch=args.batch, workers=args.workers, epochs=args.epochs,
                                  storage_options=so)
        local_rate = (rates["local"] + rates["local (again)"]) / 2
        shard_mb = sum(s.num_bytes for s in manifest.shards) / len(manifest.shards) / 2**20
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
            "num": args.num, "size": args.size, "rgb": "jpg" if args.jpg else "png", "shard_mb": round(shard_mb, 2),
            "synth_per_s": round(args.num / t_synth, 1), **{k: round(v, 2) for k, v in per_core.items()},
            "workers": args.workers, "stream_local_per_s": round(local_rate, 1),
            "stream_s3_per_s": round(rates["s3"], 1), "s3_over_local": round(rates["s3"] / local_rate, 3),
        }
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        ("synthetic rendering + PNG encoding (all cores)", f"{result['synth_per_s']} samples/s"),
        ("decode only, 1 core", f"{result['decode_per_s']:.1f} samples/s ({result['decode_ms']:.2f} ms)"),
        ("decode + crop/flip + normalise, 1 core", f"{result['decode_augment_per_s']:.1f} samples/s "
                                                   f"(augment {result['augment_ms']:.2f} ms)"),
        (f"stream local disk, {args.workers} workers", f"{result['stream_local_per_s']} samples/s"),
        (f"stream S3 (moto on loopback), {args.workers} workers", f"{result['stream_s3_per_s']} samples/s"),
        ("S3 / local", f"{result['s3_over_local']}"),
    ]
    print(f"| {args.num} samples, {args.size} px, rgb {result['rgb']}, {result['shard_mb']} MiB shards | |")
    print("|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def _main_per_core(args: argparse.Namespace) -> None:
    from multimae_core.data.synth import write_synth

    tmp = Path(tempfile.mkdtemp(prefix="mmae-bench-"))
    try:
        local = str(tmp / "synth")
        write_synth(local, args.num, size=args.size, seed=0, samples_per_shard=args.shard_size,
                    rgb_format="jpg" if args.jpg else "png")
        per_core = _per_core(local, size=args.size, repeats=args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
              "num": args.num, "size": args.size, "rgb": "jpg" if args.jpg else "png",
              **{k: round(v, 3) for k, v in per_core.items()}}
    print(f"| {args.num} samples x {args.repeats}, {args.size} px, rgb {result['rgb']}, all stored modalities | |")
    print("|---|---|")
    print(f"| decode only, 1 core | {result['decode_per_s']:.1f} samples/s ({result['decode_ms']:.3f} ms) |")
    print(f"| decode + crop/flip + normalise, 1 core | {result['decode_augment_per_s']:.1f} samples/s "
          f"(augment {result['augment_ms']:.3f} ms) |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
