"""data part (see DESIGN.md): offline sources, embedding features, federated partitions and
the prepared-data directory (``prepare`` writes it, ``load_prepared`` reads and verifies it)."""
from feda2v.data.prepared import NodeData, PreparedData, files_hash, load_prepared, prepare

__all__ = ["prepare", "load_prepared", "NodeData", "PreparedData", "files_hash"]
