"""Global RNG states (torch, numpy, python ``random``) as tensors + JSON, so no pickle is needed.

Training draws from derived generators (feda2v.seeding), but library code may still touch the
global streams; saving them keeps a resumed run bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch

from feda2v.errors import CheckpointError

# Names inside the RNG part; a federation checkpoint stores them under "rng/" (rng/torch, ...).
TORCH = "torch"
NUMPY = "numpy/state"
PYTHON = "python/state"
PREFIX = "rng/"


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(tensors, json_parts)`` describing the current global RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    tensors = {
        TORCH: torch.get_rng_state().clone(),
        # uint32 words stored as int64 (exact) because torch's uint32 support is partial.
        NUMPY: torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        PYTHON: torch.tensor(list(internal), dtype=torch.int64),
    }
    parts = {
        "numpy": {"kind": str(kind), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "gauss_next": None if gauss_next is None else float(gauss_next)},
    }
    return tensors, parts


def restore_rng(tensors: Mapping[str, torch.Tensor], json_parts: Mapping[str, Any]) -> None:
    """Set the global RNG states; CheckpointError (nothing changed) if the parts are malformed."""
    try:
        t_state = tensors[TORCH]
        n_keys = tensors[NUMPY]
        p_state = tensors[PYTHON]
        n = json_parts["numpy"]
        p = json_parts["python"]
        if t_state.dtype != torch.uint8 or t_state.dim() != 1:
            raise ValueError(f"{TORCH} must be a 1-D uint8 tensor")
        if n_keys.dtype != torch.int64 or tuple(n_keys.shape) != (624,):
            raise ValueError(f"{NUMPY} must be int64 [624]")
        if p_state.dtype != torch.int64 or tuple(p_state.shape) != (625,):
            raise ValueError(f"{PYTHON} must be int64 [625]")
        keys = n_keys.numpy()
        if keys.min() < 0 or keys.max() >= 2**32:
            raise ValueError(f"{NUMPY} words must be uint32")
        np_state = (str(n["kind"]), keys.astype(np.uint32), int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
        gauss = p["gauss_next"]
        py_state = (int(p["version"]), tuple(int(x) for x in p_state.tolist()), None if gauss is None else float(gauss))
    except (KeyError, TypeError, ValueError) as e:
        what = e.args[0] if isinstance(e, KeyError) else e
        raise CheckpointError(f"checkpoint RNG state is malformed ({what}); the file is not a complete federation checkpoint") from None
    # Validate everything on scratch objects first so a bad part leaves the globals untouched.
    try:
        scratch_np = np.random.RandomState()
        scratch_np.set_state(np_state)
        random.Random().setstate(py_state)
        torch.Generator().set_state(t_state.clone())
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint RNG state is invalid ({e})") from None
    torch.set_rng_state(t_state.clone())
    np.random.set_state(np_state)
    random.setstate(py_state)
