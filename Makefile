# Two commands for a fresh machine:  `make demo` (the main job)  and  `make test` (the test suite).
# Both create .venv on first use. torch and torchvision are pinned first so that no other dependency
# pulls a different multi-GB torch build; the package itself declares a version range.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH   = torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint setup gpu-wheels

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/dedn demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests tools

# The pure-Python dependencies a bare CUDA machine without network may lack, as wheels in .whl/ for the
# GPU check, tools/gpu-check.sh (which installs them first when .whl/ has any, then runs tools/gpu_check.py).
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
		omegaconf==2.4.0 submitit==1.5.4 efficientnet-lite-pytorch==0.1.0
