# `make test` and `make serve` create .venv when missing and install what they need.
PYTHON ?= python3
VENV   ?= .venv
# CPU torch from a pinned wheel; an unpinned torch would pull gigabytes of CUDA packages.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: test serve install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m engine.kernels.native
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

serve: $(VENV)/.installed
	$(BIN)/bitskip serve $(ARGS)

bench: $(VENV)/.installed
	$(BIN)/python bench/decode.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
