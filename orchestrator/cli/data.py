"""`mmae data ...`: make, import, pseudo-label and look at multi-modal shard folders (local paths or any fsspec URL).

The work happens in `orchestrator.data.*`, imported inside the command bodies.
"""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.cli import console
from orchestrator.cli.options import JsonOpt, typer_factory

app = typer_factory(name="data", help="Make, import, pseudo-label and inspect multi-modal shard folders.")

OutOpt = Annotated[
    str,
    typer.Option("--out", "-o", metavar="URL", help="Shard folder to write: a local path or any fsspec URL "
                 "(s3://bucket/prefix, gs://bucket/prefix, ...).", show_default=False),
]
ShardSizeOpt = Annotated[int, typer.Option("--shard-size", min=1, help="Samples per tar shard.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a shard folder that already exists.")]
SkipBadOpt = Annotated[
    bool, typer.Option("--skip-bad", help="Skip samples that cannot be read and report how many, instead of stopping "
                       "at the first one.")
]
WorkersOpt = Annotated[int | None, typer.Option("--workers", min=1, help="Parallel workers (default: all cores).")]
DepthModelOpt = Annotated[
    str,
    typer.Option("--depth-model", metavar="PATH|URL|ID", help="Depth network (transformers DPT / Depth Anything): a "
                 "local save_pretrained folder, an fsspec URL of one, or a Hugging Face id (needs network)."),
]
SegModelOpt = Annotated[
    str,
    typer.Option("--seg-model", metavar="PATH|URL|ID", help="Segmentation network (transformers Mask2Former or "
                 "SegFormer), given as for --depth-model; its id2label becomes the semseg label set."),
]


def _user_errors(fn, *args, **kwargs):
    """Run `fn`; bad input (ValueError, missing or unreadable files) becomes a one-line UserError."""
    from orchestrator.errors import UserError

    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except (ValueError, OSError) as err:
        raise UserError(str(err) or type(err).__name__) from err


@app.command("synth")
def data_synth(
    out: OutOpt,
    num: Annotated[int, typer.Option("--num", "-n", min=1, help="Number of scenes.")] = 1000,
    size: Annotated[int, typer.Option("--size", min=8, help="Image side in pixels.")] = 224,
    seed: Annotated[int, typer.Option("--seed", help="Scene i of seed s is the same on every machine; use another "
                                      "seed for a validation split.")] = 0,
    shard_size: ShardSizeOpt = 256,
    jpg: Annotated[bool, typer.Option("--jpg", help="Store rgb as JPEG (quality 95) instead of PNG.")] = False,
    workers: WorkersOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Render procedural scenes with exact rgb, depth, semseg, surface normals and a class label.

    Primitives (sphere, box, cylinder, cone) on a ground plane under a sky, ray-cast in numpy; deterministic per
    seed. Example: mmae data synth --out data/synth/train --num 2000 --size 64
    """
    from orchestrator.data.synth import run_synth

    manifest = _user_errors(run_synth, out, num, size=size, seed=seed, samples_per_shard=shard_size,
                            workers=workers, jpg=jpg, overwrite=overwrite)
    console.info(f"wrote {manifest.num_samples} samples in {len(manifest.shards)} shards to {out}")


@app.command("inspect")
def data_inspect(
    url: Annotated[str, typer.Argument(metavar="URL", help="Shard folder (path or fsspec URL).", show_default=False)],
    grid: Annotated[
        str | None, typer.Option("--grid", metavar="PNG", help="Write a picture grid: one row per sample, one "
                                 "column per modality.")
    ] = None,
    num: Annotated[int, typer.Option("--num", "-n", min=1, help="Samples in the grid.")] = 8,
    scan: Annotated[bool, typer.Option("--scan", help="Read every sample: verify checksums, decode everything, "
                                       "count classes and semseg pixels.")] = False,
    skip_bad: SkipBadOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Show what a shard folder holds: counts, modalities, class histogram, and optionally a picture grid."""
    import dataclasses

    from orchestrator.data.inspect import inspect_folder

    report = _user_errors(inspect_folder, url, grid=grid, num=num, scan=scan, skip_bad=skip_bad)
    if as_json:
        console.print_json(dataclasses.asdict(report))
    else:
        console.out(console.table(report.rows(), ["field", "value"]))
    if report.num_skipped:
        console.warn(f"skipped {report.num_skipped} bad samples; first: {report.skipped_reasons[0]}")


@app.command("import-folder")
def data_import_folder(
    root: Annotated[str, typer.Argument(metavar="ROOT", help="Folder in the original layout: ROOT/{rgb,depth,"
                                        "semseg}/<class>/<file>.", show_default=False)],
    out: OutOpt,
    shard_size: ShardSizeOpt = 256,
    semseg_classes: Annotated[int, typer.Option("--semseg-classes", min=1, help="Size of the semseg label set "
                                                "(133: COCO panoptic, the original's).")] = 133,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample order across shards.")] = 0,
    skip_bad: SkipBadOpt = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Parallel file readers.")] = 8,
    overwrite: OverwriteOpt = False,
) -> None:
    """Convert the original MultiMAE folder layout into shards, pairing files by name across modalities.

    Files without a partner in every modality are listed and the import is refused.
    """
    from orchestrator.data.import_folder import import_folder

    result = _user_errors(import_folder, root, out, samples_per_shard=shard_size,
                          num_semseg_classes=semseg_classes, seed=seed, skip_bad=skip_bad, overwrite=overwrite,
                          workers=workers, progress=True)
    man = result.manifest
    console.info(f"wrote {man.num_samples} samples ({len(man.class_names or ())} classes, "
                 f"{', '.join(man.modalities)}) in {len(man.shards)} shards to {out}")
    if result.num_skipped:
        console.warn(f"skipped {result.num_skipped} bad samples; first: {result.skipped_reasons[0]}")


@app.command("pseudolabel")
def data_pseudolabel(
    images: Annotated[str, typer.Option("--images", metavar="URL", help="RGB images: a folder (searched "
                                        "recursively) or a shard folder with rgb.", show_default=False)],
    out: OutOpt,
    depth_model: DepthModelOpt = "Intel/dpt-hybrid-midas",
    seg_model: SegModelOpt = "facebook/mask2former-swin-small-coco-panoptic",
    size: Annotated[int, typer.Option("--size", min=16, help="Output side: shorter side resized, centre crop.")] = 224,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per model call.")] = 16,
    shard_size: ShardSizeOpt = 256,
    actors: Annotated[int | None, typer.Option("--actors", min=1, help="Model replicas (default: one per GPU, or "
                                               "one on CPU).")] = None,
    skip_bad: SkipBadOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Predict depth and semantic maps for RGB images with off-the-shelf networks (Ray Data batch inference).

    As the paper does: depth from a DPT, semseg from Mask2Former; the label set is recorded in the manifest.
    """
    from orchestrator.data.pseudolabel import pseudolabel

    result = _user_errors(pseudolabel, images, out, depth_model=depth_model, seg_model=seg_model, size=size,
                          batch_size=batch_size, samples_per_shard=shard_size, num_actors=actors,
                          skip_bad=skip_bad, overwrite=overwrite)
    console.info(f"wrote {result.manifest.num_samples} pseudo-labelled samples in {len(result.manifest.shards)} "
                 f"shards to {out}")
    if result.num_skipped:
        console.warn(f"skipped {result.num_skipped} unreadable images; first: {result.skipped_reasons[0]}")
