"""The M2-Encoder module of one pipeline stage (the whole model when there is one stage).

Stage s holds layers [start, end) of BOTH towers. Between stages the microbatch travels as one packed
tensor [S_img + S_txt, b, D]: image tokens first, then text tokens. Each stage runs its vision layers
on the image segment and its text layers on the text segment (attention never crosses segments).
The first stage embeds; the last stage runs the tower final LNs, the shared VL block, the VL final LN,
the projections and the L2 normalization. With sequence parallelism each TP rank holds its shard of
each padded segment instead (m2megatron.models.sequence_parallel).

The text mask (1 = real token) is needed on every stage: it gives the segment split and the key mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from megatron.core.utils import get_pg_size

from m2megatron.config.base import ConfigError
from m2megatron.config.model import ModelConfig
from m2megatron.models.embeddings import TextEmbedding, VisionEmbedding
from m2megatron.models.layer_norm import LayerNorm
from m2megatron.models.layer_specs import layer_spec
from m2megatron.models.recompute import run_stack
from m2megatron.models.sequence_parallel import SegmentShards
from m2megatron.models.transformer_config import transformer_config

LAYER_STACKS = ("vision_layers", "text_layers", "vl_layers")


class EncoderOutput(NamedTuple):
    """What the last stage returns: L2-normalized embeddings ([b, E], None when a modality is absent)."""

    image: torch.Tensor | None
    text: torch.Tensor | None
    logit_scale: torch.Tensor
    """The raw learnable log temperature (unclamped; the loss clamps it)."""


def _collection(groups):
    """Accept a ParallelGroups (uses its .collection) or a Megatron ProcessGroupCollection."""
    return getattr(groups, "collection", groups)


def _on_meta_device() -> bool:
    return torch.empty(()).device.type == "meta"


def _build_stack(cfg, config, pg, indices, depth: int, mask_type: AttnMaskType) -> torch.nn.ModuleDict:
    """Layers `indices` of a stack of `depth` layers, keyed by their global index (so state-dict names are
    the same whatever the pipeline split). Drop-path rates rise linearly over the stack, as in torchscale."""
    rates = [cfg.drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
    return torch.nn.ModuleDict({
        str(i): build_module(layer_spec(cfg, mask_type, rates[i]), config=config, layer_number=i + 1,
                             pg_collection=pg)
        for i in indices
    })


class M2Encoder(MegatronModule):
    """One pipeline stage of the M2-Encoder (see module docstring).

    Args:
        cfg: model sizes and layer spec.
        groups: a ParallelGroups or a Megatron ProcessGroupCollection (needs .tp, .pp, .cp).
        pre_process: this stage embeds the inputs (first stage).
        post_process: this stage holds the final LNs, VL block and heads (last stage).
        layer_range: [start, end) of the tower layers on this stage; default all of them.
        config: the run's Megatron TransformerConfig (m2megatron.runtime builds it once for all stages);
            None builds one from `cfg` with `params_dtype` and `config_overrides` (tests, single modules).
        params_dtype: parameter dtype (fp32 by default) when `config` is None.
        config_overrides: extra Megatron TransformerConfig fields when `config` is None.
    """

    def __init__(self, cfg: ModelConfig, groups, *, config: TransformerConfig | None = None,
                 pre_process: bool = True, post_process: bool = True, layer_range: tuple[int, int] | None = None,
                 params_dtype: torch.dtype = torch.float32, **config_overrides):
        pg = _collection(groups)
        if config is None:
            if _on_meta_device():  # no init, and no explicit device= that would escape the meta context
                config_overrides = {**config_overrides, "perform_initialization": False,
                                    "use_cpu_initialization": True}
            config = transformer_config(cfg, tp_size=get_pg_size(pg.tp), params_dtype=params_dtype,
                                        **config_overrides)
        elif config_overrides:
            raise TypeError("M2Encoder: pass either a config or config overrides, not both")
        super().__init__(config=config)
        start, end = layer_range if layer_range is not None else (0, cfg.num_layers)
        if not 0 <= start <= end <= cfg.num_layers:
            raise ConfigError(f"layer_range: [{start}, {end}) is not inside [0, {cfg.num_layers})")
        self.cfg, self.pg_collection, self.tp_group = cfg, pg, pg.tp
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process, self.layer_range = pre_process, post_process, (start, end)
        self.input_tensor: torch.Tensor | None = None
        if pre_process:
            self.vision_embedding = VisionEmbedding(cfg, config, pg.tp)
            self.text_embedding = TextEmbedding(cfg, config, pg.tp)
        indices = range(start, end)
        # Images have no padding, hence no key mask (flash attention), unless SP pads their segment.
        vision_mask = AttnMaskType.padding if self._segment(cfg.num_image_tokens).is_padded else AttnMaskType.no_mask
        self.vision_layers = _build_stack(cfg, config, pg, indices, cfg.num_layers, vision_mask)
        self.text_layers = _build_stack(cfg, config, pg, indices, cfg.num_layers, AttnMaskType.padding)
        if post_process:
            self._build_heads(cfg, config, pg)

    def _build_heads(self, cfg: ModelConfig, config, pg) -> None:
        d, dtype = cfg.hidden_size, config.params_dtype

        def norm(**kw):
            return LayerNorm(config, d, eps=cfg.layernorm_eps, **kw)

        self.vision_final_norm, self.text_final_norm = norm(), norm()  # sequence-split under SP
        # The VL block serves both modalities (images: no key mask unless SP pads their segment).
        self.vl_layers = _build_stack(cfg, config, pg, range(cfg.num_vl_layers), cfg.num_vl_layers,
                                      AttnMaskType.padding)
        self.vl_final_norm = norm(sequence_parallel=False)  # sees the CLS rows, the same on every TP rank
        self.vision_projection = torch.nn.Linear(d, cfg.embed_dim, bias=False, dtype=dtype)
        self.text_projection = torch.nn.Linear(d, cfg.embed_dim, bias=False, dtype=dtype)
        self.logit_scale = torch.nn.Parameter(torch.tensor(cfg.logit_scale_init, dtype=torch.float32))

    # ---- Megatron pipeline interface -------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        """Called by Megatron's schedules with the tensor received from the previous stage."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def forward(self, images: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None):
        """Run this stage.

        images: [b, C, H, W] normalized as (x − 0.5)/0.5 (first stage only).
        text_ids: [b, S_txt] token ids (first stage only). text_mask: [b, S_txt], 1 = real token (every stage).
        Returns the packed activation [S_img + S_txt, b, D] (under SP this rank's
        [S_img_pad/TP + S_txt_pad/TP, b, D]), or an EncoderOutput on the last stage.
        """
        if text_ids is not None and (text_mask is None or text_mask.shape != text_ids.shape):
            raise ValueError("text_mask: must be given with the shape of text_ids")
        image_seg = self._segment(self.cfg.num_image_tokens)
        text_seg = None if text_mask is None else self._segment(text_mask.shape[1])
        hidden = self._stage_input(images, text_ids, text_mask, image_seg, text_seg)
        s_txt = 0 if text_seg is None else text_seg.local
        image, text = hidden[:hidden.shape[0] - s_txt], hidden[hidden.shape[0] - s_txt:]
        if image.shape[0] not in (0, image_seg.local):
            raise ValueError(f"forward: the packed activation has {hidden.shape[0]} rows: {image.shape[0]} image "
                             f"rows, expected 0 or {image_seg.local} (+ {s_txt} text rows)")
        batch, device = hidden.shape[1], hidden.device
        with self._fp8_context():
            if image.shape[0]:
                image = self._run(self.vision_layers, image, image_seg.key_mask(None, batch, device))
            if s_txt:
                text = self._run(self.text_layers, text, text_seg.key_mask(text_mask, batch, device))
            if not self.post_process:
                return torch.cat([image, text], dim=0)
            return EncoderOutput(
                image=self._head(image, image_seg, None, self.vision_final_norm, self.vision_projection)
                if image.shape[0] else None,
                text=self._head(text, text_seg, text_mask, self.text_final_norm, self.text_projection)
                if s_txt else None,
                logit_scale=self.logit_scale,
            )

    def _segment(self, tokens: int) -> SegmentShards:
        return SegmentShards(tokens, self.tp_group, self.config.sequence_parallel)

    def _stage_input(self, images, text_ids, text_mask, image_seg, text_seg) -> torch.Tensor:
        """The first stage embeds (and under SP scatters each segment); later stages take the received tensor."""
        if not self.pre_process:
            if self.input_tensor is None:
                raise RuntimeError("forward: no input tensor set on a non-first pipeline stage")
            return self.input_tensor
        parts = []
        if images is not None:
            parts.append(image_seg.scatter(self.vision_embedding(images)))
        if text_ids is not None:
            parts.append(text_seg.scatter(self.text_embedding(text_ids, text_mask)))
        if not parts:
            raise ValueError("forward: give images and/or text_ids")
        return torch.cat(parts, dim=0)  # [S_img + S_txt, b, D] (this rank's shards under SP)

    def _fp8_context(self):
        from megatron.core.fp8_utils import get_fp8_context

        return get_fp8_context(self.config)

    def _run(self, stack: torch.nn.ModuleDict, hidden: torch.Tensor, key_mask) -> torch.Tensor:
        return run_stack(stack.values(), hidden, key_mask, self.config, self.tp_group, self.training)

    def _head(self, x: torch.Tensor, seg: SegmentShards, text_mask, final_norm, projection) -> torch.Tensor:
        """Tower final LN → VL block → VL final LN on the CLS token → projection → L2 normalization."""
        x = final_norm(x)  # [S, b, D] (this rank's rows under SP)
        batch = x.shape[1]
        if text_mask is None:
            key_mask = seg.key_mask(None, batch, x.device)
            if key_mask is None and self.cfg.layer_spec == "te":  # TE's padding mask type is given a mask
                key_mask = torch.zeros(batch, 1, 1, seg.padded, dtype=torch.bool, device=x.device)
        else:
            valid = seg.valid(text_mask, batch, x.device)  # [b, S_pad]
            x = x * seg.local_rows(valid.t()).unsqueeze(-1).to(x.dtype)  # VL entry zeroes padded positions again
            key_mask = (valid == 0)[:, None, None, :]
        x = self._run(self.vl_layers, x, key_mask)
        cls = self.vl_final_norm(seg.first_row(x))  # [b, D]; LN is per token, so only the CLS token is needed
        z = projection(cls)  # [b, E]
        return z / z.norm(dim=-1, keepdim=True)  # no eps, as the reference

    # ---- convenience APIs (single-stage model) --------------------------------------------------
    def _check_whole(self) -> None:
        if not (self.pre_process and self.post_process and self.layer_range == (0, self.cfg.num_layers)):
            raise RuntimeError("encode_image/encode_text need the whole model on one pipeline stage")

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [b, 3, H, W] already normalized as (x − 0.5)/0.5 → L2-normalized embeddings [b, E]."""
        self._check_whole()
        return self.forward(images=pixels).image

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [b, S] (mask 1 = real token) → L2-normalized embeddings [b, E]."""
        self._check_whole()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"text ids: outside [0, {self.cfg.vocab_size})")
        return self.forward(text_ids=ids, text_mask=mask).text

    # ---- checkpointing --------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """ShardedTensors for dist_checkpointing; layer keys carry the global layer index."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)  # logit_scale: replicated
        out = make_sharded_tensors_for_checkpoint(own, prefix, sharded_offsets=sharded_offsets,
                                                  tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        for name, child in self.named_children():
            if name in LAYER_STACKS:
                for idx, layer in child.items():
                    out.update(layer.sharded_state_dict(f"{prefix}{name}.{idx}.", sharded_offsets, metadata))
            else:
                out.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata,
                                                      tp_group=self.tp_group))
        return out


def default_layer_ranges(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Even split of the tower layers over `stages` (earlier stages take the remainder)."""
    base, extra = divmod(num_layers, stages)
    bounds = [0]
    for s in range(stages):
        bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return list(zip(bounds[:-1], bounds[1:]))


