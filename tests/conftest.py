import os
import sys
from pathlib import Path

import pytest

# The console scripts pin the CPU numerics before numpy or torch load (feda2v/numerics.py); the test
# process does the same, so what a test computes in-process and what the processes it starts compute
# (console scripts, Flower's Ray workers, which inherit this environment) take the same code paths.
from feda2v.numerics import pin_environment

pin_environment()

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# The models under test are small: one intra-op thread is fastest and keeps results independent of
# how many cores the runner has (training uses train.threads=1 by default for the same reason).
torch.set_num_threads(1)


@pytest.fixture
def root() -> Path:
    return ROOT


def cli(name: str) -> str:
    """Path of one of the project's console scripts in the running environment."""
    return str(BIN / name)


def pytest_collection_modifyitems(config, items):
    """``cuda`` tests (tests/test_cuda.py) are deselected where no CUDA device is usable, unless
    FEDA2V_CUDA_TEST_DEVICE=cpu asks for their CPU dry run; scripts/gpu_check.sh runs them."""
    if torch.cuda.is_available() or os.environ.get("FEDA2V_CUDA_TEST_DEVICE", "cuda") == "cpu":
        return
    gone = [it for it in items if it.get_closest_marker("cuda")]
    if gone:
        items[:] = [it for it in items if not it.get_closest_marker("cuda")]
        config.hook.pytest_deselected(items=gone)
