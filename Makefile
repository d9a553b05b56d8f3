# The two commands the README opens with: `make quickstart` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/lejepa sweep sweeps/quickstart.yaml
	$(BIN)/lejepa select quickstart --out runs/selection-quickstart

test: $(STAMP)
	$(BIN)/python -m pytest
