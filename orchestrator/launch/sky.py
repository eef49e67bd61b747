"""A job as a SkyPilot task: the task YAML, the checks made before spending money, and the launch itself.

The task is a plain dict in SkyPilot's task YAML schema (what ``--dry-run`` prints and ``sky launch`` accepts); a
`sky.Task` is built from it with SkyPilot's own parser, secret values added only then. ``sky`` is imported inside
functions. Every call that reaches SkyPilot's API goes through `orchestrator.launch.boundary`.

On the nodes: ``setup`` installs the project from the synced workdir into ``~/mmae-venv``; ``run`` starts a Ray
cluster of its own on port 6379 (SkyPilot's Ray owns 6380, facts 1.6), waits for every node, then runs the Ray Train
driver on the head.
"""

from __future__ import annotations

import copy
import csv
import difflib
import logging
import os
import re
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator import spec
from orchestrator.errors import UserError

if TYPE_CHECKING:
    import sky

    from orchestrator.launch.boundary import RecordingBoundary, SkyBoundary
    from orchestrator.spec import JobSpec

__all__ = [
    "FORWARDED_ENV_VARS",
    "LaunchPlan",
    "SECRET_ENV_VARS",
    "check_accelerators",
    "check_bucket_credentials",
    "check_tracking_server",
    "cluster_name_for",
    "dump_task_yaml",
    "estimate_price",
    "make_task",
    "plan_launch",
    "submit",
    "task_config",
]

logger = logging.getLogger(__name__)

SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "HF_TOKEN",
    "DATABRICKS_TOKEN",
)
"""Credentials passed to the nodes as SkyPilot secrets when set here: null in the YAML, values only at launch."""

FORWARDED_ENV_VARS = (
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "DATABRICKS_HOST",
)
"""Non-secret settings copied from this environment into the task's envs when set."""

RAY_TOKEN_SECRET = "RAY_AUTH_TOKEN"
"""Shared Ray token (facts 0.7): a new random one per launch, passed as a secret."""

RAY_PORT = 6379
"""Port of the job's own Ray head; SkyPilot's internal Ray uses 6380."""

VENV = "$HOME/mmae-venv"
"""Virtual environment the setup installs the project into on every node."""

REMOTE_JOB_DIR = "~/.mmae/job"
"""Where the resolved job file lands on every node."""

AUTODOWN_IDLE_MINUTES = 5
"""A cluster launched without --managed tears itself down after this long idle (after the job ends)."""

TRACKING_PROBE_TIMEOUT_S = 5.0
_REMOTE_TRACKING = ("http://", "https://", "databricks")  # tracking URIs a cluster can log to

# SkyPilot's accelerator names (catalog v8 common/accelerators.csv), used when its catalog has not been downloaded
# to this machine yet (it is fetched from GitHub on first use).
_KNOWN_ACCELERATORS = (
    "A10 A100 A100-80GB A100-80GB-SXM A10G A30 A40 A4000 A6000 A800 B200 GB200 GH200 GTX1660S H100 H100-MEGA "
    "H100-NVL H100-NVLINK H100-SXM H200 H200-SXM K80 L4 L40 L40S M4000 M60 MI300X P100 P4 P4000 RTX3060 RTX3070 "
    "RTX3080 RTX3090 RTX4000-Ada RTX4090 RTX5060 RTX5090 RTX6000 RTX6000-Ada RTX6000Ada RTXA4000 RTXA4500 "
    "RTXA5000 RTXA6000 RTXPRO6000S RTXPRO6000WS T4 T4g V100 V100-32GB Gaudi_HL-205 Radeon_MI25 Radeon_Pro_V520 "
    "Inferentia Trainium tpu-v2 tpu-v3 tpu-v4 tpu-v5litepod tpu-v5p tpu-v6e"
).replace("_", " ").split(" ")
_CUSTOM_ACCELERATOR_CLOUDS = {"kubernetes", "k8s", "ssh", "slurm"}  # site-defined GPU names are allowed there
_CLUSTER_CHARS = re.compile(r"[^a-z0-9-]+")


# ---------------------------------------------------------------------------------------------------------------
# Checks made before launching. Each raises UserError with one line.


def _catalog_accelerator_names() -> list[str] | None:
    """Accelerator names from SkyPilot's catalog if it is on this machine already (never downloads it)."""
    try:
        from sky.catalog import common as catalog_common

        path = Path(catalog_common.get_catalog_path("common/accelerators.csv"))
    except Exception:  # noqa: BLE001 - catalog layout changed: fall back to the built-in list
        return None
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        return [row["AcceleratorName"] for row in csv.DictReader(f) if row.get("AcceleratorName")]


def check_accelerators(job: JobSpec) -> str | None:
    """The accelerator name as SkyPilot spells it; UserError if SkyPilot does not know it (offline check)."""
    name = job.resources.accelerator_name
    if name is None:
        return None
    cloud = (job.resources.cloud or "").lower()
    if cloud in _CUSTOM_ACCELERATOR_CLOUDS:
        return name
    known = _catalog_accelerator_names() or list(_KNOWN_ACCELERATORS)
    by_lower = {k.lower(): k for k in known}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    close = difflib.get_close_matches(name.upper(), [k.upper() for k in known], n=1, cutoff=0.6)
    hint = f"; did you mean '{by_lower[close[0].lower()]}'?" if close else " (see `sky show-gpus`)"
    raise UserError(f"resources.accelerators: SkyPilot does not know the accelerator '{name}'{hint}")


def _has_aws_credentials(env: Mapping[str, str]) -> bool:
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return True
    if any(env.get(k) for k in ("AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI")):
        return True
    shared = Path(env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser()
    if shared.is_file():
        return True
    config = Path(env.get("AWS_CONFIG_FILE", "~/.aws/config")).expanduser()
    if config.is_file():
        text = config.read_text(errors="replace")
        return any(k in text for k in ("aws_access_key_id", "credential_process", "sso_", "role_arn"))
    return False


def _has_gcs_credentials(env: Mapping[str, str]) -> bool:
    if env.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return True
    return Path("~/.config/gcloud/application_default_credentials.json").expanduser().is_file()


def bucket_urls(job: JobSpec) -> dict[str, str]:
    """Dotted path -> URL for every object-store location the job names."""
    urls = {"data.train_url": job.data.train_url, "data.val_url": job.data.val_url,
            "checkpoint.storage_url": job.checkpoint.storage_url}
    return {k: v for k, v in urls.items() if v and "://" in v and not v.startswith("file://")}


def check_bucket_credentials(job: JobSpec, env: Mapping[str, str] | None = None) -> None:
    """UserError when the job names an s3:// or gs:// location and no credentials for it can be found here."""
    env = os.environ if env is None else env
    for path, url in bucket_urls(job).items():
        scheme = url.split("://", 1)[0].lower()
        if scheme in ("s3", "s3a") and not _has_aws_credentials(env):
            raise UserError(
                f"{path} is {url} but no AWS credentials were found (set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or create ~/.aws/credentials)"
            )
        if scheme in ("gs", "gcs") and not _has_gcs_credentials(env):
            raise UserError(
                f"{path} is {url} but no Google Cloud credentials were found (set GOOGLE_APPLICATION_CREDENTIALS "
                f"or run `gcloud auth application-default login`)"
            )


def _tracking_uri(env: Mapping[str, str]) -> str | None:
    uri = env.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or None


def check_tracking_server(uri: str | None, *, contact: bool) -> list[str]:
    """Check that a cluster can log to `uri`; returns warnings, raises UserError for what cannot work.

    With `contact`, an http(s) server must answer within a few seconds (any HTTP status counts as an answer).
    """
    warnings: list[str] = []
    if uri is None or not uri.startswith(_REMOTE_TRACKING):
        where = uri or "the local store .mmae/mlflow.db"
        message = (f"MLFLOW_TRACKING_URI must name a tracking server the cluster can reach (http[s]://...), not "
                   f"{where}; see infra/README.md")
        if contact:
            raise UserError(message)
        warnings.append(message)
        return warnings
    if not uri.startswith("http"):
        return warnings
    parts = urllib.parse.urlsplit(uri)
    if parts.password:
        raise UserError("MLFLOW_TRACKING_URI contains a password; put credentials in MLFLOW_TRACKING_USERNAME and "
                        "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
    if parts.hostname in ("localhost", "127.0.0.1", "::1", "0.0.0.0"):
        warnings.append(f"MLFLOW_TRACKING_URI ({uri}) points at this machine; cluster nodes cannot reach it")
    if contact:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=TRACKING_PROBE_TIMEOUT_S) as resp:
                resp.read(64)
        except urllib.error.HTTPError:
            pass  # it answered (auth or routing may differ): reachable
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(f"MLflow tracking server {uri} is not reachable ({reason}); check MLFLOW_TRACKING_URI"
                            ) from None
    return warnings


# ---------------------------------------------------------------------------------------------------------------
# The task.


def cluster_name_for(job: JobSpec) -> str:
    """SkyPilot cluster name of a job: ``mmae-<name>`` in lower case letters, digits and dashes."""
    name = _CLUSTER_CHARS.sub("-", f"mmae-{job.name}".lower()).strip("-")
    return name[:40].rstrip("-")


def project_root() -> Path:
    """The source checkout that is synced to the nodes as the workdir (it holds pyproject.toml)."""
    import orchestrator

    root = Path(orchestrator.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise UserError(f"cannot find the mmae source checkout to sync to the cluster (no pyproject.toml in {root}); "
                        f"install mmae with `pip install -e .` from a checkout")
    return root


def _setup_script() -> str:
    return f"""\
set -euo pipefail
# Install the project (exact pins for torch, ray, mlflow, skypilot in pyproject.toml) into one venv per node.
# --system-site-packages reuses what a prebuilt image (infra/docker/Dockerfile) already holds.
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
  curl -LsSf https://astral.sh/uv/install.sh | sh
fi
uv venv --python 3.11 --system-site-packages --allow-existing "{VENV}"
uv pip install --python "{VENV}/bin/python" -e .
"""


def _run_script(remote_job: str) -> str:
    port = RAY_PORT
    return f"""\
set -euo pipefail
export PATH="{VENV}/bin:$PATH"
HEAD_IP=$(echo "$SKYPILOT_NODE_IPS" | head -n1)
GPUS=${{SKYPILOT_NUM_GPUS_PER_NODE:-0}}
# Our own Ray on {port}: SkyPilot's Ray listens on 6380 and its dashboard agent on 52365 (facts 1.6).
RAY_ARGS="--disable-usage-stats --include-dashboard=false --dashboard-agent-listen-port=52366 --num-gpus=$GPUS"
if [ "$SKYPILOT_NODE_RANK" = "0" ]; then
  # Probe the port first: `ray status` on a node with no Ray waits ~40 s for a GCS before it gives up.
  if ! {{ (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null \\
         && ray status --address=127.0.0.1:{port} >/dev/null 2>&1; }}; then
    ray start --head --port={port} $RAY_ARGS
  fi
  python - <<'EOF'
import os, time, ray
ray.init(address="127.0.0.1:{port}", logging_level="ERROR")
want, deadline = int(os.environ["SKYPILOT_NUM_NODES"]), time.time() + 600
while (have := sum(n["Alive"] for n in ray.nodes())) < want:
    if time.time() > deadline:
        raise SystemExit(f"only {{have}} of {{want}} nodes joined Ray in 600 s")
    time.sleep(2)
print(f"Ray: {{want}} node(s) up")
EOF
  if [ "$MMAE_LAUNCH" = "sky-managed" ]; then
    # SKYPILOT_TASK_ID is the same across recoveries of a managed job: recoveries reopen the same MLflow run.
    export MMAE_RUN_KEY="$MMAE_RUN_KEY-$(printf %s "$SKYPILOT_TASK_ID" | sha256sum | cut -c1-8)"
  fi
  export RAY_ADDRESS=127.0.0.1:{port}
  python -m orchestrator.runtime.entry --job {remote_job}
else
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/$HEAD_IP/{port}") 2>/dev/null \\
      && ray health-check --address="$HEAD_IP:{port}" >/dev/null 2>&1 && break
    sleep 2
  done
  # Fails when this node already runs Ray (a relaunch on a live cluster); the head's wait above catches real failures.
  ray start --address="$HEAD_IP:{port}" $RAY_ARGS || echo "ray start failed (already running here?)"
  sleep 5  # let the raylet daemonize before SkyPilot reaps this script's processes (skypilot#4695)
fi
"""


def _infra(job: JobSpec) -> str | None:
    res = job.resources
    parts = [p for p in (res.cloud, res.region, res.zone) if p]
    return "/".join(parts) or None


def _resources(job: JobSpec, *, managed: bool, accelerator: str | None) -> dict[str, Any]:
    res = job.resources
    out: dict[str, Any] = {}
    if _infra(job):
        out["infra"] = _infra(job)
    if accelerator:
        out["accelerators"] = f"{accelerator}:{res.gpus_per_node}"
    if res.cpus:
        out["cpus"] = res.cpus
    if res.memory:
        out["memory"] = res.memory
    out["use_spot"] = res.use_spot
    out["disk_size"] = res.disk_size
    if res.image_id:
        out["image_id"] = res.image_id
    if managed:
        recovery: dict[str, Any] = {"strategy": res.job_recovery.strategy,
                                    "max_restarts_on_errors": res.job_recovery.max_restarts_on_errors}
        if res.job_recovery.recover_on_exit_codes:
            recovery["recover_on_exit_codes"] = list(res.job_recovery.recover_on_exit_codes)
        out["job_recovery"] = recovery
    return out


def task_config(
    job: JobSpec, *, job_file: Path, workdir: Path, run_key: str, managed: bool, tracking_uri: str | None,
    env: Mapping[str, str], accelerator: str | None = None,
) -> dict[str, Any]:
    """The SkyPilot task YAML (as a dict) for `job`; secrets appear by name only, with null values."""
    remote_job = f"{REMOTE_JOB_DIR}/{job_file.name}"
    envs: dict[str, str] = {
        "MMAE_JOB_NAME": job.name,
        "MMAE_RUN_KEY": run_key,
        "MMAE_LAUNCH": "sky-managed" if managed else "sky",
        "MMAE_DATA_TRAIN_URL": job.data.train_url,
        "MMAE_CHECKPOINT_URL": job.checkpoint.storage_url,
    }
    if job.data.val_url:
        envs["MMAE_DATA_VAL_URL"] = job.data.val_url
    if tracking_uri:
        envs["MLFLOW_TRACKING_URI"] = tracking_uri
    envs["RAY_AUTH_MODE"] = "token"
    envs["RAY_USAGE_STATS_ENABLED"] = "0"
    for name in FORWARDED_ENV_VARS:
        if env.get(name):
            envs[name] = env[name]
    secret_names = [name for name in SECRET_ENV_VARS if env.get(name)] + [RAY_TOKEN_SECRET]
    return {
        "name": job.name,
        "resources": _resources(job, managed=managed, accelerator=accelerator or job.resources.accelerator_name),
        "num_nodes": job.resources.num_nodes,
        "workdir": str(workdir),
        "file_mounts": {remote_job: str(job_file)},
        "envs": envs,
        "secrets": {name: None for name in secret_names},
        "setup": _setup_script(),
        "run": _run_script(remote_job),
    }


class _TaskDumper(yaml.SafeDumper):
    """Block style for multi-line strings, so setup and run read as scripts."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_TaskDumper.add_representer(str, _str_representer)


def dump_task_yaml(config: Mapping[str, Any]) -> str:
    """The task as YAML text (valid input for `sky launch`)."""
    return yaml.dump(dict(config), Dumper=_TaskDumper, sort_keys=False, default_flow_style=False, width=120)


def make_task(config: Mapping[str, Any], secret_values: Mapping[str, str] | None = None) -> sky.Task:
    """A `sky.Task` from the task dict, parsed by SkyPilot itself; secret values are added only here."""
    import sky

    overrides = [(k, v) for k, v in (secret_values or {}).items() if k in (config.get("secrets") or {})]
    try:
        return sky.Task.from_yaml_config(copy.deepcopy(dict(config)), secrets_overrides=overrides or None)
    except Exception as err:  # SkyPilot raises ValueError / InvalidSkyPilotConfigError / its own errors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        for name, value in (secret_values or {}).items():  # never echo a secret, even in an error
            first = first.replace(value, f"<{name}>") if value else first
        raise UserError(f"SkyPilot rejected the task: {first}") from None


# ---------------------------------------------------------------------------------------------------------------
# The launch.


@dataclass
class LaunchPlan:
    """Everything decided before the money is spent."""

    job: JobSpec
    managed: bool
    config: dict[str, Any]
    """SkyPilot task YAML as a dict: what --dry-run prints."""
    secret_values: dict[str, str] = field(repr=False)
    """Secret name -> value; given to SkyPilot at launch, never printed."""
    run_key: str
    job_file: Path
    cluster_name: str
    """Cluster of a plain launch; a managed job gets its clusters from the jobs controller."""
    warnings: list[str] = field(default_factory=list)

    def yaml(self) -> str:
        return dump_task_yaml(self.config)

    def describe(self, price: tuple[float, str] | None) -> list[str]:
        """What will be launched, for the confirmation prompt (no secret values)."""
        res = self.job.resources
        low, high = res.worker_bounds
        gpus = res.num_nodes * res.gpus_per_node
        accel = f"{self.config['resources'].get('accelerators')} per node ({gpus} in all)" if gpus else "CPUs only"
        kind = "managed job (recovers from preemption)" if self.managed else f"cluster {self.cluster_name}"
        lines = [
            f"launch {self.job.name} as a SkyPilot {kind}",
            f"  nodes:       {res.num_nodes} x {accel}",
            f"  spot:        {'yes' if res.use_spot else 'no'}",
            f"  where:       {_infra(self.job) or 'cheapest enabled cloud'}",
            f"  workers:     {high}" + (f" (elastic, at least {low})" if low != high else ""),
            f"  run key:     {self.run_key}" + ("-<hash of SKYPILOT_TASK_ID>" if self.managed else ""),
            f"  tracking:    {self.config['envs'].get('MLFLOW_TRACKING_URI', '-')} ({self.job.tracking.experiment})",
        ]
        if not gpus:
            lines.append("  price:       not estimated for CPU-only nodes")
        elif price is None:
            lines.append("  price:       unavailable offline (SkyPilot's catalog could not be read)")
        else:
            per_node, where = price
            lines.append(f"  price:       ~${per_node * res.num_nodes:,.2f}/h for {res.num_nodes} node(s) "
                         f"(${per_node:,.2f}/h each, {where}{', spot' if res.use_spot else ''})")
        return lines


def _write_job_file(job: JobSpec, directory: Path, stem: str) -> Path:
    """The resolved job, with the worker bounds made explicit, written atomically under `directory`."""
    low, high = job.resources.worker_bounds
    resolved = job.model_copy(update={"resources": job.resources.model_copy(
        update={"min_workers": low, "max_workers": high})})
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.yaml"
    tmp = path.with_suffix(f".yaml.tmp-{os.getpid()}")
    tmp.write_text(spec.render(resolved), encoding="utf-8")
    tmp.replace(path)
    return path


def plan_launch(
    job: JobSpec, *, managed: bool = False, fresh: bool = False, contact: bool = True,
    env: Mapping[str, str] | None = None, state_dir: Path | None = None,
) -> LaunchPlan:
    """Check the job for a cloud launch and build its task. `contact=False` (dry run) skips the tracking probe.

    Writes the resolved job file under `state_dir` (default ``.mmae/launch``): the task mounts it on every node.
    """
    env = dict(os.environ if env is None else env)
    managed = managed or job.resources.use_spot
    accelerator = check_accelerators(job)
    check_bucket_credentials(job, env)
    uri = _tracking_uri(env)
    warnings = check_tracking_server(uri, contact=contact)
    for path, url in {"data.train_url": job.data.train_url, "data.val_url": job.data.val_url}.items():
        if url and "://" not in url:
            warnings.append(f"{path} ({url}) is a local path: on the cluster it is read relative to the synced "
                            f"workdir, and git-ignored files are not synced")
    run_key = spec.run_name(job)
    if fresh:
        run_key += time.strftime("-%Y%m%dT%H%M%S", time.gmtime()) + secrets.token_hex(2)
    job_file = _write_job_file(job, state_dir or Path.cwd() / ".mmae" / "launch", spec.run_name(job))
    config = task_config(job, job_file=job_file, workdir=project_root(), run_key=run_key, managed=managed,
                         tracking_uri=uri if uri and uri.startswith(_REMOTE_TRACKING) else None, env=env,
                         accelerator=accelerator)
    secret_values = {name: env[name] for name in config["secrets"] if env.get(name)}
    secret_values[RAY_TOKEN_SECRET] = secrets.token_hex(32)
    return LaunchPlan(job=job, managed=managed, config=config, secret_values=secret_values, run_key=run_key,
                      job_file=job_file, cluster_name=cluster_name_for(job), warnings=warnings)


def sky_launch_hint(plan: LaunchPlan) -> str:
    """How to launch the printed YAML with SkyPilot's own CLI (secrets by name: SkyPilot reads them from env)."""
    verb = "sky jobs launch" if plan.managed else f"sky launch -c {plan.cluster_name}"
    flags = " ".join(f"--secret {name}" for name in plan.config["secrets"] if name != RAY_TOKEN_SECRET)
    token = f"--secret {RAY_TOKEN_SECRET}=$(openssl rand -hex 32)"
    return " ".join(part for part in (verb, "task.yaml", flags, token) if part)


def estimate_price(plan: LaunchPlan, boundary: SkyBoundary | RecordingBoundary) -> tuple[float, str] | None:
    """Cheapest catalog price per node-hour, or None (no accelerators, or the catalog cannot be fetched)."""
    res = plan.job.resources
    accelerator = plan.config["resources"].get("accelerators")
    if not accelerator:
        return None
    name = accelerator.partition(":")[0]
    return boundary.estimate_hourly_price(accelerator=name, count=res.gpus_per_node, use_spot=res.use_spot,
                                          cloud=res.cloud, region=res.region)


def submit(plan: LaunchPlan, boundary: SkyBoundary | RecordingBoundary, *, detach: bool = False) -> dict[str, Any]:
    """Hand the task to SkyPilot: a managed job, or a cluster that tears itself down when idle."""
    task = make_task(plan.config, plan.secret_values)
    if plan.managed:
        return boundary.jobs_launch(task, name=plan.job.name, detach=detach)
    return boundary.launch(task, cluster_name=plan.cluster_name, down=True, idle_minutes=AUTODOWN_IDLE_MINUTES,
                           detach=detach)
