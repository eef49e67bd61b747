"""`mmae status`, `logs` and `down`: MLflow runs joined with SkyPilot clusters and managed jobs.

MLflow is read with one `MlflowClient.search_runs` call; SkyPilot through `orchestrator.launch.boundary`, and only
when its API server already answers (status never starts one). Whatever cannot be reached is named in one line.
"""

from __future__ import annotations

import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UserError

if TYPE_CHECKING:
    from orchestrator.launch.boundary import RecordingBoundary, SkyBoundary

    Boundary = SkyBoundary | RecordingBoundary

__all__ = [
    "COLUMNS",
    "StatusReport",
    "Target",
    "collect",
    "down",
    "link_children",
    "resolve_target",
    "tail_logs",
    "tracking_uri",
]

logger = logging.getLogger(__name__)

COLUMNS = ("name", "stage", "state", "steps", "loss", "img_per_s", "started", "duration", "run_id", "parent",
           "cluster", "sky_state", "resources", "recoveries")
"""Columns of the status table (the JSON rows carry more)."""

RECENT_RUNS = 20
"""Runs `mmae status` shows without --all (newest first); unfinished runs are always shown."""

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_ACTIVE = ("RUNNING", "SCHEDULED")
_CONTROLLER = re.compile(r"^sky-(jobs|serve)-controller-")
_LOSS = "train/loss/total"
_SPEED = "images_per_s"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the local store ``sqlite:///<cwd>/.mmae/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / '.mmae' / 'mlflow.db'}"


def _shown(uri: str) -> str:
    """A URI as it may be printed: without a user:password part."""
    from orchestrator.launch.boundary import display_url

    return display_url(uri)


def _tracking_problem(uri: str) -> str | None:
    """None when the tracking store can be read quickly; else what could not be reached."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        return None if path.is_file() else f"no MLflow runs yet (no tracking store at {path})"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{_shown(uri).rstrip('/')}/health", timeout=3) as resp:
                resp.read(64)
        except urllib.error.HTTPError:
            return None  # it answered; the client will authenticate
        except (urllib.error.URLError, OSError) as err:
            return f"MLflow tracking server {_shown(uri)} not reachable ({getattr(err, 'reason', err)})"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Rows.


def _when(ms: int | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else None


def _duration(seconds: float | None) -> str | None:
    if seconds is None or seconds < 0:
        return None
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 24:
        return f"{hours // 24}d{hours % 24:02d}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _steps_done(run: Any) -> int | None:
    """Last optimizer step with a logged metric (MLflow keeps each metric's latest step with the run)."""
    metrics = getattr(run.data, "_metric_objs", None) or []
    steps = [m.step for m in metrics if m.key in (_LOSS, _SPEED)] or [m.step for m in metrics]
    return max(steps) if steps else None


def run_row(run: Any, *, now: float | None = None) -> dict[str, Any]:
    """One MLflow run as a status row (the SkyPilot columns are filled in by the join)."""
    info, tags, metrics = run.info, run.data.tags, run.data.metrics
    done = _steps_done(run)
    total = tags.get("mmae.total_steps")
    end = info.end_time / 1000 if info.end_time else (now or time.time())
    parent = tags.get("mmae.parent_run_id") or tags.get("mlflow.parentRunId")
    return {
        "name": info.run_name,
        "stage": tags.get("mmae.stage"),
        "state": info.status,
        "steps": None if done is None and not total else f"{done if done is not None else 0}/{total or '?'}",
        "step": done,
        "total_steps": int(total) if total and total.isdigit() else None,
        "loss": metrics.get(_LOSS),
        "img_per_s": metrics.get(_SPEED),
        "started": _when(info.start_time),
        "duration": _duration(end - info.start_time / 1000) if info.start_time else None,
        "run_id": info.run_id,
        "parent": parent[:8] if parent else None,
        "parent_run_id": parent,
        "launch": tags.get("mmae.launch"),
        "cluster": tags.get("mmae.sky_cluster"),
        "sky_job_id": tags.get("mmae.sky_job_id"),
        "sky_state": None,
        "resources": None,
        "recoveries": None,
        "checkpoint_uri": tags.get("mmae.checkpoint_uri"),
    }


def link_children(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every run row ``children``: the run ids of the listed runs whose parent it is (fine-tuning lineage)."""
    children: dict[str, list[str]] = {}
    for row in rows:
        if row.get("parent_run_id"):
            children.setdefault(row["parent_run_id"], []).append(row["run_id"])
    for row in rows:
        row["children"] = children.get(row["run_id"], [])
    return rows


def _sky_row(name: str | None, *, cluster: str | None, state: str | None, resources: str | None,
             recoveries: int | None, sky_job_id: Any = None) -> dict[str, Any]:
    return {"name": name, "stage": None, "state": None, "steps": None, "loss": None, "img_per_s": None,
            "started": None, "duration": None, "run_id": None, "parent": None, "cluster": cluster,
            "sky_state": state, "resources": resources, "recoveries": recoveries,
            "sky_job_id": None if sky_job_id is None else str(sky_job_id)}


def join(runs: Sequence[dict[str, Any]], clusters: Sequence[Mapping[str, Any]] | None,
         managed_jobs: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Run rows with their cluster or managed job filled in, then the clusters and jobs no run claims.

    None for `clusters`/`managed_jobs` means SkyPilot was not reached: those columns stay empty.
    """
    by_cluster = {c["name"]: c for c in clusters or []}
    by_job = {str(j["job_id"]): j for j in managed_jobs or []}
    claimed_clusters: set[str] = set()
    claimed_jobs: set[str] = set()
    rows = []
    for row in runs:
        row = dict(row)
        job = by_job.get(str(row.get("sky_job_id"))) if row.get("launch") == "sky-managed" else None
        cluster = by_cluster.get(row.get("cluster") or "")
        if job is not None:
            claimed_jobs.add(str(job["job_id"]))
            row.update(sky_state=job.get("status"), resources=job.get("resources"),
                       recoveries=job.get("recovery_count"), cluster=job.get("cluster") or row.get("cluster"))
            if job.get("cluster"):
                claimed_clusters.add(job["cluster"])
        elif cluster is not None:
            claimed_clusters.add(cluster["name"])
            row.update(sky_state=cluster.get("status"), resources=cluster.get("resources"))
        elif (row.get("launch") or "").startswith("sky") and clusters is not None:
            row["sky_state"] = "gone"
        rows.append(row)
    for job in managed_jobs or []:
        if str(job["job_id"]) not in claimed_jobs:
            if job.get("cluster"):
                claimed_clusters.add(job["cluster"])
            rows.append(_sky_row(job.get("name"), cluster=job.get("cluster"), state=job.get("status"),
                                 resources=job.get("resources"), recoveries=job.get("recovery_count"),
                                 sky_job_id=job.get("job_id")))
    for cluster in clusters or []:
        if cluster["name"] not in claimed_clusters and not _CONTROLLER.match(cluster["name"]):
            rows.append(_sky_row(cluster["name"], cluster=cluster["name"], state=cluster.get("status"),
                                 resources=cluster.get("resources"), recoveries=None))
    return rows


@dataclass
class StatusReport:
    """What `mmae status` shows."""

    rows: list[dict[str, Any]]
    clusters: list[dict[str, Any]] | None
    """None when SkyPilot was not reached."""
    managed_jobs: list[dict[str, Any]] | None
    tracking_uri: str
    unreachable: list[str] = field(default_factory=list)
    """What could not be reached, one phrase each."""

    def to_json(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "rows": self.rows, "clusters": self.clusters,
                "managed_jobs": self.managed_jobs, "unreachable": self.unreachable}

    def note(self) -> str | None:
        """One line naming what could not be reached, or None."""
        return "; ".join(self.unreachable) if self.unreachable else None


def _select(heads: Sequence[Any], *, all_runs: bool, status_of: Any) -> list[Any]:
    """Newest first; without `all_runs`, the RECENT_RUNS newest plus older runs still RUNNING."""
    if all_runs:
        return list(heads)
    return [h for i, h in enumerate(heads) if i < RECENT_RUNS or status_of(h) == "RUNNING"]


def search_runs(uri: str, *, all_runs: bool) -> list[Any]:
    """The mmae runs (tagged ``mmae.run_key``) in the tracking store, newest first.

    A local sqlite store is read directly (read-only, stdlib sqlite3): `import mlflow` plus its SQLAlchemy store
    take ~2 s on a small machine, the whole budget of `mmae status`. Any other store, or a sqlite schema this
    reader does not recognise, goes through `MlflowClient.search_runs`.
    """
    if uri.startswith("sqlite:///"):
        runs = _sqlite_runs(Path(uri.removeprefix("sqlite:///")), all_runs=all_runs)
        if runs is not None:
            return runs
    return _client_runs(uri, all_runs=all_runs)


def _client_runs(uri: str, *, all_runs: bool) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    query = "tags.`mmae.run_key` LIKE '%'"
    order = ["attributes.start_time DESC"]
    if all_runs:
        runs, token = [], None
        while True:
            page = client.search_runs(experiment_ids, query, order_by=order, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs
    recent = list(client.search_runs(experiment_ids, query, order_by=order, max_results=RECENT_RUNS))
    if len(recent) == RECENT_RUNS:  # older runs still going are worth showing too
        seen = {r.info.run_id for r in recent}
        active = client.search_runs(experiment_ids, f"{query} and attributes.status = 'RUNNING'", order_by=order,
                                    max_results=1000)
        recent.extend(r for r in active if r.info.run_id not in seen)
    return recent


@dataclass(frozen=True)
class _Metric:
    key: str
    value: float
    step: int


@dataclass
class _RunInfo:
    run_id: str
    run_name: str | None
    status: str
    start_time: int | None
    end_time: int | None


@dataclass
class _RunData:
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    _metric_objs: list[_Metric] = field(default_factory=list)


@dataclass
class _Run:
    """The parts of `mlflow.entities.Run` that `run_row` reads."""

    info: _RunInfo
    data: _RunData


_SQLITE_COLUMNS = {
    "experiments": {"experiment_id", "lifecycle_stage"},
    "runs": {"run_uuid", "name", "status", "start_time", "end_time", "lifecycle_stage", "experiment_id"},
    "tags": {"key", "value", "run_uuid"},
    "latest_metrics": {"key", "value", "step", "is_nan", "run_uuid"},
}


def _sqlite_runs(path: Path, *, all_runs: bool) -> list[_Run] | None:
    """Runs read straight from MLflow's sqlite schema; None when the tables do not look as expected."""
    import contextlib
    import sqlite3

    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return None
    with contextlib.closing(db):
        try:
            for table, columns in _SQLITE_COLUMNS.items():
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if not columns <= have:
                    logger.debug("sqlite store %s: table %s lacks %s", path, table, columns - have)
                    return None
            heads = db.execute(
                "SELECT r.run_uuid, r.name, r.status, r.start_time, r.end_time FROM runs r "
                "JOIN experiments e ON e.experiment_id = r.experiment_id "
                "WHERE r.lifecycle_stage = 'active' AND e.lifecycle_stage = 'active' AND EXISTS "
                "(SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = 'mmae.run_key') "
                "ORDER BY r.start_time DESC, r.run_uuid"
            ).fetchall()
            chosen = _select(heads, all_runs=all_runs, status_of=lambda h: h[2])
            runs = {h[0]: _Run(_RunInfo(h[0], h[1], h[2], h[3], h[4]), _RunData()) for h in chosen}
            ids = list(runs)
            for start in range(0, len(ids), 500):  # stay under sqlite's bound-parameter limit
                batch = ids[start:start + 500]
                marks = ",".join("?" * len(batch))
                for run_id, key, value in db.execute(
                        f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({marks})", batch):
                    runs[run_id].data.tags[key] = value
                for run_id, key, value, step, is_nan in db.execute(
                        f"SELECT run_uuid, key, value, step, is_nan FROM latest_metrics WHERE run_uuid IN ({marks})",
                        batch):
                    value = float("nan") if is_nan else float(value)
                    runs[run_id].data.metrics[key] = value
                    runs[run_id].data._metric_objs.append(_Metric(key, value, int(step)))
        except sqlite3.Error as err:
            logger.debug("sqlite store %s not readable directly: %s", path, err)
            return None
    return list(runs.values())


def _sky_state(boundary: Boundary, *, all_users: bool) -> tuple[list | None, list | None, list[str]]:
    problem = boundary.server_problem()
    if problem:
        return None, None, [f"{problem}: clusters and managed jobs not shown"]
    unreachable: list[str] = []
    clusters = managed = None
    try:
        clusters = boundary.status(all_users=all_users)
    except Exception as err:  # noqa: BLE001 - any failure here is "could not reach"
        unreachable.append(f"SkyPilot clusters not shown ({_one_line(err)})")
    try:
        managed = boundary.jobs_queue(all_users=all_users)
    except Exception as err:  # noqa: BLE001
        unreachable.append(f"SkyPilot managed jobs not shown ({_one_line(err)})")
    return clusters, managed, unreachable


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def collect(*, all_runs: bool = False, boundary: Boundary | None = None, uri: str | None = None) -> StatusReport:
    """Runs from MLflow joined with SkyPilot's clusters and managed jobs; unreachable parts are noted, not fatal."""
    from orchestrator.launch.boundary import get_boundary

    boundary = boundary or get_boundary()
    uri = uri or tracking_uri()
    unreachable: list[str] = []
    runs: list[dict[str, Any]] = []
    problem = _tracking_problem(uri)
    if problem:
        unreachable.append(problem)
    else:
        try:
            now = time.time()
            runs = link_children([run_row(r, now=now) for r in search_runs(uri, all_runs=all_runs)])
        except Exception as err:  # noqa: BLE001 - show SkyPilot's side even when MLflow fails
            unreachable.append(f"MLflow runs not shown ({_one_line(err)})")
    clusters, managed, sky_problems = _sky_state(boundary, all_users=all_runs)
    unreachable.extend(sky_problems)
    return StatusReport(rows=join(runs, clusters, managed), clusters=clusters, managed_jobs=managed,
                        tracking_uri=_shown(uri), unreachable=unreachable)


# ---------------------------------------------------------------------------------------------------------------
# logs and down.


@dataclass(frozen=True)
class Target:
    """What a RUN|CLUSTER argument names on SkyPilot."""

    label: str
    cluster: str | None = None
    job_id: int | None = None
    """Job on `cluster` (None: its latest job)."""
    managed_job_id: int | None = None
    run_id: str | None = None

    def describe(self) -> str:
        if self.managed_job_id is not None:
            return f"managed job {self.managed_job_id} ({self.label})"
        return f"cluster {self.cluster}" + (f" (run {self.run_id})" if self.run_id else "")


def _target_from_run(run_id: str) -> Target | None:
    """The SkyPilot side of an MLflow run (from its tags); None when there is no such run."""
    uri = tracking_uri()
    if _tracking_problem(uri):
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:
        return None
    tags = run.data.tags
    launch = tags.get("mmae.launch")
    job_id = tags.get("mmae.sky_job_id")
    label = run.info.run_name or run_id
    if launch == "sky-managed" and job_id and job_id.isdigit():
        return Target(label=label, managed_job_id=int(job_id), run_id=run_id, cluster=tags.get("mmae.sky_cluster"))
    if tags.get("mmae.sky_cluster"):
        return Target(label=label, cluster=tags["mmae.sky_cluster"],
                      job_id=int(job_id) if job_id and job_id.isdigit() else None, run_id=run_id)
    where = "ran on this machine (mmae.launch=local)" if launch == "local" else "has no SkyPilot cluster recorded"
    raise UserError(f"run {run_id} {where}; logs and down apply to SkyPilot runs")


def resolve_target(text: str, boundary: Boundary) -> Target:
    """An MLflow run id (via its tags), a SkyPilot cluster name or a managed-job name or id; else UserError."""
    if _RUN_ID.match(text):
        target = _target_from_run(text)
        if target is not None:
            return target
        raise UserError(f"unknown run '{text}' in the tracking store {_shown(tracking_uri())} (see `mmae status`)")
    clusters = boundary.status(all_users=True)
    if any(c["name"] == text for c in clusters):
        return Target(label=text, cluster=text)
    jobs = [j for j in boundary.jobs_queue(all_users=True) if j.get("name") == text or str(j.get("job_id")) == text]
    if jobs:
        job = max(jobs, key=lambda j: j.get("job_id") or 0)  # the newest job of that name
        return Target(label=job.get("name") or text, managed_job_id=int(job["job_id"]), cluster=job.get("cluster"))
    raise UserError(f"unknown run or cluster '{text}': not an MLflow run id, SkyPilot cluster or managed job "
                    f"(see `mmae status`)")


def tail_logs(target: Target, boundary: Boundary, *, follow: bool) -> int:
    """Stream the target's job logs to stdout; returns the job's exit code."""
    if target.managed_job_id is not None:
        return boundary.tail_logs(managed_job_id=target.managed_job_id, follow=follow)
    return boundary.tail_logs(cluster_name=target.cluster, job_id=target.job_id, follow=follow)


def down(target: Target, boundary: Boundary) -> None:
    """Stop paying: cancel a managed job (its cluster goes with it) or tear down a cluster."""
    if target.managed_job_id is not None:
        boundary.jobs_cancel(job_ids=[target.managed_job_id])
    else:
        boundary.down(target.cluster)
