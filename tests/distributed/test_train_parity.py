"""Training through Megatron's pipeline schedules reproduces the single-process run.

Each run trains the same seeded tiny model for a few SGD steps on the same global batches; every
data-parallel rank takes its rows of each global batch. PP=2 and PP=2 × TP=2 must reproduce the
TP1·PP1 losses and updated parameters to 1e-5 (fp32), and accumulated mode (A microbatches with
exact full-batch negatives) must reproduce one microbatch holding all of them. Uneven pipeline stages
(parallel.first_stage_layers / last_stage_layers, with and without virtual stages, down to a stage of only
embeddings or only the VL block and heads) must reproduce it too.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from m2megatron.config import load_config
from m2megatron.models.state import full_state_dict
from m2megatron.parallel import initialize, seed_everything
from m2megatron.runtime import ContrastiveStep, build_stages

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GLOBAL_BATCH = 8
STEPS = 3
SIZES = ["--model.hidden_size=32", "--model.num_attention_heads=4", "--model.ffn_hidden_size=64",
         "--model.num_layers=2", "--model.num_vl_layers=1", "--model.image_size=16", "--model.patch_size=8",
         "--model.max_text_len=8", "--model.vocab_size=64", "--model.embed_dim=16", "--model.drop_path_rate=0",
         "--optim.optimizer=sgd", "--optim.lr=0.5", "--optim.weight_decay=0", "--optim.clip_grad=0",
         "--train.seed=7"]


def _global_batches(cfg, steps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(123)
    batches = []
    for _ in range(steps):
        n, s = GLOBAL_BATCH, cfg.model.max_text_len
        lengths = torch.randint(2, s + 1, (n,), generator=gen)
        mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
        ids = torch.randint(0, cfg.model.vocab_size, (n, s), generator=gen) * mask
        images = torch.rand(n, 3, cfg.model.image_size, cfg.model.image_size, generator=gen) * 2 - 1
        batches.append({"images": images, "text_ids": ids, "text_mask": mask})
    return batches


def _microbatches(batch: dict, dp_rank: int, dp_size: int, num_micro: int) -> list[dict]:
    """This DP rank's rows of a global batch, split into `num_micro` microbatches."""
    rows = GLOBAL_BATCH // dp_size
    mine = {k: v[dp_rank * rows:(dp_rank + 1) * rows] for k, v in batch.items()}
    size = rows // num_micro
    return [{**{k: v[i * size:(i + 1) * size] for k, v in mine.items()}, "microbatch": i} for i in range(num_micro)]


def _train(overrides: list[str], num_micro: int = 1) -> dict:
    cfg = load_config(overrides=SIZES + overrides)
    groups = initialize(cfg.parallel)
    seed_everything(cfg.train.seed, groups)
    stages = build_stages(cfg, groups)
    modules, chunks, optimizer = stages.modules, stages.chunks, stages.optimizer
    step = ContrastiveStep(stages)
    losses = []
    for batch in _global_batches(cfg, STEPS):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        loss = step(_microbatches(batch, groups.dp_rank, groups.layout.data_parallel, num_micro))
        value = torch.tensor([0.0 if loss is None else float(loss)])
        if loss is not None:
            dist.all_reduce(value, group=groups.dp)  # mean over DP of per-rank losses = the global loss
            value /= groups.layout.data_parallel
        losses.append(value.item())
        optimizer.step()
    params = {}
    for module in modules:
        params.update({k: v.clone() for k, v in full_state_dict(module).items()})
    return {"losses": losses, "params": params, "last": groups.is_last_stage, "pp": groups.pp_rank,
            "ranges": [m.layer_range for m in modules]}


def _merge(results: list[dict]) -> tuple[list[float], dict]:
    params: dict = {}
    losses = None
    for r in results:
        params.update(r["params"])
        if r["last"]:
            losses = r["losses"]
    return losses, params


def _assert_same(reference, other, tol=1e-5):
    ref_losses, ref_params = reference
    losses, params = other
    assert losses == pytest.approx(ref_losses, abs=tol), (losses, ref_losses)
    assert set(params) == set(ref_params)
    worst = max((params[k] - ref_params[k]).abs().max().item() for k in ref_params)
    assert worst <= tol, f"max parameter difference {worst}"


@pytest.fixture(scope="module")
def reference(dist_pool):
    return _merge(dist_pool(1).run(_train, []))


def test_reference_loss_falls(reference):
    losses, _ = reference
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("layout", [
    ["--parallel.pipeline_parallel=2"],
    ["--parallel.pipeline_parallel=2", "--parallel.tensor_parallel=2"],
])
def test_pipeline_and_tensor_parallel_reproduce_single_process(dist_pool, reference, layout):
    world = 2 if "--parallel.tensor_parallel=2" not in layout else 4
    _assert_same(reference, _merge(dist_pool(world).run(_train, layout)))


def test_data_parallel_with_pipeline_reproduces_single_process(dist_pool, reference):
    # DP=2 × PP=2: the global loss gathers embeddings over both DP ranks (G = P = 2).
    _assert_same(reference, _merge(dist_pool(4).run(_train, ["--parallel.pipeline_parallel=2"])))


def test_accumulated_microbatches_reproduce_one_large_microbatch(dist_pool, reference):
    # A=4 microbatches of 1 on each of 2 DP ranks, pipeline of 2: exact negatives over all 8 samples.
    result = dist_pool(4).run(_train, ["--parallel.pipeline_parallel=2", "--loss.accumulation_steps=4"], 4)
    _assert_same(reference, _merge(result))


def test_plain_microbatches_differ_from_accumulation(dist_pool, reference):
    # Guard that the test above can fail: without accumulation, 4 microbatches see only their own negatives.
    losses, _ = _merge(dist_pool(2).run(_train, ["--parallel.pipeline_parallel=2"], 4))
    assert abs(losses[0] - reference[0][0]) > 1e-3


@pytest.mark.parametrize("vp_layout", [["--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline=2",
                                        "--model.num_layers=4"]])
def test_interleaved_pipeline_reproduces_single_process(dist_pool, vp_layout):
    reference4 = _merge(dist_pool(1).run(_train, ["--model.num_layers=4"], 2))
    _assert_same(reference4, _merge(dist_pool(2).run(_train, vp_layout, 2)))


@pytest.fixture(scope="module")
def reference6(dist_pool):
    """TP1·PP1 with 6 tower layers and 2 microbatches per step (the uneven layouts below)."""
    return _merge(dist_pool(1).run(_train, ["--model.num_layers=6"], 2))


def test_uneven_stages_with_an_embeddings_only_first_stage_reproduce_single_process(dist_pool, reference):
    # PP=2 over 2 layers: stage 0 holds only the embeddings, stage 1 both layers, the VL block and the heads
    layout = ["--parallel.pipeline_parallel=2", "--parallel.first_stage_layers=0"]
    results = dist_pool(2).run(_train, layout)
    assert [r["ranges"] for r in results] == [[(0, 0)], [(0, 2)]]
    _assert_same(reference, _merge(results))


@pytest.mark.parametrize("layout,world,ranges", [
    # PP=3, 6 layers as 1 | 4 | 1
    (["--parallel.pipeline_parallel=3", "--parallel.first_stage_layers=1", "--parallel.last_stage_layers=1"], 3,
     [[(0, 1)], [(1, 5)], [(5, 6)]]),
    # PP=2 × VP=2: global stages 2 | 2 | 2 | 0, the last chunk of rank 1 holds only the VL block and the heads
    (["--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline=2", "--parallel.first_stage_layers=2",
      "--parallel.last_stage_layers=0"], 2, [[(0, 2), (4, 6)], [(2, 4), (6, 6)]]),
])
def test_uneven_stages_reproduce_single_process(dist_pool, reference6, layout, world, ranges):
    results = dist_pool(world).run(_train, ["--model.num_layers=6"] + layout, 2)
    assert [r["ranges"] for r in results] == ranges
    _assert_same(reference6, _merge(results))
