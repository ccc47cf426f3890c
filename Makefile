# Entry points: `make test` (what CI runs via .ci/run), `make demo`, `make bench`, `make clean`.
# The venv is built on first use. torch is installed pinned *before* the project so that pip
# takes the CPU wheel from the local wheel dir and never resolves pyproject's range to a CUDA build.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test bench clean distclean

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs only when pyproject.toml changes; the stamp marks a finished install.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -e ".[dev,ray]"
	touch $@

# Kept as a target name too (`make .venv`).
$(VENV): $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tuner run studies/mnist-quick.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/throughput.py
	$(VENV)/bin/python benchmarks/quality.py

# Build outputs, caches and demo runs; the venv and storage/ (studies, artifacts) are kept.
clean:
	rm -rf build dist *.egg-info .pytest_cache runs
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

# Also drops the venv (rebuilt by the next target that needs it).
distclean: clean
	rm -rf $(VENV)
