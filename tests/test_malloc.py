"""feda2v.malloc: the entry points' glibc settings keep a step's freed heap for the next step.

Each case runs in a fresh interpreter (mallopt is process-wide and glibc reads its environment
once, at start-up)."""
import json
import os
import subprocess
import sys

import pytest

# 40 "steps", each allocating and touching three 4 MiB blocks and freeing them (as a training step
# does its activations); the minor page faults of the loop.
_PROBE = r"""
import ctypes, json, resource, sys
if sys.argv[1] == "apply":
    from feda2v import malloc
    applied = malloc.apply()
else:
    applied = None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 4 << 20
def step():
    ps = [libc.malloc(n) for _ in range(3)]
    for p in ps:
        ctypes.memset(p, 1, n)
    for p in ps:
        libc.free(p)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    step()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "applied": applied}))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")


def _probe(mode: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=clean | env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_applied_the_freed_block_is_reused_without_faulting_it_in_again():
    default, tuned = _probe("default"), _probe("apply")
    # glibc's defaults give the freed 12 MiB at the heap's top back each step: ~3000 faults a step
    assert default["faults"] >= 40 * 2000, default
    assert tuned["faults"] < 100, tuned
    assert tuned["applied"] == {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 256 << 20}


def test_a_users_own_setting_is_left_as_it_is():
    got = _probe("apply", MALLOC_TRIM_THRESHOLD_="1000")
    assert got["applied"] == {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": "1000"}
