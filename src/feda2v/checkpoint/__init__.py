"""checkpoint part (see DESIGN.md "Checkpoints"): the one on-disk/on-wire format.

One safetensors file per checkpoint with feda2v's JSON header in its metadata; atomic writes; a
``latest.ckpt`` pointer; integrity checks on every load; legacy migration; inspect/verify/diff.
Nothing here unpickles untrusted bytes.
"""
from feda2v.checkpoint.container import (
    FORMAT_VERSION,
    checkpoint_bytes,
    read_checkpoint,
    read_checkpoint_bytes,
    verify_checkpoint,
    write_checkpoint,
)
from feda2v.checkpoint.manager import LATEST, CheckpointManager, round_filename
from feda2v.checkpoint.rng import capture_rng, restore_rng
from feda2v.checkpoint.tools import diff_checkpoints, inspect_checkpoint, provenance_note


def migrate_legacy(*args, **kwargs):
    """See feda2v.checkpoint.legacy.migrate_legacy (imported lazily: it needs the store)."""
    from feda2v.checkpoint.legacy import migrate_legacy as _migrate

    return _migrate(*args, **kwargs)


def layout_expectations(cfg) -> dict:
    """Header fields a checkpoint must match to be resumed under ``cfg`` (for read_checkpoint's
    ``expect=``): the ones that decide which tensors exist and what they mean."""
    from omegaconf import OmegaConf

    fields = (
        "data.name",
        "generator.type",
        "generator.granularity",
        "generator.class_groups",
        "generator.default_group",
        "generator.latent_dim",
        "generator.hidden_dim",
        "generator.optimizer.name",
        "federation.mode",
        "federation.sharing",
    )
    out = {}
    for f in fields:
        v = OmegaConf.select(cfg, f)
        if OmegaConf.is_config(v):
            v = OmegaConf.to_container(v, resolve=True)
        out[f"config.{f}"] = v
    return out


__all__ = [
    "FORMAT_VERSION",
    "LATEST",
    "CheckpointManager",
    "capture_rng",
    "checkpoint_bytes",
    "diff_checkpoints",
    "provenance_note",
    "inspect_checkpoint",
    "layout_expectations",
    "migrate_legacy",
    "read_checkpoint",
    "read_checkpoint_bytes",
    "restore_rng",
    "round_filename",
    "verify_checkpoint",
    "write_checkpoint",
]
