"""Start training from a single weights file: a released M2-Encoder checkpoint (.ckpt/.pt/.pth, or the
.safetensors of a port) or our consolidated .safetensors (docs/MODEL.md §5).

- The model's sizes come from the file (`start_model_config`), as `encode` and the eval launchers take
  them: a consolidated file carries its ModelConfig; a released checkpoint gives every size by its tensor
  shapes but not the heads, which come from model.num_attention_heads, or, when the config named no preset
  (the default `tiny`) and left the heads alone, from the preset of the same width if there is one. The
  config's other model settings (layer_spec, attention, drop_path_rate, max_text_len, ...) are kept.
  A size the config sets itself (a named released preset's, or one given explicitly) that disagrees with
  the file is a one-line ConfigError naming both.
- Loading (`load_weights_file`) is per rank and layout-free: each rank reads only its TP slice of the
  tensors of its own stages (safetensors through lazy slices, a torch zip file through a memory map, a
  released checkpoint's q/k/v fused for the rank's heads only), pads its rows of the vocabulary and loads
  them (`models.load_full_state_dict`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from m2megatron.checkpoint.files import is_consolidated, load_consolidated_config, read_reference_checkpoint
from m2megatron.checkpoint.reference_format import heads_for_width, infer_model_config, reference_to_ours
from m2megatron.checkpoint.safety import CheckpointError
from m2megatron.config.base import ConfigError
from m2megatron.config.model import PRESETS, ModelConfig
from m2megatron.models.state import load_full_state_dict, local_state_dict

SIZE_FIELDS = ("hidden_size", "num_layers", "num_vl_layers", "num_attention_heads", "ffn_hidden_size", "vocab_size",
               "image_size", "patch_size", "num_channels", "text_position_table", "embed_dim")
"""The model settings a weights file fixes."""
_DEFAULT_PRESET = "tiny"


def start_model_config(cfg):
    """`cfg` (a RunConfig) with the model sizes of the weights file it starts from; unchanged otherwise."""
    if not cfg.checkpoint.starts_from_file:
        return cfg
    path = Path(cfg.checkpoint.load)
    if not path.is_file():
        raise CheckpointError(f"checkpoint.load: {path} does not exist (or is not a file)")
    model = cfg.model
    found = file_model_config(path, model, heads_given=_set_by_user(model, "num_attention_heads"))
    clashes = [f for f in SIZE_FIELDS if _set_by_user(model, f) and getattr(model, f) != getattr(found, f)]
    if clashes:
        ours = ", ".join(f"{f}={getattr(model, f)}" for f in clashes)
        theirs = ", ".join(f"{f}={getattr(found, f)}" for f in clashes)
        raise ConfigError(f"model: the config (preset {model.preset}) has {ours}, but checkpoint.load {path} has "
                          f"{theirs}; drop those settings or start from a matching file")
    sizes = {f: getattr(found, f) for f in SIZE_FIELDS}
    return dataclasses.replace(cfg, model=dataclasses.replace(model, **sizes))


def _set_by_user(model: ModelConfig, name: str) -> bool:
    """A size the config fixes: every size of a named released preset, else a value given explicitly."""
    base = PRESETS.get(model.preset)
    return model.preset != _DEFAULT_PRESET or base is None or getattr(model, name) != getattr(base, name)


def file_model_config(path: Path, model: ModelConfig, *, heads_given: bool = True) -> ModelConfig:
    """The sizes of a weights file, reading no tensor data (metadata, or the shapes through a memory map).
    A released checkpoint does not give its heads: model.num_attention_heads, unless not `heads_given` and a
    preset has the file's width (then that preset's heads)."""
    if is_consolidated(path):
        return load_consolidated_config(path)
    ref = read_reference_checkpoint(path, mmap=True)
    try:
        found = infer_model_config(ref, num_heads=1, base=model)  # the heads are decided below
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    heads = model.num_attention_heads
    if not heads_given:
        try:
            heads = heads_for_width(found.hidden_size)
        except ConfigError:
            pass  # no preset of this width: the config's heads
    return dataclasses.replace(found, num_attention_heads=heads)


def load_weights_file(path: str | Path, modules: list, cfg: ModelConfig) -> None:
    """Copy the weights of `path` into this rank's stage modules (any TP/PP/VP layout, any parameter dtype)."""
    path = Path(path)
    wanted = {name for module in modules for name in local_state_dict(module)}
    if not is_consolidated(path):
        try:
            full, _ = reference_to_ours(read_reference_checkpoint(path, mmap=True), cfg, keys=wanted, lazy=True)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        _load(path, modules, full)
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # lazy slices: each rank reads only its TP part
        _load(path, modules, {k: _FileTensor(f.get_slice(k)) for k in f.keys() if k in wanted})


def _load(path: Path, modules: list, full: dict) -> None:
    for module in modules:
        try:
            load_full_state_dict(module, full)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None


class _FileTensor:
    """A tensor of a safetensors file that reads only what is indexed (`models.shard_full_state_dict` needs no
    more than indexing and `.shape`)."""

    def __init__(self, part):
        self._part = part
        self.shape = torch.Size(part.get_shape())

    def __getitem__(self, index) -> torch.Tensor:
        return self._part[index]
