#!/usr/bin/env bash
# One prepared GPU check (< 8 minutes): install, run the `gpu` tests, then the ViT-B bf16 train-step benchmark.
# Usage on a CUDA machine, from the repo root:  bash bench/gpu_check.sh   (figures land in $OUT or ./gpu_out)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"; mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  test -x .venv/bin/python || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]'; }
  timeout 180 .venv/bin/pytest -m gpu -q -p no:cacheprovider tests || echo "gpu tests: FAILED ($?)"
  for bs in 64 256; do
    timeout 150 .venv/bin/python bench/train_step.py --preset base --batch-size "$bs" --precision bf16 \
      --device cuda --steps 10 --json "$out/train_step_base_bf16_b$bs.json" || echo "bench b$bs: FAILED ($?)"
  done
} 2>&1 | tee "$out/gpu_check.log"
