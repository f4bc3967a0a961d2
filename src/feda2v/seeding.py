"""Explicit, derived random streams: no training decision reads a global RNG.

Every stream is seeded from a tuple such as ``(seed, "shuffle", round, node)``, so a resumed run
draws exactly what an uninterrupted one would, with no RNG state to carry.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (same parts -> same seed, in any process)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def torch_generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def numpy_generator(*parts: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*parts))
