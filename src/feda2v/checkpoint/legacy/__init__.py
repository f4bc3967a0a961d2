"""Legacy migration: the published FedA2V system's ``torch.save`` checkpoints -> one federation
checkpoint whose store computes the published function (``generator.arch=fedgfe``).

Steps (each its own function): ``read_legacy``/``merge_files`` (read.py), ``infer_architecture``
(layouts.py), ``derive_plan``, ``fill_store``, ``write_migrated`` (migrate.py).
"""
from feda2v.checkpoint.legacy.layouts import LAYOUTS, detect_layout, infer_architecture
from feda2v.checkpoint.legacy.migrate import OVERRIDES_SUFFIX, Migrated, migrate_legacy, resume_overrides
from feda2v.checkpoint.legacy.read import load_legacy, merge_files, read_legacy

__all__ = ["LAYOUTS", "OVERRIDES_SUFFIX", "Migrated", "detect_layout", "infer_architecture", "load_legacy",
           "merge_files", "migrate_legacy", "read_legacy", "resume_overrides"]
