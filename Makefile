# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# torch first, pinned to a pair known to work together (timm needs torchvision); override for other platforms.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
# pytest-xdist workers of `make test`; each test still runs as it would alone (see docs/testing.md).
TEST_WORKERS ?= 2

$(BIN)/lorafair: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(BIN)/lorafair

.PHONY: install demo test lint bench
install: $(BIN)/lorafair

demo: install
	$(BIN)/lorafair fit --config configs/demo.yaml

test: install
	$(BIN)/ruff check lorafair tests benchmarks scripts
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

lint: install
	$(BIN)/ruff check lorafair tests benchmarks scripts
	$(BIN)/lint-imports --no-cache

bench: install
	$(BIN)/python benchmarks/aggregation.py
	$(BIN)/python benchmarks/data_loading.py
	$(BIN)/python benchmarks/shapes_generation.py
	$(BIN)/python benchmarks/round_time.py
