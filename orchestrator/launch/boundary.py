"""The one boundary between mmae and SkyPilot's API: every call that reaches a SkyPilot API server goes through here.

`SkyBoundary` is the real one (``sky`` is imported inside its methods). `RecordingBoundary` writes each call as a
JSON line instead, for tests: ``MMAE_SKY_BOUNDARY=record:<path>`` selects it in a subprocess, `set_boundary()` in
process. Everything before the boundary (task building and validation, confirmation, joining status) stays real.
Results are plain dicts so callers never touch SkyPilot's response types.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import sky

__all__ = [
    "BOUNDARY_ENV",
    "RecordingBoundary",
    "SkyBoundary",
    "SkyUnavailable",
    "api_server_endpoint",
    "api_server_problem",
    "display_url",
    "get_boundary",
    "set_boundary",
]

logger = logging.getLogger(__name__)

BOUNDARY_ENV = "MMAE_SKY_BOUNDARY"
"""`record:<path>` makes `get_boundary()` return a `RecordingBoundary` writing to <path>."""

DEFAULT_API_PORT = 46580
"""SkyPilot's local API server port (`SKYPILOT_API_SERVER_LOCAL_PORT` overrides it, as in sky/server/common.py)."""

PROBE_TIMEOUT_S = 1.5
"""How long `api_server_problem` waits for the API server's health endpoint."""

QUERY_TIMEOUT_S = 20.0
"""How long status and queue requests may take before they count as unreachable."""

PRICE_TIMEOUT_S = 20.0
"""How long the price lookup (a catalog download on first use) may take before the price counts as unavailable."""

T = TypeVar("T")


class SkyUnavailable(Exception):
    """SkyPilot's API server (or the cloud behind it) could not answer; the message says what was not reached."""


# ---------------------------------------------------------------------------------------------------------------
# Where the API server is, decided the way SkyPilot decides it, without importing sky (1.6 s).


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _configured_endpoint() -> str | None:
    """`api_server.endpoint` from SkyPilot's config files (SKYPILOT_CONFIG, else user config then project config)."""
    internal = os.environ.get("SKYPILOT_CONFIG")
    if internal:
        paths = [Path(internal).expanduser()]
    else:
        paths = [
            Path(os.environ.get("SKYPILOT_GLOBAL_CONFIG", "~/.sky/config.yaml")).expanduser(),
            Path(os.environ.get("SKYPILOT_PROJECT_CONFIG", ".sky.yaml")).expanduser(),
        ]
    endpoint = None
    for path in paths:  # later files override earlier ones
        if path.is_file():
            value = (_read_yaml(path).get("api_server") or {}).get("endpoint")
            if value:
                endpoint = str(value)
    return endpoint


def api_server_endpoint() -> tuple[str, bool]:
    """The SkyPilot API server URL and whether the user named it (env or config) rather than the local default."""
    explicit = os.environ.get("SKYPILOT_API_SERVER_ENDPOINT") or _configured_endpoint()
    if explicit:
        return explicit.rstrip("/"), True
    port = os.environ.get("SKYPILOT_API_SERVER_LOCAL_PORT") or DEFAULT_API_PORT
    return f"http://127.0.0.1:{port}", False


def display_url(url: str) -> str:
    """The URL without any user:password part."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _urlopen(url: str, timeout: float) -> Any:
    """urlopen that never sends loopback requests through an HTTP proxy from the environment."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=timeout)
    return urllib.request.urlopen(url, timeout=timeout)


def api_server_problem(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the API server answers its health check; else one line saying what could not be reached.

    A local server that is not running is *not* started (SkyPilot's SDK would start one, which takes ~18 s).
    """
    url, explicit = api_server_endpoint()
    shown = display_url(url)
    try:
        with _urlopen(f"{shown}/api/health", timeout) as resp:  # health needs no credentials
            resp.read(64)
        return None
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return None  # up, and the SDK knows how to authenticate (sky api login)
        return f"SkyPilot API server at {shown} answered HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if not explicit and isinstance(reason, ConnectionRefusedError):
            return "SkyPilot API server not running (start it with `sky api start`)"
        return f"SkyPilot API server at {shown} not reachable ({reason})"


# ---------------------------------------------------------------------------------------------------------------
# Plain-dict views of SkyPilot's records.


def _field(rec: Any, name: str, default: Any = None) -> Any:
    value = getattr(rec, name, None)
    if value is None and isinstance(rec, dict):
        value = rec.get(name)
    return default if value is None else value


def _enum_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


def _cluster_dict(rec: Any) -> dict[str, Any]:
    return {
        "name": _field(rec, "name"),
        "status": _enum_name(_field(rec, "status")),
        "nodes": _field(rec, "nodes"),
        "resources": _field(rec, "resources_str"),
        "cloud": _field(rec, "cloud"),
        "region": _field(rec, "region"),
        "launched_at": _field(rec, "launched_at"),
        "user": _field(rec, "user_name"),
    }


def _managed_job_dict(rec: Any) -> dict[str, Any]:
    return {
        "job_id": _field(rec, "job_id"),
        "name": _field(rec, "job_name"),
        "status": _enum_name(_field(rec, "status")),
        "recovery_count": _field(rec, "recovery_count", 0),
        "cluster": _field(rec, "current_cluster_name"),
        "resources": _field(rec, "cluster_resources") or _field(rec, "resources"),
        "infra": _field(rec, "infra"),
        "submitted_at": _field(rec, "submitted_at"),
        "failure_reason": _field(rec, "failure_reason"),
    }


def _with_timeout(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run `fn` in a daemon thread; raise SkyUnavailable if it does not return within `timeout` seconds."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target, name=f"mmae-sky-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise SkyUnavailable(f"SkyPilot {what} did not answer within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


@contextlib.contextmanager
def _quiet_sky() -> Iterator[None]:
    """Silence SkyPilot's spinners and progress payloads (they would land on stdout)."""
    from sky import sky_logging

    with sky_logging.silent(), sky_logging.set_sky_logging_levels(logging.CRITICAL), \
            contextlib.redirect_stdout(io.StringIO()):
        yield


class SkyBoundary:
    """The real SkyPilot API. Each method is one conversation with the API server."""

    def server_problem(self) -> str | None:
        """None when the API server answers; else what could not be reached (never starts a server)."""
        return api_server_problem()

    def launch(
        self, task: sky.Task, *, cluster_name: str, down: bool = True, idle_minutes: int | None = None,
        detach: bool = False,
    ) -> dict[str, Any]:
        """Provision (or reuse) `cluster_name` and run `task` on it; unless `detach`, stream until the job ends.

        With `down`, the cluster is torn down after `idle_minutes` idle (or right after the job when None).
        """
        import sky

        request_id = sky.launch(task, cluster_name=cluster_name, down=down, idle_minutes_to_autostop=idle_minutes)
        result: dict[str, Any] = {"request_id": str(request_id), "cluster_name": cluster_name, "job_id": None}
        if detach:
            return result
        returned = sky.stream_and_get(request_id, output_stream=sys.stderr)  # provisioning: messages
        job_id = returned[0] if isinstance(returned, tuple) else None
        result["job_id"] = job_id
        if job_id is not None:
            result["returncode"] = sky.tail_logs(cluster_name, job_id, follow=True)
        return result

    def jobs_launch(self, task: sky.Task, *, name: str, detach: bool = False) -> dict[str, Any]:
        """Submit `task` as a managed job (recovers from preemption); unless `detach`, stream its logs."""
        import sky

        request_id = sky.jobs.launch(task, name=name)
        result: dict[str, Any] = {"request_id": str(request_id), "name": name, "job_ids": []}
        if detach:
            return result
        returned = sky.stream_and_get(request_id, output_stream=sys.stderr)  # provisioning: messages
        job_ids = returned[0] if isinstance(returned, tuple) else returned
        job_ids = [job_ids] if isinstance(job_ids, int) else list(job_ids or [])
        result["job_ids"] = job_ids
        if len(job_ids) == 1:
            result["returncode"] = sky.jobs.tail_logs(job_id=job_ids[0], follow=True)
        return result

    def status(self, *, all_users: bool = False) -> list[dict[str, Any]]:
        """Clusters the API server knows (no cloud refresh)."""
        import sky

        def query() -> Any:
            with _quiet_sky():  # keeps SDK chatter off stdout (`mmae status --json`)
                return sky.get(sky.status(all_users=all_users))

        records = _with_timeout(query, QUERY_TIMEOUT_S, "status")
        return [_cluster_dict(rec) for rec in records]

    def jobs_queue(self, *, all_users: bool = False) -> list[dict[str, Any]]:
        """Managed jobs; empty when no jobs controller is up."""
        import sky
        from sky import exceptions

        def query() -> Any:
            try:
                with _quiet_sky():
                    return sky.get(sky.jobs.queue_v2(refresh=False, all_users=all_users))
            except exceptions.ClusterNotUpError:  # no controller: no managed jobs (facts 1.3)
                return ([], 0, {}, 0)

        returned = _with_timeout(query, QUERY_TIMEOUT_S, "managed-jobs queue")
        records = returned[0] if isinstance(returned, tuple) else returned
        return [_managed_job_dict(rec) for rec in records]

    def down(self, cluster_name: str) -> None:
        """Tear down a cluster (billing stops; its disks are lost)."""
        import sky

        sky.stream_and_get(sky.down(cluster_name), output_stream=sys.stderr)

    def jobs_cancel(self, *, job_ids: list[int]) -> None:
        """Cancel managed jobs (their clusters are cleaned up by the controller)."""
        import sky

        sky.stream_and_get(sky.jobs.cancel(job_ids=job_ids), output_stream=sys.stderr)

    def tail_logs(
        self, *, cluster_name: str | None = None, job_id: int | None = None, managed_job_id: int | None = None,
        follow: bool = True,
    ) -> int:
        """Print a job's logs to stdout: a managed job by id, else `job_id` (None: latest) on `cluster_name`."""
        import sky

        if managed_job_id is not None:
            code = sky.jobs.tail_logs(job_id=managed_job_id, follow=follow)
        else:
            code = sky.tail_logs(cluster_name, job_id, follow=follow)
        return int(code or 0)

    def estimate_hourly_price(
        self, *, accelerator: str, count: int, use_spot: bool, cloud: str | None = None, region: str | None = None,
    ) -> tuple[float, str] | None:
        """Cheapest catalog price per node-hour and where it is, or None when the catalog cannot be fetched.

        Reads SkyPilot's catalog on this machine (downloaded from GitHub on first use; offline that fails fast).
        """
        from sky import catalog

        clouds = [cloud] if cloud else ["aws", "gcp", "azure"]

        def lookup() -> Any:
            with _quiet_sky():
                return catalog.list_accelerators(
                    gpus_only=True, name_filter=accelerator, region_filter=region, quantity_filter=count,
                    clouds=clouds, case_sensitive=False, require_price=True,
                )

        try:  # the catalog download has no timeout of its own
            offers = _with_timeout(lookup, PRICE_TIMEOUT_S, "catalog")
        except Exception as err:  # noqa: BLE001 - any failure (offline, unknown cloud) just means no price
            logger.debug("price lookup failed: %s", err)
            return None
        best: tuple[float, str] | None = None
        for items in offers.values():
            for item in items:
                if item.accelerator_name.lower() != accelerator.lower() or item.accelerator_count != count:
                    continue
                price = item.spot_price if use_spot else item.price
                if price is None or price != price or price <= 0:  # NaN: no spot offer
                    continue
                where = f"{item.cloud} {item.instance_type}"
                if best is None or price < best[0]:
                    best = (float(price), where)
        return best


class RecordingBoundary:
    """Writes each call as one JSON line to `path` and answers from canned state; never imports sky.

    Tasks are recorded as SkyPilot's own redacted view of the task YAML (secret values never; only secret names),
    plus the fields read back from the `sky.Task` object, so a test can compare both with the dry-run output.
    Canned answers come from `state` or, if present, the JSON file `<path>.state.json`: keys `clusters`,
    `managed_jobs` (lists of the dicts `SkyBoundary` returns), `server_problem`, `hourly_price` ([price, where]).
    """

    def __init__(self, path: str | os.PathLike[str], state: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        state_file = Path(f"{self.path}.state.json")
        self.state: dict[str, Any] = dict(state or {})
        if state is None and state_file.is_file():
            self.state = json.loads(state_file.read_text())

    def _record(self, call: str, **args: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"call": call, **args}, default=str, sort_keys=True) + "\n")

    @staticmethod
    def _task_view(task: Any) -> dict[str, Any]:
        resources = sorted(str(r) for r in task.resources)
        return {
            "task": task.to_yaml_config(use_user_specified_yaml=True),
            "task_fields": {
                "name": task.name,
                "num_nodes": task.num_nodes,
                "envs": dict(task.envs),
                "setup": task.setup,
                "run": task.run,
                "workdir": task.workdir,
                "file_mounts": dict(task.file_mounts or {}),
                "resources": resources,
            },
            "secret_names": sorted(task.secrets),
        }

    def server_problem(self) -> str | None:
        self._record("server_problem")
        return self.state.get("server_problem")

    def launch(self, task: Any, *, cluster_name: str, down: bool = True, idle_minutes: int | None = None,
               detach: bool = False) -> dict[str, Any]:
        self._record("launch", cluster_name=cluster_name, down=down, idle_minutes=idle_minutes, detach=detach,
                     **self._task_view(task))
        return {"request_id": "recorded", "cluster_name": cluster_name, "job_id": 1, "returncode": 0}

    def jobs_launch(self, task: Any, *, name: str, detach: bool = False) -> dict[str, Any]:
        self._record("jobs_launch", name=name, detach=detach, **self._task_view(task))
        return {"request_id": "recorded", "name": name, "job_ids": [1], "returncode": 0}

    def status(self, *, all_users: bool = False) -> list[dict[str, Any]]:
        self._record("status", all_users=all_users)
        return list(self.state.get("clusters", []))

    def jobs_queue(self, *, all_users: bool = False) -> list[dict[str, Any]]:
        self._record("jobs_queue", all_users=all_users)
        return list(self.state.get("managed_jobs", []))

    def down(self, cluster_name: str) -> None:
        self._record("down", cluster_name=cluster_name)

    def jobs_cancel(self, *, job_ids: list[int]) -> None:
        self._record("jobs_cancel", job_ids=list(job_ids))

    def tail_logs(self, *, cluster_name: str | None = None, job_id: int | None = None,
                  managed_job_id: int | None = None, follow: bool = True) -> int:
        self._record("tail_logs", cluster_name=cluster_name, job_id=job_id, managed_job_id=managed_job_id,
                     follow=follow)
        return 0

    def estimate_hourly_price(self, *, accelerator: str, count: int, use_spot: bool, cloud: str | None = None,
                              region: str | None = None) -> tuple[float, str] | None:
        self._record("estimate_hourly_price", accelerator=accelerator, count=count, use_spot=use_spot, cloud=cloud,
                     region=region)
        price = self.state.get("hourly_price")
        return (float(price[0]), str(price[1])) if price else None


_override: SkyBoundary | RecordingBoundary | None = None


def set_boundary(boundary: SkyBoundary | RecordingBoundary | None) -> None:
    """Use `boundary` for every SkyPilot call in this process (None restores the default)."""
    global _override
    _override = boundary


def get_boundary() -> SkyBoundary | RecordingBoundary:
    """The boundary in force: `set_boundary`'s, else `MMAE_SKY_BOUNDARY=record:<path>`'s recorder, else the real one."""
    if _override is not None:
        return _override
    spec = os.environ.get(BOUNDARY_ENV, "")
    if spec.startswith("record:"):
        return RecordingBoundary(spec.removeprefix("record:"))
    if spec and spec != "sky":
        from orchestrator.errors import UserError

        raise UserError(f"{BOUNDARY_ENV}={spec!r} is not understood; use 'sky' or 'record:<path>'")
    return SkyBoundary()
