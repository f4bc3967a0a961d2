# The two quick-start commands (README): `make repro` and `make test`. Both set up first.
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup repro lock plots exp test test-fast bench compare compare-generators clean

setup:
	@scripts/setup.sh

repro: setup
	dvc repro

# dvc.lock and the committed pipeline outputs, regenerated from a clean clone of HEAD (then commit
# them); CHECK=1 also proves a second run writes the same dvc.lock.
lock: setup
	scripts/relock.sh

# The DVC plots as one page that needs no network (vega scripts inlined): reports/dvc_plots/index.html
plots: setup
	python scripts/plots_offline.py

# `dvc exp show` for a 120-column terminal: only what differs between experiments, the headline
# metrics, no dependency hashes or dates (plain `dvc exp show` has a column per param and dependency)
exp: setup
	dvc exp show --no-pager --only-changed --precision 4 \
	    --drop 'Created|^data/|^checkpoints$$|^reports/|^src/|precision|recall|resets'

test: setup
	python -m pytest -q

test-fast: setup
	python -m pytest -q -m "not slow"

bench: setup
	python benchmarks/run.py

compare: setup
	python scripts/compare.py

compare-generators: setup
	python scripts/compare_generators.py

clean:
	rm -rf data/prepared data/cache checkpoints reports/train reports/profile reports/timing reports/multirun reports/dvc_plots
