"""DDP communication overlap changes when gradients are reduced and parameters gathered, never what they are.

Megatron DDP's overlap_grad_reduce launches each bucket's reduction from the backward hooks, and the
distributed optimizer's overlap_param_gather gathers the updated shards in the next forward's pre-hooks;
the schedules drive both through the config hooks the runtime installs (no_sync / grad_sync / param_sync,
per virtual stage). Small buckets make every step use many of them. After several Adam steps the
parameters must be identical to the run without overlap.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.test_precision import _train_steps

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SMALL_BUCKETS = ["--parallel.bucket_size_mb=0.02"]
GRAD = ["--parallel.overlap_grad_reduce=true"]
PARAM = ["--parallel.distributed_optimizer=true", "--parallel.overlap_param_gather=true"]


def _params(overrides: list[str], steps: int = 4) -> dict:
    from m2megatron.config import load_config
    from m2megatron.models.state import full_state_dict
    from m2megatron.parallel import initialize, seed_everything
    from m2megatron.runtime import ContrastiveStep, build_stages
    from tests.distributed.test_train_parity import SIZES, _global_batches, _microbatches

    cfg = load_config(overrides=SIZES + ["--optim.optimizer=adam", "--optim.lr=0.01"] + overrides)
    groups = initialize(cfg.parallel)
    seed_everything(cfg.train.seed, groups)
    stages = build_stages(cfg, groups)
    step = ContrastiveStep(stages)
    num_micro = cfg.num_microbatches(groups.layout.world_size)
    for batch in _global_batches(cfg, steps):
        for chunk in stages.chunks:
            chunk.zero_grad_buffer()
        stages.optimizer.zero_grad()
        step(_microbatches(batch, groups.dp_rank, groups.layout.data_parallel, num_micro))
        stages.optimizer.step()
    with stages.params_in_sync():
        params = {k: v.clone() for m in stages.modules for k, v in full_state_dict(m).items()}
    params["_buckets"] = torch.tensor(sum(len(c.bucket_groups) for c in stages.chunks))
    return params


def _same(a: list[dict], b: list[dict]) -> None:
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        worst = max((ra[k] - rb[k]).abs().max().item() for k in ra if k != "_buckets")
        assert worst == 0.0, f"parameters differ by up to {worst}"


@pytest.mark.parametrize("name,world,layout,overlap", [
    ("dp2-grad-reduce", 2, [], GRAD),
    ("dp2-distopt-grad-and-param", 2, ["--parallel.distributed_optimizer=true"], GRAD + PARAM),
    ("pp2-vp2-dp2-distopt", 4, ["--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline=2",
                                "--model.num_layers=4", "--train.global_batch_size=8",
                                "--train.micro_batch_size=2", "--parallel.distributed_optimizer=true"],
     GRAD + PARAM),
])
def test_overlap_gives_identical_parameters(dist_pool, name, world, layout, overlap):
    pool = dist_pool(world)
    plain = pool.run(_params, layout + SMALL_BUCKETS)
    overlapped = pool.run(_params, layout + SMALL_BUCKETS + overlap)
    assert all(rank["_buckets"] > 1 for rank in overlapped)  # small buckets: several per step
    _same(plain, overlapped)


def test_overlap_run_trains(dist_pool):
    # The overlapped run really steps (guards against comparing two untouched models).
    runs = dist_pool(2).run(_train_steps, SMALL_BUCKETS + GRAD, 3)
    losses = [r for r in runs if r["last"]][0]["losses"]
    assert losses[-1] != losses[0]
