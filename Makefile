# lightopd developer tasks. Run inside an activated virtualenv.
PYTHON ?= python
# torch is installed first and on its own so that the build can be chosen: the default pins the
# release this project is tested with; on a GPU machine pass the build you want, e.g.
# `make install TORCH=torch` for the newest default (CUDA) wheel.
TORCH ?= torch==2.13.0

.PHONY: install test lint bench

install:
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e ".[dev]"

test:
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check lightopd tests bench

bench:
	$(PYTHON) bench/rollout.py
	$(PYTHON) bench/score.py
	$(PYTHON) bench/train.py
