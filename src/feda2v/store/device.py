"""``train.device``: which torch device the store, the federation, evaluation and sampling run on.

``cpu`` is the default: the same config then gives the same bytes on every machine (DVC-tracked
outputs must not depend on where they ran; a CUDA run differs from a CPU run in the last bits).
``auto`` takes the first CUDA device when there is one. Everything random is drawn from seeded CPU
generators (parameter init, noise, shuffles), so a CUDA run consumes the same random numbers as a
CPU run and its results never depend on the CUDA generator's state.
"""
from __future__ import annotations

import os
import re

import torch

from feda2v.errors import ConfigError

# cuBLAS needs a fixed workspace for deterministic GEMMs (NVIDIA's documented setting); it must
# be in the environment before the first cuBLAS handle is created, i.e. before the first matmul.
CUBLAS_WORKSPACE = ":4096:8"


def resolve_device(name: str) -> torch.device:
    """``auto | cpu | cuda | cuda:N`` -> a usable torch.device, or one ConfigError line."""
    name = str(name)
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise ConfigError(f"train.device: {name!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: this machine has no usable CUDA device "
                          f"(torch {torch.__version__}, torch.cuda.is_available() is false); "
                          "use train.device=cpu or auto")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={name}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def configure_determinism(device: torch.device) -> None:
    """Bit-for-bit repeatable CUDA runs (and so exact resume): deterministic kernels, no TF32, no
    autotuning, cuBLAS's fixed workspace. Nothing to do on the CPU."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
