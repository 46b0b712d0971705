"""The one driver of Megatron-Core's pipeline schedules, forward-only or forward–backward.

    reports = run_schedule(chunks, groups, microbatches, loss_fn, config=C, seq_length=S)   # training
    outputs = run_schedule(chunks, groups, microbatches, collect_fn, config=C, seq_length=S,
                           forward_only=True, collect=True)                                # eval

`chunks` are this rank's stage chunks in virtual-stage order (`Stages.chunks`: DDP wrappers when
training, the bare modules otherwise); `groups` the rank's ParallelGroups; `config` the run's one
TransformerConfig (`Stages.config`); `seq_length` the packed activation's tokens between stages
(`models.sequence_parallel.packed_seq_length`).

A microbatch is a dict of tensors already on the runtime device (`images`, `text_ids`, `text_mask`, ...):
the training data arrive there (`data.stage_batches`), eval batches are moved by the feature extractor.
Each chunk reads only what its stage needs: the first stage the images and token ids, every stage the
text mask (segment split and key mask). `loss_fn(batch, output)` runs on the last stage and returns
`(loss, report)` as Megatron expects; with `collect=True`, `collect_fn(batch, output)` returns what to
keep (Megatron's non-loss data) and the outputs come back in microbatch order on the last stage ([]
elsewhere).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Sequence

from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

FIRST_STAGE_INPUTS = ("images", "text_ids")


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def stage_inputs(batch: dict, pre_process: bool) -> dict:
    """The model inputs a stage reads (later stages only need the text mask)."""
    wanted = {"text_mask"} | (set(FIRST_STAGE_INPUTS) if pre_process else set())
    return {k: v for k, v in batch.items() if k in wanted and v is not None}


def _forward_step(fn: Callable, collect: bool, rows: int) -> Callable:
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if _rows(batch) not in (None, rows):
            raise ValueError(f"schedule: a microbatch of {_rows(batch)} rows in a pipeline of {rows}-row microbatches")
        stage = _unwrap(model)
        inputs = stage_inputs(batch, stage.pre_process)
        output = model(images=inputs.get("images"), text_ids=inputs.get("text_ids"),
                       text_mask=inputs.get("text_mask"))
        if collect:
            return output, lambda out, non_loss_data=True: fn(batch, out)
        return output, functools.partial(fn, batch)
    return forward_step


def run_schedule(chunks: Sequence, groups, microbatches: Iterable[dict], fn: Callable, *, config,
                 seq_length: int, forward_only: bool = False, collect: bool = False,
                 num_microbatches: int | None = None, micro_batch_size: int | None = None) -> list:
    """Run Megatron's schedule for this rank's chunks over `microbatches` (collective over the pipeline).

    microbatches: a sequence, or an iterator (streamed; then give `num_microbatches` and
    `micro_batch_size`). Every microbatch must have the same number of rows (the receive buffers'
    shape). seq_length: tokens of the packed activation between stages as `packed_seq_length` counts them
    (image + text segments, padded under sequence parallelism, which Megatron then divides by TP).
    """
    layout = groups.layout
    if num_microbatches is None or micro_batch_size is None:
        microbatches = list(microbatches)
        num_microbatches, micro_batch_size = len(microbatches), _rows(microbatches[0])
        if micro_batch_size is None:
            raise ValueError("schedule: give micro_batch_size for microbatches without tensors")
    forward_backward = get_forward_backward_func(layout.pipeline_parallel, layout.virtual_pipeline)
    kwargs = {}
    if layout.pipeline_parallel > 1:
        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=groups.pp, config=config)
    # Every chunk reads the same microbatches; tee keeps only those between the first and the last chunk.
    iterators = list(itertools.tee(microbatches, len(chunks))) if len(chunks) > 1 else [iter(microbatches)]
    return forward_backward(
        forward_step_func=_forward_step(fn, collect, micro_batch_size),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=list(chunks) if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        collect_non_loss_data=collect,
        pg_collection=groups.collection,
        **kwargs,
    )


def _rows(batch: dict) -> int | None:
    """Rows of a microbatch; None for an empty one (image eval on a later stage reads nothing)."""
    for key in ("text_mask", "images", "text_ids"):
        value = batch.get(key)
        if value is not None:
            return value.shape[0]
    return None
