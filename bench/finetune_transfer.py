"""Does pretraining transfer? Fine-tune from a tiny MultiMAE pretraining run vs from random init, same budget.

On synthetic scenes (`mmae data synth`): pretrain `jobs/pretrain_tiny.yaml` (rgb, depth, semseg in and out) on
--train-samples scenes, then fine-tune `jobs/finetune_tiny_depth.yaml` and `jobs/finetune_tiny_semseg.yaml` (rgb input)
on the first --finetune-samples of them, twice each, once from the pretraining run's final weights and once from
random init, with the same steps, schedule and seed, and compare depth delta1 / RMSE and semseg mIoU / pixel accuracy
on separate validation scenes. Everything runs in this process through `fit` (the
code path Ray Train workers run), without Ray or MLflow, so the timings are the training itself. Example:

    .venv/bin/python bench/finetune_transfer.py --pretrain-steps 1500 --finetune-steps 300 --seeds 0

Prints a markdown table (and writes it as JSON with --json FILE).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _job(name: str, overrides: list[str]):
    from orchestrator.spec import load_job

    return load_job(REPO / "jobs" / f"{name}.yaml", overrides)


def _data_overrides(data: Path, train: str = "train") -> list[str]:
    return [f"data.train_url={data / train}", f"data.val_url={data / 'val'}", "data.num_workers=1",
            "train.log_every_steps=50"]


def pretrain(data: Path, out: Path, steps: int) -> tuple[Path, float, float]:
    """Pretrain the tiny job; its final weights as safetensors, the final val loss and the seconds it took."""
    from safetensors.torch import save_file

    from multimae_core.data.loader import ShardDataSource
    from multimae_core.model.state_dict import to_original
    from multimae_core.training.loop import fit
    from multimae_core.training.reporting import MemoryReporter

    job = _job("pretrain_tiny", [*_data_overrides(data), f"train.max_steps={steps}",
                                 f"train.image_every_steps={steps + 1}"])
    t0 = time.perf_counter()
    result = fit(job, MemoryReporter(), ShardDataSource.from_config(job))
    seconds = time.perf_counter() - t0
    path = out / "pretrain_tiny.safetensors"
    save_file(to_original(result.model), str(path))
    return path, result.val_metrics.get("val/loss/total", float("nan")), seconds


class _TrainOnly:
    """The train split of a DataSource only: `fit` then skips its per-epoch validation (many short epochs on a small
    labelled set would spend most of the time validating); the bench validates once at the end."""

    def __init__(self, source) -> None:
        self.source = source

    def epoch_batches(self, epoch: int, *, split: str = "train", skip: int = 0):
        return self.source.epoch_batches(epoch, split=split, skip=skip) if split == "train" else iter(())

    def num_batches(self, split: str = "train") -> int:
        return self.source.num_batches(split) if split == "train" else 0


def finetune(kind: str, data: Path, steps: int, seed: int, weights: Path | None) -> tuple[dict[str, float], float]:
    """Fine-tune one task; its validation metrics at the end and the seconds it took."""
    import torch

    from multimae_core.data.tasks import FinetuneDataSource
    from multimae_core.training.loop import fit
    from multimae_core.training.reporting import MemoryReporter
    from multimae_core.training.task_objective import FinetuneObjective

    init = [f"init.checkpoint_url={weights}"] if weights is not None else []
    job = _job(f"finetune_tiny_{kind}", [*_data_overrides(data, "labelled"), f"train.max_steps={steps}",
                                         f"train.seed={seed}", f"train.image_every_steps={steps + 1}",
                                         "data.num_workers=0", *init])
    t0 = time.perf_counter()
    source = FinetuneDataSource.from_config(job)
    result = fit(job, MemoryReporter(), _TrainOnly(source))
    metrics = FinetuneObjective(job).validate(result.model, source.epoch_batches(0, split="val"),
                                              device=torch.device("cpu"), seed=job.train.seed)
    return metrics, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train-samples", type=int, default=2048, help="scenes for pretraining")
    parser.add_argument("--finetune-samples", type=int, default=None,
                        help="labelled scenes for fine-tuning: the first N of the pretraining scenes (default all)")
    parser.add_argument("--val-samples", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from multimae_core.data.synth import write_synth

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmae-transfer-") as tmp:
        root = Path(tmp)
        write_synth(str(root / "train"), args.train_samples, size=64, seed=0, samples_per_shard=256)
        # Scene i depends only on (seed, i): the labelled set is the first N pretraining scenes.
        labelled = min(args.finetune_samples or args.train_samples, args.train_samples)
        write_synth(str(root / "labelled"), labelled, size=64, seed=0, samples_per_shard=256)
        write_synth(str(root / "val"), args.val_samples, size=64, seed=1, samples_per_shard=256)
        weights, pre_loss, pre_s = pretrain(root, root, args.pretrain_steps)
        print(f"pretraining: {args.pretrain_steps} steps in {pre_s:.0f} s, final val/loss/total {pre_loss:.3f}",
              file=sys.stderr)
        results: dict[str, dict[str, list[float]]] = {}
        for kind in ("depth", "semseg"):
            for label, init in (("pretrained", weights), ("random init", None)):
                for seed in args.seeds:
                    metrics, seconds = finetune(kind, root, args.finetune_steps, seed, init)
                    print(f"{kind} / {label} / seed {seed}: {seconds:.0f} s {metrics}", file=sys.stderr)
                    row = results.setdefault(f"{kind} | {label}", {})
                    for key, value in metrics.items():
                        row.setdefault(key, []).append(value)
    total = time.perf_counter() - start

    columns = (("delta1", "depth delta1 (%)"), ("rmse", "depth RMSE (m)"), ("absrel", "depth AbsRel"),
               ("miou", "semseg mIoU (%)"), ("pixel_acc", "semseg pixel acc (%)"), ("loss/total", "val loss"))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; pretrain {args.pretrain_steps} steps on "
          f"{args.train_samples} scenes, fine-tune {args.finetune_steps} steps on {labelled} labelled scenes, "
          f"validation on {args.val_samples}, seeds {args.seeds}; {total:.0f} s in all\n")
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
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
                                         "pretrain_val_loss": pre_loss, "seconds": total, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
