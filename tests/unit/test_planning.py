"""The memory and layout planners (m2megatron/planning), their tools, and the GPU check script.

The planners' agreement with measured memory is tests/distributed/test_memory_planner.py.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from m2megatron.config.model import preset
from m2megatron.planning import GPUS, Cluster, PlanInput, plan_layouts, plan_memory
from m2megatron.planning.activations import microbatches_in_flight
from m2megatron.planning.params import stage_parameters_per_rank

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pre,post,layer_range", [(True, True, None), (True, False, (0, 1)), (False, True, (1, 2))])
def test_parameter_count_per_rank_equals_the_model_built_on_meta(tp, pre, post, layer_range):
    from m2megatron.runtime.shapes import build_on_meta

    cfg = preset("tiny")
    model = build_on_meta(cfg, tp_size=tp, pre_process=pre, post_process=post, layer_range=layer_range)
    layers = cfg.num_layers if layer_range is None else layer_range[1] - layer_range[0]
    assert sum(p.numel() for p in model.parameters()) == stage_parameters_per_rank(
        cfg, tp, num_layers=layers, pre_process=pre, post_process=post)


def _plan(**kw):
    base = dict(model=preset("m2-1b"), tp=2, pp=3, dp=4, micro_batch=8, num_microbatches=8, precision="bf16")
    return PlanInput(**{**base, **kw})


def test_categories_add_up_and_every_stage_is_planned():
    ranks = plan_memory(_plan())
    assert [r.pp_rank for r in ranks] == [0, 1, 2]
    for r in ranks:
        assert r.total == pytest.approx(sum(r.bytes.values())) and min(r.bytes.values()) >= 0
    assert ranks[-1].bytes["loss"] > 0 and ranks[0].bytes["loss"] == 0  # the loss lives on the last stage


def test_distributed_optimizer_divides_the_optimizer_state_by_dp():
    plain, sharded = plan_memory(_plan())[0], plan_memory(_plan(distributed_optimizer=True))[0]
    assert sharded.bytes["optimizer"] * 4 == pytest.approx(plain.bytes["optimizer"])
    assert sharded.optimizer_alternative == pytest.approx(plain.bytes["optimizer"])
    assert plain.bytes["optimizer"] == 12 * plain.parameters_count  # fp32 master + two Adam moments


def test_recompute_and_smaller_microbatches_shrink_activations():
    full = plan_memory(_plan())[0].bytes["activations"]
    assert plan_memory(_plan(recompute="full"))[0].bytes["activations"] < full / 3
    assert plan_memory(_plan(micro_batch=4, num_microbatches=16))[0].bytes["activations"] < full


def test_1f1b_first_stage_holds_pp_microbatches_and_interleaving_more():
    assert [microbatches_in_flight(pp=4, pp_rank=p, vp=None, num_microbatches=8) for p in range(4)] == [4, 3, 2, 1]
    assert microbatches_in_flight(pp=4, pp_rank=0, vp=None, num_microbatches=2) == 2
    assert microbatches_in_flight(pp=4, pp_rank=0, vp=2, num_microbatches=8) == (2 * 3 + 4 + 1) / 2


def test_bad_layouts_are_refused_with_the_setting_named():
    with pytest.raises(ValueError, match="parallel.pipeline_parallel: 4 pipeline stages do not divide"):
        _plan(pp=4)  # 21 layers, even split
    with pytest.raises(ValueError, match="parallel.last_stage_layers"):
        _plan(pp=4, last_stage_layers=2)  # 19 layers do not split over 3 stages
    with pytest.raises(ValueError, match="tp"):
        _plan(tp=3)


def test_10b_layouts_on_256_gpus_fit_and_are_sorted_by_step_time():
    model = preset("m2-10b")
    rows = {}
    for gpu in ("h100", "h200"):
        cluster = Cluster(num_gpus=256, gpu_memory=GPUS[gpu])
        rows[gpu] = plan_layouts(model, cluster, global_batch=16384, precision="bf16", micro_batches=(8, 32),
                                 recompute_modes=("none", "full"), sequence_parallel=(False,))
        assert rows[gpu], f"no layout fits on {gpu}"
        # 21 layers and 256 = 2^8 GPUs: pipelined rows exist only through uneven splits
        assert any(r.plan.pp > 1 and r.plan.last_stage_layers is not None for r in rows[gpu])
        assert all(r.memory <= GPUS[gpu] for r in rows[gpu])
        assert [r.step_s for r in rows[gpu]] == sorted(r.step_s for r in rows[gpu])
        best = rows[gpu][0]
        assert best.loss_bytes["G=node"] < best.loss_bytes["G=P"] == pytest.approx(best.loss_bytes["A=M"])
    assert len(rows["h200"]) >= len(rows["h100"])


def test_step_time_counts_the_stage_imbalance_and_the_bubble():
    from m2megatron.planning.layouts import estimate

    cluster = Cluster(num_gpus=96, gpu_memory=GPUS["h100"])
    even, balanced = (estimate(_plan(model=preset("m2-10b"), tp=4, pp=3, dp=8, num_microbatches=16,
                                     last_stage_layers=last), cluster) for last in (None, 5))
    assert even.imbalance == pytest.approx(1 + (10 - 8) / 8, rel=0.01) and balanced.imbalance < 1.01
    assert balanced.step_s < even.step_s and even.bubble == balanced.bubble == pytest.approx(2 / 16)


def test_plan_memory_tool_prints_a_summary_line(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_memory", REPO / "tools" / "plan_memory.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--preset", "m2-10b", "--tp", "4", "--pp", "3", "--dp", "8", "--micro-batch", "4",
               "--microbatches", "4", "--distributed-optimizer", "--recompute"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"peak_gib=[\d.]+ peak_pp_rank=\d forward_gflops_per_sample=[\d.]+ "
                        r"train_gflops_per_sample=[\d.]+", last), last


def test_plan_input_from_run_config_reads_the_trainer_settings():
    from m2megatron.config import load_config

    cfg = load_config(overrides=["--parallel.pipeline_parallel=2", "--train.micro_batch_size=4",
                                 "--train.global_batch_size=32", "--train.recompute=full"])
    plan = PlanInput.from_run_config(cfg, world_size=4)
    assert (plan.pp, plan.dp, plan.micro_batch, plan.num_microbatches, plan.recompute) == (2, 2, 4, 4, "full")
    assert dataclasses.replace(plan, precision="fp32").precision == "fp32"


# --- tests/gpu/run.sh ---------------------------------------------------------------------------------


def test_gpu_script_is_valid_bash():
    bash = shutil.which("bash")
    assert bash
    run = subprocess.run([bash, "-n", str(REPO / "tests/gpu/run.sh")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_gpu_script_runs_every_gpu_marked_test_file():
    script = (REPO / "tests/gpu/run.sh").read_text()
    listed = set(re.findall(r"tests/gpu/test_\w+\.py", script))
    marked = {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
              if re.search(r"pytest\.mark\.gpu\b", p.read_text(encoding="utf-8"))}
    assert marked <= listed, f"tests/gpu/run.sh misses {sorted(marked - listed)}"


# --- planner modes: bf16 weights, sequence parallelism, recompute, overlap ------------------------------------------


def test_bytes_per_parameter_follow_megatron_mixed_precision_and_the_distributed_optimizer():
    from m2megatron.planning.memory import bytes_per_parameter

    # train.precision=bf16 + distributed optimizer: bf16 weights in DDP's param buffer, fp32 main grads in its
    # grad buffer (never sharded), fp32 main weights + two Adam moments sharded over DP
    assert bytes_per_parameter(_plan(precision="bf16", distributed_optimizer=True)) == (2, 4, 12, 3)
    assert bytes_per_parameter(_plan(precision="fp16")) == (2, 4, 12, 3)
    # fp32 and bf16-autocast: the fp32 weights are the main weights, no copy
    assert bytes_per_parameter(_plan(precision="fp32")) == (4, 4, 8, 2)
    assert bytes_per_parameter(_plan(precision="bf16-autocast")) == (4, 4, 8, 2)


def test_overlap_settings_add_no_memory():
    base = plan_memory(_plan(distributed_optimizer=True))
    overlapped = plan_memory(_plan(distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True))
    assert [r.total for r in base] == [r.total for r in overlapped]


def test_sequence_parallel_shards_the_replicated_activations_and_pads_segments():
    from m2megatron.planning import activations as act

    plain, sp = _plan(tp=4), _plan(tp=4, sequence_parallel=True)
    assert act.segments(sp.model, sp.activation_mode()) == (200, 52)  # 197 image tokens padded to 4·50
    a, b = plan_memory(plain)[1], plan_memory(sp)[1]
    assert b.activations_per_microbatch < 0.85 * a.activations_per_microbatch
    assert b.bytes["communication"] < a.bytes["communication"] / 3  # the stage output is sequence-sharded
    assert plan_memory(_plan(tp=1, sequence_parallel=True))[1].total == plan_memory(_plan(tp=1))[1].total


def test_selective_recompute_drops_only_the_attention_probabilities():
    import dataclasses as dc

    unfused = dc.replace(preset("m2-1b"), attention="megatron")  # Megatron's attention keeps its probabilities
    none, selective = plan_memory(_plan(model=unfused))[1], plan_memory(_plan(model=unfused, recompute="selective"))[1]
    assert selective.activations_per_microbatch < none.activations_per_microbatch
    full = plan_memory(_plan(model=unfused, recompute="full"))[1]
    assert selective.activations_per_microbatch > full.activations_per_microbatch
    fused = dc.replace(preset("m2-1b"), attention="sdpa")  # fused attention keeps no probabilities anyway
    assert (plan_memory(_plan(model=fused, recompute="selective"))[1].total
            == pytest.approx(plan_memory(_plan(model=fused))[1].total))


def test_full_recompute_methods_keep_what_megatron_keeps():
    def kept(**kw):
        return plan_memory(_plan(recompute="full", **kw))[1].activations_per_microbatch

    # a stage of 7 layers per tower. uniform: one input per group of k layers; block: the first k layers
    # keep their input, the others everything
    assert kept(recompute_num_layers=7) < kept(recompute_num_layers=1)
    assert kept(recompute_method="block", recompute_num_layers=7) == pytest.approx(kept())
    everything = plan_memory(_plan())[1].activations_per_microbatch
    assert kept() < kept(recompute_method="block", recompute_num_layers=3) < everything


def test_plan_input_reads_every_memory_mode_from_the_run_config():
    from m2megatron.config import load_config

    cfg = load_config(overrides=["--parallel.tensor_parallel=2", "--parallel.pipeline_parallel=2",
                                 "--model.num_layers=3", "--parallel.first_stage_layers=1",
                                 "--parallel.sequence_parallel=true", "--train.precision=bf16",
                                 "--train.recompute=selective", "--parallel.distributed_optimizer=true",
                                 "--parallel.overlap_grad_reduce=true", "--parallel.overlap_param_gather=true"])
    plan = PlanInput.from_run_config(cfg, world_size=8)
    assert (plan.first_stage_layers, plan.sequence_parallel, plan.precision, plan.recompute) == (1, True, "bf16",
                                                                                                   "selective")
    assert plan.overlap_grad_reduce and plan.overlap_param_gather and plan.distributed_optimizer
    assert [r.layer_ranges for r in plan_memory(plan)] == [[(0, 1)], [(1, 3)]]
