"""`mmae launch` up to the SkyPilot boundary: dry run, confirmation, the recorded call, bad input, --local.

The boundary is replaced by its recorder (MMAE_SKY_BOUNDARY=record:<file>); everything before it is real.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from orchestrator.launch import sky as sky_task

REPO = Path(__file__).resolve().parents[3]

SENTINELS = {
    "AWS_ACCESS_KEY_ID": "AKIASENTINEL1111KEYID",
    "AWS_SECRET_ACCESS_KEY": "sentinel-aws-secret-c0ffee",
    "MLFLOW_TRACKING_TOKEN": "sentinel-mlflow-token-5eed",
    "MLFLOW_TRACKING_PASSWORD": "sentinel-mlflow-password-77",
}

SPOT_JOB = """\
name: flow-spot
model: {preset: tiny, image_size: 64, patch_size: 16}
masking: {num_encoded_tokens: 16}
data: {train_url: s3://flow-bucket/train, val_url: null}
checkpoint: {storage_url: s3://flow-bucket/ckpt}
train: {global_batch_size: 64, per_worker_batch_size: 8, epochs: 1}
resources: {accelerators: "A100:4", num_nodes: 2, use_spot: true}
"""


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def tracking_stub() -> Iterator[str]:
    """A tiny HTTP server answering like MLflow's /health (what launch checks before spending money)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def workspace(tmp_path: Path, tracking_stub: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """cwd with a job file, an env with sentinel credentials, and the recorder in place of SkyPilot."""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "job.yaml").write_text(SPOT_JOB)
    record = tmp_path / "sky_calls.jsonl"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "SKYPILOT_", "MMAE_", "GOOGLE_"))}
    env.update(SENTINELS, HOME=str(home), MLFLOW_TRACKING_URI=tracking_stub, MMAE_SKY_BOUNDARY=f"record:{record}")
    for key in list(os.environ):
        if key.startswith(("AWS_", "MLFLOW_", "SKYPILOT_", "MMAE_", "GOOGLE_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return {"env": env, "record": record, "cwd": tmp_path}


def _mmae(workspace: dict[str, object], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=workspace["cwd"], env=workspace["env"],
                          input=stdin or "", capture_output=True, text=True, timeout=120)


def _calls(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def _no_sentinels(*texts: str) -> None:
    for text in texts:
        for name, value in SENTINELS.items():
            assert value not in text, f"value of {name} leaked"


def test_dry_run_prints_only_the_task_yaml(workspace: dict[str, object]) -> None:
    import sky

    result = _mmae(workspace, "launch", "job.yaml", "--dry-run")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)  # stdout is the YAML and nothing else
    task = sky.Task.from_yaml_config(dict(config))
    assert task.num_nodes == 2
    (res,) = task.resources
    assert res.accelerators == {"A100": 4} and res.use_spot
    assert task.envs["MMAE_JOB_NAME"] == "flow-spot" and task.envs["MMAE_LAUNCH"] == "sky-managed"
    assert "python -m orchestrator.runtime.entry --job" in task.run
    assert set(config["secrets"]) == {*SENTINELS, "RAY_AUTH_TOKEN"}
    assert all(v is None for v in config["secrets"].values())
    _no_sentinels(result.stdout, result.stderr)
    assert "dry run: nothing launched" in result.stderr
    assert not Path(workspace["record"]).exists()  # no call reached the SkyPilot boundary


def test_two_node_spot_launch_hands_the_dry_run_task_to_managed_jobs(workspace: dict[str, object]) -> None:
    dry = _mmae(workspace, "launch", "job.yaml", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    printed = yaml.safe_load(dry.stdout)

    result = _mmae(workspace, "launch", "job.yaml", "--yes")
    assert result.returncode == 0, result.stderr
    calls = _calls(workspace["record"])
    assert [c["call"] for c in calls] == ["estimate_hourly_price", "jobs_launch"]
    price, launch = calls
    assert (price["accelerator"], price["count"], price["use_spot"]) == ("A100", 4, True)

    assert launch["name"] == "flow-spot" and launch["detach"] is False
    assert launch["task"] == printed  # exactly the task --dry-run printed
    fields = launch["task_fields"]  # ...and read back from the sky.Task object that was handed over
    assert fields["num_nodes"] == 2
    assert fields["envs"] == printed["envs"]
    assert fields["run"] == printed["run"] and fields["setup"] == printed["setup"]
    assert fields["file_mounts"] == printed["file_mounts"]
    assert len(fields["resources"]) == 1 and "Spot" in fields["resources"][0] and "A100" in fields["resources"][0]
    assert launch["secret_names"] == sorted([*SENTINELS, "RAY_AUTH_TOKEN"])

    assert "2 x A100:4 per node (8 in all)" in result.stderr
    assert "spot:        yes" in result.stderr
    assert "price:       unavailable offline" in result.stderr
    _no_sentinels(result.stdout, result.stderr, Path(workspace["record"]).read_text())


def test_on_demand_launch_goes_to_a_cluster_that_downs_itself(workspace: dict[str, object]) -> None:
    from orchestrator.cli.app import main

    record = Path(workspace["record"])
    Path(f"{record}.state.json").write_text(json.dumps({"hourly_price": [12.5, "aws p4d.24xlarge"]}))
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", "job.yaml", "--set", "resources.use_spot=false", "--yes", "--detach"])
    assert exit_info.value.code in (0, None)
    calls = _calls(record)
    assert [c["call"] for c in calls] == ["estimate_hourly_price", "launch"]
    launch = calls[1]
    assert launch["cluster_name"] == "mmae-flow-spot"
    assert launch["down"] is True and launch["idle_minutes"] == sky_task.AUTODOWN_IDLE_MINUTES
    assert launch["detach"] is True
    assert "job_recovery" not in launch["task"]["resources"]


def test_price_line(workspace: dict[str, object], capfd: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli.app import main

    record = Path(workspace["record"])
    Path(f"{record}.state.json").write_text(json.dumps({"hourly_price": [12.5, "aws p4d.24xlarge"]}))
    with pytest.raises(SystemExit):
        main(["launch", "job.yaml", "--yes", "--detach"])
    err = capfd.readouterr().err
    assert "~$25.00/h for 2 node(s) ($12.50/h each, aws p4d.24xlarge, spot)" in err


def test_launch_without_yes_and_no_terminal_refuses(workspace: dict[str, object]) -> None:
    result = _mmae(workspace, "launch", "job.yaml", stdin="y\n")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: launching costs money and there is no terminal to confirm on: pass --yes")
    assert "Traceback" not in result.stderr
    assert [c["call"] for c in _calls(workspace["record"])] == ["estimate_hourly_price"]


@pytest.mark.parametrize(
    ("args", "env_change", "message"),
    [
        (["--set", "resources.accelerators=A1000:4"], {}, "SkyPilot does not know the accelerator 'A1000'"),
        ([], {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
         "data.train_url is s3://flow-bucket/train but no AWS credentials were found"),
        ([], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{closed}"}, "is not reachable"),
        (["--set", "resources.min_workers=3"], {}, "cannot share evenly"),
    ],
    ids=["unknown-accelerator", "no-bucket-credentials", "tracking-unreachable", "indivisible-batch"],
)
def test_bad_input_is_one_line_exit_2(workspace: dict[str, object], monkeypatch: pytest.MonkeyPatch,
                                      capfd: pytest.CaptureFixture[str], args: list[str],
                                      env_change: dict[str, str | None], message: str) -> None:
    from orchestrator.cli.app import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for key, value in env_change.items():
        if value is None:
            monkeypatch.delenv(key)
        else:
            monkeypatch.setenv(key, value.format(closed=closed))
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", "job.yaml", "--yes", *args])
    assert exit_info.value.code == 2
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert out == ""
    assert _calls(workspace["record"]) == []  # nothing reached SkyPilot


def test_local_runs_through_run_local(workspace: dict[str, object], monkeypatch: pytest.MonkeyPatch,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli.app import main
    from orchestrator.runtime import local

    seen = {}

    def fake_run_local(job, *, fresh=False):
        seen.update(name=job.name, fresh=fresh, steps=job.train.max_steps)
        return "0123456789abcdef0123456789abcdef"

    monkeypatch.setattr(local, "run_local", fake_run_local)
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", "job.yaml", "--local", "--fresh", "--set", "train.max_steps=3"])
    assert exit_info.value.code in (0, None)
    assert seen == {"name": "flow-spot", "fresh": True, "steps": 3}
    assert capfd.readouterr().out.strip() == "0123456789abcdef0123456789abcdef"
    assert _calls(workspace["record"]) == []


class _Calls:
    """Fake SkyPilot SDK functions that remember how they were called."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, tuple, dict]] = []

    def fake(self, name: str, result: object = None):
        def call(*args, **kwargs):
            self.seen.append((name, args, kwargs))
            if isinstance(result, BaseException):
                raise result
            return result

        return call


def test_sky_boundary_drives_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real boundary against a faked SDK: which calls, with what, and how results come back as dicts."""
    import sky
    from sky import exceptions

    from orchestrator.launch.boundary import SkyBoundary

    calls = _Calls()
    monkeypatch.setattr(sky, "launch", calls.fake("launch", "req-1"))
    monkeypatch.setattr(sky, "stream_and_get", calls.fake("stream_and_get", (3, object(), {})))
    monkeypatch.setattr(sky, "tail_logs", calls.fake("tail_logs", 0))
    task = object()
    result = SkyBoundary().launch(task, cluster_name="mmae-x", down=True, idle_minutes=5)
    assert result == {"request_id": "req-1", "cluster_name": "mmae-x", "job_id": 3, "returncode": 0}
    assert calls.seen[0] == ("launch", (task,), {"cluster_name": "mmae-x", "down": True,
                                                 "idle_minutes_to_autostop": 5})
    assert calls.seen[1] == ("stream_and_get", ("req-1",), {"output_stream": sys.stderr})  # progress: stderr
    assert calls.seen[2] == ("tail_logs", ("mmae-x", 3), {"follow": True})

    calls.seen.clear()
    monkeypatch.setattr(sky.jobs, "launch", calls.fake("jobs.launch", "req-2"))
    monkeypatch.setattr(sky, "stream_and_get", calls.fake("stream_and_get", ([11], None)))
    monkeypatch.setattr(sky.jobs, "tail_logs", calls.fake("jobs.tail_logs", 0))
    assert SkyBoundary().jobs_launch(task, name="flow", detach=True) == {"request_id": "req-2", "name": "flow",
                                                                         "job_ids": []}
    assert [c[0] for c in calls.seen] == ["jobs.launch"]  # detached: nothing streamed
    result = SkyBoundary().jobs_launch(task, name="flow")
    assert result["job_ids"] == [11] and calls.seen[-1] == ("jobs.tail_logs", (), {"job_id": 11, "follow": True})

    class Rec:  # SkyPilot's response models are attribute objects
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class Status:
        value = "UP"

    monkeypatch.setattr(sky, "status", calls.fake("status", "req-3"))
    monkeypatch.setattr(sky, "get", calls.fake("get", [Rec(name="mmae-x", status=Status(), nodes=2,
                                                           resources_str="2x AWS(p4d)", cloud="AWS",
                                                           region="us-east-1", launched_at=5, user_name="me")]))
    assert SkyBoundary().status() == [{"name": "mmae-x", "status": "UP", "nodes": 2, "resources": "2x AWS(p4d)",
                                       "cloud": "AWS", "region": "us-east-1", "launched_at": 5, "user": "me"}]
    # no jobs controller: "no managed jobs", not an error
    monkeypatch.setattr(sky.jobs, "queue_v2", calls.fake("jobs.queue_v2", "req-4"))
    monkeypatch.setattr(sky, "get", calls.fake("get", exceptions.ClusterNotUpError("No in-progress managed jobs.")))
    assert SkyBoundary().jobs_queue() == []


def test_price_estimate_takes_the_cheapest_matching_offer(monkeypatch: pytest.MonkeyPatch) -> None:
    from sky import catalog
    from sky.catalog.common import InstanceTypeInfo

    from orchestrator.launch.boundary import SkyBoundary

    def offer(cloud, itype, count, price, spot):
        return InstanceTypeInfo(cloud, itype, "A100", count, 96, 40, 1152, price, spot, "us-east-1")

    offers = {"A100": [offer("AWS", "p4d.24xlarge", 8, 32.77, 11.5), offer("GCP", "a2-highgpu-8g", 8, 29.39,
                                                                             float("nan")),
                       offer("GCP", "a2-highgpu-4g", 4, 14.69, 5.0)]}
    seen = {}

    def list_accelerators(**kwargs):
        seen.update(kwargs)
        return offers

    monkeypatch.setattr(catalog, "list_accelerators", list_accelerators)
    boundary = SkyBoundary()
    assert boundary.estimate_hourly_price(accelerator="A100", count=8, use_spot=False) == (29.39,
                                                                                           "GCP a2-highgpu-8g")
    assert boundary.estimate_hourly_price(accelerator="A100", count=8, use_spot=True) == (11.5, "AWS p4d.24xlarge")
    assert seen["quantity_filter"] == 8 and seen["clouds"] == ["aws", "gcp", "azure"]
    boundary.estimate_hourly_price(accelerator="A100", count=8, use_spot=True, cloud="gcp", region="us-central1")
    assert seen["clouds"] == ["gcp"] and seen["region_filter"] == "us-central1"

    def offline(**kwargs):
        raise ConnectionError("Failed to resolve 'raw.githubusercontent.com'")

    monkeypatch.setattr(catalog, "list_accelerators", offline)
    assert boundary.estimate_hourly_price(accelerator="A100", count=8, use_spot=True) is None
