"""Sequence-parallel layout on one process: padded segment lengths for the schedules, config errors, and that
the layout is the identity without SP (the multi-process parity is tests/distributed/test_sequence_parallel.py)."""

import pytest
import torch

from m2megatron.config import ConfigError, ParallelConfig, load_config, preset
from m2megatron.models import packed_seq_length, transformer_config
from m2megatron.models.sequence_parallel import SegmentShards, padded_length
from tests.reference_model import single_groups

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("tp,image,text", [(1, 197, 52), (2, 198, 52), (4, 200, 52), (8, 200, 56)])
def test_224px_segments_are_padded_to_a_multiple_of_tp(tp, image, text):
    cfg = preset("m2-0.4b")
    assert packed_seq_length(cfg, tp, sequence_parallel=True, segments=("image",)) == image
    assert packed_seq_length(cfg, tp, sequence_parallel=True, segments=("text",)) == text
    assert packed_seq_length(cfg, tp, sequence_parallel=True) == image + text
    assert packed_seq_length(cfg, tp, sequence_parallel=False) == 197 + 52  # no SP: no padding
    assert image % tp == 0 and text % tp == 0


def test_unknown_segment_is_an_error():
    with pytest.raises(ValueError, match="unknown segments"):
        packed_seq_length(preset("tiny"), 2, True, segments=("audio",))


def test_sequence_parallel_without_tensor_parallel_names_the_setting():
    with pytest.raises(ConfigError, match="parallel.sequence_parallel"):
        ParallelConfig(sequence_parallel=True).validate()
    with pytest.raises(ConfigError, match="parallel.sequence_parallel"):
        load_config(overrides=["--parallel.sequence_parallel=true"]).validate()
    with pytest.raises(ConfigError, match="parallel.sequence_parallel"):
        transformer_config(preset("tiny"), tp_size=1, sequence_parallel=True)
    ParallelConfig(sequence_parallel=True, tensor_parallel=2).validate(world_size=2, num_attention_heads=4)


def test_segment_shards_are_the_identity_without_sequence_parallelism():
    group = single_groups().tp
    seg = SegmentShards(17, group, sequence_parallel=True)  # TP = 1: nothing to split
    x = torch.randn(17, 2, 8)
    assert (seg.padded, seg.local, seg.is_padded) == (17, 17, False)
    assert seg.scatter(x) is x and seg.local_rows(x) is x and torch.equal(seg.first_row(x), x[0])
    assert seg.key_mask(None, 2, x.device) is None
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(SegmentShards(3, group, False).key_mask(mask, 1, x.device), (mask == 0)[:, None, None, :])
    assert padded_length(197, 4, False) == 197 and padded_length(197, 4, True) == 200


def test_under_sp_exactly_the_sequence_split_norms_and_biases_are_marked_for_the_tp_all_reduce():
    from m2megatron.runtime.build import build_stage_module
    from m2megatron.runtime.shapes import _ShapeOnlyCollection, _ShapeOnlyGroup
    from m2megatron.runtime.stages import StageSpec

    cfg = preset("tiny")
    single_groups()  # a default process group, as build_on_meta needs
    groups = _ShapeOnlyCollection(tp=_ShapeOnlyGroup(2, 0), pp=_ShapeOnlyGroup(1, 0), cp=_ShapeOnlyGroup(1, 0))
    config = transformer_config(cfg, tp_size=2, sequence_parallel=True, perform_initialization=False,
                                use_cpu_initialization=True)
    model = build_stage_module(cfg, config, groups, StageSpec(0, True, True, (0, cfg.num_layers)), torch.device("meta"))
    marked = {n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)}
    layer_parts = ("input_layernorm.weight", "input_layernorm.bias", "pre_mlp_layernorm.weight",
                   "pre_mlp_layernorm.bias", "self_attention.linear_proj.linear.bias", "mlp.linear_fc2.linear.bias")
    stacks = (("vision_layers", cfg.num_layers), ("text_layers", cfg.num_layers), ("vl_layers", cfg.num_vl_layers))
    expected = {f"{stack}.{i}.{part}" for stack, n in stacks for i in range(n) for part in layer_parts}
    expected |= {f"{norm}.{p}" for norm in ("vision_final_norm", "text_final_norm") for p in ("weight", "bias")}
    assert marked == expected  # vl_final_norm sees the gathered CLS rows: complete gradients on every rank
