"""feda2v: shared class-conditional generators for federated learning (see DESIGN.md)."""
__version__ = "0.1.0"
