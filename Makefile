# The project's two commands: `make demo` (the main job on the bundled sample) and
# `make test` (the test suite). Each creates .venv and installs what it needs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Prepares the bundled sample once (runs/sample-bytes), trains tiny-moe8 on 2 local Ray
# workers (final validation loss and where the run lives), then runs the tiny
# dense-versus-MoE study on Ray Tune (about 20 minutes) and prints its report.
demo: $(STAMP)
	$(VENV)/bin/raymoe demo
	$(VENV)/bin/raymoe compare jobs/configs/study-tiny.yaml

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/moe_layer.py

clean:
	rm -rf $(VENV) runs
