"""evaluate part (see DESIGN.md): generator quality and downstream metrics, reports and plots.

``evaluate(cfg) -> {"metrics", "outputs", "notes"}`` is the DVC stage's job; ``metrics`` holds the
pure metric functions (Fréchet, MMD, k-NN precision/recall, TSTR/TRTR, reconstruction error).
"""
from feda2v.evaluate import metrics
from feda2v.evaluate.job import evaluate, load_trained_store

__all__ = ["evaluate", "load_trained_store", "metrics"]
