"""Resume is exact, and checkpoints reshard on load (model and optimizer), on a small Megatron stand-in model.

The stand-in (tests.checkpoint_toy) has tensor-parallel linears, a TransformerBlock and a replicated
head, DDP-wrapped and trained with Megatron's optimizer and LR schedule like the trainer does.
"""

import multiprocessing as mp

import pytest
import torch
import torch.distributed as dist

from m2megatron.checkpoint import Checkpointer, CheckpointError, load_checkpoint, save_checkpoint
from m2megatron.checkpoint.consolidate import read_full_tensors, sharded_region, tensor_index
from m2megatron.parallel import Layout, build_groups
from tests.checkpoint_toy import build_toy, train_toy

pytestmark = pytest.mark.distributed


def _setup(tp=1, pp=1, **toy):
    # The harness's workers are daemonic; Megatron's writer forks helper processes, which a daemon may not.
    mp.current_process()._config["daemon"] = False
    groups = build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=tp, pipeline_parallel=pp))
    chunks, opt, sched = build_toy(groups, **toy)
    return groups, chunks, opt, sched


def _local_params(chunks):
    return {k: v.detach().clone() for k, v in chunks[0].module.state_dict().items() if torch.is_tensor(v)}


def _straight(root, tp, steps, distributed=False):
    groups, chunks, opt, sched = _setup(tp, distributed=distributed)
    losses = train_toy(chunks, opt, sched, groups, 0, steps)
    if root:
        save_checkpoint(root, steps, chunks, opt, sched, groups=groups)
    return losses, _local_params(chunks), torch.get_rng_state()


def _first_half(root, tp, steps, distributed=False):
    groups, chunks, opt, sched = _setup(tp, distributed=distributed)
    losses = train_toy(chunks, opt, sched, groups, 0, steps)
    save_checkpoint(root, steps, chunks, opt, sched, groups=groups, extra_state={"consumed": steps * 8},
                    rank_state={"rank": dist.get_rank()})
    return losses


def _second_half(root, tp, steps, distributed=False, final_root=None):
    # A different seed proves that everything the run depends on comes from the checkpoint.
    groups, chunks, opt, sched = _setup(tp, distributed=distributed, seed=999)
    loaded = load_checkpoint(root, chunks, opt, sched, groups=groups)
    losses = train_toy(chunks, opt, sched, groups, loaded.step, steps)
    if final_root:
        save_checkpoint(final_root, loaded.step + steps, chunks, opt, sched, groups=groups)
    return losses, _local_params(chunks), torch.get_rng_state(), loaded


def _full(root):
    from m2megatron.checkpoint.atomic import resolve

    path = resolve(root)
    return dict(read_full_tensors(path, tensor_index(path, include_optimizer=True)))


@pytest.mark.parametrize("distributed", [False, True], ids=["adam", "distributed_adam"])
def test_resume_at_same_layout_is_bit_exact(dist_pool, tmp_path, distributed):
    tp = 1 if distributed else 2  # the distributed optimizer shards over DP: use TP1 × DP2
    pool = dist_pool(2)
    straight = pool.run(_straight, None, tp, 4, distributed)
    first = pool.run(_first_half, str(tmp_path), tp, 2, distributed)
    second = pool.run(_second_half, str(tmp_path), tp, 2, distributed)
    for rank in range(2):
        losses, params, rng_state = straight[rank]
        resumed_losses, resumed_params, resumed_rng, loaded = second[rank]
        assert first[rank] + resumed_losses == losses
        assert params.keys() == resumed_params.keys()
        for k in params:
            assert torch.equal(params[k], resumed_params[k]), k
        assert torch.equal(rng_state, resumed_rng), "RNG streams were not restored"
        assert loaded.same_layout and loaded.rng_restored and loaded.step == 2
        assert loaded.extra_state == {"consumed": 16} and loaded.rank_state == {"rank": rank}


def test_resume_across_layout_change_matches_to_1e5(dist_pool, tmp_path):
    """Train TP2 for 2 steps, resume at TP1×DP2 for 2 more; compare with 4 straight TP2 steps."""
    pool = dist_pool(2)
    straight = pool.run(_straight, str(tmp_path / "straight"), 2, 4)
    pool.run(_first_half, str(tmp_path / "half"), 2, 2)
    second = pool.run(_second_half, str(tmp_path / "half"), 1, 2, False, str(tmp_path / "resumed"))
    losses = straight[0][0]
    resumed_losses, _, _, loaded = second[0]
    assert not loaded.same_layout and not loaded.rng_restored and loaded.rank_state is None
    assert loaded.saved_rank_states == {(0, 0, 0): {"rank": 0}, (0, 1, 0): {"rank": 1}}
    assert resumed_losses == pytest.approx(losses[2:], abs=1e-5)
    want, got = _full(tmp_path / "straight"), _full(tmp_path / "resumed")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)


def _shards_match_full(root, tp, pp):
    """Load at (tp, pp) and compare every local model and optimizer slice with the full saved tensors."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from m2megatron.checkpoint import optimizer_state, state

    groups, chunks, opt, sched = _setup(tp, pp, seed=77)
    loaded = load_checkpoint(root, chunks, opt, sched, groups=groups)
    metadata = optimizer_state.sharding_metadata(groups, opt)
    sharded = state.model_sharded_state_dict(chunks, metadata)
    sharded["optimizer"] = opt.sharded_state_dict(sharded, is_loading=False, metadata=metadata)
    full = _full(root)
    checked = 0
    for sh in nested_values(sharded):
        if not isinstance(sh, ShardedTensor):
            continue
        want = full[sh.key][sharded_region(sh)]
        assert torch.equal(sh.data, want.reshape(sh.data.shape)), sh.key
        checked += 1
    return loaded.step, checked, sched.num_steps


def test_reshard_on_load_to_other_tp_pp_dp(dist_pool, tmp_path):
    pool2, pool4 = dist_pool(2), dist_pool(4)
    pool2.run(_first_half, str(tmp_path), 2, 2)
    for pool, tp, pp in [(pool2, 1, 2), (pool2, 1, 1), (pool4, 2, 2), (pool4, 1, 4)]:
        results = pool.run(_shards_match_full, str(tmp_path), tp, pp)
        assert all(step == 2 and checked > 0 and sched_steps == 2 for step, checked, sched_steps in results), \
            (tp, pp, results)


def _first_half_old_format(root, tp, steps):
    """A distributed-optimizer checkpoint as written before issue 15 (dp_reshardable buckets)."""
    from m2megatron.checkpoint import optimizer_state

    optimizer_state.WRITE_FORMAT = optimizer_state.DP_RESHARDABLE
    try:
        return _first_half(root, tp, steps, True)
    finally:
        optimizer_state.WRITE_FORMAT = optimizer_state.FULLY_RESHARDABLE


def _dist_opt_to_tp2(root):
    groups, chunks, opt, sched = _setup(2, distributed=True)
    try:
        load_checkpoint(root, chunks, opt, sched, groups=groups)
    except CheckpointError as exc:
        return str(exc)
    return "loaded"


def test_old_dp_reshardable_checkpoints_still_load_across_dp_and_refuse_a_tp_change(dist_pool, tmp_path):
    from m2megatron.checkpoint import manifest
    from m2megatron.checkpoint.atomic import resolve

    pool2, pool4 = dist_pool(2), dist_pool(4)
    straight = pool2.run(_straight, None, 1, 4, True)
    pool2.run(_first_half_old_format, str(tmp_path), 1, 2)
    assert manifest.read(resolve(tmp_path))["optimizer"]["format"] == "dp_reshardable"
    second = pool4.run(_second_half, str(tmp_path), 1, 2, True)  # DP2 → DP4
    assert second[0][0] == pytest.approx(straight[0][0][2:], abs=1e-5)
    message = pool2.run(_dist_opt_to_tp2, str(tmp_path))[0]
    assert "reshards only across DP" in message and "TP=1" in message and "load_mode=weights" in message


def _async_vs_sync(root_sync, root_async):
    groups, chunks, opt, sched = _setup(2)
    train_toy(chunks, opt, sched, groups, 0, 2)
    save_checkpoint(root_sync, 2, chunks, opt, sched, groups=groups)
    ckpt = Checkpointer(root_async, groups, async_save=True)
    ckpt.save(2, chunks, opt, sched)
    train_toy(chunks, opt, sched, groups, 2, 2)  # changes parameters while the writer runs
    published = ckpt.poll() + ckpt.wait()
    return published


def test_async_save_snapshots_the_state_at_save_time(dist_pool, tmp_path):
    results = dist_pool(2).run(_async_vs_sync, str(tmp_path / "sync"), str(tmp_path / "async"))
    assert results[0] == [2]
    want, got = _full(tmp_path / "sync"), _full(tmp_path / "async")
    for k in want:
        assert torch.equal(want[k], got[k]), k
