"""Compare two pipeline runs' metrics within the README's stated tolerance, for where the bits cannot
be held (another CPU family than x86-64 with AVX2, FEDA2V_NATIVE_NUMERICS=1, other library builds).

    python scripts/compare_outputs.py RUN_A RUN_B [--rtol 1e-4] [--atol 1e-9] [--acc-samples 1]

RUN_A and RUN_B are project roots (or copies of their reports/ folders' parents). Every number in
reports/train_metrics.json and reports/evaluation.json (metrics.json is a subset) must agree within
``rtol`` (relative) or ``atol`` (absolute); accuracies (``*acc*``) may differ by ``acc-samples``
held-out samples of the class (per-class) or of the whole test set (overall). Exit 0 when all
agree, 1 otherwise (each difference on its own line), 2 on unusable input.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

FILES = ("reports/train_metrics.json", "reports/evaluation.json")


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def _load(root: Path) -> dict:
    values = {}
    for name in FILES:
        p = root / name
        if p.is_file():
            try:
                values.update({f"{name}:{k}": v for k, v in _flat(json.loads(p.read_text())).items()})
            except ValueError as e:
                raise SystemExit(f"compare_outputs: error: {p} is not JSON ({e})") from None
    if not values:
        print(f"compare_outputs: error: {root} has none of {', '.join(FILES)}", file=sys.stderr)
        raise SystemExit(2)
    return values


def differences(a: dict, b: dict, *, rtol: float, atol: float, acc_samples: int,
                n_test: float, n_real: dict) -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            out.append(f"{key}: only in {'A' if key in a else 'B'}")
            continue
        x, y = a[key], b[key]
        if "acc" in key.rsplit("/", 1)[-1]:
            cls = key.split("per_class/")[-1].split("/")[0] if "per_class/" in key else None
            n = n_real.get(cls) if cls else n_test
            tol = acc_samples / n if n else 0.0
            if abs(x - y) > tol + 1e-12:
                out.append(f"{key}: {x!r} vs {y!r} (more than {acc_samples} sample(s) of {n:g})")
        elif not math.isclose(x, y, rel_tol=rtol, abs_tol=atol):
            out.append(f"{key}: {x!r} vs {y!r} (relative {abs(x - y) / max(abs(x), abs(y)):.1e} > {rtol:g})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--atol", type=float, default=1e-9)
    ap.add_argument("--acc-samples", type=int, default=1)
    args = ap.parse_args(argv)
    a, b = _load(args.a), _load(args.b)
    # sample counts behind the accuracies: per class n_real (held-out samples), overall their sum
    n_real = {k.split("per_class/")[1].split("/")[0]: v for k, v in a.items() if k.endswith("/n_real")}
    diffs = differences(a, b, rtol=args.rtol, atol=args.atol, acc_samples=args.acc_samples,
                        n_test=sum(n_real.values()), n_real=n_real)
    for d in diffs:
        print(d)
    print(f"compare_outputs: {len(a)} numbers, {len(diffs)} outside rtol={args.rtol:g} "
          f"(accuracies: {args.acc_samples} sample(s))")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
