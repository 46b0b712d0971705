"""Distributed-optimizer state reshards across TP, PP and DP (the fully reshardable format).

The M2 model trains at TP1·PP2·DP2 with the distributed optimizer (torch Adam on CPU) and is saved. It is
resumed at TP2·PP1·DP2 (TP up, PP down) and at TP1·PP1·DP4 (DP up, PP down), on 4 ranks (8 ranks on 2 cores
took a minute); the bf16 test below goes TP down, and tests/distributed/test_checkpoint_resume.py loads model
and optimizer slices at PP up to 4. The reference at each new layout is a straight run started
from the same weights and optimizer state, built without our load path: the plain (non-distributed)
Megatron optimizer, its Adam moments set by hand from the checkpoint's full tensors (assembled offline
by torch.distributed.checkpoint) and its step from the checkpoint. The next steps' losses and the
updated parameters must agree to 1e-5 (fp32); the losses also agree with the run that went on at the
saved layout.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from m2megatron.config import load_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SIZES = ["--model.hidden_size=32", "--model.num_attention_heads=4", "--model.ffn_hidden_size=64",
         "--model.num_layers=4", "--model.num_vl_layers=1", "--model.image_size=16", "--model.patch_size=8",
         "--model.max_text_len=8", "--model.vocab_size=64", "--model.embed_dim=16", "--model.drop_path_rate=0",
         "--optim.optimizer=adam", "--optim.lr=0.001", "--optim.warmup_steps=1", "--optim.weight_decay=0.01",
         "--optim.clip_grad=0", "--train.seed=7", "--train.train_steps=8"]
GLOBAL_BATCH = 8
SAVED_AT = 2
MORE = 2
SAVED_LAYOUT = ["--parallel.pipeline_parallel=2"]


def _batches(cfg) -> list[dict]:
    gen = torch.Generator().manual_seed(123)
    out = []
    for _ in range(SAVED_AT + MORE):
        n, s = GLOBAL_BATCH, cfg.model.max_text_len
        mask = (torch.arange(s)[None, :] < torch.randint(2, s + 1, (n,), generator=gen)[:, None]).long()
        ids = torch.randint(0, cfg.model.vocab_size, (n, s), generator=gen) * mask
        images = torch.rand(n, 3, cfg.model.image_size, cfg.model.image_size, generator=gen) * 2 - 1
        out.append({"images": images, "text_ids": ids, "text_mask": mask})
    return out


def _build(layout: list[str], distributed: bool):
    from m2megatron.parallel import initialize, seed_everything
    from m2megatron.runtime import ContrastiveStep, build_stages

    cfg = load_config(overrides=SIZES + layout + [f"--parallel.distributed_optimizer={distributed}"])
    groups = initialize(cfg.parallel)
    seed_everything(cfg.train.seed, groups)
    stages = build_stages(cfg, groups)
    return cfg, groups, stages, ContrastiveStep(stages)


def _train(cfg, groups, stages, step_fn, first: int, num: int) -> list[float]:
    """Steps first..first+num-1 on this DP rank's rows of the global batches; the global loss per step."""
    losses = []
    rows = GLOBAL_BATCH // groups.layout.data_parallel
    for batch in _batches(cfg)[first:first + num]:
        mine = {k: v[groups.dp_rank * rows:(groups.dp_rank + 1) * rows] for k, v in batch.items()}
        for chunk in stages.chunks:
            chunk.zero_grad_buffer()
        stages.optimizer.zero_grad()
        loss = step_fn([{**mine, "microbatch": 0}])
        value = torch.zeros(1)
        if loss is not None:
            value += float(loss)
            dist.all_reduce(value, group=groups.dp)
            value /= groups.layout.data_parallel
        losses.append(value.item())
        stages.optimizer.step()
        stages.scheduler.step(increment=1)
    return losses


def _result(groups, stages, losses) -> dict:
    from m2megatron.models.state import full_state_dict

    params = {}
    for module in stages.modules:
        params.update({k: v.detach().clone() for k, v in full_state_dict(module).items()})
    return {"losses": losses, "last": groups.is_last_stage, "params": params}


def _train_and_save(root: str) -> dict:
    from m2megatron.checkpoint import save_checkpoint

    cfg, groups, stages, step_fn = _build(SAVED_LAYOUT, distributed=True)
    _train(cfg, groups, stages, step_fn, 0, SAVED_AT)
    save_checkpoint(root, SAVED_AT, stages.chunks, stages.optimizer, stages.scheduler, groups=groups, config=cfg)
    return _result(groups, stages, _train(cfg, groups, stages, step_fn, SAVED_AT, MORE))


def _resume(root: str, layout: list[str]) -> dict:
    from m2megatron.checkpoint import load_checkpoint

    cfg, groups, stages, step_fn = _build(layout, distributed=True)
    loaded = load_checkpoint(root, stages.chunks, stages.optimizer, stages.scheduler, groups=groups, config=cfg)
    assert loaded.step == SAVED_AT and not loaded.same_layout
    return _result(groups, stages, _train(cfg, groups, stages, step_fn, SAVED_AT, MORE))


def _set_adam_state_by_hand(root: str, stages, groups, step: int) -> int:
    """The plain optimizer's torch Adam state of every local parameter, from the checkpoint's full tensors."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from m2megatron.checkpoint import optimizer_state, state
    from m2megatron.checkpoint.atomic import resolve
    from m2megatron.checkpoint.consolidate import read_full_tensors, sharded_region, tensor_index

    sharded = state.model_sharded_state_dict(stages.chunks, optimizer_state.sharding_metadata(groups, None))
    by_data = {sh.data.data_ptr(): sh for sh in nested_values(sharded) if isinstance(sh, ShardedTensor)}
    path = resolve(root)
    index = tensor_index(path, include_optimizer=True)
    wanted = {k: v for k, v in index.items()
              if k.split(".", 3)[-1] in {sh.key for sh in by_data.values()} and k.startswith("optimizer.state.")}
    full = dict(read_full_tensors(path, wanted))
    count = 0
    for part in optimizer_state.parts(stages.optimizer):
        for group in part.optimizer.param_groups:
            for p in group["params"]:
                sh = by_data[p.data_ptr()]

                def saved(name, sh=sh, p=p):
                    return full[f"optimizer.state.{name}.{sh.key}"][sharded_region(sh)].reshape(p.shape).clone()

                assert torch.equal(saved("param"), p.detach()), f"main weights of {sh.key} differ from the model's"
                part.optimizer.state[p] = {"step": torch.tensor(float(step)), "exp_avg": saved("exp_avg"),
                                           "exp_avg_sq": saved("exp_avg_sq")}
                count += 1
    return count


def _straight_from_the_same_state(root: str, layout: list[str]) -> dict:
    from m2megatron.checkpoint import load_checkpoint

    cfg, groups, stages, step_fn = _build(layout, distributed=False)
    loaded = load_checkpoint(root, stages.chunks, None, stages.scheduler, groups=groups, config=cfg)  # weights
    assert _set_adam_state_by_hand(root, stages, groups, loaded.step) > 0
    return _result(groups, stages, _train(cfg, groups, stages, step_fn, loaded.step, MORE))


def _merge(results: list[dict]) -> tuple[list[float], dict]:
    params: dict = {}
    for r in results:
        params.update(r["params"])
    return next(r["losses"] for r in results if r["last"]), params


def _assert_close(a, b, tol=1e-5):
    (losses_a, params_a), (losses_b, params_b) = a, b
    assert losses_a == pytest.approx(losses_b, abs=tol), (losses_a, losses_b)
    assert params_a.keys() == params_b.keys()
    worst = max((params_a[k] - params_b[k]).abs().max().item() for k in params_a)
    assert worst <= tol, f"max parameter difference {worst}"


def test_distributed_optimizer_state_resumes_at_other_tp_and_pp(dist_pool, tmp_path):
    pool = dist_pool(4)
    root = str(tmp_path / "ckpt")
    went_on = _merge(pool.run(_train_and_save, root))
    for layout in (["--parallel.tensor_parallel=2"], []):
        resumed = _merge(pool.run(_resume, root, layout))
        reference = _merge(pool.run(_straight_from_the_same_state, root, layout))
        _assert_close(resumed, reference)
        # The same steps at the saved layout: the losses agree (parameters differ by rounding order only).
        assert resumed[0] == pytest.approx(went_on[0], abs=1e-5)


# --- bf16 parameters: the fp32 main weights are part of the state and come back at another layout ---------

def _toy(tp: int, distributed: bool, seed: int = 1234):
    import multiprocessing as mp

    from m2megatron.parallel import Layout, build_groups
    from tests.checkpoint_toy import build_toy

    mp.current_process()._config["daemon"] = False  # Megatron's writer forks; pool workers are daemons
    groups = build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=tp))
    return groups, *build_toy(groups, distributed=distributed, bf16=True, seed=seed)


def _local_main_weights(chunks, optimizer, groups) -> dict[str, tuple[torch.Tensor, slice, tuple]]:
    """{checkpoint key: (this rank's fp32 main weights, their flat range in the TP-local tensor, TP region)}."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from m2megatron.checkpoint import optimizer_state, state
    from m2megatron.checkpoint.consolidate import sharded_region

    sharded = state.model_sharded_state_dict(chunks, optimizer_state.sharding_metadata(groups, None))
    by_data = {sh.data.data_ptr(): sh for sh in nested_values(sharded) if isinstance(sh, ShardedTensor)}
    out = {}
    for part in optimizer_state.parts(optimizer):
        if isinstance(part, DistributedOptimizer):
            for model_param in part.model_param_group_index_map:
                sh = by_data[model_param.data_ptr()]
                where = part._get_model_param_range_map(model_param)["param"]
                main = part._get_main_param_and_optimizer_states(model_param)["param"]
                out[sh.key] = (main.detach().clone(), slice(where.start, where.end), sharded_region(sh))
        else:  # Float16OptimizerWithFloat16Params: fp32 copies beside the bf16 groups
            for model_group, main_group in zip(part.float16_groups, part.fp32_from_float16_groups):
                for model_param, main in zip(model_group, main_group):
                    sh = by_data[model_param.data_ptr()]
                    out[sh.key] = (main.detach().clone().flatten(), slice(None), sharded_region(sh))
    return out


def _bf16_save(root: str, distributed: bool) -> None:
    from m2megatron.checkpoint import save_checkpoint
    from tests.checkpoint_toy import train_toy

    groups, chunks, opt, sched = _toy(2, distributed)
    train_toy(chunks, opt, sched, groups, 0, 3)
    save_checkpoint(root, 3, chunks, opt, sched, groups=groups)


def _bf16_load_at_tp1(root: str, distributed: bool) -> dict:
    from m2megatron.checkpoint import load_checkpoint
    from m2megatron.checkpoint.atomic import resolve
    from m2megatron.checkpoint.consolidate import read_full_tensors, tensor_index

    groups, chunks, opt, sched = _toy(1, distributed, seed=999)
    load_checkpoint(root, chunks, opt, sched, groups=groups)
    path = resolve(root)
    name = "param" if distributed else "fp32_param"
    index = tensor_index(path, include_optimizer=True)
    full = dict(read_full_tensors(path, {k: v for k, v in index.items() if k.startswith(f"optimizer.state.{name}.")}))
    model = dict(read_full_tensors(path, tensor_index(path)))
    checked, finer = 0, 0
    for key, (main, flat, region) in _local_main_weights(chunks, opt, groups).items():
        saved = full[f"optimizer.state.{name}.{key}"]
        assert saved.dtype == torch.float32 and model[key].dtype == torch.bfloat16
        assert torch.equal(main, saved[region].flatten()[flat]), key
        finer += int(not torch.equal(saved, model[key].float()))  # more than the bf16 weights hold
        checked += 1
    return {"checked": checked, "finer": finer}


@pytest.mark.parametrize("distributed", [False, True], ids=["float16_optimizer", "distributed_optimizer"])
def test_bf16_fp32_main_weights_are_saved_and_resharded(dist_pool, tmp_path, distributed):
    pool = dist_pool(2)
    pool.run(_bf16_save, str(tmp_path), distributed)  # TP2
    results = pool.run(_bf16_load_at_tp1, str(tmp_path), distributed)  # TP1 (× DP2)
    assert all(r["checked"] > 0 and r["finer"] > 0 for r in results), results
