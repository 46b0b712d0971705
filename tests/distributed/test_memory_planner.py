"""The memory planner predicts the measured per-rank peak of a real training step within ±15%.

Each case builds the trainer's stages, Megatron DDP and Adam on gloo ranks, runs two steps inside
`LiveTensorBytes` (exact live tensor bytes: CPU torch has no max_memory_allocated) and compares the
second step's peak with `plan_memory` for the rank's pipeline stage. Uneven pipeline stages, selective
recompute and Megatron-native bf16 weights (with the distributed optimizer and DDP overlap) are among the
cases; sequence parallelism and the full-recompute methods are planned but not yet measured here
(docs/PERFORMANCE.md §2 lists how each will be checked). Shapes are small but chosen so
that activations are a large share of the total (a small vocabulary, 16-sample microbatches).
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import m2megatron.runtime.megatron_config as megatron_config
from m2megatron.config import load_config
from m2megatron.parallel import build_groups, seed_everything
from m2megatron.parallel.layout import Layout
from m2megatron.planning.measure import measure_step_peak
from m2megatron.planning.memory import PlanInput, plan_memory

pytestmark = pytest.mark.distributed

TOLERANCE = 0.15
SIZES = ["--model.hidden_size=64", "--model.num_attention_heads=4", "--model.ffn_hidden_size=256",
         "--model.num_layers=2", "--model.num_vl_layers=1", "--model.image_size=32", "--model.patch_size=8",
         "--model.max_text_len=52", "--model.vocab_size=1000", "--model.embed_dim=32", "--train.seed=3"]


def _measure_and_plan(overrides: list[str]) -> dict:
    cfg = load_config(overrides=SIZES + overrides)
    world = dist.get_world_size()
    groups = build_groups(Layout(world_size=world, tensor_parallel=cfg.parallel.tensor_parallel,
                                 pipeline_parallel=cfg.parallel.pipeline_parallel,
                                 virtual_pipeline=cfg.parallel.virtual_pipeline,
                                 loss_group_size=cfg.parallel.loss_group_size))
    seed_everything(cfg.train.seed, groups)
    measured = measure_step_peak(cfg, groups, cfg.num_microbatches(world))
    planned = plan_memory(PlanInput.from_run_config(cfg, world))[groups.pp_rank]
    return {"rank": groups.rank, "measured": measured["peak"], "planned": planned.total,
            "activation_share": planned.bytes["activations"] / planned.total}


CASES = {
    "tp1_b16": (1, ["--train.micro_batch_size=16"]),
    "tp1_b16_recompute": (1, ["--train.micro_batch_size=16", "--train.recompute=full"]),
    "tp2_b16": (2, ["--train.micro_batch_size=16", "--parallel.tensor_parallel=2"]),
    "pp2_1f1b_m4": (2, ["--train.micro_batch_size=8", "--parallel.pipeline_parallel=2",
                        "--train.global_batch_size=32"]),
    "dp2_distopt_grouped": (2, ["--train.micro_batch_size=16", "--parallel.distributed_optimizer=true",
                                "--parallel.loss_group_size=1"]),
    "pp2_vp2_interleaved": (2, ["--train.micro_batch_size=8", "--parallel.pipeline_parallel=2",
                                "--parallel.virtual_pipeline=2", "--model.num_layers=4",
                                "--train.global_batch_size=16"]),
    "tp1_b16_selective": (1, ["--train.micro_batch_size=16", "--train.recompute=selective"]),
    # uneven stages: 1 | 2 tower layers (the first stage holds 2 microbatches in flight)
    "pp2_uneven_1_2": (2, ["--train.micro_batch_size=8", "--parallel.pipeline_parallel=2", "--model.num_layers=3",
                           "--parallel.first_stage_layers=1", "--train.global_batch_size=32"]),
    # PP=2 × VP=2 over 5 layers: global stages 2 | 1 | 1 | 1
    "pp2_vp2_uneven": (2, ["--train.micro_batch_size=8", "--parallel.pipeline_parallel=2",
                           "--parallel.virtual_pipeline=2", "--model.num_layers=5", "--parallel.first_stage_layers=2",
                           "--parallel.last_stage_layers=1", "--train.global_batch_size=16"]),
}


BF16 = ["--train.precision=bf16"]
BF16_CASES = {
    "tp1_b16_bf16": (1, BF16 + ["--train.micro_batch_size=16"]),
    "tp2_b16_bf16": (2, BF16 + ["--train.micro_batch_size=16", "--parallel.tensor_parallel=2"]),
    "dp2_bf16_distopt_overlap": (2, BF16 + ["--train.micro_batch_size=16", "--parallel.distributed_optimizer=true",
                                            "--parallel.loss_group_size=1", "--parallel.overlap_grad_reduce=true",
                                            "--parallel.overlap_param_gather=true"]),
    "pp2_bf16_uneven_1_2": (2, BF16 + ["--train.micro_batch_size=8", "--parallel.pipeline_parallel=2",
                                       "--model.num_layers=3", "--parallel.first_stage_layers=1",
                                       "--train.global_batch_size=32"]),
}
# train.precision=bf16 builds bf16 parameters only with the Megatron-native precision runtime (main 171962b);
# before that branch is merged the setting trains fp32 weights and these cases cannot be compared.
NATIVE_BF16 = hasattr(megatron_config, "params_dtype")


@pytest.mark.parametrize("case", list(CASES) + [
    pytest.param(c, marks=pytest.mark.skipif(not NATIVE_BF16, reason="needs the Megatron-native bf16 runtime"))
    for c in BF16_CASES])
def test_planned_peak_is_within_15_percent_of_measured(dist_pool, case):
    world, overrides = {**CASES, **BF16_CASES}[case]
    results = dist_pool(world).run(_measure_and_plan, overrides)
    for r in results:
        error = r["planned"] / r["measured"] - 1
        print(f"{case} rank {r['rank']}: measured {r['measured'] / 2**20:.2f} MiB, planned {r['planned'] / 2**20:.2f} "
              f"MiB ({error:+.1%}), activations {r['activation_share']:.0%} of planned")
        assert abs(error) <= TOLERANCE, (f"{case} rank {r['rank']}: planned {r['planned'] / 2**20:.2f} MiB, "
                                         f"measured {r['measured'] / 2**20:.2f} MiB ({error:+.1%})")
    assert max(r["activation_share"] for r in results) > 0.3, "the case does not exercise the activation model"
