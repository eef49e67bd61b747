# mmae developer entry points. `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast quality style schema bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject (pip takes them from local files where present)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

## demo: set up, make the synthetic data set if absent, pretrain the tiny job locally, show the run
demo: setup
	@test -f data/synth/train/manifest.json || $(BIN)/mmae data synth --out data/synth/train --num 512 --size 64 --seed 0
	@test -f data/synth/val/manifest.json || $(BIN)/mmae data synth --out data/synth/val --num 64 --size 64 --seed 1
	$(BIN)/mmae launch jobs/pretrain_tiny.yaml --local
	$(BIN)/mmae status

## test: set up, then the whole suite (unit + integration with real local services; gpu tests skip without CUDA)
test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

## test-fast: unit tests only
test-fast: setup
	$(BIN)/pytest -m "not integration and not slow" $(PYTEST_ARGS)

quality: setup
	$(BIN)/ruff check .
	$(BIN)/mmae config schema | diff -q - jobs/schema.json

style: setup
	$(BIN)/ruff check --fix .
	$(BIN)/mmae config schema --out jobs/schema.json

bench: setup
	$(BIN)/python bench/train_step.py --preset tiny --batch-size 16

clean:
	rm -rf $(VENV) .pytest_cache .mmae
