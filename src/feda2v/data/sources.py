"""Offline data sources: labels, class names, class descriptions and per-sample features.

A source only describes and featurises; subsetting, partitioning and standardisation happen in
``prepare`` so every source is treated alike. Features are float64 here (exact, reproducible
arithmetic); they become float32 once, when written.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from feda2v.data.source import Source
from feda2v.errors import ConfigError, DataError
from feda2v.seeding import numpy_generator


DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The data of ``sklearn.datasets.load_digits``, read from the CSV scikit-learn ships, without
    importing scikit-learn (whose import costs ~2 s, more than the whole digits prepare). Falls
    back to load_digits itself if that file ever moves."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        csv = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            raw = np.loadtxt(csv, delimiter=",")
            if raw.shape == (1797, 65):
                return raw[:, :-1], raw[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.asarray(d.data, dtype=np.float64), np.asarray(d.target, dtype=np.int64)


def digits(cfg) -> Source:
    x, y = _digits_arrays()  # 8x8 grey levels 0..16, flattened: 64-d
    return Source(
        name="digits",
        classes=list(DIGIT_WORDS),
        descriptions=[f"a handwritten digit {w}" for w in DIGIT_WORDS],
        labels=y,
        features=lambda variant, idx: x[idx],
        feature_dim=x.shape[1],
        info={"origin": "sklearn.datasets.load_digits", "features": "8x8 pixel grey levels (64-d)"},
    )


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t_shirt_top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
FASHION_TEXT = ["t-shirt or top", "pair of trousers", "pullover", "dress", "coat",
                "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FASHION_DIM = 128


def _idx_file(path: Path, magic: int, header: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(
            f"{path} is missing; install Debian's dataset-fashion-mnist (scripts/setup.sh does)"
        )
    try:
        raw = gzip.open(path, "rb").read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} cannot be read ({e}); reinstall dataset-fashion-mnist") from None
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path} is not an IDX file; reinstall dataset-fashion-mnist")
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


def fashion_projection() -> np.ndarray:
    """Fixed Gaussian random projection 784 -> 128 (Johnson-Lindenstrauss: pairwise distances
    kept within a few percent). Chosen over raw pixels (6x smaller prepared data, a feature size
    like the audio embeddings) and over PCA (data-independent: fitted on nobody's data, so no
    node's or test sample leaks into the feature extractor; same matrix for every seed)."""
    rng = numpy_generator("fashion_mnist", "projection", 784, FASHION_DIM)
    return rng.standard_normal((784, FASHION_DIM)) / np.sqrt(FASHION_DIM)


def fashion_mnist(cfg) -> Source:
    # The official train/test split is pooled: prepare re-splits per node by data.test_fraction.
    images, labels = [], []
    for kind in ("train", "t10k"):
        lab = _idx_file(FASHION_DIR / f"{kind}-labels-idx1-ubyte.gz", 2049, 8)
        img = _idx_file(FASHION_DIR / f"{kind}-images-idx3-ubyte.gz", 2051, 16)
        if img.size != lab.size * 784:
            raise DataError(f"{FASHION_DIR}/{kind}-*: image and label counts differ; reinstall it")
        images.append(img.reshape(-1, 784))
        labels.append(lab)
    pix = np.concatenate(images)
    y = np.concatenate(labels).astype(np.int64)

    def features(variant: int, idx: np.ndarray) -> np.ndarray:
        proj = fashion_projection() / 255.0
        out = np.empty((len(idx), FASHION_DIM), dtype=np.float64)
        # in chunks: one float64 copy of all 70,000 images would be 440 MB of page faults
        for s in range(0, len(idx), 4096):
            out[s:s + 4096] = pix[idx[s:s + 4096]].astype(np.float64) @ proj
        return out

    return Source(
        name="fashion_mnist",
        classes=list(FASHION_CLASSES),
        descriptions=[f"a photo of a {t}" for t in FASHION_TEXT],
        labels=y,
        features=features,
        feature_dim=FASHION_DIM,
        info={"origin": str(FASHION_DIR) + " (Debian dataset-fashion-mnist, train+t10k pooled)",
              "features": f"pixels/255 @ fixed seeded Gaussian projection 784->{FASHION_DIM}"},
    )


def load_source(cfg) -> Source:
    name = cfg.data.name
    if name == "digits":
        return digits(cfg)
    if name == "fashion_mnist":
        return fashion_mnist(cfg)
    if name == "instruments":
        from feda2v.data.instruments import instruments

        return instruments(cfg)
    from feda2v.config.schema import CHOICES

    raise ConfigError(f"data.name: {name!r} is not one of {', '.join(CHOICES['data.name'])}")
