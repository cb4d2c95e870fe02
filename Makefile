# lightopd developer tasks. Run inside an activated virtualenv.
PYTHON ?= python
# torch is installed first and on its own so that the build can be chosen: the default pins the
# release this project is tested with; on a GPU machine pass the build you want, e.g.
# `make install TORCH=torch` for the newest default (CUDA) wheel.
TORCH ?= torch==2.13.0

.PHONY: install test lint bench experiment

install:
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e ".[dev]"

test:
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check lightopd tests bench experiments

bench:
	$(PYTHON) bench/rollout.py
	$(PYTHON) bench/score.py
	$(PYTHON) bench/train.py
	$(PYTHON) bench/long.py
	$(PYTHON) bench/gpu.py
	$(PYTHON) bench/tail.py
	$(PYTHON) bench/demo.py

# The teacher-consistency study (about 6 minutes on 2 CPU cores): docs/consistency.png and the
# table of docs/experiments.md
experiment:
	$(PYTHON) experiments/consistency.py --out runs/consistency-$$(date +%Y%m%d-%H%M%S) --png docs/consistency.png
