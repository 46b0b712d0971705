"""Feature extraction at any TP/PP/DP layout.

Items (images or texts) are cut into contiguous shards, one per data-parallel rank. The TP×PP ranks of
one model replica share their DP rank's shard and run the same batches through the model stages
(through Megatron-Core's forward-only pipeline schedule when PP > 1). The last pipeline stage gathers
the shards over the DP group; the result is then broadcast over the pipeline group, so every rank
returns the same [N, E] features.

A batch is a dict with `images` [b, 3, H, W] (normalized as (x − 0.5)/0.5) or `text_ids`/`text_mask`
[b, S]. Stages after the first never look at `images` or `text_ids`, so they may be None there (only
the text mask travels with every stage).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from m2megatron.models.sequence_parallel import packed_seq_length
from m2megatron.parallel.device import to_device
from m2megatron.runtime.schedule import run_schedule

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor | None]


def shard_bounds(num_items: int, num_shards: int, shard: int) -> tuple[int, int]:
    """[start, end) of contiguous shard `shard` of `num_shards` (each holds ceil(N / num_shards) but the last)."""
    per = math.ceil(num_items / num_shards) if num_items else 0
    start = min(num_items, shard * per)
    return start, min(num_items, start + per)


def _dp(groups) -> tuple[int, int]:
    """(DP size, DP rank)."""
    return groups.layout.data_parallel, groups.dp_rank


class ReplicaEncoder:
    """Runs batches through the stage chunks of one model replica; every TP/PP rank of it calls `encode`.

    model_chunks: this rank's M2Encoder stage module(s): one per virtual pipeline stage, in chunk order
    (m2megatron.runtime.Stages.modules or .chunks). groups: the ParallelGroups of the job (their device is
    where the batches go and where features are gathered).
    """

    def __init__(self, model_chunks, groups):
        if groups is None:
            raise ValueError("eval: needs the job's process groups (m2megatron.parallel.initialize)")
        self.chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        self.model = _unwrap(self.chunks[0])
        self.groups = groups
        self.pipeline = groups.layout.pipeline_parallel
        self.virtual = groups.layout.virtual_pipeline

    @property
    def device(self) -> torch.device:
        return self.groups.device

    @property
    def is_last_stage(self) -> bool:
        return self.groups.is_last_stage

    @property
    def is_first_stage(self) -> bool:
        return self.groups.is_first_stage

    @property
    def batch_multiple(self) -> int:
        """The interleaved schedule runs whole groups of PP microbatches; others any number."""
        return self.pipeline if self.virtual else 1

    @torch.no_grad()
    def encode(self, kind: str, batches: Iterator[Batch], num_batches: int, batch_size: int) -> list[torch.Tensor]:
        """Embeddings [b, E] (fp32, on the device) per batch on the last stage ([] elsewhere).

        Every batch must have exactly `batch_size` rows (the pipeline's receive buffers), and
        `num_batches` must be a multiple of `batch_multiple`.
        """
        if num_batches == 0:
            return []
        modules = [_unwrap(c) for c in self.chunks]
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            seq = packed_seq_length(self.model.cfg, self.groups.layout.tensor_parallel,
                                    self.model.config.sequence_parallel, segments=(kind,))
            on_device = (to_device(batch, self.device) for batch in batches)
            outputs = run_schedule(self.chunks, self.groups, on_device, lambda batch, out: _output(kind, out),
                                   config=self.model.config, seq_length=seq, forward_only=True, collect=True,
                                   num_microbatches=num_batches, micro_batch_size=batch_size)
            return list(outputs) if self.is_last_stage else []
        finally:
            for m, mode in zip(modules, was_training):
                m.train(mode)


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def _output(kind: str, out) -> torch.Tensor:
    return (out.image if kind == "image" else out.text).float()


def _gather_dp(local: torch.Tensor, num_items: int, groups) -> torch.Tensor:
    """All-gather contiguous DP shards (padded to equal length for the collective) → [num_items, E]."""
    dp_size, _ = _dp(groups)
    if dp_size == 1:
        return local
    per = math.ceil(num_items / dp_size)
    padded = torch.zeros(per, local.shape[1], dtype=local.dtype, device=groups.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(dp_size)]
    dist.all_gather(parts, padded, group=groups.dp)
    lengths = [e - s for s, e in (shard_bounds(num_items, dp_size, r) for r in range(dp_size))]
    return torch.cat([p[:n] for p, n in zip(parts, lengths)])


def _broadcast_from_last_stage(feats: torch.Tensor | None, groups, dim: int, num_items: int) -> torch.Tensor:
    if groups.layout.pipeline_parallel == 1:
        return feats
    if feats is None:
        feats = torch.empty(num_items, dim, device=groups.device)
    layout = groups.layout
    src = layout.rank(groups.tp_rank, groups.dp_rank, layout.pipeline_parallel - 1)
    dist.broadcast(feats, src=src, group=groups.pp)
    return feats


def extract_features(encoder: ReplicaEncoder, kind: str, num_items: int,
                     make_batch: Callable[[Sequence[int], bool], Batch], *, batch_size: int,
                     embed_dim: int, groups=None) -> tuple[torch.Tensor, float]:
    """([num_items, embed_dim] float32 features of items 0..N−1 on every rank, items per second); logs the rate.

    make_batch(indices, first_stage) builds the model inputs of those items; `first_stage` False means
    only `text_mask` (texts) or nothing (images) is needed.
    """
    if batch_size < 1:
        raise ValueError(f"eval.batch_size: must be >= 1, got {batch_size}")
    dp_size, dp_rank = _dp(groups)
    start, end = shard_bounds(num_items, dp_size, dp_rank)
    tic = time.perf_counter()
    # Pipeline microbatches share one shape: the last batch is padded with repeats of an item, and the
    # interleaved schedule gets whole groups of batches; padding rows and batches are dropped below.
    spans = [(lo, min(end, lo + batch_size)) for lo in range(start, end, batch_size)]
    counts = [hi - lo for lo, hi in spans]
    if spans:
        spans += [spans[-1]] * (-len(spans) % encoder.batch_multiple)

    def batches() -> Iterator[Batch]:
        for lo, hi in spans:
            idx = list(range(lo, hi))
            idx += [idx[-1]] * (batch_size - len(idx))
            yield make_batch(idx, encoder.is_first_stage)

    outputs = encoder.encode(kind, batches(), len(spans), batch_size)
    feats = None
    if encoder.is_last_stage:
        local = torch.cat([o[:n] for o, n in zip(outputs, counts)]) if counts else \
            torch.zeros(0, embed_dim, device=encoder.device)
        if local.shape[1] != embed_dim:
            raise ValueError(f"eval: the model returned {local.shape[1]}-dim features, expected {embed_dim}")
        feats = _gather_dp(local, num_items, groups)
    feats = _broadcast_from_last_stage(feats, groups, embed_dim, num_items)
    seconds = time.perf_counter() - tic
    unit = "images" if kind == "image" else "texts"
    rate = num_items / max(seconds, 1e-9)
    log.info("%s features: %d in %.2f s (%.1f %s/s over %d data-parallel ranks)", kind, num_items, seconds,
             rate, unit, dp_size)
    return feats, rate
