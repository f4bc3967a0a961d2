"""``report.md``: the evaluation's figures and tables, readable on GitHub or in any Markdown viewer."""
from __future__ import annotations

import os
from pathlib import Path

OVERALL_ROWS = [
    ("tstr_acc", "TSTR accuracy (train synthetic, test real)"),
    ("trtr_acc", "TRTR accuracy (train real, test real)"),
    ("tstr_balanced_acc", "TSTR balanced accuracy (mean class recall)"),
    ("trtr_balanced_acc", "TRTR balanced accuracy"),
    ("tstr_trtr_ratio", "TSTR / TRTR (balanced)"),
    ("frechet", "Fréchet distance (lower is better)"),
    ("mmd", "MMD² RBF, unbiased (lower is better)"),
    ("precision", "k-NN precision (fidelity)"),
    ("recall", "k-NN recall (diversity)"),
    ("recon_mse", "VAE reconstruction MSE per feature"),
]
PER_CLASS_COLS = ["n_real", "tstr_acc", "trtr_acc", "frechet", "mmd", "precision", "recall", "recon_mse"]
FIGURES = [
    ("fig_loss_curves", "Training losses per round"),
    ("fig_tstr_vs_trtr", "Per-class TSTR vs TRTR"),
    ("fig_embedding_2d", "Real vs synthetic embeddings (PCA)"),
    ("fig_per_node_accuracy", "Per-node accuracy (downstream)"),
]


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cell(s: str) -> str:
    return s.replace("|", "\\|")


def render(metrics: dict, info: dict, outputs: dict, out_dir: Path, notes: list[str]) -> str:
    ov = metrics["overall"]
    lines = [
        "# feda2v evaluation",
        "",
        f"Checkpoint `{info['checkpoint']}` (store `{info['store']}`, generator {info['generator']}, "
        f"round {info['round']}, "
        f"keys: {', '.join(f'`{k}`' for k in info['keys'][:8])}{' …' if len(info['keys']) > 8 else ''}); "
        f"data manifest `{info['data_manifest_hash'][:12]}`; {info['samples_per_class']} synthetic samples "
        f"per class, k = {info['knn_k']} for precision/recall, evaluate.seed {info['seed']}.",
        "",
        "Real side: the union of the nodes' held-out test splits (TRTR trains on the union of their train "
        "splits). Fréchet, MMD and precision/recall compare class-balanced sets.",
        "",
        "## Overall",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {label} | {_fmt(ov[k])} |" for k, label in OVERALL_ROWS if k in ov]
    cols = [c for c in PER_CLASS_COLS if any(c in d for d in metrics["per_class"].values())]
    lines += ["", "## Per class", "", "| class | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, d in metrics["per_class"].items():
        lines.append(f"| {_cell(name)} | " + " | ".join(_fmt(d.get(c)) for c in cols) + " |")
    lines += ["", "Per-class Fréchet, MMD and precision/recall rest on `n_real` held-out samples: with few "
              "samples in many dimensions covariances are rank-deficient (Fréchet is biased upward) and "
              "k-NN balls are wide (precision drifts toward 1), so compare them between runs rather than "
              "read them as absolute; TSTR and the overall numbers are steadier."]
    ds = metrics.get("downstream")
    if ds:
        lines += ["", "## Downstream value (full mode)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in ds.items() if not isinstance(v, dict)]
        per_node = ds.get("per_node") or {}
        if per_node:
            from feda2v.evaluate.plots import _node_series

            series = _node_series(per_node)
            lines += ["", "| node | " + " | ".join(series) + " |", "|---" * (len(series) + 1) + "|"]
            for n, v in per_node.items():
                vals = [v.get(s) for s in series] if isinstance(v, dict) else [v]
                lines.append(f"| {_cell(n)} | " + " | ".join(_fmt(x) for x in vals) + " |")
    figs = [(k, t) for k, t in FIGURES if k in outputs]
    if figs:
        lines += ["", "## Figures", ""]
        for k, title in figs:
            rel = Path(os.path.relpath(outputs[k], out_dir)).as_posix()
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"
