"""CLI start-up latency: wall time of `mmae` commands run as fresh processes (median of N runs).

    python bench/cli_latency.py                 # every benchmark, 10 runs each
    python bench/cli_latency.py --runs 30 help  # one benchmark
    python bench/cli_latency.py --json          # figures as JSON on stdout

Each benchmark is a function `(runs) -> list[Result]` registered in `BENCHMARKS`; adding one (for example
`mmae status` against a tracking store with 200 runs) is one more function and one more entry.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    """Timings of one command line."""

    name: str
    command: str
    runs: int
    median_s: float
    min_s: float
    max_s: float
    budget_s: float | None = None

    @property
    def within_budget(self) -> bool | None:
        """Whether the median meets the budget (None when there is none)."""
        return None if self.budget_s is None else self.median_s <= self.budget_s


def mmae_command() -> list[str]:
    """How users start the CLI: the `mmae` console script of this environment, else `python -m orchestrator`."""
    script = Path(sys.executable).parent / "mmae"
    if script.exists():
        return [str(script)]
    found = shutil.which("mmae")
    return [found] if found else [sys.executable, "-m", "orchestrator"]


def time_command(
    argv: Sequence[str], runs: int, *, env: Mapping[str, str] | None = None, warmup: int = 1
) -> list[float]:
    """Wall-clock seconds of `runs` fresh processes (after `warmup` untimed ones for the page cache)."""
    full_env = {**os.environ, **(env or {})}
    timings = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        proc = subprocess.run(list(argv), capture_output=True, env=full_env, cwd=REPO, check=False)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.decode()[-500:]}")
        if i >= warmup:
            timings.append(elapsed)
    return timings


def _display(argv: Sequence[str]) -> str:
    prefix = mmae_command()
    if list(argv[: len(prefix)]) == prefix:
        return " ".join(["mmae", *argv[len(prefix) :]])
    return " ".join(argv)


def summarize(name: str, argv: Sequence[str], timings: Sequence[float], budget_s: float | None = None) -> Result:
    """Median, min and max of a list of timings."""
    return Result(
        name=name,
        command=_display(argv),
        runs=len(timings),
        median_s=statistics.median(timings),
        min_s=min(timings),
        max_s=max(timings),
        budget_s=budget_s,
    )


def bench_help(runs: int) -> list[Result]:
    """`mmae --help` (budget 0.3 s), a subcommand's help, and bare interpreter start-up for reference."""
    python = [sys.executable, "-c", "pass"]
    root = [*mmae_command(), "--help"]
    sub = [*mmae_command(), "config", "render", "--help"]
    return [
        summarize("python startup", python, time_command(python, runs)),
        summarize("help", root, time_command(root, runs), budget_s=0.3),
        summarize("subcommand help", sub, time_command(sub, runs)),
    ]


def bench_render(runs: int) -> list[Result]:
    """`mmae config render jobs/pretrain_base.yaml`: resolving a job (pydantic + yaml, no training stack)."""
    argv = [*mmae_command(), "config", "render", "jobs/pretrain_base.yaml"]
    return [summarize("render", argv, time_command(argv, runs))]


def make_status_store(root: Path, num_runs: int = 200) -> str:
    """A sqlite tracking store holding `num_runs` finished mmae runs shaped like real ones; returns its URI.

    Each run has the resolved job's params (`spec.flatten`, ~100 of them), the contract's tags and the training
    metrics at 20 logged steps, so `search_runs` reads as much as it would in a real store.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from orchestrator import spec

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("multimae/pretrain", artifact_location=str(root / "artifacts"))
    job = spec.load_job(REPO / "jobs" / "pretrain_tiny.yaml")
    params = [Param(k, v[:6000]) for k, v in spec.flatten(job).items()]
    keys = ["train/loss/total", "train/loss/rgb", "train/loss/depth", "train/loss/semseg", "val/loss/total", "lr",
            "images_per_s", "step_time_s", "data_wait_s", "grad_norm", "num_workers"]
    now = int(time.time() * 1000)
    for i in range(num_runs):
        key = f"bench-{i:03d}"
        tags = {"mmae.run_key": key, "mmae.stage": "pretrain", "mmae.job_name": job.name, "mmae.total_steps": "1000",
                "mmae.config_hash": spec.job_hash(job), "mmae.launch": "local" if i % 2 else "sky"}
        run = client.create_run(experiment, start_time=now - (num_runs - i) * 60_000, run_name=key,
                                tags={**tags, **({"mmae.sky_cluster": f"mmae-{key}"} if i % 2 == 0 else {})})
        metrics = [Metric(k, 1.0 / (s + 1), now, s) for s in range(0, 1000, 50) for k in keys]
        for start in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[start:start + 100], synchronous=True)
        for start in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[start:start + 1000], synchronous=True)
        client.log_batch(run.info.run_id, tags=[RunTag("mmae.checkpoint_uri", f"s3://b/{key}")], synchronous=True)
        client.set_terminated(run.info.run_id, "FINISHED", end_time=now - (num_runs - i) * 60_000 + 45_000)
    return uri


def bench_status(runs: int) -> list[Result]:
    """`mmae status` (newest runs) and `mmae status --all` (every run) against 200 runs, with no SkyPilot API
    server and no cloud reachable (budget 2 s each)."""
    import socket
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmae-bench-status-") as tmp:
        root = Path(tmp)
        uri = make_status_store(root)
        with socket.socket() as s:  # a port nothing listens on: the local API server is "not running"
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        (root / "home").mkdir()
        env = {"MLFLOW_TRACKING_URI": uri, "HOME": str(root / "home"),
               "SKYPILOT_API_SERVER_LOCAL_PORT": str(closed_port), "SKYPILOT_API_SERVER_ENDPOINT": ""}
        recent = [*mmae_command(), "status"]
        every = [*mmae_command(), "status", "--all"]
        return [
            summarize("status (200 runs)", recent, time_command(recent, runs, env=env), budget_s=2.0),
            summarize("status --all", every, time_command(every, runs, env=env), budget_s=2.0),
        ]


BENCHMARKS: dict[str, Callable[[int], list[Result]]] = {
    "help": bench_help,
    "render": bench_render,
    "status": bench_status,
}


def _table(results: Sequence[Result]) -> str:
    header = f"{'benchmark':<18} {'median':>8} {'min':>8} {'max':>8} {'runs':>5}  {'budget':>8}  command"
    lines = [header]
    for r in results:
        verdict = "" if r.budget_s is None else f"{r.budget_s:.2f} {'ok' if r.within_budget else 'OVER'}"
        lines.append(
            f"{r.name:<18} {r.median_s:>7.3f}s {r.min_s:>7.3f}s {r.max_s:>7.3f}s {r.runs:>5}  {verdict:>8}  {r.command}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen benchmarks and print the figures; exit code 1 if a median misses its budget."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", nargs="*", metavar="NAME", help=f"any of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per command (default 10)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    unknown = [name for name in args.benchmarks if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    results: list[Result] = []
    for name in args.benchmarks or list(BENCHMARKS):
        results.extend(BENCHMARKS[name](args.runs))
    if args.json:
        print(json.dumps([{**asdict(r), "within_budget": r.within_budget} for r in results], indent=2))
    else:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, median of {args.runs} runs (1 warm-up)")
        print(_table(results))
    return 1 if any(r.within_budget is False for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
