# The two commands the README opens with: `make quickstart` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install quickstart lint test datasets browser cluster

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Debian's dataset-fashion-mnist (the 70,000 real Fashion-MNIST images, offline), when missing.
datasets:
	@test -f $(FASHION_MNIST) || bash .ci/install-debian-packages \
	  "get Fashion-MNIST's four IDX files (github.com/zalandoresearch/fashion-mnist) and pass data.root=<their folder>" \
	  dataset-fashion-mnist

# Debian's chromium for the suite's browser test of `lejepa ui` (it skips, saying why, without it).
browser:
	@command -v chromium >/dev/null || bash .ci/install-debian-packages \
	  "the browser test of lejepa ui will skip" chromium

# Debian's SLURM, munge and PostgreSQL for the suite's cluster tests (a one-node SLURM and a team
# MLflow server on PostgreSQL, started by the tests on 127.0.0.1; they skip, saying why, without them).
cluster:
	@bash .ci/install-debian-packages "the SLURM and PostgreSQL tests will skip" \
	  slurmctld slurmd slurm-client munge postgresql

install: $(STAMP) datasets

quickstart: install
	$(BIN)/lejepa sweep sweeps/quickstart.yaml
	$(BIN)/lejepa select quickstart --out runs/selection-quickstart

LINTED := lejepa sweeps analysis benchmarks notebooks tests

# Lint, format and types (settings in pyproject.toml; .pre-commit-config.yaml runs the same).
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

# Two workers, a file at a time each, the longest files first (tests/conftest.py); plain `pytest` runs
# everything in one process.
test: lint browser cluster
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder
