# The two commands of the README:
#   make pipeline   install on first use, then run the DVC pipeline on the embedded defaults
#   make test       install on first use, then run the whole test suite
# Everything else here is a helper.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.lingtune-installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Offline and quiet by default (the lingtune CLI sets the same; these cover dvc/pytest themselves).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export BENTOML_DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: pipeline test test-fast install lock clean-venv tables bento

$(STAMP): pyproject.toml requirements/constraints.txt scripts/install.sh
	bash scripts/install.sh

install: $(STAMP)

pipeline: $(STAMP)
	python scripts/timed_repro.py    # dvc repro, timing each stage: reports/pipeline.json
	lingtune data stats
	python3 scripts/tables.py

test: $(STAMP)
	python -m pytest

test-fast: $(STAMP)
	python -m pytest -m "not slow"

# A Bento of the registry's @champion (docs/serving.md#bento-and-container); prints its tag.
bento: $(STAMP)
	lingtune bento

# Rewrite the generated tables in README.md and docs/ from the JSON reports (standard library only).
tables:
	python3 scripts/tables.py

# Re-resolve the stack from pyproject.toml and pin the result (needs the package registry).
lock:
	bash scripts/lock.sh

clean-venv:
	rm -rf $(VENV)
