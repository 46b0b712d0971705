"""Distributed checkpoints: Megatron-Core dist_checkpointing with atomic publishing, resharding on load,
refusals of unsafe or mismatched checkpoints, and offline tools (docs/CHECKPOINTS.md)."""

from m2megatron.checkpoint.load import LoadedCheckpoint, load_checkpoint
from m2megatron.checkpoint.safety import CheckpointError
from m2megatron.checkpoint.save import Checkpointer, save_checkpoint

__all__ = ["CheckpointError", "Checkpointer", "LoadedCheckpoint", "load_checkpoint", "save_checkpoint"]
