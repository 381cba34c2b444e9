# Two entry points: `make main` (set up, then train + evaluate SASRec on ML-1M) and `make test`.
# Both create .venv on first use. torch 2.13.0 (CPU) is installed first so that the project's
# torch requirement is already met and pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= ../shared/data
RUN_DIR ?= runs/sasrec-ml-1m
TORCH ?= torch==2.13.0

BIN := $(VENV)/bin

.PHONY: main test lint setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

main: setup
	$(BIN)/mlsa4rec train --model sasrec --dataset ml-1m --data-dir $(DATA_DIR) --output-dir $(RUN_DIR) \
		--overwrite --config configs/sasrec-ml-1m-quick.yaml

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests benchmarks
