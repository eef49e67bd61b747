"""`mmae status`, `logs`, `down`: MLflow runs joined with SkyPilot state; offline behaviour; target resolution."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.errors import UserError
from orchestrator.launch import boundary as boundary_lib
from orchestrator.launch import status as status_lib
from orchestrator.launch.boundary import RecordingBoundary

CLUSTERS = [
    {"name": "mmae-b", "status": "UP", "nodes": 2, "resources": "2x AWS(p4d.24xlarge, {'A100': 8})",
     "cloud": "AWS", "region": "us-east-1", "launched_at": 1, "user": "me"},
    {"name": "orphan", "status": "STOPPED", "nodes": 1, "resources": "1x GCP(n1-standard-8)", "cloud": "GCP",
     "region": "us-central1", "launched_at": 2, "user": "me"},
    {"name": "sky-jobs-controller-1a2b", "status": "UP", "nodes": 1, "resources": "1x AWS(m6i.large)",
     "cloud": "AWS", "region": "us-east-1", "launched_at": 0, "user": "me"},
    {"name": "flow-7-9f", "status": "UP", "nodes": 2, "resources": "2x AWS(p4d.24xlarge)", "cloud": "AWS",
     "region": "us-east-2", "launched_at": 3, "user": "me"},
]
MANAGED = [
    {"job_id": 7, "name": "flow", "status": "RUNNING", "recovery_count": 2, "cluster": "flow-7-9f",
     "resources": "2x[A100:8]", "infra": "AWS/us-east-2", "submitted_at": 1.0, "failure_reason": None},
    {"job_id": 9, "name": "queued", "status": "PENDING", "recovery_count": 0, "cluster": None,
     "resources": "4x[H100:8]", "infra": None, "submitted_at": 2.0, "failure_reason": None},
]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A sqlite tracking store with a local run, a cluster run, a managed run, a fine-tune child and a foreign run."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    pre = client.create_experiment("multimae/pretrain", artifact_location=str(root / "artifacts"))
    fine = client.create_experiment("multimae/finetune", artifact_location=str(root / "artifacts"))
    ids = {}

    def run(key: str, exp: str, tags: dict[str, str], losses: dict[int, float], speed: float | None = None,
            finish: bool = True) -> str:
        r = client.create_run(exp, run_name=f"{key}-run", tags={"mmae.run_key": f"{key}-k", "mmae.stage": "pretrain",
                                                                "mmae.job_name": key, **tags})
        for step, loss in losses.items():
            client.log_metric(r.info.run_id, "train/loss/total", loss, step=step)
        if speed is not None:
            client.log_metric(r.info.run_id, "images_per_s", speed, step=max(losses))
        if finish:
            client.set_terminated(r.info.run_id, "FINISHED")
        ids[key] = r.info.run_id
        return r.info.run_id

    run("local", pre, {"mmae.launch": "local", "mmae.total_steps": "100"}, {10: 2.0, 50: 1.0, 100: 0.5}, 123.0)
    run("onb", pre, {"mmae.launch": "sky", "mmae.sky_cluster": "mmae-b", "mmae.sky_job_id": "1",
                     "mmae.total_steps": "200"}, {10: 3.0, 30: 2.5}, finish=False)
    run("flow", pre, {"mmae.launch": "sky-managed", "mmae.sky_cluster": "flow-7-old", "mmae.sky_job_id": "7"},
        {5: 4.0}, finish=False)
    run("child", fine, {"mmae.launch": "local", "mmae.stage": "finetune", "mmae.parent_run_id": ids["local"],
                        "mlflow.parentRunId": ids["local"]}, {1: 0.9})
    foreign = client.create_run(pre, run_name="not-mmae")  # no mmae tags: not shown
    ids["foreign"] = foreign.info.run_id
    return {"uri": uri, **ids}


@pytest.fixture
def tracking(store: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    return store


def _rows_by_name(report: status_lib.StatusReport) -> dict[str, dict]:
    return {row["name"]: row for row in report.rows}


def test_status_joins_runs_with_clusters_and_managed_jobs(store: dict[str, str], tmp_path: Path) -> None:
    rec = RecordingBoundary(tmp_path / "calls.jsonl", state={"clusters": CLUSTERS, "managed_jobs": MANAGED})
    report = status_lib.collect(boundary=rec, uri=store["uri"])
    rows = _rows_by_name(report)
    assert report.unreachable == []
    assert set(rows) == {"local-run", "onb-run", "flow-run", "child-run", "queued", "orphan"}

    local = rows["local-run"]
    assert (local["state"], local["stage"], local["steps"], local["loss"], local["img_per_s"]) == (
        "FINISHED", "pretrain", "100/100", 0.5, 123.0)
    assert local["sky_state"] is None and local["cluster"] is None
    assert local["run_id"] == store["local"]

    onb = rows["onb-run"]
    assert (onb["state"], onb["steps"], onb["loss"]) == ("RUNNING", "30/200", 2.5)
    assert (onb["cluster"], onb["sky_state"], onb["resources"]) == ("mmae-b", "UP", CLUSTERS[0]["resources"])

    flow = rows["flow-run"]  # the managed job's current cluster replaces the one recorded at first start
    assert (flow["sky_state"], flow["recoveries"], flow["cluster"]) == ("RUNNING", 2, "flow-7-9f")
    assert flow["steps"] == "5/?"

    child = rows["child-run"]
    assert child["parent"] == store["local"][:8] and child["parent_run_id"] == store["local"]
    assert child["stage"] == "finetune"

    assert rows["queued"]["run_id"] is None and rows["queued"]["sky_state"] == "PENDING"
    assert rows["orphan"]["sky_state"] == "STOPPED"
    assert [c["call"] for c in map(json.loads, (tmp_path / "calls.jsonl").read_text().splitlines())] == [
        "server_problem", "status", "jobs_queue"]


def test_duration_and_start_are_from_mlflow_times(store: dict[str, str]) -> None:
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=store["uri"]).get_run(store["local"])
    row = status_lib.run_row(run)
    seconds = (run.info.end_time - run.info.start_time) // 1000
    assert row["duration"] == f"{seconds // 60}m{seconds % 60:02d}s"
    assert row["started"] == time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000))
    assert status_lib._duration(3 * 3600 + 5 * 60) == "3h05m" and status_lib._duration(50 * 3600) == "2d02h"


@pytest.mark.parametrize("all_runs", [False, True])
def test_direct_sqlite_read_matches_mlflow_client(store: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                                  all_runs: bool) -> None:
    """The fast sqlite reader gives exactly the rows MlflowClient.search_runs gives (also for the RECENT cut)."""
    monkeypatch.setattr(status_lib, "RECENT_RUNS", 2)
    path = Path(store["uri"].removeprefix("sqlite:///"))
    direct = status_lib._sqlite_runs(path, all_runs=all_runs)
    assert direct is not None  # the installed MLflow's schema is recognised: status stays on the fast path
    via_client = status_lib._client_runs(store["uri"], all_runs=all_runs)
    now = time.time()
    assert [status_lib.run_row(r, now=now) for r in direct] == [status_lib.run_row(r, now=now) for r in via_client]
    assert len(direct) == (4 if all_runs else 3)


def test_unrecognised_sqlite_schema_falls_back_to_the_client(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "odd.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE runs (run_uuid TEXT)")
    assert status_lib._sqlite_runs(path, all_runs=True) is None


def test_status_without_skypilot_server_shows_runs_and_says_so(store: dict[str, str], tmp_path: Path) -> None:
    rec = RecordingBoundary(tmp_path / "calls.jsonl",
                            state={"server_problem": "SkyPilot API server not running (start it with `sky api start`)",
                                   "clusters": CLUSTERS})
    report = status_lib.collect(boundary=rec, uri=store["uri"])
    assert report.clusters is None and report.managed_jobs is None
    assert {r["name"] for r in report.rows} == {"local-run", "onb-run", "flow-run", "child-run"}
    assert all(r["sky_state"] is None for r in report.rows)
    assert report.note() == ("SkyPilot API server not running (start it with `sky api start`): clusters and managed "
                             "jobs not shown")
    assert [json.loads(x)["call"] for x in (tmp_path / "calls.jsonl").read_text().splitlines()] == ["server_problem"]


def test_status_with_unreachable_tracking_server_still_shows_skypilot(tmp_path: Path) -> None:
    rec = RecordingBoundary(tmp_path / "calls.jsonl", state={"clusters": CLUSTERS, "managed_jobs": MANAGED})
    uri = f"http://127.0.0.1:{_closed_port()}"
    report = status_lib.collect(boundary=rec, uri=uri)
    assert report.note().startswith(f"MLflow tracking server {uri} not reachable")
    assert {r["name"] for r in report.rows} == {"flow", "queued", "mmae-b", "orphan"}
    port = uri.rpartition(":")[2]
    secret = status_lib.collect(boundary=rec, uri=f"http://bob:pw-sentinel-3@127.0.0.1:{port}")
    assert "pw-sentinel-3" not in json.dumps(secret.to_json())
    assert secret.note().startswith(f"MLflow tracking server http://127.0.0.1:{port} not reachable")


def test_status_all_pages_through_every_run(store: dict[str, str], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_lib, "RECENT_RUNS", 2)
    rec = RecordingBoundary(tmp_path / "calls.jsonl", state={})
    recent = status_lib.collect(boundary=rec, uri=store["uri"])
    # the 2 newest, plus the older runs still RUNNING
    assert {r["name"] for r in recent.rows} == {"child-run", "flow-run", "onb-run"}
    every = status_lib.collect(boundary=rec, uri=store["uri"], all_runs=True)
    assert len(every.rows) == 4


def _cli_env(tmp_path: Path, uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPILOT_", "MLFLOW_", "MMAE_"))}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), MLFLOW_TRACKING_URI=uri, SKYPILOT_API_SERVER_LOCAL_PORT=str(_closed_port()))
    return env


def test_status_cli_offline_json_never_imports_sky(store: dict[str, str], tmp_path: Path) -> None:
    env = _cli_env(tmp_path, store["uri"])
    result = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--json"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {r["name"] for r in data["rows"]} == {"local-run", "onb-run", "flow-run", "child-run"}
    assert data["clusters"] is None
    assert result.stderr.strip() == ("warning: not reached: SkyPilot API server not running (start it with "
                                     "`sky api start`): clusters and managed jobs not shown")
    probe = ("import sys, json; from orchestrator.launch import status; r = status.collect(); "
             "print(json.dumps({'sky': 'sky' in sys.modules, 'rows': len(r.rows)}))")
    checked = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=60, check=True)
    assert json.loads(checked.stdout) == {"sky": False, "rows": 4}


def test_status_cli_table_with_no_store(tmp_path: Path) -> None:
    env = _cli_env(tmp_path, "")
    del env["MLFLOW_TRACKING_URI"]
    result = subprocess.run([sys.executable, "-m", "orchestrator", "status"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no runs, clusters or managed jobs"
    assert f"no MLflow runs yet (no tracking store at {tmp_path / '.mmae' / 'mlflow.db'})" in result.stderr
    assert not (tmp_path / ".mmae").exists()  # status creates no store


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "healthy"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api_stub() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_api_server_endpoint_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api_stub: str) -> None:
    for key in ("SKYPILOT_API_SERVER_ENDPOINT", "SKYPILOT_CONFIG", "SKYPILOT_PROJECT_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "sky.yaml"
    monkeypatch.setenv("SKYPILOT_GLOBAL_CONFIG", str(config))
    port = _closed_port()
    monkeypatch.setenv("SKYPILOT_API_SERVER_LOCAL_PORT", str(port))
    assert boundary_lib.api_server_endpoint() == (f"http://127.0.0.1:{port}", False)
    assert boundary_lib.api_server_problem() == "SkyPilot API server not running (start it with `sky api start`)"

    config.write_text(f"api_server:\n  endpoint: {api_stub}/\n")
    assert boundary_lib.api_server_endpoint() == (api_stub, True)
    assert boundary_lib.api_server_problem() is None

    monkeypatch.setenv("SKYPILOT_API_SERVER_ENDPOINT", f"http://user:pw-sentinel@127.0.0.1:{port}")
    assert boundary_lib.api_server_endpoint() == (f"http://user:pw-sentinel@127.0.0.1:{port}", True)
    problem = boundary_lib.api_server_problem()
    assert problem.startswith(f"SkyPilot API server at http://127.0.0.1:{port} not reachable")
    assert "pw-sentinel" not in problem


@pytest.fixture
def recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    record = tmp_path / "calls.jsonl"
    Path(f"{record}.state.json").write_text(json.dumps({"clusters": CLUSTERS, "managed_jobs": MANAGED}))
    monkeypatch.setenv("MMAE_SKY_BOUNDARY", f"record:{record}")
    return record


def _main(*args: str) -> int:
    from orchestrator.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code or 0


def _last_call(record: Path) -> dict:
    return json.loads(record.read_text().splitlines()[-1])


def test_logs_resolves_runs_clusters_and_managed_jobs(tracking: dict[str, str], recorder: Path) -> None:
    assert _main("logs", tracking["flow"]) == 0
    assert _last_call(recorder) == {"call": "tail_logs", "cluster_name": None, "job_id": None, "managed_job_id": 7,
                                    "follow": True}
    assert _main("logs", tracking["onb"], "--no-follow") == 0
    assert _last_call(recorder) == {"call": "tail_logs", "cluster_name": "mmae-b", "job_id": 1,
                                    "managed_job_id": None, "follow": False}
    assert _main("logs", "orphan") == 0
    assert _last_call(recorder)["cluster_name"] == "orphan"
    assert _main("logs", "queued") == 0
    assert _last_call(recorder)["managed_job_id"] == 9


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no-such-cluster", "unknown run or cluster 'no-such-cluster'"),
        ("f" * 32, f"unknown run '{'f' * 32}'"),
        ("local", "ran on this machine"),
    ],
)
def test_logs_and_down_reject_unknown_targets(tracking: dict[str, str], recorder: Path,
                                              capfd: pytest.CaptureFixture[str], target: str, message: str) -> None:
    target = tracking["local"] if target == "local" else target
    for command in ("logs", "down"):
        assert _main(command, target, "--yes" if command == "down" else "--follow") == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    calls = [json.loads(x)["call"] for x in recorder.read_text().splitlines()] if recorder.exists() else []
    assert "down" not in calls and "jobs_cancel" not in calls and "tail_logs" not in calls


def test_down_cancels_managed_jobs_and_tears_down_clusters(tracking: dict[str, str], recorder: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    assert _main("down", tracking["flow"], "--yes") == 0
    assert _last_call(recorder) == {"call": "jobs_cancel", "job_ids": [7]}
    assert _main("down", "mmae-b", "-y") == 0
    assert _last_call(recorder) == {"call": "down", "cluster_name": "mmae-b"}
    capfd.readouterr()
    # without --yes and without a terminal: refuse, do nothing
    assert _main("down", "orphan") == 2
    assert "pass --yes" in capfd.readouterr().err
    calls = [json.loads(x) for x in recorder.read_text().splitlines()]
    assert not [c for c in calls if c["call"] == "down" and c["cluster_name"] == "orphan"]


def test_resolve_target_prefers_the_newest_managed_job_of_a_name(tmp_path: Path) -> None:
    jobs = [dict(MANAGED[0], job_id=3, status="FAILED"), MANAGED[0]]
    rec = RecordingBoundary(tmp_path / "c.jsonl", state={"clusters": [], "managed_jobs": jobs})
    assert status_lib.resolve_target("flow", rec).managed_job_id == 7
    with pytest.raises(UserError):
        status_lib.resolve_target("flo", rec)
