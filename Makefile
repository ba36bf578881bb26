# The project's two commands: `make demo` (the main job on the bundled sample) and
# `make test` (the test suite). Each creates .venv and installs what it needs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned in one place, pyproject.toml; it is installed first, from that pin, so that
# pip never resolves it itself (an unpinned torch pulls a multi-GB CUDA build).
TORCH := $(shell sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)

.PHONY: demo study test test-fast check bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

# Prepares the bundled sample once (runs/sample-bytes), trains tiny-moe8 on 2 local Ray
# workers, then runs the short dense-versus-MoE study (jobs/configs/study-demo.yaml) and
# prints its table, Table 1's form and where the plot and report are. Under 8 minutes on 2 cores.
demo: $(STAMP)
	$(VENV)/bin/raymoe demo
	$(VENV)/bin/raymoe compare jobs/configs/study-demo.yaml

# The full tiny study (every model, two seeds; about 25 minutes on 2 cores). It also renews
# the plot the README shows.
study: $(STAMP)
	$(VENV)/bin/raymoe demo --prepare-only
	$(VENV)/bin/raymoe compare jobs/configs/study-tiny.yaml
	mkdir -p docs && cp runs/study-tiny/validation_loss.png docs/study-tiny.png

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# What needs neither a Ray cluster nor the S3 server: for the edit-test loop. Two
# pytest-xdist workers, each running one group of tests (tests/conftest.py says which).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not ray and not s3 and not slow" -n 2 --dist loadgroup

check: $(STAMP)
	$(VENV)/bin/ruff check raymoe tests bench jobs
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/moe_layer.py

clean:
	rm -rf $(VENV) runs
