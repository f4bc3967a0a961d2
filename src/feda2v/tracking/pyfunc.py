"""The final generator store as an MLflow pyfunc model.

The model is stored "from code" (``store_model_code.py``, no cloudpickle) with one artifact, a
feda2v checkpoint file (safetensors + JSON header): nothing in it is unpickled. ``load_context`` rebuilds the store with ``GeneratorStore.from_state`` and ``predict``
samples synthetic embeddings for the requested classes:

    model = mlflow.pyfunc.load_model(uri)
    model.predict({"class": ["piano", "violin"], "count": [3, 2]}, params={"seed": 7})
    # -> DataFrame, 5 rows: "class" (str) and "embedding" (list of float, feature_dim long)

Sampling uses an explicit generator seeded from ``params["seed"]`` (default 0): same input, same
output.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from feda2v.errors import DataError

# Logged as a model from code (no cloudpickle): the file builds a StoreModel at load time.
_CODE = str(Path(__file__).with_name("store_model_code.py"))


def split_store(tensors: dict, header: dict, store: str | None = None) -> tuple[str, dict, dict]:
    """(store name, its tensors without the ``store/<name>/`` prefix, its meta) from a
    federation checkpoint's ``(tensors, header)``: the primary store, or ``store``."""
    from feda2v.checkpoint import unpack_run_state
    from feda2v.errors import CheckpointError

    state = unpack_run_state(tensors, header, source="the store model's checkpoint")
    name = store or state.primary_store
    if name not in state.stores:
        raise CheckpointError(f"checkpoint has no store '{name}'; it has: {', '.join(state.stores)}")
    own, meta = state.stores[name]
    return name, own, meta


def _classes_of(meta: dict) -> list[str]:
    spec = meta.get("spec") or {}
    classes = spec.get("classes")
    if not classes:
        raise DataError("store meta has no spec.classes; cannot map class names to indices")
    return [str(c) for c in classes]


def parse_request(model_input: Any) -> list[tuple[str, int]]:
    """Accept a DataFrame / dict of lists with columns ``class`` and ``count``, or a plain
    ``{class: count}`` dict; returns ``[(class, count), ...]`` in input order."""
    import pandas as pd

    if isinstance(model_input, dict) and "class" not in model_input:
        pairs = list(model_input.items())
    else:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = {"class", "count"} - set(df.columns)
        if missing:
            raise DataError(f"store model input needs columns 'class' and 'count'; missing "
                            f"{sorted(missing)}")
        pairs = list(zip(df["class"].tolist(), df["count"].tolist()))
    out = []
    for c, n in pairs:
        try:
            n_int = int(n)
        except (TypeError, ValueError):
            n_int = -1
        if n_int < 0 or n_int != n:
            raise DataError(f"store model: count for class '{c}' must be a non-negative integer, "
                            f"got {n!r}")
        out.append((str(c), n_int))
    return out


@contextmanager
def _quiet():
    """MLflow nags (in colour) about type hints; the explicit signature below is what serving
    needs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)
        yield


class StoreModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a GeneratorStore read from a checkpoint artifact."""

    def load_context(self, context) -> None:
        from feda2v.checkpoint import read_checkpoint
        from feda2v.store import GeneratorStore

        cfg = context.model_config or {}
        tensors, header = read_checkpoint(context.artifacts["checkpoint"])
        self.store_name, own, meta = split_store(tensors, header, cfg.get("store"))
        self.store = GeneratorStore.from_state(own, meta)
        self.classes = _classes_of(meta)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        # (the DataFrame hint also tells MLflow not to infer a schema: the signature is explicit)
        import numpy as np
        import torch

        from feda2v.seeding import torch_generator

        seed = int((params or {}).get("seed", 0))
        index = {c: i for i, c in enumerate(self.classes)}
        names, idx = [], []
        for c, n in parse_request(model_input):
            if c not in index:
                raise DataError(f"store model: unknown class '{c}'; known: "
                                f"{', '.join(self.classes)}")
            names += [c] * n
            idx += [index[c]] * n
        if not idx:
            return pd.DataFrame({"class": pd.Series([], dtype=object),
                                 "embedding": pd.Series([], dtype=object)})
        with torch.no_grad():
            x = self.store.sample(torch.tensor(idx, dtype=torch.long),
                                  gen=torch_generator("pyfunc", seed))
        rows = x.detach().cpu().to(torch.float32).numpy()
        return pd.DataFrame({"class": names, "embedding": [np.asarray(r) for r in rows]})


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "class"), ColSpec("long", "count")]),
        outputs=Schema([ColSpec("string", "class"), ColSpec(Array("float"), "embedding")]),
        params=ParamSchema([ParamSpec("seed", "long", 0)]),
    )


def input_example(classes: list[str]) -> pd.DataFrame:
    """Two samples of the first class, one of the second: what the model page shows and what
    MLflow predicts on once when the model is logged (so a model that cannot serve is known)."""
    picked = list(classes[:2])
    return pd.DataFrame({"class": picked, "count": [2, 1][:len(picked)]})


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("feda2v", "torch", "safetensors", "numpy", "pandas", "mlflow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def _checkpoint_facts(ckpt: Path, store: str | None) -> tuple[dict, dict]:
    """(header, the store's meta) of a checkpoint the model is made from."""
    from feda2v.checkpoint import read_checkpoint

    _, header = read_checkpoint(ckpt)
    name = store or header.get("primary_store") or "server"
    return header, (header.get("stores") or {}).get(name) or {}


def save_store_model(checkpoint_path: str | Path, path: str | Path, store: str | None = None):
    """Write the pyfunc model directory (no tracking server needed)."""
    ckpt = Path(checkpoint_path).resolve()
    _, meta = _checkpoint_facts(ckpt, store)
    with _quiet():
        mlflow.pyfunc.save_model(
            path=str(path), python_model=_CODE, artifacts={"checkpoint": str(ckpt)},
            model_config={"store": store} if store else None,
            signature=_signature(), input_example=input_example(_classes_of(meta)),
            pip_requirements=_pip_requirements())


def log_store_model(checkpoint_path: str | Path, *, run_id: str, name: str = "store_model",
                    store: str | None = None, dataset: tuple[str, str] | None = None):
    """Log the model into ``run_id`` on the current global tracking URI as an MLflow 3
    LoggedModel; returns ModelInfo (``model_id``, ``model_uri``).

    It carries the run's params (MLflow copies them), the run's metrics at the checkpoint's
    round (logged at ``step`` = that round), an input example and an input/output signature,
    and tags naming the generator and the dataset. Requirements are given explicitly, so MLflow
    does not load the model in a subprocess to infer them (slow, and the checkpoint may be large).
    """
    from mlflow.models import Model

    ckpt = Path(checkpoint_path).resolve()  # latest.ckpt may be a link: log the file it names
    if not ckpt.is_file():
        raise DataError(f"checkpoint {ckpt} does not exist; cannot log the store model")
    header, meta = _checkpoint_facts(ckpt, store)
    spec = meta.get("spec") or {}
    tags = {"feda2v.store": store or header.get("primary_store") or "server",
            "feda2v.keys": len(meta.get("keys") or []),
            "feda2v.generator": f"{spec.get('type')}/{spec.get('granularity')}"}
    if dataset:
        tags.update({"feda2v.dataset": dataset[0], "feda2v.dataset_digest": dataset[1]})
    with _quiet():
        return Model.log(
            None, name=name, flavor=mlflow.pyfunc, run_id=run_id, python_model=_CODE,
            artifacts={"checkpoint": str(ckpt)},
            model_config={"store": store} if store else None,
            model_type="feda2v-generator-store", tags=tags, step=int(header.get("round", 0)),
            signature=_signature(), input_example=input_example(_classes_of(meta)),
            pip_requirements=_pip_requirements())
