"""Full ("consolidated") state dicts ↔ per-TP-rank shards, and deterministic by-name initialization.

The full state dict is our single-file format: the plain state-dict names of the local spec, global layer
indices, the unpadded vocabulary, no `_extra_state`. A stage on TP rank r of TP holds a slice of it:
`shard_full_state_dict` cuts that slice (padding the vocab), `merge_tp_shards` glues shards back.
"""

from __future__ import annotations

import re
import zlib

import torch
import torch.distributed as dist
from megatron.core.utils import get_pg_rank, get_pg_size

from m2megatron.config.model import ModelConfig
from m2megatron.models.embeddings import padded_vocab_size
from m2megatron.models.layer_specs import TE_FUSED_NORM_NAMES

VOCAB_KEY = "text_embedding.word_embeddings.weight"
_TP_AXES = (  # (suffix, axis) of TP-sharded tensors; everything else is replicated
    ("self_attention.linear_qkv.weight", 0), ("self_attention.linear_qkv.bias", 0),
    ("linear_proj.norm.weight", 0), ("linear_proj.norm.bias", 0), ("linear_proj.linear.weight", 1),
    ("mlp.linear_fc1.weight", 0), ("mlp.linear_fc1.bias", 0),
    ("linear_fc2.norm.weight", 0), ("linear_fc2.norm.bias", 0), ("linear_fc2.linear.weight", 1),
    (VOCAB_KEY, 0),
)
_LAYER_KEY = re.compile(r"^(vision_layers|text_layers|vl_layers)\.(\d+)\.")


def tp_axis(name: str) -> int | None:
    """The axis along which tensor `name` is split over TP ranks, or None if replicated."""
    for suffix, axis in _TP_AXES:
        if name.endswith(suffix):
            return axis
    return None


def _to_local_names(name: str) -> str:
    for local, te in TE_FUSED_NORM_NAMES.items():
        name = name.replace(te, local)
    return name


def _to_model_names(name: str, layer_spec: str) -> str:
    if layer_spec != "te":
        return name
    for local, te in TE_FUSED_NORM_NAMES.items():
        name = name.replace("." + local, "." + te)
    return name


def local_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's tensors under local-spec names (TE's `_extra_state` dropped)."""
    return {_to_local_names(k): v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def shard_full_state_dict(full: dict[str, torch.Tensor], cfg: ModelConfig, tp_rank: int, tp_size: int
                          ) -> dict[str, torch.Tensor]:
    """The slice of a full state dict that TP rank `tp_rank` of `tp_size` holds (vocab padded with zeros).

    Only indexing and `.shape` are used, so a value may also be a lazy view of a file (safetensors' get_slice):
    then only this rank's slice is read."""
    out = {}
    for name, tensor in full.items():
        axis = tp_axis(name)
        if name == VOCAB_KEY:
            out[name] = _vocab_rows(tensor, padded_vocab_size(cfg, tp_size) // tp_size, tp_rank)
        elif axis is not None and tp_size > 1:
            size = tensor.shape[axis] // tp_size
            out[name] = tensor[(slice(None),) * axis + (slice(tp_rank * size, (tp_rank + 1) * size),)]
        else:
            out[name] = tensor[...]
    return out


def _vocab_rows(table, rows: int, tp_rank: int) -> torch.Tensor:
    """Rows [tp_rank·rows, (tp_rank+1)·rows) of the vocabulary table padded with zero rows (never read)."""
    vocab = table.shape[0]
    real = table[min(tp_rank * rows, vocab):min((tp_rank + 1) * rows, vocab)]
    if real.shape[0] == rows:
        return real
    return torch.cat([real, real.new_zeros(rows - real.shape[0], *real.shape[1:])])


def merge_tp_shards(shards: list[dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `shard_full_state_dict`: concatenate sharded tensors, drop the vocab padding."""
    out = {}
    for name, tensor in shards[0].items():
        axis = tp_axis(name)
        if axis is not None and len(shards) > 1:
            tensor = torch.cat([s[name] for s in shards], dim=axis)
        if name == VOCAB_KEY:
            tensor = tensor[:cfg.vocab_size]
        out[name] = tensor
    return out


def gather_full(tensors: dict[str, torch.Tensor], cfg: ModelConfig, tp_group) -> dict[str, torch.Tensor]:
    """All-gather this stage's TP shards (e.g. weights or grads, under local names) into full tensors."""
    size = get_pg_size(tp_group)
    if size == 1:
        return merge_tp_shards([tensors], cfg)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(size)]
    for name, tensor in tensors.items():
        if tp_axis(name) is None:
            for s in shards:
                s[name] = tensor
            continue
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous(), group=tp_group)
        for s, part in zip(shards, parts):
            s[name] = part
    return merge_tp_shards(shards, cfg)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """This stage's weights as full tensors (gathered over TP), detached, under local names."""
    tensors = {k: v.detach() for k, v in local_state_dict(model).items()}
    return gather_full(tensors, model.cfg, model.tp_group)


def _elsewhere(model, name: str) -> bool:
    """True if `name` is a valid full-model key that another pipeline stage holds."""
    match = _LAYER_KEY.match(name)
    if match:
        start, end = model.layer_range
        stack, idx = match.group(1), int(match.group(2))
        if stack == "vl_layers":
            return not model.post_process and idx < model.cfg.num_vl_layers
        return idx < model.cfg.num_layers and not start <= idx < end
    if name.startswith(("vision_embedding.", "text_embedding.")):
        return not model.pre_process
    heads = ("vision_final_norm.", "text_final_norm.", "vl_final_norm.", "vision_projection.", "text_projection.")
    return not model.post_process and (name.startswith(heads) or name == "logit_scale")


def load_full_state_dict(model, full: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into this stage at its TP rank. Missing, unknown or misshaped keys: one ValueError."""
    cfg = model.cfg
    shard = shard_full_state_dict(full, cfg, get_pg_rank(model.tp_group), get_pg_size(model.tp_group))
    expected = local_state_dict(model)
    missing = sorted(set(expected) - set(shard))
    unexpected = sorted(k for k in set(shard) - set(expected) if not _elsewhere(model, k))
    misshaped = sorted(f"{k}: got {list(full[k].shape)}, expected {list(expected[k].shape)} on this rank"
                       for k in set(expected) & set(shard) if shard[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        raise ValueError("state dict does not fit the model:" + _listing("missing", missing)
                         + _listing("unexpected", unexpected) + _listing("misshaped", misshaped))
    ours = {_to_model_names(k, cfg.layer_spec): shard[k] for k in expected}
    with torch.no_grad():
        result = model.load_state_dict(ours, strict=False)
    left = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    assert not left and not result.unexpected_keys, (left, result.unexpected_keys)


def _listing(what: str, keys: list[str], limit: int = 50) -> str:
    if not keys:
        return ""
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {what} ({len(keys)}): " + ", ".join(keys[:limit]) + more


def _init_value(name: str, shape, cfg: ModelConfig, gen: torch.Generator, device) -> torch.Tensor:
    if name == "logit_scale":
        return torch.full(shape, cfg.logit_scale_init, device=device)
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if "." in name else ""
    if "norm" in parent:
        return torch.ones(shape, device=device) if leaf.endswith("weight") else torch.zeros(shape, device=device)
    if leaf == "bias":
        return torch.zeros(shape, device=device)
    return torch.empty(shape, device=device).normal_(0.0, cfg.init_method_std, generator=gen)


@torch.no_grad()
def init_weights(model, seed: int) -> None:
    """Deterministic init by parameter name: every TP/PP layout of the same seed gets the same full weights.

    Each full tensor comes from a generator seeded by (seed, crc32(name)) and is then sliced for this TP
    rank. Linear, embedding, position and cls weights ~ N(0, init_method_std); biases 0; norms (1, 0);
    logit_scale = logit_scale_init. Works after `to_empty()` of a model built on the meta device.
    """
    cfg, tp_rank, tp_size = model.cfg, get_pg_rank(model.tp_group), get_pg_size(model.tp_group)
    for name, param in model.named_parameters():
        local = _to_local_names(name)
        axis = tp_axis(local)
        shape = list(param.shape)
        if axis is not None:
            shape[axis] *= tp_size
        gen = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + zlib.crc32(local.encode()))
        value = _init_value(local, shape, cfg, gen, param.device)
        if local == VOCAB_KEY:
            value[cfg.vocab_size:] = 0  # padding rows are never read
        if axis is not None and tp_size > 1:
            value = value.chunk(tp_size, dim=axis)[tp_rank]
        param.copy_(value.to(param.dtype))
