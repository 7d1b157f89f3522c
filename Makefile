# gen3d — build the book, run the tests.
#
#   make book              install (once), make the data (once), run every chapter, build _build/html
#   make test              install (once), unit tests + every chapter in the smoke profile
#   make chapter N=1       run one chapter (PROFILE=smoke|cpu|gpu to choose; default by machine)
#   make dryrun            every chapter with the gpu profile's sizes, two steps per loop
#   make browser           check the built site in headless Chromium
#   make data | report | serve | clean | distclean
#
# PROFILE=smoke|cpu|gpu overrides the profile (default: gpu with CUDA, else cpu).
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu installs the CPU-only torch wheel.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GEN3D := $(VENV)/bin/gen3d
STAMP := $(VENV)/.gen3d-installed
TORCH_VERSION := 2.13.0
TORCH_INDEX_URL ?=
PROFILE ?=
ONLY ?=
N ?= 1

DATA ?= data
DATA_N ?= 64
DATA_SIZE ?= 64
DATA_FRAMES ?= 16
DATA_SEED ?= 0

PROFILE_ARG := $(if $(PROFILE),--profile $(PROFILE))

.PHONY: book test dryrun chapter data report browser serve install clean distclean help

help:
	@sed -n '3,10p' Makefile | sed 's/^# \{0,1\}//'

## The virtual environment: torch first, pinned (a bare `torch` pulls a multi-GB CUDA build),
## then the requirements and the library itself. The stamp makes a second `make` skip this.
install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) torch==$(TORCH_VERSION)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -e .
	@touch $@

## The datasets: synthetic, made locally (nothing is downloaded), skipped when present; then the
## yardstick encoder the synthesis chapters share (trained once on new phantom brains, then cached)
## and the new phantom hearts chapter 7 draws beside the heart dataset (made once, then cached).
data: $(DATA)/brain/dataset.json $(DATA)/heart/dataset.json
	$(GEN3D) yardstick --data $(DATA)/brain
	$(GEN3D) hearts --data $(DATA)/heart

$(DATA)/brain/dataset.json: | $(STAMP)
	$(GEN3D) data brain --out $(DATA)/brain --n $(DATA_N) --size $(DATA_SIZE) --seed $(DATA_SEED)

$(DATA)/heart/dataset.json: | $(STAMP)
	$(GEN3D) data heart --out $(DATA)/heart --n $(DATA_N) --size $(DATA_SIZE) --frames $(DATA_FRAMES) --seed $(DATA_SEED)

## The book: every chapter of _toc.yml, then the site from the executed copies, then the report.
book: $(STAMP) data
	$(GEN3D) book $(PROFILE_ARG) $(if $(ONLY),--only $(ONLY))

chapter: $(STAMP) data
	$(GEN3D) run $(N) $(PROFILE_ARG)

report: | $(STAMP)
	$(GEN3D) report

## Unit tests + every chapter in the smoke profile. pytest's "no tests ran" (exit 5) is a failure.
test: $(STAMP) data
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

## The gpu profile's shapes and configs, on any machine: two steps per training or sampling loop.
dryrun: $(STAMP) data
	@GEN3D_MAX_STEPS=2 $(PY) -m pytest -m dryrun -rs tests/test_notebooks.py; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make dryrun: no chapter ran" >&2; exit 1; fi; exit $$rc

## The built site in headless Chromium (needs `make book` first and /usr/bin/chromium).
browser: | $(STAMP)
	@$(PY) -m pytest -m browser tests/test_site.py; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make browser: no browser test ran" >&2; exit 1; fi; exit $$rc

serve:
	$(PY) -m http.server --bind 127.0.0.1 --directory _build/html 8000

clean:
	rm -rf _build

distclean: clean
	rm -rf $(VENV) $(DATA)
