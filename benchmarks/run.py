"""Run every benchmark and write reports/bench.json and reports/bench.md (one command: `make bench`).

Each benchmarks/bench_<name>.py has `run(quick: bool) -> dict` returning measured numbers (medians over
repeats, ratios measured in the same run). `--quick` is the seconds-long smoke CI runs (numbers from a
quick run are not the report's). `--only NAME... --splice` re-measures some sections and replaces just
those in the existing report (JSON entry and Markdown section; the other sections and notes stay).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["generator", "store", "engine", "flower", "checkpoint", "tracking", "scale", "profiler", "prepare"]


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from feda2v import malloc

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "malloc": malloc.apply()}


def to_markdown(report: dict) -> str:
    lines = ["# feda2v benchmarks", "",
             f"Measured {report['when']} on: {json.dumps(report['machine'])}",
             f"Mode: {'quick smoke (not for claims)' if report['quick'] else 'full'}", ""]
    for name, res in report["results"].items():
        lines += section_markdown(name, res)
    return "\n".join(lines) + "\n"


def section_markdown(name: str, res: dict) -> list[str]:
    lines = [f"## {name}", ""]
    if "remeasured" in res:
        on = f" on: {json.dumps(res['remeasured_on'])}" if "remeasured_on" in res else ""
        lines += [f"Re-measured {res['remeasured']}{on} (this section only: "
                  f"`python benchmarks/run.py --only {name} --splice`).", ""]
    if "error" in res:
        return lines + [f"FAILED: {res['error']}", ""]
    if "summary" in res:
        lines += [res["summary"], ""]
    tables = {"": res.get("table")} | dict(res.get("tables") or {})  # more tables: {title: rows}
    for title, table in tables.items():
        if not table or not isinstance(table, list):
            continue
        if title:
            lines += [f"### {title}", ""]
        cols = list(table[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in table:
            lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
        lines.append("")
    return lines


def splice(out: Path, stem: str, report: dict) -> None:
    """Put the sections of ``report`` into the existing ``out/stem.{json,md}`` in place of theirs."""
    old = json.loads((out / f"{stem}.json").read_text())
    if old.get("quick") != report["quick"]:
        raise SystemExit("--splice: the existing report was measured in the other mode (--quick or not)")
    for name, res in report["results"].items():
        res["remeasured"] = report["when"]
        if report.get("machine") and report["machine"] != old.get("machine"):
            res["remeasured_on"] = report["machine"]  # the header's machine is the full run's
        old["results"][name] = res
    old["results"] = {n: old["results"][n] for n in ORDER if n in old["results"]} | {
        n: r for n, r in old["results"].items() if n not in ORDER}
    (out / f"{stem}.json").write_text(json.dumps(old, indent=2) + "\n")
    md = (out / f"{stem}.md").read_text().split("\n")
    for name, res in report["results"].items():
        new = section_markdown(name, res)
        starts = [i for i, line in enumerate(md) if line == f"## {name}"]
        if not starts:  # a section the report did not have: appended
            md = md[:-1] + new + [""] if md and md[-1] == "" else md + new
            continue
        start = starts[0]
        end = next((i for i in range(start + 1, len(md)) if md[i].startswith("## ")), len(md))
        md[start:end] = new
    (out / f"{stem}.md").write_text("\n".join(md))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    ap.add_argument("--only", nargs="*", help="benchmark names to run")
    ap.add_argument("--out", default="reports", help="output folder")
    ap.add_argument("--splice", action="store_true",
                    help="replace only the re-run sections of the existing report in --out")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    # The allocator settings the command-line apps run with (feda2v.malloc), for every peer alike:
    # process-wide, so each ratio compares the store and its contender under the same malloc.
    from feda2v import malloc

    malloc.apply()
    # Training runs on one thread (train.threads=1): every ratio here is measured on one thread too,
    # the matmul ceiling included, so "share of peak" compares like with like.
    import torch

    torch.set_num_threads(1)
    names = [n for n in ORDER if (HERE / f"bench_{n}.py").exists() and (not args.only or n in args.only)]
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": args.quick, "machine": machine(),
              "results": {}}
    failed = False
    for name in names:
        t0 = time.perf_counter()
        try:
            res = importlib.import_module(f"bench_{name}").run(quick=args.quick)
        except Exception as e:  # one broken benchmark must not hide the others' numbers
            res, failed = {"error": f"{type(e).__name__}: {e}"}, True
        res["seconds"] = round(time.perf_counter() - t0, 2)
        report["results"][name] = res
        print(f"bench {name}: {res.get('summary', res.get('error', ''))} ({res['seconds']} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_quick" if args.quick else "bench"
    if args.splice and (out / f"{stem}.json").exists():
        splice(out, stem, report)
        print(f"spliced {', '.join(names)} into {out / stem}.json and {out / stem}.md")
    else:
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"{stem}.md").write_text(to_markdown(report))
        print(f"wrote {out / stem}.json and {out / stem}.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
