"""Shared set-up of the integration tests that run real training jobs: a tiny job, MLflow run lookup, and the
clean-up of local checkpoint copies that killed workers leave behind."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from orchestrator.spec import validate_job


def tiny_job(*, train_url: str, storage_url: str, experiment: str, max_steps: int, val_url: str | None = None,
             workers: int = 1, every_steps: int = 2, name: str = "rt-tiny", system_metrics: bool = True):
    """A MultiMAE small enough for a few seconds per step on 2 shared cores: embed 64, depth 2, 32 px."""
    return validate_job({
        "name": name,
        "model": {"preset": "tiny", "image_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2,
                  "decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 2, "semseg_dim_class_emb": 16},
        "modalities": {"inputs": ["rgb", "depth"], "outputs": ["rgb", "depth"]},
        "masking": {"num_encoded_tokens": 12},
        "data": {"train_url": train_url, "val_url": val_url, "shuffle_buffer": 8, "num_workers": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "min_lr": 1e-4, "weight_decay": 0.0},
        "train": {"max_steps": max_steps, "global_batch_size": 8, "per_worker_batch_size": 8 // workers,
                  "log_every_steps": 1, "image_every_steps": 6, "seed": 0},
        "checkpoint": {"storage_url": storage_url, "every_steps": every_steps, "keep": 2},
        "tracking": {"experiment": experiment, "log_system_metrics": system_metrics},
        "resources": {"max_workers": workers},
    })


def runs_with_key(client, experiment: str, run_key: str):
    """The MLflow runs of ``experiment`` tagged with ``run_key`` ([] when the experiment does not exist yet)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mmae.run_key` = '{run_key}'")


def remove_leaked_local_checkpoints(run_key: str, since: float) -> None:
    """Delete the local checkpoint copies that killed workers of this run left in the temp folder (the reporter
    removes its copy after the upload, which a SIGKILL or a stopped worker group never reaches): complete ones of
    ``run_key``, and half-written or empty ones (no run info yet; other ranks write nothing) made since ``since``
    (epoch seconds) by this test's run."""
    for folder in Path(tempfile.gettempdir()).glob("mmae-ckpt-*"):
        info = folder / "checkpoint" / "mmae_run.json"
        try:
            if info.is_file():
                mine = json.loads(info.read_text()).get("run_key") == run_key
            else:
                leftovers = [c.name for c in folder.iterdir()]
                mine = folder.stat().st_mtime >= since and all(n.startswith("checkpoint") for n in leftovers)
        except (OSError, ValueError):
            continue
        if mine:
            shutil.rmtree(folder, ignore_errors=True)
