"""Does pretraining transfer? Fine-tune from a tiny MultiMAE pretraining run vs from random init, same budget.

On synthetic scenes (`mmae data synth`): pretrain `jobs/pretrain_tiny.yaml` (rgb, depth, semseg in and out) on
--train-samples scenes, then fine-tune `jobs/finetune_tiny_depth.yaml` and `jobs/finetune_tiny_semseg.yaml` (rgb input)
on the first --finetune-samples of them, twice per seed, once from the pretraining run's final weights and once from
random init, with the same steps, schedule, data and seed, and compare depth delta1 / RMSE and semseg mIoU / pixel
accuracy on validation scenes rendered with another seed (--val-seed; no validation scene is a training scene).
Everything runs in this process through `fit` (the code path Ray Train workers run), without Ray or MLflow, so the
timings are the training itself.

Both stages take the same model overrides: --patch-size (default 8: 64 tokens per modality at 64 px instead of the
jobs' 16) and --encoded-tokens (default: 1/6 of the 3 input modalities' tokens, rounded up, the paper's ratio; at
patch 16 the job's own 16).
--finetune-set KEY=VALUE applies a `--set` override to every fine-tuning run of both arms.

Pretrain once and reuse: --save-pretrained PATH keeps the pretrained weights (safetensors, original MultiMAE layout)
and --pretrained PATH skips pretraining and starts from them (the model overrides must match). --data-dir DIR keeps
the rendered scenes (rendered there when missing). Before the comparison the script checks that the fine-tuning
model of the pretrained arm holds exactly the saved encoder and rgb-adapter tensors, and that the random arm does not.
Example (the recorded run is in BENCHMARKS.md, "Transfer"):

    .venv/bin/python bench/finetune_transfer.py --pretrain-steps 1500 --finetune-steps 300 --seeds 0

Prints a markdown table (and writes every seed's metrics as JSON with --json FILE).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGE_SIZE = 64
NUM_PRETRAIN_INPUTS = 3  # rgb, depth, semseg (jobs/pretrain_tiny.yaml)
JOB_PATCH_SIZE = 16  # the jobs' model.patch_size (masking.num_encoded_tokens 16 of 48 there)


def _job(name: str, overrides: list[str]):
    from orchestrator.spec import load_job

    return load_job(REPO / "jobs" / f"{name}.yaml", overrides)


def _data_overrides(data: Path, train: str = "train") -> list[str]:
    return [f"data.train_url={data / train}", f"data.val_url={data / 'val'}", "data.num_workers=1",
            "train.log_every_steps=50"]


def model_overrides(patch_size: int, encoded_tokens: int | None) -> list[str]:
    """Model overrides shared by pretraining and fine-tuning (fine-tuning ignores the masking section).

    Without ``encoded_tokens``: the jobs' own value at their patch size 16, else 1/6 of the input tokens rounded up.
    """
    if encoded_tokens is None and patch_size == JOB_PATCH_SIZE:
        return [f"model.patch_size={patch_size}"]
    tokens = (IMAGE_SIZE // patch_size) ** 2
    encoded = encoded_tokens or math.ceil(NUM_PRETRAIN_INPUTS * tokens / 6)
    return [f"model.patch_size={patch_size}", f"masking.num_encoded_tokens={encoded}"]


def render(data: Path, train_samples: int, labelled: int, val_samples: int, val_seed: int) -> None:
    """Render the pretraining, labelled (the first `labelled` pretraining scenes) and validation sets, unless there."""
    from multimae_core.data.synth import write_synth

    for name, num, seed in (("train", train_samples, 0), ("labelled", labelled, 0), ("val", val_samples, val_seed)):
        folder = data / name
        marker = folder / ".bench-params"
        params = f"{num} {IMAGE_SIZE} {seed}"
        if marker.exists() and marker.read_text() == params:
            continue
        if folder.exists():
            shutil.rmtree(folder)
        # Scene i depends only on (seed, i): the labelled set is the first N pretraining scenes.
        write_synth(str(folder), num, size=IMAGE_SIZE, seed=seed, samples_per_shard=256)
        marker.write_text(params)


def pretrain(data: Path, out: Path, steps: int, model: list[str]) -> tuple[float, float]:
    """Pretrain the tiny job and save its final weights at ``out``; the final val loss and the seconds it took."""
    from safetensors.torch import save_file

    from multimae_core.data.loader import ShardDataSource
    from multimae_core.model.state_dict import to_original
    from multimae_core.training.loop import fit
    from multimae_core.training.reporting import MemoryReporter

    job = _job("pretrain_tiny", [*_data_overrides(data), *model, f"train.max_steps={steps}",
                                 f"train.image_every_steps={steps + 1}"])
    t0 = time.perf_counter()
    reporter = MemoryReporter()
    result = fit(job, reporter, ShardDataSource.from_config(job))
    seconds = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_original(result.model), str(out))
    curve = [(step, round(m["val/loss/total"], 3)) for step, m in reporter.metrics if "val/loss/total" in m]
    if curve:
        print(f"pretraining val/loss/total by step: {curve}", file=sys.stderr)
    return result.val_metrics.get("val/loss/total", float("nan")), seconds


class _TrainOnly:
    """The train split of a DataSource only: `fit` then skips its per-epoch validation (many short epochs on a small
    labelled set would spend most of the time validating); the bench validates once at the end."""

    def __init__(self, source) -> None:
        self.source = source

    def epoch_batches(self, epoch: int, *, split: str = "train", skip: int = 0):
        return self.source.epoch_batches(epoch, split=split, skip=skip) if split == "train" else iter(())

    def num_batches(self, split: str = "train") -> int:
        return self.source.num_batches(split) if split == "train" else 0


def _finetune_job(kind: str, data: Path, steps: int, seed: int, weights: Path | None, model: list[str],
                  extra: list[str]):
    init = [f"init.checkpoint_url={weights}"] if weights is not None else []
    return _job(f"finetune_tiny_{kind}", [*_data_overrides(data, "labelled"), *model, f"train.max_steps={steps}",
                                          f"train.seed={seed}", f"train.image_every_steps={steps + 1}",
                                          "data.num_workers=0", *init, *extra])


def _encoder_keys(model) -> list[str]:
    return [k for k in model.state_dict() if k.startswith(("encoder.", "input_adapters.", "global_tokens"))]


def check_loading(kind: str, data: Path, weights: Path, model: list[str]) -> int:
    """Assert the pretrained arm's fine-tuning model starts with the saved encoder and adapter tensors (exactly) and
    the random arm does not; the number of tensors compared. Builds the model as `fit` does."""
    import torch
    from safetensors.torch import load_file

    from multimae_core.training.task_objective import FinetuneObjective

    saved = load_file(str(weights))
    counts = []
    for init in (weights, None):
        objective = FinetuneObjective(_finetune_job(kind, data, 1, 0, init, model, []))
        torch.manual_seed(0)
        net = objective.build_model()
        objective.initialise(net)
        own = net.state_dict()
        keys = _encoder_keys(net)
        if not keys or any(k not in saved for k in keys):
            raise RuntimeError(f"{kind}: encoder keys of the fine-tuning model missing from {weights}: "
                               f"{[k for k in keys if k not in saved][:5]}")
        same = [k for k in keys if own[k].shape == saved[k].shape and torch.equal(own[k], saved[k])]
        if init is not None and len(same) != len(keys):
            raise RuntimeError(f"{kind}: pretrained weights not loaded: {sorted(set(keys) - set(same))[:5]}")
        if init is None and any(k.startswith("encoder.") and k.endswith(".weight") for k in same):
            raise RuntimeError(f"{kind}: the random-init model holds pretrained encoder weights")
        counts.append(len(keys))
    return counts[0]


def encoder_drift(model, weights: Path) -> float:
    """Relative L2 distance of the fine-tuned encoder blocks from the pretrained ones (encoder.* weights only)."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    own = model.state_dict()
    num = den = 0.0
    for key in own:
        if key.startswith("encoder.") and key in saved:
            num += float(torch.sum((own[key].float() - saved[key].float()) ** 2))
            den += float(torch.sum(saved[key].float() ** 2))
    return math.sqrt(num / den) if den else float("nan")


def finetune(kind: str, data: Path, steps: int, seed: int, weights: Path | None, model: list[str], extra: list[str],
             reference: Path) -> tuple[dict[str, float], float]:
    """Fine-tune one task; its validation metrics at the end (plus ``encoder_drift`` from ``reference``, the
    pretrained weights) and the seconds it took."""
    import torch

    from multimae_core.data.tasks import FinetuneDataSource
    from multimae_core.training.loop import fit
    from multimae_core.training.reporting import MemoryReporter
    from multimae_core.training.task_objective import FinetuneObjective

    job = _finetune_job(kind, data, steps, seed, weights, model, extra)
    t0 = time.perf_counter()
    source = FinetuneDataSource.from_config(job)
    result = fit(job, MemoryReporter(), _TrainOnly(source))
    metrics = FinetuneObjective(job).validate(result.model, source.epoch_batches(0, split="val"),
                                              device=torch.device("cpu"), seed=job.train.seed)
    metrics["encoder_drift"] = encoder_drift(result.model, reference)
    return metrics, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--kinds", nargs="+", default=["depth", "semseg"], choices=["depth", "semseg"])
    parser.add_argument("--train-samples", type=int, default=2048, help="scenes for pretraining")
    parser.add_argument("--finetune-samples", type=int, default=None,
                        help="labelled scenes for fine-tuning: the first N of the pretraining scenes (default all)")
    parser.add_argument("--val-samples", type=int, default=128)
    parser.add_argument("--val-seed", type=int, default=1,
                        help="render seed of the validation scenes (training scenes use 0); use another one, e.g. "
                             "2, as a development split when choosing settings")
    parser.add_argument("--patch-size", type=int, default=8, help="model.patch_size of both stages")
    parser.add_argument("--encoded-tokens", type=int, default=None,
                        help="masking.num_encoded_tokens for pretraining (default: 1/6 of the input tokens rounded up; "
                             "at patch 16 the job's 16)")
    parser.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every fine-tuning run of both arms (repeatable)")
    parser.add_argument("--pretrained", type=Path, default=None,
                        help="start from these pretrained weights instead of pretraining (same model overrides)")
    parser.add_argument("--save-pretrained", type=Path, default=None,
                        help="keep the pretrained weights here (default: a temporary folder, deleted at the end)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep the rendered scenes here and reuse them (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    model = model_overrides(args.patch_size, args.encoded_tokens)
    labelled = min(args.finetune_samples or args.train_samples, args.train_samples)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmae-transfer-") as tmp:
        data = args.data_dir or Path(tmp) / "data"
        render(data, args.train_samples, labelled, args.val_samples, args.val_seed)
        if args.pretrained is not None:
            weights, pre_loss, pre_s = args.pretrained, float("nan"), 0.0
            print(f"pretraining: skipped, weights from {weights}", file=sys.stderr)
        else:
            weights = args.save_pretrained or Path(tmp) / "pretrain_tiny.safetensors"
            pre_loss, pre_s = pretrain(data, weights, args.pretrain_steps, model)
            print(f"pretraining: {args.pretrain_steps} steps in {pre_s:.0f} s, final val/loss/total {pre_loss:.3f}, "
                  f"weights at {weights}", file=sys.stderr)
        for kind in args.kinds:
            n = check_loading(kind, data, weights, model)
            print(f"{kind}: the pretrained arm starts from the saved weights ({n} encoder/adapter tensors equal), "
                  f"the random arm does not", file=sys.stderr)
        results: dict[str, dict[str, list[float]]] = {}
        seconds: list[float] = []
        for kind in args.kinds:
            for seed in args.seeds:
                for label, init in (("pretrained", weights), ("random init", None)):
                    metrics, secs = finetune(kind, data, args.finetune_steps, seed, init, model, args.finetune_set,
                                             weights)
                    seconds.append(secs)
                    print(f"{kind} / {label} / seed {seed}: {secs:.0f} s "
                          + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), file=sys.stderr)
                    row = results.setdefault(f"{kind} | {label}", {})
                    for key, value in metrics.items():
                        row.setdefault(key, []).append(value)
    total = time.perf_counter() - start

    columns = (("delta1", "depth delta1 (%)"), ("rmse", "depth RMSE (m)"), ("absrel", "depth AbsRel"),
               ("miou", "semseg mIoU (%)"), ("pixel_acc", "semseg pixel acc (%)"), ("loss/total", "val loss"),
               ("encoder_drift", "encoder drift"))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; {' '.join(model)}; pretrain "
          f"{args.pretrain_steps if args.pretrained is None else 'reused'} steps on {args.train_samples} scenes "
          f"(final val loss {pre_loss:.3f}, {pre_s:.0f} s), fine-tune {args.finetune_steps} steps on {labelled} "
          f"labelled scenes ({statistics.fmean(seconds):.0f} s per run) {args.finetune_set or ''}, validation on "
          f"{args.val_samples} scenes of seed {args.val_seed}, seeds {args.seeds}; {total:.0f} s in all\n")
    print("| task | init | " + " | ".join(title for _, title in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name, row in results.items():
        cells = []
        for key, _ in columns:
            values = row.get(key)
            if not values:
                cells.append("-")
                continue
            spread = f" +- {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.3g}{spread}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nper seed:", file=sys.stderr)
    for name, row in results.items():
        for key in ("delta1", "rmse", "miou", "pixel_acc"):
            if key in row:
                print(f"  {name} {key}: {', '.join(f'{v:.4g}' for v in row[key])}", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
                                         "pretrain_val_loss": pre_loss, "pretrain_seconds": pre_s, "seconds": total,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
