"""The data position across a layout change, through StageBatches and the checkpoint: a run at TP2·DP2 saves
after k steps; resumed at DP4 (TP1) or at TP2·DP1, the new reading ranks read exactly the samples of the
epoch no saved reader had returned (none repeated, none dropped)."""

from __future__ import annotations

import collections
import json

import pytest

from m2megatron.config.data import DataConfig
from m2megatron.data.build import build_train_loader, resolve_tokenizer
from m2megatron.data.tokenizer import Tokenizer
from tests.data_samples import write_jsonl_set, write_mixed_shards

pytestmark = pytest.mark.distributed

SIZE, SEED, M, STEPS_BEFORE = 32, 3, 2, 3


class _Recording:
    """A reading rank's loader that records (epoch, key) of every sample it returns (micro batch size 1)."""

    def __init__(self, loader):
        self.inner, self.seen = loader, []

    def __next__(self):
        batch = next(self.inner)
        self.seen += [(self.inner.epoch, k) for k in batch["keys"]]
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _stage_batches(cfg_kwargs: dict, sp_model: str, tp: int):
    import torch.distributed as dist

    from m2megatron.data.stage_batches import StageBatches
    from m2megatron.parallel import Layout, build_groups

    groups = build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=tp))
    batches = StageBatches(DataConfig(**cfg_kwargs), Tokenizer(sp_model, max_length=16), image_size=SIZE,
                           micro_batch_size=1, num_microbatches=M, groups=groups, seed=SEED)
    if batches.is_reader:
        batches.loader = _Recording(batches.loader)
    return groups, batches


def _before(cfg_kwargs: dict, sp_model: str, root: str | None) -> dict:
    """TP2·DP2: STEPS_BEFORE steps, then the state of every rank (saved in a checkpoint when `root`)."""
    groups, batches = _stage_batches(cfg_kwargs, sp_model, tp=2)
    for _ in range(STEPS_BEFORE):
        batches.next_step()
    state = json.loads(json.dumps(batches.state_dict()))
    if root:
        from m2megatron.checkpoint import save_checkpoint
        from tests.checkpoint_toy import build_toy

        chunks, opt, sched = build_toy(groups)
        save_checkpoint(root, STEPS_BEFORE, chunks, opt, sched, groups=groups, rank_state={"loader": state})
    seen = batches.loader.seen if batches.is_reader else []
    batches.close()
    return {"state": state, "seen": seen}


def _after(cfg_kwargs: dict, sp_model: str, tp: int, states: list[dict] | None, root: str | None,
           steps: int) -> dict:
    """At TP `tp`: resume from `states` (or from the checkpoint under `root`, as the trainer does) and run."""
    groups, batches = _stage_batches(cfg_kwargs, sp_model, tp=tp)
    if root:
        from m2megatron.checkpoint import load_checkpoint
        from m2megatron.train.checkpointing import restore_data_position
        from tests.checkpoint_toy import build_toy

        chunks, opt, sched = build_toy(groups)
        loaded = load_checkpoint(root, chunks, opt, sched, groups=groups)
        assert not loaded.same_layout
        restore_data_position(batches, loaded)
    else:
        batches.load_global_state(states)
    skipped_at_resume = batches.skipped()
    for _ in range(steps):
        batches.next_step()
    seen = batches.loader.seen if batches.is_reader else []
    batches.close()
    return {"seen": seen, "reader": batches.is_reader, "skipped_at_resume": skipped_at_resume}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("position")
    tok = resolve_tokenizer(DataConfig(), max_length=16, cache_dir=root / "tok")
    return {"tok": tok, "shards": write_mixed_shards(root / "wds", num_shards=4, per_shard=10),
            "jsonl": str(write_jsonl_set(root / "jsonl", num_samples=24))}


def _epoch_0(cfg: DataConfig, tok) -> collections.Counter:
    loader = build_train_loader(cfg, tokenizer=tok, image_size=SIZE, micro_batch_size=1, seed=SEED, gpu=False)
    keys = []
    while True:
        batch = next(loader)
        if loader.epoch > 0:
            break
        keys += batch["keys"]
    loader.close()
    return collections.Counter(keys)


@pytest.mark.parametrize("source", ["webdataset", "synthetic", "jsonl"])
def test_resume_at_dp4_and_at_tp2_dp1_reads_each_unread_sample_of_the_epoch_once(dist_pool, data, tmp_path, source):
    cfg_kwargs = dict(source=source, shards=[data["shards"]], jsonl=data["jsonl"], synthetic_train_samples=24,
                      decoder="pil", num_workers=0, prefetch=2, shuffle_block=3)
    sp_model = str(data["tok"].path)
    epoch = _epoch_0(DataConfig(**cfg_kwargs), data["tok"])
    root = str(tmp_path / "ckpt") if source == "webdataset" else None  # the trainer's path: through a checkpoint
    before = dist_pool(4).run(_before, cfg_kwargs, sp_model, root)
    states = [r["state"] for r in before]
    seen_before = [k for r in before for e, k in r["seen"] if e == 0]
    assert len(seen_before) == 2 * STEPS_BEFORE * M and {r["seen"] == [] for r in before[1::2]} == {True}
    saved_skips = sum((collections.Counter(r["state"].get("skipped", {})) for r in before), collections.Counter())
    for world, tp in ((4, 1), (2, 2)):
        readers = world // tp
        steps = (sum(epoch.values()) - len(seen_before)) // (readers * M) + 8  # past the epoch's end on every reader
        after = dist_pool(world).run(_after, cfg_kwargs, sp_model, tp, states, root, steps)
        seen_after = [k for r in after for e, k in r["seen"] if e == 0]
        assert collections.Counter(seen_before + seen_after) == epoch, (world, tp)
        assert all(any(e == 1 for e, _ in r["seen"]) for r in after if r["reader"])
        assert after[0]["skipped_at_resume"] == dict(saved_skips)  # carried over, summed into DP rank 0
        assert all(r["skipped_at_resume"] == {} for r in after[1:])


TRAINER = ["--model.hidden_size=32", "--model.ffn_hidden_size=64", "--model.num_layers=2", "--model.num_vl_layers=1",
           "--model.image_size=16", "--model.patch_size=8", "--model.max_text_len=12", "--model.embed_dim=16",
           "--train.micro_batch_size=8", "--train.eval_at_end=false", "--train.tensorboard=false",
           "--data.synthetic_train_samples=64"]


def _train(run_dir: str, overrides: list[str]) -> None:
    from m2megatron.config import load_config
    from m2megatron.train.run import train_and_evaluate

    train_and_evaluate(load_config(overrides=TRAINER + [f"--train.run_dir={run_dir}"] + overrides))


def _resumed_reader_work(run_dir: str, overrides: list[str]) -> dict | None:
    """Build the trainer at another layout (it resumes from the run's checkpoint); the reader's loader state."""
    from m2megatron.config import load_config
    from m2megatron.train.trainer import Trainer

    trainer = Trainer(load_config(overrides=TRAINER + [f"--train.run_dir={run_dir}"] + overrides), progress=False)
    try:
        return trainer.batches.state_dict() if trainer.batches.is_reader else None
    finally:
        trainer.close()


@pytest.mark.slow
def test_the_trainer_resumes_at_another_dp_size_with_the_unread_samples(dist_pool, tmp_path):
    pool, run_dir = dist_pool(2), str(tmp_path / "run")
    pool.run(_train, run_dir, ["--train.train_steps=2"])  # DP 2: 2 steps × 2 readers × 8 = 32 of 64 samples
    state = pool.run(_resumed_reader_work, run_dir, ["--parallel.pipeline_parallel=2", "--train.train_steps=3"])[0]
    from m2megatron.data.position import Segment

    slots = sorted(s for seg in state["plan"] for s in Segment.from_list(seg).slots)
    assert state["dp_size"] == 1 and state["then"] == 1 and state["batches"] == 2
    assert slots == list(range(32, 64))  # no skips: the 32 consumed samples are the order's first 32 slots
