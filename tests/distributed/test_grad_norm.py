"""The gradient norm Megatron's optimizer reports (and clips by) is the norm of the full gradient at every layout.

One Adam step with clipping on and binding (a norm of ~100 against optim.clip_grad=0.05), on the same global
batch as tests/distributed/test_train_parity.py. At each layout the reported norm must equal a plain-torch
norm of the same run's gradients: Megatron DDP's main grads after the schedule's finalize step (complete
over DP; with the distributed optimizer its reduce-scattered shards are all-gathered first; fp16's unscaled),
gathered to full tensors over TP and summed over the pipeline stages, each parameter counted once. The norm
and the clipped update (the parameters after the step) must also equal the single-process TP1·PP1 run's.

Before the fix (runtime.param_attributes) the TP-sharded weights lacked Megatron's `tensor_model_parallel`
attribute and were counted on TP rank 0 only: at TP2 the norm was ~0.8× the true one.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from m2megatron.config import load_config
from m2megatron.models import gather_full
from m2megatron.models.state import full_state_dict
from m2megatron.runtime import ContrastiveStep
from tests.distributed.test_sequence_parallel import training_stages
from tests.distributed.test_train_parity import SIZES, _global_batches, _merge, _microbatches

pytestmark = pytest.mark.distributed

CLIP = 0.05
# Adam, which the distributed optimizer needs, with an epsilon far above every gradient element: its first
# step is then ~lr·g, proportional to the clipped gradient (with a small epsilon it would be ~lr·sign(g),
# blind to the clip factor).
CLIPPED = SIZES + [f"--optim.clip_grad={CLIP}", "--optim.optimizer=adam", "--optim.adam_eps=1.0"]
RTOL = 1e-5
"""fp32: the norms differ only by summation order."""
PARAM_TOL = 1e-5
"""fp32 parameters after one clipped step, as tests/distributed/test_train_parity.py."""
BF16_RTOL = 2e-2
"""bf16 parameters: the gradient differs from the fp32 run's by bf16 rounding of weights and activations."""
BF16_PARAM_TOL = 1e-2
"""bf16 parameters of magnitude up to 1 (the norms' weights) are rounded to 2⁻⁸ relative (fp16: 2⁻¹¹)."""
VP = ["--model.num_layers=4", "--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline=2"]


def complete_dp_shards(chunks) -> None:
    """With the distributed optimizer each DP rank holds the reduced gradient of its bucket shard only:
    all-gather the shards so that every rank's main grads are the full DP-reduced gradient."""
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for chunk in chunks:
        for bucket_group in chunk.bucket_groups:
            group = bucket_group.intra_distributed_optimizer_instance_group
            if group.size() == 1:
                continue
            for bucket in bucket_group.buckets:
                shards = shard_buffer(bucket.grad_data, group.size())
                dist.all_gather(list(shards), shards[group.rank()].clone(), group=group)


def full_grad_norm(stages) -> float:
    """Plain torch: the L2 norm of the full gradient (TP-gathered, summed over the pipeline stages)."""
    squares = torch.zeros((), dtype=torch.float64)
    for module in stages.modules:
        grads = {name: p.main_grad.detach().float() for name, p in module.named_parameters()}
        for grad in gather_full(grads, module.cfg, stages.groups.tp).values():
            squares += grad.double().square().sum()
    dist.all_reduce(squares, group=stages.groups.pp)
    return squares.sqrt().item()


def _one_clipped_step(overrides: list[str], num_micro: int = 1) -> dict:
    cfg = load_config(overrides=CLIPPED + overrides)
    groups, stages = training_stages(cfg)
    stages.optimizer.zero_grad()
    (batch,) = _global_batches(cfg, 1)
    ContrastiveStep(stages)(_microbatches(batch, groups.dp_rank, groups.layout.data_parallel, num_micro))
    if cfg.parallel.distributed_optimizer:
        complete_dp_shards(stages.chunks)
    reference = full_grad_norm(stages)
    if cfg.train.precision == "fp16":  # the main grads hold the loss-scaled gradient; Megatron unscales it first
        reference /= stages.optimizer.get_loss_scale().item()
    updated, reported, _ = stages.optimizer.step()
    assert updated
    params = {}
    for module in stages.modules:
        params.update({k: v.float().clone() for k, v in full_state_dict(module).items()})
    return {"reported": float(reported), "reference": reference, "losses": [], "params": params,
            "last": groups.is_last_stage}


def _check(results: list[dict], straight: dict, *, rtol: float = RTOL, param_tol: float = PARAM_TOL) -> None:
    for rank, r in enumerate(results):
        assert r["reference"] > 2 * CLIP, f"clipping does not bind: norm {r['reference']}"
        assert r["reported"] == pytest.approx(r["reference"], rel=RTOL), f"rank {rank}: {r}"
        assert r["reported"] == pytest.approx(straight["reported"], rel=rtol), f"rank {rank}: {r}"
    _, params = _merge(results)
    assert params.keys() == straight["params"].keys()
    worst = max((params[k] - straight["params"][k]).abs().max().item() for k in params)
    assert worst <= param_tol, f"parameters after the clipped step differ by {worst}"


@pytest.fixture(scope="module")
def straight(dist_pool):
    """The single-process TP1·PP1 step (two tower layers, one microbatch)."""
    (result,) = dist_pool(1).run(_one_clipped_step, [])
    assert result["reported"] == pytest.approx(result["reference"], rel=RTOL)
    return result


@pytest.mark.parametrize("layout", [
    ["--parallel.tensor_parallel=2"],
    ["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=true"],
    ["--parallel.pipeline_parallel=2"],
    [],  # DP2
    ["--parallel.distributed_optimizer=true"],  # DP2, gradients reduce-scattered
], ids=["tp2", "tp2_sp", "pp2", "dp2", "dp2_distopt"])
def test_grad_norm_and_clipped_step_at_two_ranks(dist_pool, straight, layout):
    _check(dist_pool(2).run(_one_clipped_step, layout), straight)


@pytest.mark.parametrize("layout", [
    ["--parallel.tensor_parallel=2", "--parallel.pipeline_parallel=2"],
    ["--parallel.tensor_parallel=2", "--parallel.distributed_optimizer=true"],  # TP2·DP2
], ids=["tp2_pp2", "tp2_dp2_distopt"])
def test_grad_norm_and_clipped_step_at_four_ranks(dist_pool, straight, layout):
    _check(dist_pool(4).run(_one_clipped_step, layout), straight)


def test_grad_norm_with_bf16_main_grads_and_distributed_optimizer(dist_pool, straight):
    # TP2·DP2, bf16 parameters, fp32 main gradients and main weights: the reported norm is that of the fp32 main
    # gradients exactly; against the fp32 run, bf16 rounding.
    layout = ["--parallel.tensor_parallel=2", "--parallel.distributed_optimizer=true", "--train.precision=bf16"]
    _check(dist_pool(4).run(_one_clipped_step, layout), straight, rtol=BF16_RTOL, param_tol=BF16_PARAM_TOL)


def test_grad_norm_with_fp16_loss_scaled_main_grads(dist_pool, straight):
    # TP2, fp16 parameters, a loss scale of 2^10 (small enough not to overflow): the norm is the unscaled one.
    layout = ["--parallel.tensor_parallel=2", "--train.precision=fp16", "--optim.initial_loss_scale=1024"]
    _check(dist_pool(2).run(_one_clipped_step, layout), straight, rtol=BF16_RTOL, param_tol=BF16_PARAM_TOL)


def test_grad_norm_with_virtual_pipeline(dist_pool):
    (vp_straight,) = dist_pool(1).run(_one_clipped_step, ["--model.num_layers=4"], 2)
    _check(dist_pool(2).run(_one_clipped_step, VP, 2), vp_straight)
