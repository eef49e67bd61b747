"""Shared fixtures: real local services (moto S3, MLflow tracking server, Ray), markers, reference data.

Every service listens on loopback only and is started and stopped by the fixtures themselves.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tag tests under tests/integration as `integration`; skip `gpu` tests without CUDA."""
    cuda = None
    for item in items:
        if "tests/integration/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("gpu") is not None:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Kill worker processes a failed or timed-out test left behind: Python joins non-daemon multiprocessing
    children at exit, so one deadlocked worker would otherwise keep the finished suite from exiting."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
        child.join(5)


def find_shared() -> Path:
    """The project's `shared/` folder: beside the repository (CI clones elsewhere with shared/ next to the clone)."""
    for parent in [REPO, *REPO.parents]:
        cand = parent.parent / "shared" if parent == REPO else parent / "shared"
        if (cand / "reference").is_dir():
            return cand
    raise FileNotFoundError("could not find the shared/ folder with reference data next to the repository")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return find_shared()


@pytest.fixture(scope="session")
def reference_dir(shared_dir: Path) -> Path:
    return shared_dir / "reference" / "multimae_tiny"


def free_port() -> int:
    """A loopback TCP port free at the time of the call (also imported by tests: `from conftest import free_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except Exception as err:  # noqa: BLE001 - server still starting
            last = err
        time.sleep(0.2)
    raise RuntimeError(f"service at {url} did not become healthy in {timeout:.0f}s: {last}")


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on loopback for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = url
    try:
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_endpoint(s3_server: str) -> Iterator[str]:
    """The session moto server with its state reset for this test; AWS_* env points at it."""
    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST"), timeout=5).close()
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:
        pass
    yield s3_server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on loopback (sqlite backend, artifacts on local disk); yields the tracking URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/health", timeout=90)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def mlflow_uri(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """MLFLOW_TRACKING_URI pointed at the session's tracking server for this test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray cluster (head started with `ray start`), shared by the session; yields its address.

    Started as a separate head so that Ray Train runs see the same kind of cluster as on a SkyPilot node, and so
    that subprocesses (the CLI under test) can join it through RAY_ADDRESS.
    """
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = free_port()
    # Ray's unix sockets live under the temp dir; keep its path short (socket paths are limited to ~107 bytes).
    tmp = Path(f"/tmp/mmae-ray-{os.getpid()}")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    subprocess.run(
        [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=4", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={tmp}"],
        check=True, env=env, capture_output=True, timeout=180,
    )
    address = f"127.0.0.1:{port}"
    os.environ.update(RAY_ADDRESS=address, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    try:
        yield address
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
