"""Where fine-tuning weights come from: an MLflow run (its final weights or a stored checkpoint) or a file/URL.

`prepare_finetune` is what `mmae finetune` and `mmae eval` run before anything is launched: it resolves the weights,
checks that they fit the job (modalities, sizes, the task's labels) and returns the job with ``init`` filled in and
the lineage tags (``mmae.parent_run_id``, ``mlflow.parentRunId``) set. `localize_init` is what a Ray Train worker
runs: MLflow artifact URIs (``runs:/...``) are downloaded, other URLs are read by the core directly.

Every problem a user can fix (unknown run, a run without weights, weights that do not fit, a file that is not a state
dict, labels outside the class range) is one `UserError` line.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UserError
from orchestrator.runtime.tracking import FINAL_WEIGHTS_ARTIFACT

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

__all__ = [
    "MLFLOW_SCHEMES",
    "as_user_error",
    "RunWeights",
    "check_weights_fit",
    "detect_format",
    "localize",
    "localize_init",
    "prepare_finetune",
    "resolve_run_weights",
    "tracking_uri",
]

logger = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("runs:/", "mlflow-artifacts:", "models:/")
"""URI prefixes that only MLflow can read (downloaded by `localize`)."""
_PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the local store ``sqlite:///<cwd>/.mmae/mlflow.db`` (as `mmae status`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / '.mmae' / 'mlflow.db'}"


@dataclass(frozen=True)
class RunWeights:
    """The weights of one MLflow run."""

    run_id: str
    url: str
    """What goes into ``init.checkpoint_url``: ``runs:/<id>/weights/final.safetensors`` or a checkpoint folder."""
    step: int | None
    """Optimizer step of the weights, when known."""
    run_name: str | None
    stage: str | None
    """The run's ``mmae.stage`` tag."""


def _client(uri: str):
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no MLflow tracking store at {uri.removeprefix('sqlite:///')} (set MLFLOW_TRACKING_URI)")
    return MlflowClient(tracking_uri=uri)


def _get_run(client, run_id: str, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(f"unknown run '{run_id}' in the tracking store {uri} (see `mmae status`)") from None


def _has_artifact(client, run_id: str, path: str) -> bool:
    parent, _, name = path.rpartition("/")
    try:
        return any(a.path == path for a in client.list_artifacts(run_id, parent or None))
    except Exception as err:  # noqa: BLE001 - an unreachable artifact store reads as "no artifact"
        logger.debug("cannot list the artifacts of %s: %s", run_id, err)
        return False


def _checkpoint_at(checkpoint_uri: str, step: int) -> str | None:
    """The stored checkpoint folder of ``step`` next to ``checkpoint_uri`` (a run's latest checkpoint), or None."""
    import fsspec

    parent = checkpoint_uri.rstrip("/").rsplit("/", 1)[0]
    fs, root = fsspec.core.url_to_fs(parent)
    prefix = f"checkpoint_{step:09d}"
    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    except FileNotFoundError:
        return None
    found = [n for n in names if n == prefix or n.startswith(prefix + "_")]
    return f"{parent}/{found[-1]}" if found else None


def _stored_steps(checkpoint_uri: str) -> list[int]:
    import fsspec

    parent = checkpoint_uri.rstrip("/").rsplit("/", 1)[0]
    fs, root = fsspec.core.url_to_fs(parent)
    steps = []
    try:
        for p in fs.ls(root, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("checkpoint_") and name[11:20].isdigit():
                steps.append(int(name[11:20]))
    except FileNotFoundError:
        pass
    return sorted(set(steps))


def resolve_run_weights(run_id: str, *, checkpoint_step: int | None = None, uri: str | None = None) -> RunWeights:
    """The final weights of an MLflow run (artifact ``weights/final.safetensors``), or with ``checkpoint_step`` the
    checkpoint of that step in the run's checkpoint storage (next to its ``mmae.checkpoint_uri``)."""
    uri = uri or tracking_uri()
    client = _client(uri)
    run = _get_run(client, run_id, uri)
    tags = run.data.tags
    name, stage = run.info.run_name, tags.get("mmae.stage")
    latest = tags.get("mmae.checkpoint_uri")
    if checkpoint_step is not None:
        if not latest:
            raise UserError(f"run {run_id} has no stored checkpoints (no mmae.checkpoint_uri tag)")
        folder = _checkpoint_at(latest, checkpoint_step)
        if folder is None:
            kept = ", ".join(map(str, _stored_steps(latest))) or "none"
            raise UserError(f"run {run_id} has no checkpoint at step {checkpoint_step} (stored steps: {kept})")
        return RunWeights(run_id, folder, checkpoint_step, name, stage)
    artifact = tags.get("mmae.final_weights") or FINAL_WEIGHTS_ARTIFACT
    if _has_artifact(client, run_id, artifact):
        step = tags.get("mmae.checkpoint_step")
        return RunWeights(run_id, f"runs:/{run_id}/{artifact}", int(step) if step and step.isdigit() else None,
                          name, stage)
    if latest:
        step = tags.get("mmae.checkpoint_step")
        logger.warning("run %s (%s) has no %s; using its latest checkpoint %s", run_id, run.info.status, artifact,
                       latest)
        return RunWeights(run_id, latest, int(step) if step and step.isdigit() else None, name, stage)
    raise UserError(f"run {run_id} ({run.info.status}) has no weights: no {artifact} artifact and no stored "
                    f"checkpoint (it ended before its first checkpoint?)")


def localize(url: str, directory: str | os.PathLike[str], *, uri: str | None = None) -> str:
    """A path the core can read for ``url``: MLflow artifact URIs are downloaded into ``directory``; other URLs
    (local paths, s3://..., checkpoint folders) are returned unchanged."""
    if not url.startswith(MLFLOW_SCHEMES):
        return url
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    previous = os.environ.get(_PROGRESS_ENV)
    os.environ[_PROGRESS_ENV] = "false"  # MLflow's download bars would garble the CLI's stderr
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=url, dst_path=str(directory),
                                                   tracking_uri=uri or tracking_uri())
    except (MlflowException, OSError) as err:
        raise UserError(f"cannot download {url}: {str(err).splitlines()[0] if str(err) else err}") from None
    finally:
        if previous is None:
            os.environ.pop(_PROGRESS_ENV, None)
        else:
            os.environ[_PROGRESS_ENV] = previous


def localize_init(job: JobSpec, directory: str | os.PathLike[str], *, uri: str | None = None) -> JobSpec:
    """The job with an MLflow ``init.checkpoint_url`` replaced by a downloaded local copy (workers call this)."""
    url = job.init.checkpoint_url
    if url is None or not url.startswith(MLFLOW_SCHEMES):
        return job
    local = localize(url, directory, uri=uri)
    return job.model_copy(update={"init": job.init.model_copy(update={"checkpoint_url": local})})


def detect_format(path: str) -> str:
    """``mmae`` for MultiMAE keys (``global_tokens``), ``timm-vit`` for timm ViT keys; UserError otherwise."""
    from multimae_core.model.pretrained import unreadable_reason, weights_file
    from multimae_core.model.state_dict import read_state_dict

    file = weights_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = read_state_dict(file)
    except FileNotFoundError:
        raise UserError(f"no weights at {file}") from None
    except Exception as err:  # noqa: BLE001 - any failure to read means: not a weights file
        raise UserError(f"{file} is not a state dict of tensors ({unreadable_reason(err)})") from None
    if "global_tokens" in state:
        return "mmae"
    if "cls_token" in state and any(k.startswith("blocks.") for k in state):
        return "timm-vit"
    some = ", ".join(sorted(state)[:4])
    raise UserError(f"{file} holds neither MultiMAE (global_tokens, encoder.*) nor timm ViT (cls_token, blocks.*) "
                    f"weights (keys: {some}, ...)")


def _check_labels(job: JobSpec) -> None:
    """Labels of the task vs finetune.num_classes, from the training shards' manifest (skipped when unreadable)."""
    from multimae_core.data.shards import read_manifest
    from multimae_core.data.tasks import check_task_labels

    ft = job.finetune
    assert ft is not None
    for split, url in (("train", job.data.train_url), ("val", job.data.val_url)):
        if url is None:
            continue
        try:
            manifest = read_manifest(url)
        except Exception as err:  # noqa: BLE001 - the workers read it again; this check is a courtesy
            logger.warning("could not read the manifest of data.%s_url (%s) to check the labels: %s", split, url,
                           str(err).splitlines()[0] if str(err) else err)
            continue
        try:
            check_task_labels(manifest, kind=ft.kind, num_classes=ft.num_classes,
                              reduce_zero_label=ft.reduce_zero_label, where=f"data.{split}_url ({url})")
        except ValueError as err:
            raise UserError(str(err)) from None


def check_weights_fit(job: JobSpec, path: str, *, source: str, require_head: bool = False) -> Any:
    """Load the weights at ``path`` (local or fsspec) into the job's fine-tuning model built on the meta device;
    UserError naming ``source`` when they do not fit. Returns the load report."""
    import torch

    from multimae_core.model.pretrained import initialise_finetune_model, read_init_weights
    from multimae_core.training.objectives import make_objective

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols of files it then refuses
            state = read_init_weights(path, job.init.format)
    except ValueError as err:
        raise UserError(f"{source}: {str(err).removeprefix('init.checkpoint_url: ')}") from None
    with torch.device("meta"):
        model = make_objective(job).build_model()
    allow_new = job.init.allow_new_inputs or job.init.format in ("original-timm", "timm-vit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # copies into meta tensors are no-ops, which torch warns about
            return initialise_finetune_model(model, state, allow_new_inputs=allow_new, require_head=require_head,
                                             source="checkpoint")
    except ValueError as err:
        raise UserError(f"the weights of {source} do not fit the job {job.name}: {err}") from None


def _with_init(job: JobSpec, init: dict[str, Any], parent_run_id: str | None) -> JobSpec:
    from orchestrator.spec import validate_job

    data = job.model_dump(mode="json")
    data["init"] = {**data["init"], **init}
    if parent_run_id:
        data["tracking"]["tags"] = {**data["tracking"]["tags"], "mmae.parent_run_id": parent_run_id,
                                    "mlflow.parentRunId": parent_run_id}
    return validate_job(data, source=job.name)


def prepare_finetune(job: JobSpec, *, from_run: str | None = None, from_checkpoint: str | None = None,
                     checkpoint_step: int | None = None, require_head: bool = False) -> tuple[JobSpec, str]:
    """The job to launch: ``init`` pointing at the weights (and the lineage tags), after checking they fit.

    Exactly one of ``from_run`` / ``from_checkpoint``. Returns (job, a one-line description of the weights).
    """
    if job.stage != "finetune" or job.finetune is None:
        raise UserError(f"{job.name}: stage is {job.stage!r}; fine-tuning needs a job with stage finetune and a "
                        f"finetune section (see jobs/finetune_*.yaml)")
    if (from_run is None) == (from_checkpoint is None):
        raise UserError("give exactly one of --from-run RUN_ID and --from-checkpoint PATH|URL")
    if checkpoint_step is not None and from_run is None:
        raise UserError("--checkpoint-step needs --from-run")
    _check_labels(job)
    with tempfile.TemporaryDirectory(prefix="mmae-init-") as tmp:
        if from_run is not None:
            weights = resolve_run_weights(from_run, checkpoint_step=checkpoint_step)
            if weights.stage == "pretrain" and require_head:
                raise UserError(f"run {from_run} is a pretraining run; evaluation needs a fine-tuning run's weights")
            init = {"checkpoint_url": weights.url, "format": "mmae", "parent_run_id": from_run}
            staged = _with_init(job, init, from_run)
            local = localize(weights.url, tmp)
            source = f"run {from_run}" + (f" (step {weights.step})" if weights.step is not None else "")
            check_weights_fit(staged, local, source=source, require_head=require_head)
            return staged, f"{source}: {weights.url}"
        assert from_checkpoint is not None
        url = from_checkpoint
        if "://" not in url:
            path = Path(url).expanduser()
            if not path.exists():
                raise UserError(f"--from-checkpoint: no such file or folder: {url}")
            url = str(path.resolve())
        fmt = job.init.format
        if fmt == "mmae":  # the default: detect instead (a timm ViT file is not in the mmae layout)
            fmt = detect_format(localize(url, tmp))
        staged = _with_init(job, {"checkpoint_url": url, "format": fmt, "parent_run_id": None}, None)
        check_weights_fit(staged, localize(url, tmp), source=from_checkpoint, require_head=require_head)
        return staged, f"{from_checkpoint} ({fmt})"


def as_user_error(err: BaseException) -> UserError | None:
    """A training failure caused by bad input as one UserError line, else None.

    Core code raises ValueError for bad input (a label outside the class range, weights that do not fit); Ray Train
    wraps the workers' errors (``worker_failures``). Anything else is a bug and keeps its traceback.
    """
    if isinstance(err, UserError):
        return err
    failures = getattr(err, "worker_failures", None)
    if failures and all(isinstance(e, ValueError) for e in failures.values()):
        rank, first = sorted(failures.items())[0]
        lines = [line.strip() for line in str(first).splitlines() if line.strip()]
        return UserError(f"training failed on rank {rank}: {lines[-1] if lines else type(first).__name__}")
    if isinstance(err, ValueError) and failures is None:
        return UserError(str(err))
    return None
