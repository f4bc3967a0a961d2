"""checkpoint part (see DESIGN.md "Checkpoints"): the one on-disk/on-wire format.

One safetensors file per checkpoint with feda2v's JSON header in its metadata; atomic writes; a
``latest.ckpt`` pointer; integrity checks on every load; the run-state layout (runstate.py: what a
federation checkpoint holds); provenance beside the file (provenance.py); legacy migration;
inspect/verify/diff.
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
from feda2v.checkpoint.runstate import (
    RESUME_FREE,
    Checkpointer,
    RunState,
    check_resumable,
    library_versions,
    pack_run_state,
    read_primary_store,
    read_run_state,
    state_config,
    unpack_run_state,
    write_run_state,
)
from feda2v.checkpoint.tools import diff_checkpoints, inspect_checkpoint, provenance_note


def migrate_legacy(*args, **kwargs):
    """See feda2v.checkpoint.legacy.migrate_legacy (imported lazily: it needs the store)."""
    from feda2v.checkpoint.legacy import migrate_legacy as _migrate

    return _migrate(*args, **kwargs)


__all__ = [
    "FORMAT_VERSION",
    "LATEST",
    "RESUME_FREE",
    "CheckpointManager",
    "Checkpointer",
    "RunState",
    "check_resumable",
    "library_versions",
    "pack_run_state",
    "read_primary_store",
    "read_run_state",
    "state_config",
    "unpack_run_state",
    "write_run_state",
    "capture_rng",
    "checkpoint_bytes",
    "diff_checkpoints",
    "provenance_note",
    "inspect_checkpoint",
    "migrate_legacy",
    "read_checkpoint",
    "read_checkpoint_bytes",
    "restore_rng",
    "round_filename",
    "verify_checkpoint",
    "write_checkpoint",
]
