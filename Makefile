# The two quick-start commands (README): `make repro` and `make test`. Both set up first.
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup repro test test-fast bench compare clean

setup:
	@scripts/setup.sh

repro: setup
	dvc repro

test: setup
	python -m pytest -q

test-fast: setup
	python -m pytest -q -m "not slow"

bench: setup
	python benchmarks/run.py

compare: setup
	python scripts/compare.py

clean:
	rm -rf data/prepared data/cache checkpoints reports/train reports/profile reports/multirun
