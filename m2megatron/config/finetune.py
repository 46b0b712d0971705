"""Fine-tuning controls: locked towers (OpenCLIP's --lock-image / --lock-text), per-tower learning-rate
multipliers and layer-wise learning-rate decay (BEiT's / EVA-CLIP's layer decay).

Each tower is a list of groups, bottom to top, as OpenCLIP's `lock(unlocked_groups=...)` counts them:
the embedding, then one group per tower layer, then the head (the tower's final LayerNorm and its
projection). The VL block's groups are its layers, then its final LayerNorm. The logit scale is never
locked and has no multiplier. docs/TRAINING.md, "Fine-tuning from released weights".
"""

from __future__ import annotations

from dataclasses import dataclass

from m2megatron.config.base import ConfigError

PARTS = ("image", "text", "vl")
LR_SETTINGS = ("image_lr_mult", "text_lr_mult", "vl_lr_mult", "image_layer_decay", "text_layer_decay")
"""The settings that make Megatron's parameter groups (an optimizer state loads only into the same groups)."""


def part_groups(part: str, num_layers: int, num_vl_layers: int) -> int:
    """Groups of a part: a tower's embedding, L layers and head; the VL block's layers and final norm."""
    return num_vl_layers + 1 if part == "vl" else num_layers + 2


@dataclass(kw_only=True)
class FinetuneConfig:
    lock_image: bool = False
    """Freeze the vision tower (patch embedding, positions, cls token, layers, final norm, projection): no
    gradients, no DDP gradient buffer, no optimizer state (OpenCLIP's --lock-image)."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: leave the top N groups of the vision tower trainable (1 = the head, 2 = the head and
    the last layer, ...; OpenCLIP's --lock-image-unlocked-groups)."""
    lock_text: bool = False
    """Freeze the text tower (token and position embeddings, layers, final norm, projection)."""
    lock_text_unlocked_groups: int = 0
    """With lock_text: leave the top N groups of the text tower trainable (1 = the head, 2 = the head and the
    last layer, ...)."""
    lock_vl: bool = False
    """Freeze the shared VL block (its layers and final norm)."""
    lock_vl_unlocked_groups: int = 0
    """With lock_vl: leave the top N groups of the VL block trainable (1 = its final norm, 2 = that and its
    last layer, ...)."""
    image_lr_mult: float = 1.0
    """Learning-rate multiplier of the vision tower (every value of its LR schedule is scaled)."""
    text_lr_mult: float = 1.0
    """Learning-rate multiplier of the text tower."""
    vl_lr_mult: float = 1.0
    """Learning-rate multiplier of the VL block."""
    image_layer_decay: float = 1.0
    """Layer-wise LR decay of the vision tower: group g of the G groups (embedding 0, layers 1..L, head L+1)
    gets image_lr_mult · decay^(G-1-g); 1 disables it (BEiT's layer_decay, EVA-CLIP's --visual-ld)."""
    text_layer_decay: float = 1.0
    """Layer-wise LR decay of the text tower, as image_layer_decay."""

    @property
    def locks_anything(self) -> bool:
        return self.lock_image or self.lock_text or self.lock_vl

    def locked_groups(self, part: str, groups: int) -> int:
        """How many of the part's `groups` groups, counted from the bottom, are locked."""
        return groups - getattr(self, f"lock_{part}_unlocked_groups") if getattr(self, f"lock_{part}") else 0

    def validate(self, num_layers: int | None = None, num_vl_layers: int | None = None) -> None:
        groups = {part: None if num_layers is None or num_vl_layers is None
                  else part_groups(part, num_layers, num_vl_layers) for part in PARTS}
        for part in PARTS:
            locked, unlocked = getattr(self, f"lock_{part}"), getattr(self, f"lock_{part}_unlocked_groups")
            name = f"finetune.lock_{part}_unlocked_groups"
            if unlocked < 0:
                raise ConfigError(f"{name}: must be >= 0, got {unlocked}")
            if unlocked and not locked:
                raise ConfigError(f"{name}: {unlocked} needs finetune.lock_{part}=true")
            if groups[part] is not None and unlocked > groups[part]:
                raise ConfigError(f"{name}: {unlocked} is more than the {groups[part]} groups of the {part} part")
            if getattr(self, f"{part}_lr_mult") <= 0:
                raise ConfigError(f"finetune.{part}_lr_mult: must be > 0 (lock the {part} part with "
                                  f"finetune.lock_{part} instead of a zero learning rate)")
        for part in ("image", "text"):
            decay = getattr(self, f"{part}_layer_decay")
            if not 0.0 < decay <= 1.0:
                raise ConfigError(f"finetune.{part}_layer_decay: {decay} is not in (0, 1]")
