"""`mmae data synth`: render the built-in synthetic scene data set into a shard folder."""

from __future__ import annotations

import logging

from multimae_core.data.shards import Manifest
from multimae_core.data.synth import write_synth

__all__ = ["run_synth"]

logger = logging.getLogger(__name__)


def run_synth(out: str, num: int, *, size: int = 224, seed: int = 0, samples_per_shard: int = 256,
              workers: int | None = None, jpg: bool = False, overwrite: bool = False,
              progress: bool = True) -> Manifest:
    """Render `num` scenes of side `size` with `seed` into `out` (any fsspec URL); returns the manifest."""
    from orchestrator.errors import UserError

    if num < 1:
        raise UserError(f"--num must be at least 1, got {num}")
    if size < 8:
        raise UserError(f"--size must be at least 8 pixels, got {size}")
    try:
        return write_synth(out, num, size=size, seed=seed, samples_per_shard=samples_per_shard,
                           num_workers=workers, progress=progress, overwrite=overwrite,
                           rgb_format="jpg" if jpg else "png")
    except ValueError as err:
        hint = "; pass --overwrite to replace it" if "already holds" in str(err) else ""
        raise UserError(f"{err}{hint}") from err
    except OSError as err:
        raise UserError(f"cannot write {out}: {err}") from err
