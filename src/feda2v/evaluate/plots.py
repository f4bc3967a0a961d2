"""Plot data (CSV, for dvc.yaml ``plots:``) and PNG figures (matplotlib, Agg) of an evaluation.

Each file is written through ``fsutil.atomic_write_bytes``, so an interrupted run never leaves half a
file in place of a good one.
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from feda2v.errors import DataError
from feda2v.fsutil import atomic_write_bytes

LOSS_COLUMNS = ("round", "node", "key", "metric", "value")


# ------------------------------------------------------------------------------------ helpers


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in r])
    return atomic_write_bytes(path, buf.getvalue().encode())


def project_2d(extras: dict) -> tuple[np.ndarray, np.ndarray]:
    """PCA (fit on real + synthetic pooled) coordinates of the real and the synthetic sets."""
    if "pca" not in extras:
        from sklearn.decomposition import PCA

        rx, sx = extras["real_x"], extras["synth_x"]
        pooled = np.concatenate([rx, sx])
        n_comp = min(2, pooled.shape[1], len(pooled))
        z = PCA(n_components=n_comp, svd_solver="full").fit_transform(pooled)
        if z.shape[1] < 2:  # 1-D features: plot against zero
            z = np.concatenate([z, np.zeros((len(z), 2 - z.shape[1]))], axis=1)
        extras["pca"] = (z[: len(rx)], z[len(rx):])
    return extras["pca"]


def read_losses(path: Path) -> dict[str, dict[str, dict[int, float]]]:
    """losses.csv (round,node,key,metric,value) -> {metric: {key: {round: mean over nodes}}}."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in LOSS_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path} lacks columns {missing} (expected {','.join(LOSS_COLUMNS)}); re-run feda2v-train")
    sums: dict = defaultdict(float)
    counts: dict = defaultdict(int)
    for i, row in enumerate(reader, start=2):
        try:
            rnd, val = int(row["round"]), float(row["value"])
        except (TypeError, ValueError):
            raise DataError(f"{path}:{i}: round/value are not numbers; re-run feda2v-train") from None
        if not math.isfinite(val):
            continue
        sums[(row["metric"], row["key"], rnd)] += val
        counts[(row["metric"], row["key"], rnd)] += 1
    out: dict = defaultdict(lambda: defaultdict(dict))
    for (m, k, r), s in sums.items():
        out[m][k][r] = s / counts[(m, k, r)]
    return {m: {k: dict(sorted(v.items())) for k, v in ks.items()} for m, ks in out.items()}


def _key_order(found, store_keys) -> list[str]:
    """The store's key order (class order), then any key the store no longer has."""
    found = set(found)
    known = [k for k in store_keys if k in found]
    return known + sorted(found - set(known))


def _main_loss(losses: dict) -> str | None:
    for m in ("loss", "g_loss"):
        if m in losses:
            return m
    return next(iter(losses), None)


# ------------------------------------------------------------------------------------ CSVs


def write_plot_csvs(out: Path, metrics: dict, extras: dict, losses: dict | None) -> dict[str, Path]:
    """CSV files for dvc.yaml ``plots:``; ``losses`` is ``read_losses``' result or None."""
    classes = extras["classes"]
    pc = metrics["per_class"]
    files = {
        "tstr_per_class": _write_csv(
            out / "tstr_per_class.csv",
            ["class", "tstr", "trtr"],
            [[c, pc[c].get("tstr_acc"), pc[c].get("trtr_acc")] for c in classes],
        ),
    }
    cols = ["frechet", "mmd", "precision", "recall"] + (
        ["recon_mse"] if any("recon_mse" in pc[c] for c in classes) else []
    )
    files["quality_per_class"] = _write_csv(
        out / "quality_per_class.csv", ["class", *cols], [[c, *(pc[c].get(k) for k in cols)] for c in classes]
    )
    zr, zs = project_2d(extras)
    rows = [[classes[int(y)], "real", float(a), float(b)] for y, (a, b) in zip(extras["real_y"], zr)]
    rows += [[classes[int(y)], "synthetic", float(a), float(b)] for y, (a, b) in zip(extras["synth_y"], zs)]
    files["embedding_2d"] = _write_csv(out / "embedding_2d.csv", ["class", "source", "pc1", "pc2"], rows)
    # one file per source as well: DVC colours plot series by file, not by a column's value
    for source in ("real", "synthetic"):
        files[f"embedding_2d_{source}"] = _write_csv(
            out / f"embedding_2d_{source}.csv", ["class", "pc1", "pc2"], [r[:1] + r[2:] for r in rows if r[1] == source]
        )
    if losses:
        main = _main_loss(losses)
        if main is not None:
            keys = _key_order(losses[main], extras.get("keys", []))
            rounds = sorted({r for k in keys for r in losses[main][k]})
            # "mean" (over keys) is a column whatever the granularity, so one dvc.yaml plot definition
            # compares unified and per-class experiments; the per-key columns follow.
            table = []
            for r in rounds:
                vals = [losses[main][k].get(r) for k in keys]
                present = [v for v in vals if v is not None]
                table.append([r, sum(present) / len(present) if present else None, *vals])
            files["loss_per_round"] = _write_csv(out / "loss_per_round.csv", ["round", "mean", *keys], table)
    per_node = (metrics.get("downstream") or {}).get("per_node")
    if per_node:
        series = _node_series(per_node)
        files["per_node_accuracy"] = _write_csv(
            out / "per_node_accuracy.csv",
            ["node", *series],
            [[n, *(v.get(s) if isinstance(v, dict) else None for s in series)] for n, v in per_node.items()],
        )
    return files


# ------------------------------------------------------------------------------------ figures


def _savefig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def fig_loss_curves(losses: dict, path: Path, store_keys=()) -> Path:
    import matplotlib.pyplot as plt

    metrics = sorted(losses, key=lambda m: (m not in ("loss", "g_loss"), m))
    keys = _key_order({k for m in metrics for k in losses[m]}, store_keys)
    colors = dict(zip(keys, _colors(len(keys))))
    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        for k in keys:
            if k in losses[m]:
                r = list(losses[m][k])
                ax.plot(r, [losses[m][k][i] for i in r], marker="o", ms=3, color=colors[k], label=k)
        ax.set_title(m)
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               title="generator key")
    fig.suptitle("Generator training losses per round (mean over nodes)")
    fig.tight_layout()
    return _savefig(fig, path)


def fig_tstr_vs_trtr(metrics: dict, classes: list[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    pc = metrics["per_class"]
    tstr = [pc[c].get("tstr_acc", np.nan) for c in classes]
    trtr = [pc[c].get("trtr_acc", np.nan) for c in classes]
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(classes) + 2), 4.2))
    ax.bar(x - 0.2, trtr, 0.4, label=f"train real (TRTR), overall {metrics['overall']['trtr_acc']:.3f}",
           color="#4C72B0")
    ax.bar(x + 0.2, tstr, 0.4, label=f"train synthetic (TSTR), overall {metrics['overall']['tstr_acc']:.3f}",
           color="#DD8452")
    ax.set_xticks(x, classes, rotation=45 if len(classes) > 6 else 0, ha="right" if len(classes) > 6 else "center",
                  fontsize=8)
    ax.set_ylim(0, 1.22)  # headroom for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("held-out real accuracy (class recall)")
    ax.set_title("Per-class accuracy: classifier trained on synthetic vs real, tested on real")
    ax.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _savefig(fig, path)


def fig_embedding_2d(extras: dict, metrics: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    classes = extras["classes"]
    zr, zs = project_2d(extras)
    ry, sy = extras["real_y"], extras["synth_y"]
    ncols = min(5, len(classes))
    nrows = math.ceil(len(classes) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.8 * ncols, 2.7 * nrows), squeeze=False,
                             sharex=True, sharey=True)
    for c, (ax, name) in enumerate(zip(axes.flat, classes)):
        ax.scatter(zs[sy == c, 0], zs[sy == c, 1], s=5, alpha=0.45, color="#DD8452", label="synthetic")
        ax.scatter(zr[ry == c, 0], zr[ry == c, 1], s=5, alpha=0.6, color="#4C72B0", label="real (held-out)")
        pcm = metrics["per_class"].get(name, {})
        sub = f"P {pcm['precision']:.2f} R {pcm['recall']:.2f}" if "precision" in pcm else ""
        ax.set_title(f"{name}\n{sub}" if sub else name, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(classes):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle("PCA of real vs synthetic embeddings per class (one projection for all panels)")
    fig.tight_layout(rect=(0, 0.06 if nrows == 1 else 0.03, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, markerscale=3, frameon=False)
    return _savefig(fig, path)


def fig_per_node_accuracy(per_node: dict, downstream: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    nodes = list(per_node)
    series = _node_series(per_node)
    if not series:  # plain {node: accuracy}
        series = ["accuracy"]
        per_node = {n: {"accuracy": v} for n, v in per_node.items()}
    x = np.arange(len(nodes))
    w = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(nodes) + 2), 4.0))
    palette = ["#4C72B0", "#DD8452"] if len(series) == 2 else _colors(len(series))
    for i, (s, color) in enumerate(zip(series, palette)):
        ax.bar(x + (i - (len(series) - 1) / 2) * w, [per_node[n].get(s, np.nan) for n in nodes], w,
               label=s, color=color)
    for name, style in (("global_acc_fedavg", "--"), ("global_acc_distilled", ":")):
        if name in downstream:
            ax.axhline(downstream[name], ls=style, color="k", lw=1, label=f"{name} {downstream[name]:.3f}")
    ax.set_xticks(x, nodes, rotation=45 if len(nodes) > 8 else 0, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy on the node's test split")
    ax.set_title("Global model per node: FedAvg alone vs with synthetic-sample fine-tuning")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 if len(nodes) <= 8 else -0.2),
              ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _savefig(fig, path)


def _node_series(per_node: dict) -> list[str]:
    """Series of the per-node accuracies: the training's "fedavg" before "distilled", others after."""
    found = {s for v in per_node.values() if isinstance(v, dict) for s in v}
    first = [s for s in ("fedavg", "distilled") if s in found]
    return first + sorted(found - set(first))


def write_figures(out: Path, metrics: dict, extras: dict, losses: dict | None) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: DVC stages and CI have no display
    files = {}
    if losses:
        files["fig_loss_curves"] = fig_loss_curves(losses, out / "loss_curves.png", extras.get("keys", []))
    files["fig_tstr_vs_trtr"] = fig_tstr_vs_trtr(metrics, extras["classes"], out / "tstr_vs_trtr.png")
    files["fig_embedding_2d"] = fig_embedding_2d(extras, metrics, out / "embedding_2d.png")
    downstream = metrics.get("downstream") or {}
    if downstream.get("per_node"):
        files["fig_per_node_accuracy"] = fig_per_node_accuracy(
            downstream["per_node"], downstream, out / "per_node_accuracy.png"
        )
    return files
