"""The distributed optimizer's fully reshardable checkpoint with Transformer Engine's FusedAdam, on a GPU.

FusedAdam keeps its step in the param groups (absent until the first step) and builds its per-parameter
moments lazily, unlike torch Adam (per-parameter step, the CPU path that the distributed tests cover).
Here, on one GPU with bf16 parameters (fp32 main weights in the optimizer): a save before the first
step loads back; after two steps a fresh model loads the checkpoint and holds the same main weights,
moments and step, the format is per parameter (readable offline), and the next step is bit-identical.
Skipped where Transformer Engine is not installed (CPU hosts; GPU hosts without an NGC container).
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp

import pytest
import torch

HAVE_TE = torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_TE, reason="needs an NGC host (Transformer Engine)")]


@pytest.fixture(scope="module")
def groups():
    import torch.distributed as dist

    from m2megatron.config import ParallelConfig
    from m2megatron.parallel import Layout, build_groups, initialize

    mp.current_process()._config["daemon"] = False
    if dist.is_initialized():  # another gpu test module made the world of one
        return build_groups(Layout(world_size=1))
    return initialize(ParallelConfig())


def _toy(groups, seed):
    from tests.checkpoint_toy import build_toy

    return build_toy(groups, distributed=True, bf16=True, seed=seed)


def _state(optimizer) -> dict:
    """Per model parameter: main weights, moments (unscaled fp32); and the param groups' steps."""
    from m2megatron.checkpoint.optimizer_state import parts

    out, steps = {}, set()
    for part in parts(optimizer):
        for group in part.optimizer.param_groups:
            steps.add(group.get("step"))
        for i, model_param in enumerate(part.model_param_group_index_map):
            tensors = part._get_main_param_and_optimizer_states(model_param)
            out[i] = {k: v.detach().float().clone() for k, v in tensors.items() if torch.is_tensor(v)}
    return {"tensors": out, "steps": steps}


def test_the_inner_optimizer_is_te_fused_adam(groups):
    from m2megatron.checkpoint.optimizer_state import parts

    _, optimizer, _ = _toy(groups, 1)
    inner = parts(optimizer)[0].optimizer
    assert type(inner).__module__.startswith("transformer_engine"), type(inner)


def test_a_save_before_the_first_step_loads_back(groups, tmp_path):
    from m2megatron.checkpoint import load_checkpoint, save_checkpoint

    chunks, optimizer, scheduler = _toy(groups, 1)
    save_checkpoint(tmp_path, 0, chunks, optimizer, scheduler, groups=groups)
    chunks2, optimizer2, scheduler2 = _toy(groups, 2)
    assert load_checkpoint(tmp_path, chunks2, optimizer2, scheduler2, groups=groups).step == 0
    for a, b in zip(chunks[0].module.parameters(), chunks2[0].module.parameters()):
        assert torch.equal(a, b)


def test_fused_adam_state_round_trips_and_the_next_step_is_identical(groups, tmp_path):
    from m2megatron.checkpoint import load_checkpoint, save_checkpoint
    from m2megatron.checkpoint.atomic import resolve
    from m2megatron.checkpoint.consolidate import tensor_index
    from tests.checkpoint_toy import train_toy

    chunks, optimizer, scheduler = _toy(groups, 1)
    train_toy(chunks, optimizer, scheduler, groups, 0, 2)
    save_checkpoint(tmp_path, 2, chunks, optimizer, scheduler, groups=groups)
    keys = tensor_index(resolve(tmp_path), include_optimizer=True)
    assert any(k.startswith("optimizer.state.exp_avg.") for k in keys)  # per parameter, not flat buckets
    assert any(k.startswith("optimizer.state.param.") for k in keys)  # the fp32 main weights

    chunks2, optimizer2, scheduler2 = _toy(groups, 999)
    load_checkpoint(tmp_path, chunks2, optimizer2, scheduler2, groups=groups)
    saved, loaded = _state(optimizer), _state(optimizer2)
    assert loaded["steps"] == saved["steps"] == {2}
    assert saved["tensors"].keys() == loaded["tensors"].keys()
    for i, tensors in saved["tensors"].items():
        assert tensors.keys() == loaded["tensors"][i].keys() >= {"param", "exp_avg", "exp_avg_sq"}
        for k, v in tensors.items():
            assert torch.equal(v, loaded["tensors"][i][k]), (i, k)
    losses = train_toy(chunks, optimizer, scheduler, groups, 2, 1)
    assert train_toy(chunks2, optimizer2, scheduler2, groups, 2, 1) == losses
    for a, b in zip(chunks[0].module.parameters(), chunks2[0].module.parameters()):
        assert torch.equal(a, b)
