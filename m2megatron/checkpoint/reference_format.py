"""Adapters between the released M2-Encoder checkpoint layout (SPEC.md §2) and our full state dict.

Reference → ours: backbone branch A → vision tower, branch B → text tower, backbone_vl branch A → VL block;
q/k/v (separate, with bias) are fused into Megatron's per-head [q_h, k_h, v_h] QKV layout. The vocabulary is
kept unpadded in the full state dict (padding happens per TP size when a model loads it).

Keys the model never reads (SPEC.md §1.1, §1.4) are accepted on import and returned separately as
"unused"; VL branch B is dropped. On export VL branch B is written as a copy of branch A, and the other
unused keys are written from the values kept at import, or else from the defaults in `unused_defaults`.
"""

from __future__ import annotations

import math
import re

import torch

from m2megatron.config.base import ConfigError
from m2megatron.config.model import PRESETS, ModelConfig

# (our suffix, reference suffix with {m} for the branch), in the reference's registration order.
_LAYER_PAIRS = (
    ("self_attention.linear_proj.linear.weight", "self_attn.out_proj.{m}.weight"),
    ("self_attention.linear_proj.linear.bias", "self_attn.out_proj.{m}.bias"),
    ("self_attention.linear_proj.norm.weight", "self_attn.inner_attn_ln.{m}.weight"),
    ("self_attention.linear_proj.norm.bias", "self_attn.inner_attn_ln.{m}.bias"),
    ("input_layernorm.weight", "self_attn_layer_norm.{m}.weight"),
    ("input_layernorm.bias", "self_attn_layer_norm.{m}.bias"),
    ("mlp.linear_fc1.weight", "ffn.{m}.fc1.weight"),
    ("mlp.linear_fc1.bias", "ffn.{m}.fc1.bias"),
    ("mlp.linear_fc2.linear.weight", "ffn.{m}.fc2.weight"),
    ("mlp.linear_fc2.linear.bias", "ffn.{m}.fc2.bias"),
    ("mlp.linear_fc2.norm.weight", "ffn.{m}.ffn_layernorm.weight"),
    ("mlp.linear_fc2.norm.bias", "ffn.{m}.ffn_layernorm.bias"),
    ("pre_mlp_layernorm.weight", "final_layer_norm.{m}.weight"),
    ("pre_mlp_layernorm.bias", "final_layer_norm.{m}.bias"),
)
_TOP_PAIRS = (
    ("logit_scale", "logit_scale"),
    ("text_embedding.word_embeddings.weight", "backbone.text_embed.weight"),
    ("vision_embedding.cls_token", "backbone.vision_embed.cls_token"),
    ("vision_embedding.patch.weight", "backbone.vision_embed.proj.weight"),
    ("vision_embedding.patch.bias", "backbone.vision_embed.proj.bias"),
    ("vision_embedding.position_embeddings", "backbone.encoder.embed_positions.A.weight"),
    ("text_embedding.position_embeddings", "backbone.encoder.embed_positions.B.weight"),
    ("vision_final_norm.weight", "backbone.encoder.layer_norm.A.weight"),
    ("vision_final_norm.bias", "backbone.encoder.layer_norm.A.bias"),
    ("text_final_norm.weight", "backbone.encoder.layer_norm.B.weight"),
    ("text_final_norm.bias", "backbone.encoder.layer_norm.B.bias"),
    ("vl_final_norm.weight", "backbone_vl.layer_norm.A.weight"),
    ("vl_final_norm.bias", "backbone_vl.layer_norm.A.bias"),
    ("text_projection.weight", "itc_vl_text_proj.fc.weight"),
    ("vision_projection.weight", "itc_vl_image_proj.fc.weight"),
)
UNUSED_KEYS = ("logit_vl_scale", "backbone.vision_embed.mask_token", "norm.weight", "norm.bias",
               "pooler.dense.weight", "pooler.dense.bias", "itc_text_proj.fc.weight", "itc_image_proj.fc.weight")


# ---- shapes ------------------------------------------------------------------------------------

def _layer_shapes(prefix: str, cfg: ModelConfig) -> dict[str, list[int]]:
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    out = {}
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        for m in "AB":
            out[f"{prefix}self_attn.{proj}.{m}.weight"] = [d, d]
            out[f"{prefix}self_attn.{proj}.{m}.bias"] = [d]
    for name in ("self_attn.inner_attn_ln.{m}", "self_attn_layer_norm.{m}"):
        for m in "AB":
            out[f"{prefix}{name.format(m=m)}.weight"] = [d]
            out[f"{prefix}{name.format(m=m)}.bias"] = [d]
    for m in "AB":
        out.update({f"{prefix}ffn.{m}.fc1.weight": [f, d], f"{prefix}ffn.{m}.fc1.bias": [f],
                    f"{prefix}ffn.{m}.fc2.weight": [d, f], f"{prefix}ffn.{m}.fc2.bias": [d],
                    f"{prefix}ffn.{m}.ffn_layernorm.weight": [f], f"{prefix}ffn.{m}.ffn_layernorm.bias": [f]})
    for m in "AB":
        out[f"{prefix}final_layer_norm.{m}.weight"] = [d]
        out[f"{prefix}final_layer_norm.{m}.bias"] = [d]
    return out


def reference_shapes(cfg: ModelConfig) -> dict[str, list[int]]:
    """Every key of the released layout for `cfg`, with its shape, in registration order."""
    d, e, p = cfg.hidden_size, cfg.embed_dim, cfg.patch_size
    out = {"logit_scale": [], "logit_vl_scale": [], "backbone.text_embed.weight": [cfg.vocab_size, d],
           "backbone.vision_embed.mask_token": [1, 1, d], "backbone.vision_embed.cls_token": [1, 1, d],
           "backbone.vision_embed.proj.weight": [d, cfg.num_channels, p, p], "backbone.vision_embed.proj.bias": [d],
           "backbone.encoder.embed_positions.A.weight": [cfg.vision_position_table, d],
           "backbone.encoder.embed_positions.B.weight": [cfg.text_position_table, d]}
    for i in range(cfg.num_layers):
        out.update(_layer_shapes(f"backbone.encoder.layers.{i}.", cfg))
    out.update({f"backbone.encoder.layer_norm.{m}.{w}": [d] for m in "AB" for w in ("weight", "bias")})
    for j in range(cfg.num_vl_layers):
        out.update(_layer_shapes(f"backbone_vl.layers.{j}.", cfg))
    out.update({f"backbone_vl.layer_norm.{m}.{w}": [d] for m in "AB" for w in ("weight", "bias")})
    out.update({"norm.weight": [d], "norm.bias": [d], "pooler.dense.weight": [d, d], "pooler.dense.bias": [d],
                "itc_text_proj.fc.weight": [e, d], "itc_image_proj.fc.weight": [e, d],
                "itc_vl_text_proj.fc.weight": [e, d], "itc_vl_image_proj.fc.weight": [e, d]})
    return out


def _stacks(cfg: ModelConfig):
    """(our stack, reference layer prefix, branch, depth)."""
    return (("vision_layers", "backbone.encoder.layers", "A", cfg.num_layers),
            ("text_layers", "backbone.encoder.layers", "B", cfg.num_layers),
            ("vl_layers", "backbone_vl.layers", "A", cfg.num_vl_layers))


# ---- config inference -------------------------------------------------------------------------

def infer_model_config(ref: dict[str, torch.Tensor], *, num_heads: int | None = None,
                       preset: str | None = None, base: ModelConfig | None = None) -> ModelConfig:
    """Architecture sizes from the tensor shapes; heads from `num_heads`, `preset`, or the released preset
    of the same width. max_text_len and vocab_pad_multiple from `base` (else the preset's or the defaults)."""
    def shape(key):
        if key not in ref:
            raise ValueError(f"reference checkpoint: key {key} is missing, cannot infer the architecture")
        return list(ref[key].shape)

    vocab, d = shape("backbone.text_embed.weight")
    _, channels, p, _ = shape("backbone.vision_embed.proj.weight")
    patches = shape("backbone.encoder.embed_positions.A.weight")[0] - 3
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"reference checkpoint: vision position table of {patches + 3} rows is not a square grid")
    depth = _count_layers(ref, r"backbone\.encoder\.layers\.(\d+)\.")
    heads = num_heads or (PRESETS[preset].num_attention_heads if preset else heads_for_width(d))
    base = base or (PRESETS[preset] if preset else ModelConfig())
    cfg = ModelConfig(
        preset=preset or "imported", hidden_size=d, num_layers=depth,
        num_vl_layers=_count_layers(ref, r"backbone_vl\.layers\.(\d+)\."), num_attention_heads=heads,
        ffn_hidden_size=shape("backbone.encoder.layers.0.ffn.A.fc1.weight")[0], vocab_size=vocab,
        image_size=side * p, patch_size=p, num_channels=channels,
        text_position_table=shape("backbone.encoder.embed_positions.B.weight")[0],
        embed_dim=shape("itc_vl_image_proj.fc.weight")[0], max_text_len=base.max_text_len,
        vocab_pad_multiple=base.vocab_pad_multiple)
    cfg.validate()
    return cfg


def _count_layers(ref, pattern: str) -> int:
    indices = {int(m.group(1)) for k in ref if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def heads_for_width(d: int) -> int:
    """The heads of the preset of width `d` (ConfigError when no preset has it)."""
    widths = {c.hidden_size: c.num_attention_heads for c in PRESETS.values()}
    if d not in widths:
        raise ConfigError(f"model.num_attention_heads: hidden size {d} matches no preset; give the heads "
                          f"(--num-heads) or a preset (--preset)")
    return widths[d]


# ---- import / export --------------------------------------------------------------------------

def check_reference_keys(ref: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """One ValueError listing every missing, unexpected and misshaped key, if any."""
    expected = reference_shapes(cfg)
    missing = [k for k in expected if k not in ref]
    unexpected = sorted(k for k in ref if k not in expected)
    misshaped = [f"{k}: got {list(ref[k].shape)}, expected {expected[k]}"
                 for k in expected if k in ref and list(ref[k].shape) != expected[k]]
    if missing or unexpected or misshaped:
        parts = [f"{what} ({len(keys)}): " + ", ".join(keys[:40]) + (" …" if len(keys) > 40 else "")
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped))
                 if keys]
        raise ValueError("reference checkpoint does not match the architecture:\n  " + "\n  ".join(parts))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Separate q/k/v weights [D, D_in] (or biases [D]) → Megatron's fused [3D, ...] with rows [q_h, k_h, v_h]
    per head h."""
    rest = q.shape[1:]
    per_head = [t.reshape(heads, -1, *rest) for t in (q, k, v)]  # [H, hd, ...] each
    return torch.stack(per_head, dim=1).reshape(-1, *rest)  # [H, 3, hd, ...] → [3D, ...]


def split_qkv(fused: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    rest = fused.shape[1:]
    grouped = fused.reshape(heads, 3, -1, *rest)  # [H, 3, hd, ...]
    q, k, v = (grouped[:, i].reshape(-1, *rest) for i in range(3))
    return q, k, v


class FusedQKV:
    """`fuse_qkv` of q, k, v, computed only for the rows indexed: a TP rank's slice of the fused rows is whole
    heads, so it fuses just those heads (what `models.shard_full_state_dict` asks for)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int):
        self.q, self.k, self.v, self.heads = q, k, v, heads
        self.shape = torch.Size([3 * q.shape[0], *q.shape[1:]])

    def __getitem__(self, index) -> torch.Tensor:
        rows = index[0] if isinstance(index, tuple) and len(index) == 1 else index
        per_head = self.shape[0] // self.heads
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(self.shape[0])
            if start % per_head == 0 and stop % per_head == 0:
                a, b = start // per_head * (per_head // 3), stop // per_head * (per_head // 3)
                return fuse_qkv(self.q[a:b], self.k[a:b], self.v[a:b], (stop - start) // per_head)
        return fuse_qkv(self.q, self.k, self.v, self.heads)[index]


def reference_to_ours(ref: dict[str, torch.Tensor], cfg: ModelConfig, keys: set[str] | None = None,
                      lazy: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(our full state dict, unused reference tensors). Raises ValueError on any key or shape mismatch.
    `keys`: convert only these of ours (e.g. one pipeline stage's). `lazy`: fused QKVs as `FusedQKV`, fused when
    (and where) indexed."""
    check_reference_keys(ref, cfg)
    wanted = (lambda key: True) if keys is None else keys.__contains__
    full = {ours: ref[theirs] for ours, theirs in _TOP_PAIRS if wanted(ours)}
    for stack, prefix, m, depth in _stacks(cfg):
        for i in range(depth):
            src, dst = f"{prefix}.{i}.", f"{stack}.{i}."
            for ours, theirs in _LAYER_PAIRS:
                if wanted(dst + ours):
                    full[dst + ours] = ref[src + theirs.format(m=m)]
            for wb in ("weight", "bias"):
                if wanted(f"{dst}self_attention.linear_qkv.{wb}"):
                    q, k, v = (ref[f"{src}self_attn.{x}_proj.{m}.{wb}"] for x in ("q", "k", "v"))
                    fuse = FusedQKV if lazy else fuse_qkv
                    full[f"{dst}self_attention.linear_qkv.{wb}"] = fuse(q, k, v, cfg.num_attention_heads)
    unused = {k: ref[k] for k in UNUSED_KEYS}
    return full, unused


def unused_defaults(full: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Values written for the keys the model never reads when no imported values are at hand."""
    d = cfg.hidden_size
    like = full["vision_projection.weight"]
    return {"logit_vl_scale": full["logit_scale"].clone(),
            "backbone.vision_embed.mask_token": like.new_zeros(1, 1, d),
            "norm.weight": like.new_ones(d), "norm.bias": like.new_zeros(d),
            "pooler.dense.weight": torch.eye(d, dtype=like.dtype), "pooler.dense.bias": like.new_zeros(d),
            "itc_text_proj.fc.weight": full["text_projection.weight"].clone(),
            "itc_image_proj.fc.weight": full["vision_projection.weight"].clone()}


def ours_to_reference(full: dict[str, torch.Tensor], cfg: ModelConfig,
                      unused: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Our full state dict → the released layout, in registration order (loads strictly into the reference)."""
    flat: dict[str, torch.Tensor] = {theirs: full[ours] for ours, theirs in _TOP_PAIRS}
    flat.update(unused_defaults(full, cfg))
    flat.update(unused or {})
    for stack, prefix, m, depth in _stacks(cfg):
        for i in range(depth):
            src, dst = f"{stack}.{i}.", f"{prefix}.{i}."
            for ours, theirs in _LAYER_PAIRS:
                flat[dst + theirs.format(m=m)] = full[src + ours]
            for wb in ("weight", "bias"):
                q, k, v = split_qkv(full[f"{src}self_attention.linear_qkv.{wb}"], cfg.num_attention_heads)
                for name, t in zip("qkv", (q, k, v)):
                    flat[f"{dst}self_attn.{name}_proj.{m}.{wb}"] = t
    for key in list(flat):  # VL branch B: a copy of branch A
        if key.startswith("backbone_vl.") and ".A." in key:
            flat[key.replace(".A.", ".B.")] = flat[key].clone()
    shapes = reference_shapes(cfg)
    return {k: flat[k].contiguous() for k in shapes}
