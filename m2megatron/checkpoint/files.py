"""Single-file checkpoint formats: the released reference `.ckpt` and our consolidated safetensors file.

Consolidated file (`*.safetensors`): our full state dict (local-spec names, global layer indices, unpadded
vocabulary), plus the reference tensors the model never reads under `reference_unused.` (kept so an export
writes them back unchanged). Metadata: `format` = FORMAT and `model_config` = the ModelConfig as JSON.

Every torch file is read with `torch.load(weights_only=True)`: a file that needs pickled code is refused.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import torch

from m2megatron.checkpoint.reference_format import infer_model_config, reference_to_ours
from m2megatron.checkpoint.safety import CheckpointError
from m2megatron.config.base import update_dataclass
from m2megatron.config.model import ModelConfig

FORMAT = "m2megatron.consolidated.v1"
UNUSED_PREFIX = "reference_unused."
_WRAPPERS = ("state_dict", "module", "model")
_DS_PREFIX = "_forward_module."


def torch_load_weights(path: str | Path) -> object:
    """`torch.load(weights_only=True)` on CPU; pickled code → CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refusing to load, the file needs pickled code beyond plain tensors "
                        f"(torch.load weights_only=True failed: {str(exc).splitlines()[0]})") from None
    except (RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0]})") from None


def unwrap_reference(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The reference loader's unwrapping (SPEC.md §2.2): `state_dict` / `module` / `model` wrappers, the
    `_forward_module.` prefix, and `visual_tokenizer*` keys dropped. Non-tensor entries are an error."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    for key in _WRAPPERS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    out = {}
    for key, value in obj.items():
        key = key[len(_DS_PREFIX):] if key.startswith(_DS_PREFIX) else key
        if "visual_tokenizer" in key:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def read_reference_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A released M2-Encoder checkpoint (`.ckpt`/`.pt`/`.pth`, or the `.safetensors` of a port) as a flat
    state dict in the released layout."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_reference(load_file(str(path)), str(path))
    return unwrap_reference(torch_load_weights(path), str(path))


def save_consolidated(path: str | Path, full: dict[str, torch.Tensor], cfg: ModelConfig,
                      unused: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in full.items()}
    tensors.update({UNUSED_PREFIX + k: v.detach().cpu().contiguous() for k, v in (unused or {}).items()})
    meta = {"format": FORMAT, "model_config": json.dumps(dataclasses.asdict(cfg))}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def read_consolidated(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model config, full state dict, unused reference tensors) of a consolidated file, read into memory.
    To load one into model chunks at any layout: checkpoint.consolidate.load_consolidated."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not an m2megatron consolidated file "
                                  f"(metadata format={meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = update_dataclass(ModelConfig(), json.loads(meta["model_config"]), prefix="model")
    full = {k: v for k, v in tensors.items() if not k.startswith(UNUSED_PREFIX)}
    unused = {k[len(UNUSED_PREFIX):]: v for k, v in tensors.items() if k.startswith(UNUSED_PREFIX)}
    return cfg, full, unused


def is_consolidated(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("format") == FORMAT


def load_any(path: str | Path, *, num_heads: int | None = None, preset: str | None = None
             ) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, full state dict, unused) from a consolidated file or a released reference checkpoint.

    For a reference checkpoint the sizes come from the tensor shapes, the heads from `num_heads` or
    `preset` (or the released preset of the same width).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory; distributed checkpoints must be consolidated to one "
                        f".safetensors file first")
    if is_consolidated(path):
        cfg, full, unused = read_consolidated(path)
        if num_heads and num_heads != cfg.num_attention_heads:
            raise CheckpointError(f"--num-heads {num_heads}: {path} was saved with {cfg.num_attention_heads} heads")
        return cfg, full, unused
    ref = read_reference_checkpoint(path)
    try:
        cfg = infer_model_config(ref, num_heads=num_heads, preset=preset)
        full, unused = reference_to_ours(ref, cfg)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return cfg, full, unused


# ---- conversions used by tools/import_reference.py and tools/export_reference.py ------------------

WRAPS = ("none", "state_dict", "module", "model")


def import_reference(src: str | Path, dst: str | Path, *, num_heads: int | None = None,
                     preset: str | None = None) -> ModelConfig:
    """Released checkpoint → consolidated file. Returns the inferred model config."""
    if Path(src).suffix == ".safetensors" and is_consolidated(src):
        raise CheckpointError(f"{src}: already an m2megatron consolidated file")
    cfg, full, unused = load_any(src, num_heads=num_heads, preset=preset)
    save_consolidated(dst, full, cfg, unused)
    return cfg


def export_reference(src: str | Path, dst: str | Path, *, wrap: str = "none") -> ModelConfig:
    """Consolidated file → released layout, saved with torch.save as a dict of plain tensors.

    wrap='none' writes the flat state dict (the reference loader uses it as is); 'state_dict', 'module'
    or 'model' nest it under that key ('module' also adds the `_forward_module.` prefix, as DeepSpeed does).
    """
    from m2megatron.checkpoint.reference_format import ours_to_reference

    if wrap not in WRAPS:
        raise CheckpointError(f"--wrap: {wrap!r} is not one of {list(WRAPS)}")
    if not is_consolidated(src):
        raise CheckpointError(f"{src}: not an m2megatron consolidated .safetensors file")
    cfg, full, unused = read_consolidated(src)
    ref = ours_to_reference(full, cfg, unused)
    if wrap == "module":
        ref = {_DS_PREFIX + k: v for k, v in ref.items()}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref if wrap == "none" else {wrap: ref}, dst)
    return cfg
