"""Uneven pipeline stages: the one split function, its one-line errors, the stage specs the runtime builds,
the FLOP balance of suggested splits, and the shipped 10B recipes (they resolve, balance and fit)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from m2megatron.config import ConfigError, load_config
from m2megatron.config.model import preset
from m2megatron.config.stage_split import layer_ranges, rank_layer_counts, stage_layer_counts
from m2megatron.models.m2_encoder import default_layer_ranges
from m2megatron.planning.memory import PlanInput, peak_rank, plan_memory
from m2megatron.planning.params import stage_parameters_per_rank
from m2megatron.planning.stage_balance import balanced_split, stage_forward_flops, stage_split, valid_splits
from m2megatron.runtime.stages import stage_specs

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
RECIPES = {"m2-10b_h100_256.yaml": 256, "m2-10b_h100.yaml": 192}
H100 = 80e9
RESERVE = 4 * 2 ** 30


def test_uneven_first_and_last_stages_and_the_rest_evenly():
    assert layer_ranges(21, 4, first=6, last=3) == [(0, 6), (6, 12), (12, 18), (18, 21)]
    assert layer_ranges(21, 3, last=5) == [(0, 8), (8, 16), (16, 21)]
    assert layer_ranges(21, 2, first=12) == [(0, 12), (12, 21)]
    assert layer_ranges(2, 2, first=0, last=2) == [(0, 0), (0, 2)]  # a stage of only embeddings


def test_virtual_stages_count_the_first_and_last_chunk():
    # PP=2 × VP=4: 8 global stages, stage v·PP + p is chunk v of rank p; the last chunk holds only VL + heads
    assert stage_layer_counts(21, 2, 4, last=0) == [3] * 7 + [0]
    assert rank_layer_counts(21, 2, 4, last=0) == [12, 9]
    specs = stage_specs(21, 2, 1, 4, last=0)
    assert [s.stage for s in specs] == [1, 3, 5, 7] and specs[-1].post_process and specs[-1].layer_range == (21, 21)
    assert [s.layer_range for s in stage_specs(6, 2, 0, 2, first=1, last=1)] == [(0, 1), (3, 5)]


@pytest.mark.parametrize("layers,pp,vp", [(2, 2, None), (4, 2, 2), (21, 3, None), (21, 7, None), (6, 3, 2)])
def test_the_even_split_is_unchanged(layers, pp, vp):
    ranges = layer_ranges(layers, pp, vp)
    assert ranges == default_layer_ranges(layers, pp * (vp or 1))
    for p in range(pp):
        assert [s.layer_range for s in stage_specs(layers, pp, p, vp)] == ranges[p::pp]


@pytest.mark.parametrize("overrides,world,message", [
    (["--parallel.first_stage_layers=1"], 1, "parallel.first_stage_layers: needs parallel.pipeline_parallel >= 2"),
    (["--parallel.pipeline_parallel=2", "--parallel.last_stage_layers=-1"], 2,
     "parallel.last_stage_layers: must be in 0..model.num_layers=2, got -1"),
    (["--parallel.pipeline_parallel=2", "--parallel.first_stage_layers=3"], 2,
     "parallel.first_stage_layers: must be in 0..model.num_layers=2, got 3"),
    (["--parallel.pipeline_parallel=2", "--parallel.first_stage_layers=1", "--parallel.last_stage_layers=0"], 2,
     "parallel.first_stage_layers: with 2 pipeline stages first_stage_layers=1 + last_stage_layers=0 must equal "
     "model.num_layers=2"),
    (["--parallel.pipeline_parallel=4", "--model.num_layers=6", "--parallel.first_stage_layers=1"], 4,
     "parallel.first_stage_layers: first_stage_layers=1 leaves 5 of model.num_layers=6 layers, which do not split "
     "evenly over the other 3 pipeline stages (at least 1 layer each)"),
    (["--parallel.pipeline_parallel=3", "--model.num_layers=4", "--parallel.first_stage_layers=2",
      "--parallel.last_stage_layers=2"], 3, "leaves 0 of model.num_layers=4 layers"),
    (["--parallel.pipeline_parallel=4", "--model.num_layers=6"], 4,
     "parallel.pipeline_parallel: 4 pipeline stages do not divide model.num_layers=6 (set "
     "parallel.first_stage_layers / last_stage_layers for an uneven split)"),
])
def test_impossible_splits_are_one_line_errors_naming_the_setting(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides).validate(world)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_planner_uses_the_real_stage_ranges():
    plan = PlanInput(model=preset("m2-10b"), tp=4, pp=4, dp=16, micro_batch=4, num_microbatches=16,
                     first_stage_layers=4, last_stage_layers=3, precision="bf16")
    ranks = plan_memory(plan)
    assert [r.num_layers for r in ranks] == [4, 7, 7, 3] and [r.layer_ranges for r in ranks][1] == [(4, 11)]
    assert ranks[3].parameters_count == stage_parameters_per_rank(plan.model, 4, num_layers=3, pre_process=False,
                                                                 post_process=True)


@pytest.mark.parametrize("pp,vp", [(2, None), (3, None), (4, None), (8, None), (2, 4), (4, 2), (3, 2)])
def test_balanced_splits_of_the_10b_model_are_within_one_percent(pp, vp):
    cfg = preset("m2-10b")
    best = balanced_split(cfg, pp, vp)
    assert best.spread < 0.01, (best, stage_layer_counts(21, pp, vp, best.first, best.last))
    assert all(s.imbalance >= best.imbalance for s in valid_splits(cfg, pp, vp))


def test_the_even_split_leaves_the_last_stage_busier():
    assert stage_split(preset("m2-10b"), 3).spread == pytest.approx(3 / 7, rel=0.01)  # 7 | 7 | 7 + 3 VL


def test_stage_flops_count_embeddings_first_and_the_vl_block_and_heads_last():
    cfg = preset("m2-10b")
    flops = stage_forward_flops(cfg, 3, None, None, 5)  # 8 | 8 | 5 + 3 VL
    assert flops[0] > flops[1] and abs(flops[2] / flops[1] - 1) < 0.01
    assert sum(flops) == pytest.approx(sum(stage_forward_flops(cfg, 1)))


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_shipped_10b_recipes_resolve_balance_their_stages_and_fit_in_80_gb(recipe):
    cfg = load_config(REPO / "launch" / "examples" / recipe)
    world = cfg.launch.world_size()
    assert world == RECIPES[recipe]
    cfg.validate(world)
    par = cfg.parallel
    assert cfg.num_microbatches(world) >= 4 * par.pipeline_parallel
    stages = stage_forward_flops(cfg.model, par.pipeline_parallel, par.virtual_pipeline, par.first_stage_layers,
                                 par.last_stage_layers)
    assert max(stages) / min(stages) - 1 <= 0.10, stages  # every (virtual) stage, embeddings and heads included
    split = stage_split(cfg.model, par.pipeline_parallel, par.virtual_pipeline, par.first_stage_layers,
                        par.last_stage_layers)
    assert split.spread <= 0.10
    plan = PlanInput.from_run_config(cfg, world, runtime_reserve_bytes=RESERVE)
    assert plan.precision == "bf16" and plan.distributed_optimizer
    assert peak_rank(plan).total <= H100


def test_config_command_resolves_the_256_gpu_recipe_at_its_launch_size():
    out = subprocess.run([sys.executable, "-m", "m2megatron.config", "--config",
                          str(REPO / "launch/examples/m2-10b_h100_256.yaml")], capture_output=True, text=True,
                         check=True).stdout
    assert "# layout (launch.nodes × launch.procs_per_node = 256 ranks): TP 2 × PP 2 × DP 64 × VP 4, " \
           "8 microbatches per step" in out
    assert "[18,21) [21,21) (+ the VL block and heads on the last)" in out


def test_plan_layout_tool_prints_the_recipe_as_fitting(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_layout", REPO / "tools" / "plan_layout.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--config", str(REPO / "launch/examples/m2-10b_h100_256.yaml"), "--no-search"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("fits=1 world_size=256 tp=2 pp=2 vp=4 dp=64 first_stage_layers=None "
                           "last_stage_layers=0 micro_batch=32 microbatches=8 "), last
