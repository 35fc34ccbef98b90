# Two commands for a fresh machine:  `make demo` (the main job)  and  `make test` (the test suite).
# Both create .venv on first use. torch and torchvision are pinned first so that no other dependency
# pulls a different multi-GB torch build; the package itself declares a version range.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH   = torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint setup gpu-wheels

# TORCH_INDEX: an extra package index for torch alone, e.g. the CPU-only builds of the PyTorch project's own index
# (make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu): about 1 GB instead of a CUDA build's 5 GB.
TORCH_INDEX ?=

# The runtime (make demo) and, on top of it, the developer tools (make test, make lint).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(BIN)/.dev-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/dedn demo

test: $(BIN)/.dev-installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.dev-installed
	$(BIN)/ruff check src tests tools

# The pure-Python dependencies a bare CUDA machine without network may lack, as wheels in .whl/ for the
# GPU check, tools/gpu-check.sh (which installs them first when .whl/ has any, then runs tools/gpu_check.py).
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
		omegaconf==2.4.0 submitit==1.5.4
