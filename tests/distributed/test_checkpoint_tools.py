"""The offline tools: inspect, consolidate (and load back at another layout), reshard (spawning its own ranks)."""

import importlib.util
import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from m2megatron.checkpoint import manifest, save_checkpoint
from m2megatron.checkpoint.atomic import resolve
from m2megatron.checkpoint.consolidate import read_full_tensors, sharded_region, tensor_index
from m2megatron.parallel import Layout, build_groups
from tests.checkpoint_toy import build_toy, train_toy

pytestmark = pytest.mark.distributed
TOOLS = Path(__file__).resolve().parents[2] / "tools"
TOY = {"toy": {"hidden": 32, "layers": 4}}


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(root):
    mp.current_process()._config["daemon"] = False  # Megatron's writer forks; pool workers are daemons
    groups = build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=2))
    chunks, opt, sched = build_toy(groups, **TOY["toy"])
    train_toy(chunks, opt, sched, groups, 0, 2)
    save_checkpoint(root, 2, chunks, opt, sched, groups=groups, config=TOY)


def _load_consolidated_matches(file, tp, pp):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from safetensors import safe_open

    from m2megatron.checkpoint import optimizer_state, state
    from m2megatron.checkpoint.consolidate import load_consolidated

    groups = build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=tp, pipeline_parallel=pp))
    chunks, _, _ = build_toy(groups, seed=5, **TOY["toy"])
    load_consolidated(file, chunks, groups)
    sharded = state.model_sharded_state_dict(chunks, optimizer_state.sharding_metadata(groups, None))
    checked = 0
    with safe_open(file, framework="pt") as f:
        for sh in nested_values(sharded):
            if isinstance(sh, ShardedTensor):
                want = f.get_slice(sh.key)[sharded_region(sh)]
                assert torch.equal(sh.data, want.reshape(sh.data.shape)), sh.key
                checked += 1
    return checked


@pytest.fixture(scope="module")
def saved(dist_pool, tmp_path_factory):
    root = tmp_path_factory.mktemp("tools") / "ckpt"
    dist_pool(2).run(_save, str(root))
    return resolve(root)


@pytest.mark.parametrize("name", ["inspect_checkpoint", "consolidate_checkpoint", "reshard_checkpoint"])
def test_every_tool_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _tool(name).main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_inspect_reports_step_layout_and_keys(saved, capsys):
    assert _tool("inspect_checkpoint").main([str(saved.parent), "--verify", "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["step"] == 2 and desc["layout"]["tensor_parallel"] == 2 and desc["problems"] == []
    assert desc["model_tensors"]["in_col.weight"]["shape"] == [128, 8]
    assert any(k.startswith("optimizer.state.exp_avg.") for k in desc["other_tensors"])
    assert _tool("inspect_checkpoint").main([str(saved)]) == 0
    assert "TP 2 × PP 1 × DP 1" in capsys.readouterr().out


def test_consolidate_then_load_back_at_another_layout(dist_pool, saved, tmp_path):
    assert _tool("consolidate_checkpoint").main([str(saved), str(tmp_path), "--batch-mib", "0"]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["step"] == 2 and config["config"] == TOY
    checked = dist_pool(2).run(_load_consolidated_matches, str(tmp_path / "model.safetensors"), 1, 2)
    assert all(n > 0 for n in checked)


def test_reshard_writes_the_target_layout_with_identical_tensors(saved, tmp_path):
    from m2megatron.checkpoint.reshard import reshard_on_this_rank
    from m2megatron.parallel.local_ranks import run_on_ranks
    from tests.checkpoint_toy import build_toy_from_config

    out = tmp_path / "resharded"
    run_on_ranks(2, reshard_on_this_rank, str(saved), str(out), 1, 2, True, build_toy_from_config)
    new = resolve(out)
    meta = manifest.read(new)
    assert meta["layout"]["pipeline_parallel"] == 2 and meta["step"] == 2
    want = dict(read_full_tensors(saved, tensor_index(saved, include_optimizer=True)))
    got = dict(read_full_tensors(new, tensor_index(new, include_optimizer=True)))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def _save_m2(root):
    from m2megatron.config import load_config
    from m2megatron.parallel import seed_everything
    from m2megatron.runtime import build_stages

    mp.current_process()._config["daemon"] = False
    groups = build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=2))
    seed_everything(3, groups)
    cfg = load_config(preset_name="tiny", overrides={"model": {"vocab_size": 1000}})
    stages = build_stages(cfg, groups)
    chunks, opt, sched = stages.chunks, stages.optimizer, stages.scheduler
    save_checkpoint(root, 1, chunks, opt, sched, groups=groups, config=cfg)
    from m2megatron.models import full_state_dict

    return {k: v.clone() for k, v in full_state_dict(chunks[0].module).items()}


def _m2_loads_at(root, tp, pp):
    from m2megatron.checkpoint import load_checkpoint
    from m2megatron.checkpoint.reshard import build_m2_from_config
    from m2megatron.config import load_config
    from m2megatron.models import full_state_dict

    groups = build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=tp, pipeline_parallel=pp))
    cfg = load_config(preset_name="tiny", overrides={"model": {"vocab_size": 1000}})
    chunks, opt, sched = build_m2_from_config(cfg.to_dict(), groups)
    load_checkpoint(root, chunks, opt, sched, groups=groups, config=cfg)
    return {k: v.clone() for k, v in full_state_dict(chunks[0].module).items()}


def test_m2_model_reshards_on_load_and_consolidates_to_the_project_file_format(dist_pool, tmp_path):
    from m2megatron.checkpoint.files import load_any

    pool = dist_pool(2)
    saved = pool.run(_save_m2, str(tmp_path / "m2"))[0]
    stages = pool.run(_m2_loads_at, str(tmp_path / "m2"), 1, 2)  # TP2 → PP2
    assert set(stages[0]) | set(stages[1]) == set(saved)
    for stage in stages:
        for k, v in stage.items():
            assert torch.equal(v, saved[k]), k
    assert _tool("consolidate_checkpoint").main([str(tmp_path / "m2"), str(tmp_path / "file")]) == 0
    cfg, full, _ = load_any(tmp_path / "file" / "model.safetensors")
    assert cfg.vocab_size == 1000 and full.keys() == saved.keys()
    for k in saved:
        assert torch.equal(full[k], saved[k]), k
