"""Job files: `JobSpec` (the training config plus MLflow tracking and compute resources), loading with ``--set``
overrides, and the resolved forms used downstream (YAML, flattened MLflow params, a short config hash).

Precedence is schema default < YAML file < ``--set``. Every problem with a job file surfaces as one ``UserError``
line naming the file, the line where the YAML has one, and the dotted path.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import to_jsonable_python

from multimae_core.config import TrainConfig
from orchestrator import overrides as _overrides
from orchestrator.errors import UserError

__all__ = [
    "JobRecoveryConfig",
    "JobSpec",
    "ResourcesConfig",
    "TrackingConfig",
    "flatten",
    "format_validation_error",
    "job_hash",
    "load_job",
    "render",
    "run_name",
    "schema_json",
    "validate_job",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True)


class TrackingConfig(_Section):
    """MLflow experiment and run naming. The tracking server comes from MLFLOW_TRACKING_URI, never from the job."""

    experiment: str | None = Field(None, min_length=1)
    """MLflow experiment; null means 'multimae/<stage>' (filled in when the job is loaded)."""
    run_name: str | None = Field(None, min_length=1)
    """MLflow run name; null means '<name>-<short hash of the resolved training config>'."""
    log_system_metrics: bool = True
    """Log CPU, memory, GPU and network use as MLflow system metrics."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Extra MLflow tags set on the run. Never put credentials here: tags are visible to everyone."""


class JobRecoveryConfig(_Section):
    """What SkyPilot managed jobs do when the cluster is preempted or the job fails."""

    strategy: Literal["EAGER_NEXT_REGION", "FAILOVER"] = "EAGER_NEXT_REGION"
    """EAGER_NEXT_REGION relaunches in another region first; FAILOVER retries the same region first."""
    max_restarts_on_errors: int = Field(0, ge=0)
    """Relaunches after the job itself fails (not a preemption); 0 gives up on the first error."""
    recover_on_exit_codes: list[int] = Field(default_factory=list)
    """Exit codes that always trigger a relaunch, without counting against max_restarts_on_errors."""


_ACCELERATORS = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(:[1-9][0-9]*)?$"
_NODE_SIZE = r"^[0-9]+(\.[0-9]+)?\+?$"


class ResourcesConfig(_Section):
    """Compute the job runs on: SkyPilot resources for cloud launches and the Ray Train worker bounds."""

    accelerators: str | None = Field(None, pattern=_ACCELERATORS)
    """Accelerators per node as NAME:COUNT (for example H100:8; COUNT defaults to 1); null runs on CPUs."""
    num_nodes: int = Field(1, ge=1)
    """Nodes in the cluster."""
    min_workers: int | None = Field(None, ge=1)
    """Fewest training workers to run with (elastic lower bound); null means max_workers (no elasticity)."""
    max_workers: int | None = Field(None, ge=1)
    """Most training workers; null means one per GPU of the cluster (num_nodes x COUNT), or one per node on CPUs."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs each Ray Train worker reserves (its data loading runs in them); the rest stay free for Ray Data."""
    cpus: str | None = Field(None, pattern=_NODE_SIZE)
    """vCPUs per node for SkyPilot, for example '32' or '32+' (at least); null lets SkyPilot choose."""
    memory: str | None = Field(None, pattern=_NODE_SIZE)
    """Memory per node in GB for SkyPilot, for example '128+'; null lets SkyPilot choose."""
    cloud: str | None = Field(None, min_length=1)
    """Cloud to launch on (aws, gcp, azure, kubernetes, ...); null lets SkyPilot pick the cheapest enabled one."""
    region: str | None = Field(None, min_length=1)
    """Region within the cloud; null lets SkyPilot choose."""
    zone: str | None = Field(None, min_length=1)
    """Zone within the region; null lets SkyPilot choose."""
    use_spot: bool = False
    """Run on spot instances through SkyPilot managed jobs, which relaunch after preemption; the run resumes from
    checkpoint.storage_url in the same MLflow run."""
    disk_size: int = Field(256, ge=1)
    """OS disk per node in GB."""
    image_id: str | None = Field(None, min_length=1)
    """Machine or container image, for example 'docker:<registry>/<image>:<tag>'; null uses SkyPilot's default."""
    job_recovery: JobRecoveryConfig = Field(default_factory=JobRecoveryConfig)
    """Managed-job recovery policy (used with use_spot)."""
    max_failures: int = Field(3, ge=-1)
    """Worker failures Ray Train recovers from (restart from the last checkpoint) before giving up; -1: no limit."""

    @property
    def accelerator_name(self) -> str | None:
        """Accelerator type without the count, or None on CPUs."""
        return self.accelerators.partition(":")[0] if self.accelerators else None

    @property
    def gpus_per_node(self) -> int:
        """Accelerators per node (0 on CPUs)."""
        if not self.accelerators:
            return 0
        _, _, count = self.accelerators.partition(":")
        return int(count) if count else 1

    @property
    def worker_bounds(self) -> tuple[int, int]:
        """(min, max) training workers after filling in the null defaults."""
        high = self.max_workers or self.num_nodes * (self.gpus_per_node or 1)
        low = self.min_workers or high
        return low, high

    @model_validator(mode="after")
    def _check(self) -> ResourcesConfig:
        if self.zone and not self.region:
            raise ValueError("resources.zone needs resources.region")
        if self.region and not self.cloud:
            raise ValueError("resources.region needs resources.cloud")
        low, high = self.worker_bounds
        if low > high:
            per = "GPU" if self.accelerators else "node"
            origin = "resources.max_workers" if self.max_workers else f"one per {per}"
            raise ValueError(f"resources.min_workers ({low}) exceeds the maximum of {high} workers ({origin})")
        slots = self.num_nodes * self.gpus_per_node
        if slots and high > slots:
            raise ValueError(
                f"resources.max_workers ({high}) exceeds the {slots} GPUs of {self.num_nodes} node(s) with "
                f"{self.accelerators} (one worker per GPU)"
            )
        return self


class JobSpec(TrainConfig):
    """A complete job file: the training config plus MLflow tracking and the compute it runs on."""

    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow experiment, run name and tags (the tracking URI comes from the environment)."""
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    """Nodes, accelerators and worker bounds."""

    @model_validator(mode="before")
    @classmethod
    def _default_experiment(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        stage = data.get("stage", "pretrain")
        experiment = f"multimae/{stage}"
        tracking = data.get("tracking")
        if tracking is None:
            return {**data, "tracking": {"experiment": experiment}}
        if isinstance(tracking, Mapping) and tracking.get("experiment") is None:
            return {**data, "tracking": {**tracking, "experiment": experiment}}
        if isinstance(tracking, TrackingConfig) and tracking.experiment is None:
            return {**data, "tracking": tracking.model_copy(update={"experiment": experiment})}
        return data

    @model_validator(mode="after")
    def _workers_share_batch(self) -> JobSpec:
        num_micro = self.train.global_batch_size // self.train.per_worker_batch_size
        low, high = self.resources.worker_bounds
        for workers, which in ((high, "max_workers"), (low, "min_workers")):
            if num_micro % workers:
                raise ValueError(
                    f"train.global_batch_size ({self.train.global_batch_size}) is {num_micro} micro-batches of "
                    f"train.per_worker_batch_size ({self.train.per_worker_batch_size}), which {workers} workers "
                    f"(resources.{which}) cannot share evenly"
                )
        if self.resources.num_nodes > 1 and "://" not in self.checkpoint.storage_url:
            raise ValueError(
                f"checkpoint.storage_url ({self.checkpoint.storage_url!r}) must be shared storage such as "
                f"s3://bucket/prefix when resources.num_nodes > 1"
            )
        return self


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:
            continue  # unhashable key: construct_mapping below reports it
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first set on line {first})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _key_lines(text: str) -> dict[str, int]:
    """Dotted path -> 1-based line of its key in the YAML text (best effort; empty when it cannot tell)."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    path = f"{prefix}{key_node.value}"
                    lines.setdefault(path, key_node.start_mark.line + 1)
                    walk(value_node, f"{path}.")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                path = f"{prefix.rstrip('.')}[{i}]"
                lines.setdefault(path, item.start_mark.line + 1)
                walk(item, f"{path}.")

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _yaml_error(source: str, err: yaml.YAMLError) -> UserError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).splitlines()[0]
    return UserError(f"{where}: invalid YAML: {problem}")


_PATH_IN_MESSAGE = re.compile(r"^([a-z_]+(?:\.[A-Za-z0-9_]+)*)")


def _display_path(loc: Sequence[int | str]) -> tuple[str, type[BaseModel] | None]:
    """Dotted path of a pydantic error location (union branch tags dropped) and the model holding its last key."""
    parts: list[str] = []
    current: Any = JobSpec
    holder: type[BaseModel] | None = None
    for item in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            holder = current
            parts.append(str(item))
            field = current.model_fields.get(str(item))
            current = _overrides.field_target(field.annotation) if field is not None else None
        elif isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
        elif isinstance(current, tuple) and current[0] == "mapping" and not _looks_like_type_tag(item):
            parts.append(item)
            current = None
        elif not _looks_like_type_tag(item):
            parts.append(item)
    return ".".join(parts), holder


def _looks_like_type_tag(item: str) -> bool:
    # pydantic names union branches in error locations: 'float', 'dict[str,float]', 'function-after[...]'.
    return "[" in item or item in {"float", "int", "str", "bool", "none", "list", "dict", "tuple"}


def _hint(path: str) -> str:
    """Extra advice for keys people reach for that deliberately do not exist."""
    if path.startswith("tracking.") and "uri" in path:
        return "; the tracking server comes from the MLFLOW_TRACKING_URI environment variable"
    return ""


def _describe(error: Mapping[str, Any]) -> tuple[str, str]:
    """(dotted path, message) for one pydantic error."""
    path, holder = _display_path(error["loc"])
    kind = error["type"]
    msg = str(error["msg"])
    if kind == "extra_forbidden":
        key = path.rpartition(".")[2]
        parent = path.rpartition(".")[0]
        fields = list(holder.model_fields) if holder is not None else []
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
        if close:
            msg = f"{path}: unknown key; did you mean '{f'{parent}.' if parent else ''}{close[0]}'?"
        else:
            msg = f"{path}: unknown key (valid keys{f' under {parent!r}' if parent else ''}: {', '.join(fields)})"
        return path, msg + _hint(path)
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if kind in {"value_error", "assertion_error"}:
        # Our own validators already name the dotted path at the start of the message.
        named = _PATH_IN_MESSAGE.match(msg)
        if named and "." in named.group(1):
            return named.group(1), msg
        return path, f"{path}: {msg}" if path else msg
    if kind == "missing":
        return path, f"{path}: required field is missing"
    value = error.get("input")
    shown = "" if isinstance(value, (dict, list, BaseModel)) or value is None else f" (got {value!r})"
    return path, f"{path}: {msg}{shown}"


def format_validation_error(
    err: ValidationError,
    *,
    source: str | None = None,
    key_lines: Mapping[str, int] | None = None,
    overridden: Sequence[str] = (),
) -> str:
    """One line for a pydantic error: where (file:line or the --set key), dotted path, and what is wrong."""
    # Unknown keys first: a misspelt key usually also explains a "missing" error for the key it should have been.
    errors = sorted(err.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
    path, message = _describe(errors[0])
    where = source
    from_set = [key for key in overridden if path == key or path.startswith(f"{key}.") or key.startswith(f"{path}.")]
    if from_set:
        where = None
        message += " (from --set)" if from_set[-1] == path else f" (from --set {from_set[-1]})"
    elif source and key_lines:
        candidates = [path]
        while "." in candidates[-1] or "[" in candidates[-1]:
            candidates.append(re.sub(r"(\.[^.\[]*|\[\d+\])$", "", candidates[-1]))
        line = next((key_lines[c] for c in candidates if c in key_lines), None)
        if line is not None:
            where = f"{source}:{line}"
    rest = len({_describe(e)[0] for e in errors[1:]} - {path})
    more = f" (and {rest} more error{'s' if rest > 1 else ''})" if rest else ""
    return f"{where}: {message}{more}" if where else f"{message}{more}"


def validate_job(
    data: Mapping[str, Any] | None,
    overrides: Sequence[str] = (),
    *,
    source: str = "<job>",
    key_lines: Mapping[str, int] | None = None,
) -> JobSpec:
    """Apply ``--set`` overrides to a parsed job mapping and validate it; every failure is a one-line UserError."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UserError(
            f"{source}: a job file is a mapping of sections (name, model, modalities, ...), got a {type(data).__name__}"
        )
    parsed: list[_overrides.Override] = []
    for text in overrides:
        try:
            override = _overrides.parse_override(text)
            _overrides.check_path(JobSpec, override.path)
        except ValueError as err:
            raise UserError(f"--set {text}: {err}{_hint(text.partition('=')[0].strip())}") from None
        parsed.append(override)
    merged = _overrides.apply_overrides(data, parsed, schema=JobSpec)
    try:
        return JobSpec.model_validate(merged)
    except ValidationError as err:
        message = format_validation_error(err, source=source, key_lines=key_lines, overridden=[o.key for o in parsed])
        raise UserError(message) from err


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read a job YAML file, apply ``--set`` overrides left to right, and validate the result.

    Raises ``UserError`` (one line) for a missing file, a YAML syntax error (with its line), an unknown key (with
    the closest valid key), or an invalid value (with its dotted path).
    """
    file = Path(path)
    source = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"job file not found: {source}") from None
    except IsADirectoryError:
        raise UserError(f"job file is a directory: {source}") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise UserError(f"cannot read job file {source}: {reason}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as err:
        raise _yaml_error(source, err) from None
    if data is None:
        raise UserError(f"{source}: the job file is empty")
    return validate_job(data, overrides, source=source, key_lines=_key_lines(text))


def _as_text(value: Any) -> str:
    """A value as the text a user would pass after ``--set key=``."""
    if isinstance(value, str):
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def flatten(job: BaseModel) -> dict[str, str]:
    """Dotted key -> value text for every field, e.g. ``{"optim.blr": "0.0001", "modalities.inputs": "[rgb, depth]"}``.

    Keys and values are what ``--set`` takes; these are the MLflow params of a run. Dict-valued fields
    (``loss.weights``) stay one param.
    """
    flat: dict[str, str] = {}

    def walk(model: BaseModel, prefix: str) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.")
            else:
                flat[f"{prefix}{name}"] = _as_text(to_jsonable_python(value))

    walk(job, "")
    return flat


class _JobDumper(yaml.SafeDumper):
    """Block-style sections, flow-style lists of scalars (``inputs: [rgb, depth]``), as job files are written."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.SequenceNode:
    flow = all(not isinstance(item, (dict, list)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_JobDumper.add_representer(list, _represent_list)


def render(job: BaseModel, fmt: Literal["yaml", "json"] = "yaml") -> str:
    """The resolved job as a complete job file (YAML) or as JSON; loading it gives the same job back."""
    data = job.model_dump(mode="json")
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.dump(data, Dumper=_JobDumper, sort_keys=False, default_flow_style=False, width=120)


def job_hash(job: TrainConfig) -> str:
    """Short hash (8 hex digits) of the resolved *training* config: identical training gives the same hash.

    Tracking and resources are left out, so the same training on other hardware or under another run name hashes
    the same.
    """
    payload = job.model_dump(mode="json", include=set(TrainConfig.model_fields))
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def run_name(job: JobSpec) -> str:
    """MLflow run name: ``tracking.run_name``, or ``<name>-<job_hash>``."""
    return job.tracking.run_name or f"{job.name}-{job_hash(job)}"


def schema_json() -> str:
    """JSON Schema of job files, as checked in at jobs/schema.json."""
    schema = JobSpec.model_json_schema()
    document = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "mmae job"}
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"
