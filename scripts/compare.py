"""The README's reproducible comparison, in one command (`make compare`):

digits, Dirichlet alpha=0.1 over 10 nodes, full mode, three seeds:
FedAvg alone vs FedAvg + synthetic-sample fine-tuning from a unified vs a per-class cVAE.
Runs Hydra multiruns of feda2v-train and feda2v-evaluate, then writes reports/compare/comparison.md
and comparison.json with mean +- std over seeds.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
OUT = Path("reports/compare")
SEEDS = "0,1,2"
DATA = ["data=digits", "data.nodes=10", "data.partition.scheme=dirichlet", "data.partition.alpha=0.1"]
VARIANTS = {  # name -> overrides (all in full mode)
    "FedAvg alone": ["federation.distill=false"],
    "FedAvg + synthetic (unified cVAE)": ["federation.distill=true", "generator.granularity=unified"],
    "FedAvg + synthetic (per-class cVAE)": ["federation.distill=true", "generator.granularity=per_class"],
}


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main() -> int:
    common = [*DATA, "federation=full", "tracking.experiment=feda2v-compare", "train.progress=off"]
    rows = {}
    for name, over in VARIANTS.items():
        accs, tstr = [], []
        for s in (f"seed={s}" for s in SEEDS.split(",")):  # the Dirichlet split follows the seed too
            run_dir = OUT / "runs" / name.split(" (")[-1].strip(")").replace(" ", "_") / s.replace("=", "")
            paths = [f"data.prepared_dir={run_dir}/prepared", f"checkpoint.dir={run_dir}/checkpoints",
                     f"train.reports_dir={run_dir}/train", f"train.metrics_path={run_dir}/train_metrics.json",
                     f"train.timing_path={run_dir}/timing.json", f"evaluate.checkpoint={run_dir}/checkpoints/latest.ckpt",
                     f"evaluate.reports_dir={run_dir}/eval"]
            args = [*common, *over, s, *paths]
            sh(str(BIN / "feda2v-prepare"), *args)
            sh(str(BIN / "feda2v-train"), *args)
            down = json.loads((run_dir / "train" / "downstream.json").read_text())
            accs.append(down["global_acc_distilled"])  # == global_acc_fedavg when distill=false
            if "federation.distill=true" in over:  # the generator's own quality, where it is used
                sh(str(BIN / "feda2v-evaluate"), *args)
                tstr.append(json.loads((run_dir / "eval" / "evaluation.json").read_text())["overall"]["tstr_acc"])
        rows[name] = {"global_acc": accs, "tstr_acc": tstr}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| variant | global accuracy (mean ± std, 3 seeds) | generator TSTR accuracy |", "|---|---|---|"]
    for name, r in rows.items():
        t = mean_std(r["tstr_acc"]) if r["tstr_acc"] else "n/a (no synthetic samples used)"
        lines.append(f"| {name} | {mean_std(r['global_acc'])} | {t} |")
    table = "\n".join(lines) + "\n"
    (OUT / "comparison.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
