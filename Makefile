# The two set-up commands: `make quickstart` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.kinoe-installed
BASE_PYTHON ?= $(shell command -v python3.11 || command -v python3)

.PHONY: install test lint quickstart clean

install: $(INSTALLED)

# Reinstalls when pyproject.toml changes. torch==2.13.0 is pinned exactly, which keeps pip on
# the CPU build where one is provided instead of pulling CUDA packages.
$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(BASE_PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"kinoe needs Python 3.11, .venv has {sys.version.split()[0]}"'
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(INSTALLED)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

# Runs every stage on the bundled corpus, on CPU (configs/pipeline/quickstart.yaml: each step's
# config writes under runs/quickstart), and ends by printing where each artifact and report is.
# The evaluation and jaster steps read real JGLUE from ../shared/data when it is there, else
# the bundled sample in JGLUE's format (data_prep/quickstart/eval/).
JGLUE := $(wildcard ../shared/data/eval/jglue)
quickstart: $(INSTALLED)
	$(VENV)/bin/kinoe doctor -c configs/doctor/workstation.yaml
	$(VENV)/bin/kinoe pipeline -c configs/pipeline/quickstart.yaml $(if $(JGLUE),variables.jglue_dir=$(JGLUE))

clean:
	rm -rf runs .pytest_cache .ruff_cache
