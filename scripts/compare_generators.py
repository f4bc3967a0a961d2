"""The README's generator comparison, in one command (`make compare-generators`):

vae / cvae / gan x unified / per_class on the instruments defaults (conf/), seeds 0, 1 and 2:
TSTR, TRTR, TSTR/TRTR, Fréchet distance, k-NN recall and training time, mean ± std over seeds.
Each cell is the pipeline's own code in one process (feda2v-prepare's data preparation per
seed, the federation's rounds, feda2v-evaluate's metrics with its seed), so no process start-up
or tracking cost enters the training time. Writes reports/compare/generators.md and .json.
`--quick` (2 rounds, 1 seed) is the smoke test. `--types`, `--granularities` and trailing config
overrides run a subset under other settings (the README's GAN sweep:
`generator.gan.d_steps=1 --types gan --granularities unified --out /tmp/sweep`).
"""
from __future__ import annotations

# The console scripts' CPU numerics (feda2v/numerics.py), pinned before numpy or torch load, so
# each cell computes the bits `feda2v-train` would: the GAN's TSTR moves by ~0.02 with rounding
# alone (seed 1: 0.575 native, 0.595 pinned, 0.617 under the former MKL_CBWR=AVX2,STRICT pin).
from feda2v.numerics import pin_environment

pin_environment()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "compare"
TYPES = ("vae", "cvae", "gan")
GRANULARITIES = ("unified", "per_class")
METRICS = ("tstr_acc", "trtr_acc", "tstr_trtr_ratio", "frechet", "recall")


def mean_std(xs: list[float], digits: int = 3) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}"


def train_cell(conf: Path, overrides: list[str], prepared_dir: Path):
    """One cell's federation, its rounds run in this process: (cfg, data, federation, training seconds)."""
    import torch
    from omegaconf import OmegaConf

    from feda2v.config import load_config
    from feda2v.config.files import compose_conf
    from feda2v.data import load_prepared
    from feda2v.federation.server import Federation
    from feda2v.pipeline.train import seed_globals

    cfg = load_config(OmegaConf.create(compose_conf(conf, [*overrides, f"data.prepared_dir={prepared_dir}"])))
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    data = load_prepared(cfg.data.prepared_dir)
    seed_globals(cfg.seed)
    fed = Federation(cfg, data)
    t0 = time.perf_counter()
    for r in range(1, cfg.federation.rounds + 1):
        fed.run_round(r)
    return cfg, data, fed, time.perf_counter() - t0


def run_cell(conf: Path, overrides: list[str], prepared_dir: Path) -> dict:
    from feda2v.evaluate.job import compute_metrics, derive_eval_seed

    cfg, data, fed, seconds = train_cell(conf, overrides, prepared_dir)
    ev = cfg.evaluate
    metrics, _ = compute_metrics(fed.stores[fed.primary_store], data, samples_per_class=int(ev.samples_per_class),
                                 knn_k=int(ev.knn_k), seed=int(derive_eval_seed(cfg)))
    return {**{m: metrics["overall"][m] for m in METRICS}, "train_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, seed 0 only (smoke test)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--types", nargs="+", choices=TYPES, default=list(TYPES))
    ap.add_argument("--granularities", nargs="+", choices=GRANULARITIES, default=list(GRANULARITIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                    help="the seeds to run (the README's tables: 0 1 2); more seeds, to tell a change from noise")
    ap.add_argument("overrides", nargs="*", help="config overrides for every cell, e.g. generator.gan.d_steps=1")
    args = ap.parse_args(argv)
    from omegaconf import OmegaConf

    from feda2v.config import load_config
    from feda2v.config.files import compose_conf
    from feda2v.data import prepare

    conf = ROOT / "conf"
    seeds = [0] if args.quick else args.seeds
    extra = ["federation.rounds=2"] if args.quick else []
    common = ["tracking=none", "train.progress=off", *extra, *args.overrides]
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:  # the partition follows the seed, so each seed prepares its own data
        prepared = args.out / "runs" / "generators" / f"prepared-s{seed}"  # gitignored
        prepare(load_config(OmegaConf.create(compose_conf(conf, [*common, f"seed={seed}",
                                                                 f"data.prepared_dir={prepared}"]))))
        for t in args.types:
            for g in args.granularities:
                name = f"{t} {g}"
                cell = run_cell(conf, [*common, f"seed={seed}", f"generator={t}", f"generator.granularity={g}"],
                                prepared)
                print(json.dumps({"seed": seed, "generator": name, **cell}), flush=True)
                for k, v in cell.items():
                    rows.setdefault(name, {}).setdefault(k, []).append(v)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generators.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [f"| generator | TSTR | TRTR | TSTR/TRTR | Fréchet | recall | training s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {mean_std(r['tstr_acc'])} | {mean_std(r['trtr_acc'])} | "
                     f"{mean_std(r['tstr_trtr_ratio'])} | {mean_std(r['frechet'], 1)} | {mean_std(r['recall'])} | "
                     f"{mean_std(r['train_seconds'], 1)} |")
    table = "\n".join(lines) + "\n"
    (args.out / "generators.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
