"""Pinned CPU numerics: the same bits on every x86-64 machine with AVX2 and FMA.

Torch (ATen kernels, MKL GEMM, oneDNN), numpy (SIMD loops) and OpenBLAS (numpy/scipy linear
algebra) each pick their code path from the CPU they run on, and an AVX-512 path rounds
differently from an AVX2 one. ``pin_environment`` caps every one of them at AVX2, which every
x86-64 CPU since 2015 has, so an AVX-512 machine computes what an AVX2-only machine computes.
The switches are environment variables: numpy and OpenBLAS read theirs when they load, so the
console scripts pin before importing anything else (``feda2v.cli``); ATen and MKL read theirs at
their first operation. ``numeric_facts`` reports the paths actually in effect; they are the same
on every machine where the pins hold, so they may sit in a checkpoint without breaking
cross-machine byte identity. ``FEDA2V_NATIVE_NUMERICS=1`` keeps each library's own choice
(faster on AVX-512, but then results are only reproducible on the same kind of CPU).
"""
from __future__ import annotations

import os
import sys

OPT_OUT = "FEDA2V_NATIVE_NUMERICS"

# numpy's dispatch targets above AVX2 (numpy accepts names this CPU lacks).
_NUMPY_ABOVE_AVX2 = ("AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX AVX512_CLX AVX512_CNL "
                     "AVX512_ICL AVX512_SPR")

PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised kernels (elementwise ops, reductions)
    # MKL's GEMM branch. COMPATIBLE, not AVX2[,STRICT]: with the AVX2 branch MKL's results still
    # depend on the thread count (train.threads is operational and must not change the bits).
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (torch's mkldnn kernels)
    "OPENBLAS_CORETYPE": "Haswell",  # numpy/scipy's OpenBLAS kernels: the AVX2 + FMA family
    # one OpenBLAS thread: its splits follow the core count, which differs between machines
    "OPENBLAS_NUM_THREADS": "1",
    "NPY_DISABLE_CPU_FEATURES": _NUMPY_ABOVE_AVX2,
}


def pinned() -> bool:
    return os.environ.get(OPT_OUT, "") not in ("1", "true", "yes")


def pin_environment() -> list[str]:
    """Set ``PINNED_ENV`` (over any value already set) unless opted out; returns the names of
    libraries already loaded, which a pin can no longer reach (numpy, OpenBLAS: read at import)."""
    if not pinned():
        return []
    os.environ.update(PINNED_ENV)
    return [m for m in ("numpy",) if m in sys.modules]


def _torch_build(pattern: str) -> str:
    """A version from torch's build summary ("MKL ... Version 2024.2-Product ...", "MKL-DNN v3.12.0")."""
    import re

    import torch

    m = re.search(pattern, torch.__config__.show())
    return m.group(1) if m else "absent"


def numeric_facts() -> dict:
    """The CPU code paths in effect for torch, numpy and OpenBLAS, with their versions."""
    import numpy as np
    import torch

    facts = {
        "pinned": all(os.environ.get(k) == v for k, v in PINNED_ENV.items()),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "mkl": _torch_build(r"Math Kernel Library Version (\S+)"),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "native"),
        "onednn": _torch_build(r"MKL-DNN v(\S+)"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
    }
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

        facts["numpy_simd"] = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    except ImportError:  # numpy moved its private module: report that instead of guessing
        facts["numpy_simd"] = "unknown"
    try:
        from threadpoolctl import threadpool_info

        # numpy's own BLAS only: which other copies are loaded (scipy's) depends on imports
        facts["blas"] = sorted({f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
                               for i in threadpool_info() if i.get("user_api") == "blas"
                               and "numpy" in str(i.get("filepath"))})
    except ImportError:
        facts["blas"] = "unknown"
    facts["numpy"] = np.__version__
    return facts


def host_cpu() -> dict:
    """This machine's CPU (model and SIMD flags): provenance, different on every kind of host."""
    model, flags = "unknown", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = sorted(x for x in value.split()
                                   if x.startswith(("avx", "fma", "sse4", "amx")))
    except OSError:
        pass
    import platform

    return {"machine": platform.machine(), "model": model, "simd": flags}
