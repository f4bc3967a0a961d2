"""What a generator must get right for TSTR/TRTR >= 0.9 on the instruments defaults, and what the cVAE gets.

Part 1, the ceiling (no training): class-conditional Gaussian "generators" fitted on the real
train split (the union of the nodes' train splits, what TRTR trains on), each sampled
``evaluate.samples_per_class`` times per class and scored with the evaluator's own
``metrics.tstr_trtr`` (standardise + logistic regression, tested on the held-out real split).
Part 2, the diagnosis: the default cVAE (unified), trained as `scripts/compare_generators.py`
trains it, with and without its learned conditional prior: the pipeline's TSTR/TRTR, its active
latent dimensions, the within-class covariance spectrum of its samples against the real one, and
TSTR/TRTR with its class means or its covariances swapped for the real ones (each Gaussian).
Part 3, its latents: the same trained decoder fed latents drawn per class from its prior, from
Gaussians or Gaussian mixtures fitted afterwards to the encoder's posterior samples of the train
split (ex-post density estimation), and from those posteriors themselves (the memorising
reference), each the mean over ``LATENT_DRAWS`` sample draws (a single draw's TSTR moves ~0.01).
Writes reports/compare/cvae_ceiling.{md,json}. `--seeds 0` and `--no-train` make it shorter.
"""
from __future__ import annotations

# The console scripts' CPU numerics, pinned before numpy or torch load (as compare_generators.py).
from feda2v.numerics import pin_environment

pin_environment()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "compare"
PPCA_RANKS = (4, 8, 16)
LATENT_DRAWS = 5
MIXTURE_COMPONENTS = (1, 2, 3, 4)
POSTERIOR_SAMPLES = 10  # posterior draws per training sample that an ex-post density is fitted to


def _cov(x: np.ndarray) -> np.ndarray:
    return np.cov(x, rowvar=False)


def _top_k_plus_diag(cov: np.ndarray, k: int) -> np.ndarray:
    """Probabilistic-PCA-like covariance: the top ``k`` eigen-directions exactly, the rest's
    variance on the diagonal only."""
    w, v = np.linalg.eigh(cov)
    top = (v[:, -k:] * w[-k:]) @ v[:, -k:].T
    return top + np.diag(np.clip(np.diag(cov - top), 1e-6, None))


def _tstr_trtr(x: np.ndarray, y: np.ndarray, real: tuple, seed: int) -> float:
    """TSTR/TRTR of the synthetic set (x, y) by the evaluator's own ``metrics.tstr_trtr``, against
    ``real`` = (train x, train y, test x, test y)."""
    from feda2v.evaluate import metrics as M

    tstr, trtr = M.tstr_trtr(x, y, *real, seed=seed)
    return tstr.balanced / trtr.balanced


def gaussian_ceiling(tr_x, tr_y, te_x, te_y, n: int, seed: int) -> dict[str, float]:
    """TSTR/TRTR of Gaussian generators fitted on the real train split (name -> ratio)."""
    from sklearn.covariance import LedoitWolf

    from feda2v.seeding import numpy_generator

    classes = np.unique(tr_y)
    per = {c: tr_x[tr_y == c] for c in classes}
    means = {c: per[c].mean(0) for c in classes}
    pooled = _cov(np.concatenate([per[c] - means[c] for c in classes]))
    pooled_lw = LedoitWolf().fit(np.concatenate([per[c] - means[c] for c in classes])).covariance_
    covs = {c: _cov(per[c]) for c in classes}
    d = tr_x.shape[1]
    ys = np.repeat(classes, n)
    generators = {
        "class mean only (spread 1e-3)": lambda c: 1e-6 * np.eye(d),
        "per-class diagonal": lambda c: np.diag(np.diag(covs[c])),
        "pooled within-class full": lambda c: pooled,
        "pooled within-class, Ledoit-Wolf": lambda c: pooled_lw,
        **{f"per-class top-{k} + diagonal": (lambda k: lambda c: _top_k_plus_diag(covs[c], k))(k)
           for k in PPCA_RANKS},
        "per-class full, Ledoit-Wolf": lambda c: LedoitWolf().fit(per[c]).covariance_,
    }
    out = {}
    for name, cov_of in generators.items():
        sx = np.concatenate([numpy_generator(seed, "ceiling", name, int(c)).multivariate_normal(means[c], cov_of(c), n)
                             for c in classes])
        out[name] = _tstr_trtr(sx, ys, (tr_x, tr_y, te_x, te_y), seed)
    boot = np.concatenate([numpy_generator(seed, "ceiling", "bootstrap", int(c)).choice(np.flatnonzero(tr_y == c), n)
                           for c in classes])
    out["real train split, resampled"] = _tstr_trtr(tr_x[boot], tr_y[boot], (tr_x, tr_y, te_x, te_y), seed)
    return out


def diagnose_cvae(conf: Path, prepared: Path, seed: int, overrides: list[str]) -> dict:
    """Train one cVAE as compare_generators.py does; its pipeline metric and sample diagnostics."""
    import torch
    from compare_generators import train_cell  # scripts/, beside this one

    from feda2v.evaluate.job import _real_sets, compute_metrics, derive_eval_seed, sample_synthetic
    from feda2v.seeding import numpy_generator

    cfg, data, fed, _ = train_cell(conf, ["tracking=none", "train.progress=off", f"seed={seed}", "generator=cvae",
                                          *overrides], prepared)
    store = fed.stores[fed.primary_store]
    n, eval_seed = int(cfg.evaluate.samples_per_class), int(derive_eval_seed(cfg))
    metrics, _ = compute_metrics(store, data, samples_per_class=n, knn_k=int(cfg.evaluate.knn_k), seed=eval_seed)
    tr_x, tr_y, te_x, te_y = (t.numpy() for t in _real_sets(data))
    tr_x, te_x = tr_x.astype(np.float64), te_x.astype(np.float64)
    sx, sy = sample_synthetic(store, len(data.classes), n, eval_seed)  # the evaluator's own samples
    sx, sy = sx.numpy().astype(np.float64), sy.numpy()
    module = store.module(store.key_for_class(data.classes[0]), "generator")
    with torch.no_grad():
        mu, _ = module.encode(torch.as_tensor(tr_x, dtype=torch.float32), data.conditions[torch.as_tensor(tr_y)].float())
    classes = np.unique(tr_y)
    real_cov = {c: _cov(tr_x[tr_y == c]) for c in classes}
    fake_cov = {c: _cov(sx[sy == c]) for c in classes}
    real_mean = {c: tr_x[tr_y == c].mean(0) for c in classes}
    fake_mean = {c: sx[sy == c].mean(0) for c in classes}
    eig = {c: (np.linalg.eigvalsh(fake_cov[c])[::-1], np.linalg.eigvalsh(real_cov[c])[::-1]) for c in classes}

    def swapped(mean_of, cov_of, name):
        x = np.concatenate([numpy_generator(seed, "ceiling/swap", name, int(c)).multivariate_normal(mean_of[c], cov_of[c], n)
                            for c in classes])
        return _tstr_trtr(x, np.repeat(classes, n), (tr_x, tr_y, te_x, te_y), eval_seed)

    latents = latent_densities(store, data, (tr_x, tr_y, te_x, te_y), n, seed, eval_seed)
    return {
        "tstr_trtr_ratio": metrics["overall"]["tstr_trtr_ratio"],
        "active_latent_dims": int((mu.var(0) > 0.01).sum()),
        "latent_dims": int(mu.shape[1]),
        # within-class variance of samples / real, per class, averaged: eigenvalues 1-3 and 4-16
        "spectrum_ratio_top3": float(np.mean([eig[c][0][:3].sum() / eig[c][1][:3].sum() for c in classes])),
        "spectrum_ratio_4_16": float(np.mean([eig[c][0][3:16].sum() / eig[c][1][3:16].sum() for c in classes])),
        "gaussian_sample_mean_and_cov": swapped(fake_mean, fake_cov, "samples"),
        "gaussian_real_mean_sample_cov": swapped(real_mean, fake_cov, "real mean"),
        "gaussian_sample_mean_real_cov": swapped(fake_mean, real_cov, "real cov"),
        **{f"latents: {name}": v for name, v in latents.items()},
    }


def _sampling_module(store, key: str):
    """The key's generator with the weights sampling reads (its moving average, where it keeps one)."""
    import copy

    import torch

    module = copy.deepcopy(store.module(key, "generator"))
    tensors = store.parameter_tensors()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(tensors.get(f"{key}/generator/ema/{name}", p))
    return module


def latent_densities(store, data, real: tuple, n: int, seed: int, eval_seed: int) -> dict[str, float]:
    """TSTR/TRTR of the trained decoder fed latents from each per-class density (name -> mean over
    ``LATENT_DRAWS`` draws): what a better prior could still give the same decoder. ``real``: the
    real (train x, train y, test x, test y), features as float64."""
    import torch
    from sklearn.mixture import GaussianMixture

    from feda2v.evaluate.job import sample_synthetic
    from feda2v.seeding import numpy_generator

    tr_x, tr_y = real[0], real[1]
    classes = np.unique(tr_y)
    module = _sampling_module(store, store.key_for_class(data.classes[0]))
    cond = data.conditions.float()
    with torch.no_grad():
        mu, logvar = module.encode(torch.as_tensor(tr_x, dtype=torch.float32), cond[torch.as_tensor(tr_y)])
    mu, sd = mu.numpy().astype(np.float64), np.exp(0.5 * logvar.numpy()).astype(np.float64)

    def decoded(latents_of) -> float:  # latents_of(class, draw) -> [n, latent_dim]
        vals = []
        for d in range(LATENT_DRAWS):
            xs = []
            for c in classes:
                z = torch.as_tensor(latents_of(int(c), d), dtype=torch.float32)
                with torch.no_grad():
                    xs.append(module.decode(z, cond[int(c)].expand(len(z), -1)).numpy().astype(np.float64))
            vals.append(_tstr_trtr(np.concatenate(xs), np.repeat(classes, n), real, eval_seed))
        return float(np.mean(vals))

    def posterior_samples(c: int) -> np.ndarray:
        m, s = mu[tr_y == c], sd[tr_y == c]
        g = numpy_generator(seed, "ceiling/latents/fit", c)
        return np.concatenate([m + s * g.standard_normal(m.shape) for _ in range(POSTERIOR_SAMPLES)])

    out = {}
    # the evaluator's own samples, re-drawn: the pipeline's number without a single draw's noise
    draws = [sample_synthetic(store, len(data.classes), n, eval_seed + 1000 * d) for d in range(LATENT_DRAWS)]
    out["the model's own samples"] = float(np.mean([_tstr_trtr(x.numpy().astype(np.float64), y.numpy(), real, eval_seed)
                                                    for x, y in draws]))
    for k in MIXTURE_COMPONENTS:
        fits = {int(c): GaussianMixture(k, covariance_type="full", reg_covar=1e-4,
                                        random_state=_sklearn_seed(seed, k, c)).fit(posterior_samples(int(c)))
                for c in classes}

        def mixture(c, d, fits=fits, k=k):
            fits[c].random_state = _sklearn_seed(seed, k, c, d)
            return fits[c].sample(n)[0]
        out[f"ex-post {k}-Gaussian mixture" if k > 1 else "ex-post Gaussian"] = decoded(mixture)

    def posteriors(c, d):  # each draw picks training samples of the class and one code from q(z | x) of each
        g = numpy_generator(seed, "ceiling/latents/posterior", c, d)
        m, s = mu[tr_y == c], sd[tr_y == c]
        i = g.integers(0, len(m), n)
        return m[i] + s[i] * g.standard_normal((n, m.shape[1]))
    out["the train split's posteriors q(z | x)"] = decoded(posteriors)
    return out


def _sklearn_seed(*parts) -> int:
    """A 32-bit seed for sklearn, from the project's seed derivation."""
    from feda2v.seeding import derive_seed

    return derive_seed("ceiling/latents", *parts) % 2**32


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def render(seeds: list[int], ceiling: dict, cvae: dict) -> str:
    """The report's markdown tables (what main writes to cvae_ceiling.md)."""
    lines = [f"Seeds {', '.join(map(str, seeds))}; TSTR/TRTR, mean ± std.", "",
             "| Gaussian generator fitted on the real train split | TSTR/TRTR |", "|---|---|"]
    lines += [f"| {name} | {_mean_std(v)} |" for name, v in ceiling.items()]
    if cvae:
        cols = ["tstr_trtr_ratio", "active_latent_dims", "spectrum_ratio_top3", "spectrum_ratio_4_16",
                "gaussian_sample_mean_and_cov", "gaussian_real_mean_sample_cov", "gaussian_sample_mean_real_cov"]
        lines += ["", "| generator | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {name} | " + " | ".join(_mean_std(d[c]) for c in cols) + " |" for name, d in cvae.items()]
        rows = [c for c in next(iter(cvae.values())) if c.startswith("latents: ")]
        lines += ["", f"The trained decoder fed latents per class from (TSTR/TRTR, each the mean of {LATENT_DRAWS} "
                  "sample draws):", "", "| latents | " + " | ".join(cvae) + " |", "|---|" + "---|" * len(cvae)]
        lines += [f"| {_cell(r.removeprefix('latents: '))} | "
                  + " | ".join(_mean_std(d[r]) for d in cvae.values()) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a markdown table cell


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-train", action="store_true", help="part 1 only (the Gaussian ceiling)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    from omegaconf import OmegaConf

    from feda2v.config import load_config
    from feda2v.config.files import compose_conf
    from feda2v.data import load_prepared, prepare
    from feda2v.evaluate.job import _real_sets

    conf = ROOT / "conf"
    ceiling: dict[str, list[float]] = {}
    cvae: dict[str, dict[str, list[float]]] = {}
    variants = {"cvae unified (default: conditional prior)": [],
                "cvae unified, N(0, I) prior": ["generator.conditional_prior=false"]}
    for seed in args.seeds:
        prepared = args.out / "runs" / "generators" / f"prepared-s{seed}"  # gitignored; compare_generators' too
        common = ["tracking=none", "train.progress=off", f"seed={seed}", f"data.prepared_dir={prepared}"]
        cfg = load_config(OmegaConf.create(compose_conf(conf, common)))
        if not (prepared / "manifest.json").is_file():
            prepare(cfg)
        tr_x, tr_y, te_x, te_y = (t.numpy() for t in _real_sets(load_prepared(prepared)))
        n = int(cfg.evaluate.samples_per_class)
        for name, v in gaussian_ceiling(tr_x.astype(np.float64), tr_y, te_x.astype(np.float64), te_y, n, seed).items():
            ceiling.setdefault(name, []).append(v)
            print(json.dumps({"seed": seed, "ceiling": name, "tstr_trtr_ratio": v}), flush=True)
        if not args.no_train:
            for name, overrides in variants.items():
                d = diagnose_cvae(conf, prepared, seed, overrides)
                print(json.dumps({"seed": seed, "generator": name, **d}), flush=True)
                for k, v in d.items():
                    cvae.setdefault(name, {}).setdefault(k, []).append(v)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cvae_ceiling.json").write_text(json.dumps({"seeds": args.seeds, "ceiling": ceiling, "cvae": cvae},
                                                           indent=2) + "\n")
    table = render(args.seeds, ceiling, cvae)
    (args.out / "cvae_ceiling.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
