# Set-up and checks. `make test` and `make demo` do their own set-up, so on a fresh machine
# each is one command. Re-running is quick: set-up is redone only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
# The CPU build of torch, for machines without a CUDA device. On these machines pip finds the local
# CPU wheel of this version; elsewhere set TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu.
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?=

# The oldest transformers vlmtune supports (pyproject.toml's lower bound): `make test-oldest` runs the fast
# tests in a second venv with it, and checks its predictions against the newest's (tests/versions.py).
TRANSFORMERS_OLDEST ?= 5.16.1
OLD_VENV := .venv-oldest
OLD_PY := $(OLD_VENV)/bin/python

.PHONY: setup test test-fast test-oldest demo docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA device found: installing the default (CUDA) build of torch"; \
		$(PIP) install -q "torch>=2.4"; \
	else \
		echo "no CUDA device: installing the CPU build of torch $(TORCH_CPU_VERSION)"; \
		$(PIP) install -q "torch==$(TORCH_CPU_VERSION)" $(if $(TORCH_CPU_INDEX),--index-url $(TORCH_CPU_INDEX)); \
	fi
	$(PIP) install -q -e ".[test,webui,api]"
	@$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is not None and not __import__('torch').cuda.is_available())" \
		|| echo "warning: torchvision is installed next to a CPU torch; it can break transformers' processors"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

test-oldest: setup
	test -x $(OLD_PY) || $(PYTHON) -m venv $(OLD_VENV)
	$(OLD_PY) -m pip --disable-pip-version-check install -q "torch==$(TORCH_CPU_VERSION)" $(if $(TORCH_CPU_INDEX),--index-url $(TORCH_CPU_INDEX))
	$(OLD_PY) -m pip --disable-pip-version-check install -q "transformers==$(TRANSFORMERS_OLDEST)" -e ".[test,api]"
	rm -rf $(OLD_VENV)/reference && $(PY) tests/versions.py make $(OLD_VENV)/reference
	VLMTUNE_REFERENCE=$(OLD_VENV)/reference $(OLD_PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/vlmtune demo

docs: setup
	$(PY) -m vlmtune.config > docs/config.md

clean:
	rm -rf $(VENV) $(OLD_VENV) build *.egg-info src/*.egg-info .pytest_cache
