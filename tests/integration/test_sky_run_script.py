"""The SkyPilot task's real ``run`` script, executed with bash on this machine as a 1-node cluster.

The script is taken from the task that `orchestrator.launch.sky.plan_launch` builds (what ``mmae launch --dry-run``
prints), parsed by SkyPilot's own parser, and run the way SkyPilot runs it on a node: the task's envs and secrets
(a random RAY_AUTH_TOKEN, RAY_AUTH_MODE=token as on a cluster) plus the SKYPILOT_* variables, HOME holding the setup's
``~/mmae-venv`` (a link to this venv) and the mounted job file, cwd the task's workdir. The only edit to the script:
the Ray ports (6379, dashboard agent 52366) become free ports, so the Ray it starts never meets another Ray on this
machine (e.g. the suite's `ray_local`). That Ray lives under its own RAY_TMPDIR, and exactly its processes are
killed afterwards (never `ray stop`, which would stop every Ray here).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from _runs import tiny_job
from conftest import free_port

from orchestrator.launch import sky as sky_task

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT_TIMEOUT_S = 240
AGENT_PORT = 52366


def _own_pids(marker: str) -> list[int]:
    """Processes started for this test: their command line names our RAY_TMPDIR, or their environment sets it."""
    env_marker = f"RAY_TMPDIR={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes() if marker.encode() not in cmdline else b""
        except OSError:  # gone, or not ours
            continue
        if marker.encode() in cmdline or env_marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _kill_own(marker: str) -> list[int]:
    """SIGTERM, then SIGKILL, exactly the processes of this test's Ray; the pids still alive afterwards."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        pids = _own_pids(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while _own_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    return _own_pids(marker)


def _with_ports(script: str, ray_port: int, agent_port: int) -> str:
    """The script with the Ray head port and the dashboard-agent port swapped for free ones (nothing else)."""
    default = sky_task.RAY_PORT
    assert re.search(rf"ray start --head --port={default}\b", script)
    assert f'ray.init(address="127.0.0.1:{default}"' in script
    assert f"export RAY_ADDRESS=127.0.0.1:{default}\n" in script
    assert script.count(f"--dashboard-agent-listen-port={AGENT_PORT}") == 1
    out = re.sub(rf"(?<![0-9]){default}(?![0-9])", str(ray_port), script)
    out = out.replace(f"--dashboard-agent-listen-port={AGENT_PORT}", f"--dashboard-agent-listen-port={agent_port}")
    # Every other line is unchanged; every changed line now names our ports and no longer the defaults.
    before, after = script.splitlines(), out.splitlines()
    assert len(before) == len(after)
    changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert changed and all(str(default) in b or str(AGENT_PORT) in b for b, _ in changed)
    assert str(default) not in out and str(AGENT_PORT) not in out
    assert f"ray start --head --port={ray_port} " in out and f"export RAY_ADDRESS=127.0.0.1:{ray_port}" in out
    return out


def _secret_value(value) -> str:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)


@pytest.mark.parametrize("managed", [False, True], ids=["sky", "sky-managed"])
def test_run_script_trains_on_a_one_node_cluster(managed, mlflow_server, tmp_path, capsys):
    from mlflow import MlflowClient

    from multimae_core.data.synth import write_synth

    write_synth(str(tmp_path / "data/train"), 16, size=32, seed=0, samples_per_shard=8, num_workers=1)
    experiment = f"sky-run-{uuid.uuid4().hex[:8]}"
    max_steps = 3
    job = tiny_job(train_url=str(tmp_path / "data/train"), storage_url=str(tmp_path / "ckpt"),
                   experiment=experiment, max_steps=max_steps, name="sky-run-script", system_metrics=False)

    # The task exactly as `mmae launch --dry-run` builds it, then parsed by SkyPilot with the Ray token secret.
    launch_env = {"MLFLOW_TRACKING_URI": mlflow_server, "HOME": str(tmp_path / "launcher-home")}
    plan = sky_task.plan_launch(job, managed=managed, contact=False, env=launch_env, state_dir=tmp_path / "launch")
    token = secrets.token_hex(32)
    task = sky_task.make_task(plan.config, {sky_task.RAY_TOKEN_SECRET: token})
    assert task.num_nodes == 1
    envs = {k: str(v) for k, v in task.envs.items()}
    secret_env = {k: _secret_value(v) for k, v in task.secrets.items()}
    assert envs["RAY_AUTH_MODE"] == "token" and secret_env == {"RAY_AUTH_TOKEN": token}
    assert envs["MLFLOW_TRACKING_URI"] == mlflow_server
    assert envs["MMAE_LAUNCH"] == ("sky-managed" if managed else "sky")

    # The node: HOME with the setup's venv and the mounted job file; the task's workdir as cwd.
    home = tmp_path / "home"
    home.mkdir()
    (home / "mmae-venv").symlink_to(sys.prefix, target_is_directory=True)
    ((remote, source),) = task.file_mounts.items()
    assert remote.startswith("~/.mmae/job/") and remote.endswith(".yaml")
    mounted = home / remote.removeprefix("~/")
    mounted.parent.mkdir(parents=True)
    shutil.copyfile(source, mounted)
    workdir = Path(task.workdir)
    assert (workdir / "pyproject.toml").is_file()

    ray_port, agent_port = free_port(), free_port()
    script = _with_ports(task.run, ray_port, agent_port)
    ray_tmp = tempfile.mkdtemp(prefix="/tmp/rs")  # short: Ray's unix socket paths live under it
    task_id = f"sky-2026-11-27-22-00-00-000000_{plan.cluster_name}_1"
    env = {
        # a bare node environment: nothing from this process (no RAY_ADDRESS, no AWS_*, no session Ray settings)
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "HOME": str(home),
        "RAY_TMPDIR": ray_tmp,
        **envs,
        **secret_env,
        "SKYPILOT_NODE_RANK": "0",
        "SKYPILOT_NODE_IPS": "127.0.0.1",
        "SKYPILOT_NUM_NODES": "1",
        "SKYPILOT_NUM_GPUS_PER_NODE": "0",
        "SKYPILOT_TASK_ID": task_id,
        "SKYPILOT_CLUSTER_INFO": json.dumps({"cluster_name": plan.cluster_name, "num_nodes": 1}),
    }
    if managed:
        env["SKYPILOT_MANAGED_JOB_ID"] = "1"
    assert "RAY_ADDRESS" not in env

    t0 = time.monotonic()
    try:
        try:
            proc = subprocess.run(["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True,
                                  timeout=SCRIPT_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
            pytest.fail(f"run script still running after {SCRIPT_TIMEOUT_S} s; output:\n{out[-6000:]}")
        output = proc.stdout + proc.stderr
        with capsys.disabled():
            print(f"\nrun script ({'managed' if managed else 'plain'}): {time.monotonic() - t0:.1f} s")
        assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n" \
                                     f"{proc.stderr[-8000:]}"
        assert "Ray: 1 node(s) up" in output, output[-4000:]
    finally:
        left = _kill_own(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes of the script's Ray survived SIGKILL: {left}"

    run_key = plan.run_key
    if managed:
        run_key += "-" + hashlib.sha256(task_id.encode()).hexdigest()[:8]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, output[-4000:]
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mmae.run_key` = '{run_key}'")
    assert len(runs) == 1, [r.data.tags.get("mmae.run_key") for r in client.search_runs([exp.experiment_id])]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mmae.launch"] == ("sky-managed" if managed else "sky")
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss/total"))
    assert steps == list(range(1, max_steps + 1))
    assert run.data.tags.get("mmae.checkpoint_step") == str(max_steps)
    assert run.data.tags["mmae.final_weights"] == "weights/final.safetensors"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "weights")] == ["weights/final.safetensors"]
    assert f"finished at step {max_steps}" in output
