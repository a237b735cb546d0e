# Two commands a new user types: `make demo` (the main job) and `make test` (the suite).
# Each sets itself up: a virtualenv in .venv, the CPU build of torch (torch==2.13.0 is the CPU wheel;
# an unpinned torch pulls a multi-GB CUDA build), then rotfunc with its test extra. Idempotent: the
# install runs again only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rotfunc-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench setup

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m rotfunc demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests --nbmake notebooks

# THP_MEM_ALLOC_ENABLE: torch's CPU allocator backs large tensors with transparent huge pages, for rotfunc
# and PEFT alike (same process); at 4096x4096 first-touch page faults otherwise dominate a merge.
bench: $(STAMP)
	THP_MEM_ALLOC_ENABLE=1 $(PY) -m benchmarks $(ARGS)
