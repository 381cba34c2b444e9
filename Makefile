# Two entry points: `make main` (set up, train + evaluate the causal MLSA4Rec on Amazon Beauty, then
# recommend for one history) and `make test`. Both create .venv on first use, with every extra
# (serve, onnx, triton: `.[dev]`). torch 2.13.0 (CPU) is installed first so that the project's
# torch requirement is already met and pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= ../shared/data
RUN_DIR ?= runs/mlsa4rec-causal-beauty
# one user's history in the data file's own item ids (user 2 of Beauty.txt.gz, oldest first)
HISTORY ?= 6 7 8 9 10 4 11
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
	$(BIN)/mlsa4rec train --model mlsa4rec --dataset amazon-beauty --data-dir $(DATA_DIR) --output-dir $(RUN_DIR) \
		--overwrite --config configs/mlsa4rec-causal-beauty.yaml
	@echo "top 10 after the history $(HISTORY):"
	$(BIN)/mlsa4rec recommend --run-dir $(RUN_DIR) --history "$(HISTORY)" -k 10

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports  # the floors of docs/architecture.md (pyproject.toml's [tool.importlinter])
