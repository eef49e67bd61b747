"""The SkyPilot task built from a job: parsed by SkyPilot's own parser, secrets only by name, pre-launch checks."""

from __future__ import annotations

import copy
import hashlib
import os
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from orchestrator import spec
from orchestrator.errors import UserError
from orchestrator.launch import sky as sky_task

REPO = Path(__file__).resolve().parents[3]
JOB_FILES = sorted((REPO / "jobs").glob("*.yaml"))

SENTINELS = {
    "AWS_ACCESS_KEY_ID": "AKIASENTINEL0000KEYID",
    "AWS_SECRET_ACCESS_KEY": "sentinel-aws-secret-7f3a9c",
    "MLFLOW_TRACKING_TOKEN": "sentinel-mlflow-token-41be",
}

TWO_NODE_SPOT = """\
name: spot-pretrain
model: {preset: tiny, image_size: 64, patch_size: 16}
masking: {num_encoded_tokens: 16}
data: {train_url: s3://team-bucket/data/train, val_url: s3://team-bucket/data/val}
checkpoint: {storage_url: s3://team-bucket/checkpoints}
train: {global_batch_size: 64, per_worker_batch_size: 8, epochs: 1}
resources: {accelerators: "H100:4", num_nodes: 2, use_spot: true, cloud: aws, region: us-east-1, min_workers: 4}
"""


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A launching environment with no stray credentials: HOME is empty, cwd is tmp_path."""
    for name in [*sky_task.SECRET_ENV_VARS, *sky_task.FORWARDED_ENV_VARS, "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
                 "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "GOOGLE_APPLICATION_CREDENTIALS", "MLFLOW_TRACKING_URI"]:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return {"HOME": str(home)}


@pytest.fixture
def launch_env(clean_env: dict[str, str]) -> dict[str, str]:
    return {**clean_env, **SENTINELS, "MLFLOW_TRACKING_URI": "http://mlflow.team.example:5000",
            "AWS_DEFAULT_REGION": "us-east-1"}


def _job(tmp_path: Path, text: str = TWO_NODE_SPOT, overrides: tuple[str, ...] = ()) -> spec.JobSpec:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return spec.load_job(path, list(overrides))


def test_task_passes_skypilot_parser(tmp_path: Path, launch_env: dict[str, str]) -> None:
    import sky

    job = _job(tmp_path)
    plan = sky_task.plan_launch(job, contact=False, env=launch_env)
    config = yaml.safe_load(plan.yaml())
    assert config == plan.config  # the printed YAML is the dict, nothing lost in dumping
    task = sky.Task.from_yaml_config(copy.deepcopy(config))  # the parser consumes its input

    assert task.num_nodes == 2
    (res,) = task.resources
    assert res.accelerators == {"H100": 4}
    assert res.use_spot is True
    assert str(res.cloud) == "AWS" and res.region == "us-east-1"
    assert res.disk_size == job.resources.disk_size
    assert plan.managed  # use_spot -> managed job with a recovery policy
    assert config["resources"]["job_recovery"]["strategy"] == "EAGER_NEXT_REGION"

    envs = task.envs
    assert envs["MMAE_JOB_NAME"] == "spot-pretrain"
    assert envs["MMAE_RUN_KEY"] == f"spot-pretrain-{spec.job_hash(job)}"
    assert envs["MMAE_LAUNCH"] == "sky-managed"
    assert envs["MLFLOW_TRACKING_URI"] == "http://mlflow.team.example:5000"
    assert envs["MMAE_CHECKPOINT_URL"] == "s3://team-bucket/checkpoints"
    assert envs["RAY_AUTH_MODE"] == "token"
    assert envs["AWS_DEFAULT_REGION"] == "us-east-1"

    # Ray of our own on 6379 (never SkyPilot's 6380), the driver on rank 0 only, the job file mounted.
    assert "ray start --head --port=6379" in task.run
    assert 'ray start --address="$HEAD_IP:6379"' in task.run
    assert ":6380" not in task.run and "port=6380" not in task.run
    (remote, local), = task.file_mounts.items()
    assert f"python -m orchestrator.runtime.entry --job {remote}" in task.run
    assert task.run.index('"$SKYPILOT_NODE_RANK" = "0"') < task.run.index("orchestrator.runtime.entry")
    assert "pip install" in task.setup and "-e ." in task.setup
    assert Path(task.workdir) == REPO


def test_mounted_job_file_is_the_resolved_job_with_worker_bounds(tmp_path: Path, launch_env: dict[str, str]) -> None:
    job = _job(tmp_path)
    plan = sky_task.plan_launch(job, contact=False, env=launch_env)
    (local,) = plan.config["file_mounts"].values()
    mounted = spec.load_job(local)
    # one worker per GPU of the cluster (2 nodes x 4), at least min_workers; the training config is unchanged
    assert (mounted.resources.min_workers, mounted.resources.max_workers) == (4, 2 * 4)
    assert spec.job_hash(mounted) == spec.job_hash(job)
    assert mounted.model_dump(exclude={"resources"}) == job.model_dump(exclude={"resources"})


def test_secret_values_never_in_yaml_but_reach_skypilot(tmp_path: Path, launch_env: dict[str, str]) -> None:
    job = _job(tmp_path)
    plan = sky_task.plan_launch(job, contact=False, env=launch_env)
    text = plan.yaml()
    for value in SENTINELS.values():
        assert value not in text
    assert plan.config["secrets"] == {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                                      "MLFLOW_TRACKING_TOKEN": None, "RAY_AUTH_TOKEN": None}
    assert not set(SENTINELS) & set(plan.config["envs"])  # never as plain envs
    assert SENTINELS["AWS_SECRET_ACCESS_KEY"] not in repr(plan)

    task = sky_task.make_task(plan.config, plan.secret_values)
    # what SkyPilot would send at launch carries the values...
    sent = task.to_yaml_config()["secrets"]
    assert sent["AWS_SECRET_ACCESS_KEY"] == SENTINELS["AWS_SECRET_ACCESS_KEY"]
    assert sent["MLFLOW_TRACKING_TOKEN"] == SENTINELS["MLFLOW_TRACKING_TOKEN"]
    assert len(sent["RAY_AUTH_TOKEN"]) == 64
    # ...and its own redacted view of the task does not
    shown = yaml.safe_dump(task.to_yaml_config(use_user_specified_yaml=True))
    for value in SENTINELS.values():
        assert value not in shown


def test_fresh_tokens_and_keys_per_launch(tmp_path: Path, launch_env: dict[str, str]) -> None:
    job = _job(tmp_path)
    a = sky_task.plan_launch(job, contact=False, env=launch_env)
    b = sky_task.plan_launch(job, contact=False, env=launch_env, fresh=True)
    assert a.secret_values["RAY_AUTH_TOKEN"] != b.secret_values["RAY_AUTH_TOKEN"]
    assert b.run_key.startswith(a.run_key + "-") and b.run_key != a.run_key
    assert b.config["envs"]["MMAE_RUN_KEY"] == b.run_key


def test_on_demand_cluster_has_no_recovery_and_managed_flag_adds_it(tmp_path: Path,
                                                                    launch_env: dict[str, str]) -> None:
    job = _job(tmp_path, overrides=("resources.use_spot=false",))
    plain = sky_task.plan_launch(job, contact=False, env=launch_env)
    assert not plain.managed
    assert "job_recovery" not in plain.config["resources"]
    assert plain.config["resources"]["use_spot"] is False
    assert plain.config["envs"]["MMAE_LAUNCH"] == "sky"
    assert plain.cluster_name == "mmae-spot-pretrain"
    managed = sky_task.plan_launch(job, managed=True, contact=False, env=launch_env)
    assert managed.managed and managed.config["resources"]["job_recovery"]["max_restarts_on_errors"] == 0


def test_managed_run_key_matches_the_runtime(tmp_path: Path, launch_env: dict[str, str]) -> None:
    """The run script's key for managed jobs equals what the runtime derives from SKYPILOT_TASK_ID itself."""
    from orchestrator.runtime.tracking import resolve_run_key

    job = _job(tmp_path)
    plan = sky_task.plan_launch(job, contact=False, env=launch_env)
    line = next(ln.strip() for ln in plan.config["run"].splitlines() if "export MMAE_RUN_KEY=" in ln)
    task_id = "sky-managed-2026-11-27-10-00-00-123456_spot-pretrain_7-0"
    env = {"PATH": os.environ["PATH"], "MMAE_RUN_KEY": plan.run_key, "SKYPILOT_TASK_ID": task_id}
    out = subprocess.run(["bash", "-c", f'set -euo pipefail; {line}; printf %s "$MMAE_RUN_KEY"'], env=env,
                         capture_output=True, text=True, check=True).stdout
    expected = resolve_run_key(job, env={"SKYPILOT_MANAGED_JOB_ID": "7", "SKYPILOT_TASK_ID": task_id})
    assert out == expected == f"{plan.run_key}-{hashlib.sha256(task_id.encode()).hexdigest()[:8]}"


def test_setup_and_run_are_valid_bash(tmp_path: Path, launch_env: dict[str, str]) -> None:
    plan = sky_task.plan_launch(_job(tmp_path), contact=False, env=launch_env)
    for key in ("setup", "run"):
        result = subprocess.run(["bash", "-n"], input=plan.config[key], capture_output=True, text=True)
        assert result.returncode == 0, (key, result.stderr)


def test_unknown_accelerator_is_a_user_error(tmp_path: Path, launch_env: dict[str, str]) -> None:
    job = _job(tmp_path, overrides=("resources.accelerators=H10O:4",))
    with pytest.raises(UserError, match=r"resources.accelerators: SkyPilot does not know the accelerator 'H10O'; "
                                        r"did you mean 'H100'\?"):
        sky_task.plan_launch(job, contact=False, env=launch_env)
    with pytest.raises(UserError, match="does not know the accelerator 'Quantum9000'"):
        sky_task.plan_launch(_job(tmp_path, overrides=("resources.accelerators=Quantum9000:4",)), contact=False,
                             env=launch_env)
    # case-insensitive names are canonicalised, custom names pass on Kubernetes
    lower = sky_task.plan_launch(_job(tmp_path, overrides=("resources.accelerators=a100-80gb:4",)), contact=False,
                                 env=launch_env)
    assert lower.config["resources"]["accelerators"] == "A100-80GB:4"
    k8s = _job(tmp_path, overrides=("resources.accelerators=MyLabGPU:4", "resources.cloud=kubernetes",
                                    "resources.region=null"))
    assert sky_task.plan_launch(k8s, contact=False, env=launch_env).config["resources"]["accelerators"] == "MyLabGPU:4"


def test_bucket_without_credentials_is_a_user_error(tmp_path: Path, clean_env: dict[str, str]) -> None:
    job = _job(tmp_path)
    env = {**clean_env, "MLFLOW_TRACKING_URI": "http://mlflow.team.example:5000"}
    with pytest.raises(UserError, match=r"data.train_url is s3://team-bucket/data/train but no AWS credentials"):
        sky_task.plan_launch(job, contact=False, env=env)
    # a credentials file is enough
    aws = Path(clean_env["HOME"]) / ".aws"
    aws.mkdir()
    (aws / "credentials").write_text("[default]\naws_access_key_id = x\naws_secret_access_key = y\n")
    assert sky_task.plan_launch(job, contact=False, env=env).config["secrets"] == {"RAY_AUTH_TOKEN": None}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_server_checks(tmp_path: Path, launch_env: dict[str, str]) -> None:
    job = _job(tmp_path)
    down = {**launch_env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_closed_port()}"}
    with pytest.raises(UserError, match=r"MLflow tracking server http://127.0.0.1:\d+ is not reachable"):
        sky_task.plan_launch(job, contact=True, env=down)
    local = {k: v for k, v in launch_env.items() if k != "MLFLOW_TRACKING_URI"}
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI must name a tracking server the cluster can reach"):
        sky_task.plan_launch(job, contact=True, env=local)
    # a dry run only warns, and leaves the URI out rather than pointing nodes at this laptop's file
    plan = sky_task.plan_launch(job, contact=False, env=local)
    assert "MLFLOW_TRACKING_URI" not in plan.config["envs"]
    assert any("MLFLOW_TRACKING_URI must name" in w for w in plan.warnings)
    with_password = {**launch_env, "MLFLOW_TRACKING_URI": "http://bob:hunter2@mlflow.team.example:5000"}
    with pytest.raises(UserError, match="contains a password") as err:
        sky_task.plan_launch(job, contact=False, env=with_password)
    assert "hunter2" not in str(err.value)


def test_skypilot_rejection_is_one_line_without_secrets() -> None:
    bad = {"name": "x", "resources": {"infra": "nocloud/us-east-1"}, "run": "true", "secrets": {"TOKEN": None}}
    with pytest.raises(UserError, match=r"^SkyPilot rejected the task: .*nocloud") as err:
        sky_task.make_task(bad, {"TOKEN": "sentinel-value-9"})
    assert "sentinel-value-9" not in str(err.value) and "\n" not in str(err.value)


def test_jobs_folder_has_the_issue_jobs() -> None:
    names = {p.name for p in JOB_FILES}
    assert {"pretrain_base.yaml", "pretrain_tiny.yaml"} <= names, names


@pytest.mark.parametrize("job_file", JOB_FILES, ids=[p.name for p in JOB_FILES])
def test_every_job_file_makes_a_valid_skypilot_task(job_file: Path, tmp_path: Path,
                                                    launch_env: dict[str, str]) -> None:
    import sky

    job = spec.load_job(job_file)
    plan = sky_task.plan_launch(job, contact=False, env=launch_env)
    task = sky.Task.from_yaml_config(yaml.safe_load(plan.yaml()))
    assert task.num_nodes == job.resources.num_nodes
    (res,) = task.resources
    if job.resources.accelerators:
        assert res.accelerators == {job.resources.accelerator_name: job.resources.gpus_per_node}
    assert res.use_spot == job.resources.use_spot
    assert task.envs["MMAE_JOB_NAME"] == job.name
