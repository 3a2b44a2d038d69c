"""Checkpoints: ``files`` writes and reads them (atomic, verified, sharded under fsdp), ``state``
decides what they hold and gives it back to the run's parts, ``background`` writes them in a thread
(``checkpoint.async``)."""

from trainer.checkpoint.files import (
    KEYS,
    SHARDED_STATE,
    VERSION,
    CheckpointError,
    check_model_state,
    find_resume_checkpoint,
    link_best,
    load_checkpoint,
    load_sharded,
    newest_good_checkpoint,
    remove,
    rng_state,
    rotate,
    save_checkpoint,
    save_sharded,
    set_rng_state,
)
from trainer.run_dir import checkpoint_name, list_checkpoints
from trainer.checkpoint.state import Attributes, Checkpointer, keep_global_batch, state_key
from trainer.data.batches import BatchLayout

__all__ = [
    "Attributes", "BatchLayout", "KEYS", "SHARDED_STATE", "VERSION", "CheckpointError", "Checkpointer", "check_model_state", "checkpoint_name",
    "find_resume_checkpoint", "keep_global_batch", "link_best", "list_checkpoints", "load_checkpoint", "load_sharded", "newest_good_checkpoint", "remove",
    "rng_state", "rotate", "save_checkpoint", "save_sharded", "set_rng_state", "state_key",
]
