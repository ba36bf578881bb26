# The project's two commands: `make demo` (the main job on the bundled sample) and
# `make test` (the test suite). Each creates .venv and installs what it needs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned in one place, pyproject.toml; it is installed first, from that pin, so that
# pip never resolves it itself (an unpinned torch pulls a multi-GB CUDA build).
TORCH := $(shell sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)

.PHONY: demo study study-tiny test test-fast check bench clean

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

# The reference's result in miniature (jobs/configs/study-small.yaml; about 70 minutes on 2
# cores): prepares the corpus once (a 4,096-token BPE trained on Dickens and Twain, their
# text to train and validate on, Austen's and Melville's to validate on), runs the study and
# copies its report, plot and CSV into docs/. CORPUS: a directory with one folder of .txt
# files per author (Project Gutenberg's boilerplate is stripped).
CORPUS ?= ../shared/data/corpus/gutenberg
STUDY_DATA := runs/gutenberg
AUTHORS := Dickens_Charles Twain_Mark Austen_Jane Melville_Herman

study: $(STUDY_DATA)/train/manifest.json $(STUDY_DATA)/austen/manifest.json $(STUDY_DATA)/melville/manifest.json
	$(VENV)/bin/raymoe compare jobs/configs/study-small.yaml
	mkdir -p docs/study-small
	cp runs/study-small/report.md runs/study-small/validation_curves.csv runs/study-small/trials.json \
	   runs/study-small/lr_search.json runs/study-small/validation_loss.png docs/study-small/

$(STUDY_DATA)/tokenizer.json: | $(STAMP)
	@for author in $(AUTHORS); do test -d "$(CORPUS)/$$author" || { \
	  echo "make study: no $(CORPUS)/$$author: pass CORPUS=DIR, a directory with the folders $(AUTHORS) of .txt books"; \
	  exit 2; }; done
	$(VENV)/bin/raymoe tokenizer train --vocab-size 4096 --out $@ $(CORPUS)/Dickens_Charles $(CORPUS)/Twain_Mark

$(STUDY_DATA)/train/manifest.json: $(STUDY_DATA)/tokenizer.json
	$(VENV)/bin/raymoe prepare $(CORPUS)/Dickens_Charles $(CORPUS)/Twain_Mark --tokenizer $< --seq-len 128 \
	  --doc-chars 20000 --val-fraction 0.01 --out $(STUDY_DATA)/train

$(STUDY_DATA)/austen/manifest.json: $(STUDY_DATA)/tokenizer.json
	$(VENV)/bin/raymoe prepare $(CORPUS)/Austen_Jane --tokenizer $< --seq-len 128 --val-fraction 0 --out $(@D)

$(STUDY_DATA)/melville/manifest.json: $(STUDY_DATA)/tokenizer.json
	$(VENV)/bin/raymoe prepare $(CORPUS)/Melville_Herman --tokenizer $< --seq-len 128 --val-fraction 0 --out $(@D)

# The tiny study on the bundled byte-level sample (every model, two seeds; about 25 minutes).
study-tiny: $(STAMP)
	$(VENV)/bin/raymoe demo --prepare-only
	$(VENV)/bin/raymoe compare jobs/configs/study-tiny.yaml

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
