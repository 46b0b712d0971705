"""The data position does not depend on the layout: a resume at another DP size reads exactly the samples of
the epoch that were not returned before it (none repeated, none dropped), and what an epoch leaves out
is counted."""

from __future__ import annotations

import collections
import json
import logging
import random

import pytest

from m2megatron.config.data import DataConfig
from m2megatron.data.build import build_train_loader, resolve_tokenizer
from m2megatron.data.position import Segment, Work, redistribute, units_left
from m2megatron.data.shard_writer import write_synthetic_shards
from m2megatron.data.skips import BadSample
from m2megatron.data.sources import _Source
from tests.data_samples import write_jsonl_set, write_mixed_shards

pytestmark = pytest.mark.unit


# -- the position logic on a fake source: units with random record counts, some records bad ------------------
class _FakeShards(_Source):
    """Units with given record counts; record i of unit u in epoch e is ("rec", e, u, i); every 7th is bad."""

    kind, left_out_reason, unit_name = "fake", "left_out_shards", "shards"

    def __init__(self, records: list[int], dp_rank: int, dp_size: int, work: Work | None = None,
                 one_record: bool = False):
        super().__init__(len(records), 5, dp_rank, dp_size, 777)
        self.records, self.records_per_unit = records, 1 if one_record else None
        if work is not None:
            self.work = work

    def _unit_items(self, epoch, unit, start):
        for i in range(start, self.records[unit]):
            bad = (unit * 31 + i * 7 + epoch) % 7 == 0
            yield i + 1, (BadSample("decode_error", f"{unit}:{i}") if bad else ("rec", epoch, unit, i))

    def describe(self, unit):
        return str(unit)


def _read(source: _Source, position: dict, count: int):
    """Read `count` items; return (kept items, position after the last good one): what a saved state holds
    when the last returned batch ended at the last good item (the bad ones after it are read again)."""
    kept, pending, last = [], [], position
    stream = source.stream(position)
    for _ in range(count):
        item, pos = next(stream)
        if isinstance(item, BadSample):
            pending.append(("left_out", pos["epoch"], int(item.detail), None)
                           if item.reason == "left_out_shards" else ("bad", pos["epoch"], *item.detail.split(":")))
        else:
            kept += pending + [item]
            pending, last = [], pos
    return kept, last


def _expected(records: list[int], epoch: int) -> collections.Counter:
    return collections.Counter((epoch, u, i) for u, n in enumerate(records) for i in range(n))


def _covered(kept: list, records: list[int], epoch: int) -> collections.Counter:
    """(epoch, unit, record) of everything kept in `epoch`: records read (good or bad), and every record of a
    left-out unit."""
    out = collections.Counter()
    for kind, e, u, i in kept:
        if e != epoch:
            continue
        if kind == "left_out":
            out.update((e, u, r) for r in range(records[u]))
        else:
            out[(e, int(u), int(i))] += 1
    return out


@pytest.mark.parametrize("trial", range(24))
def test_chained_layout_changes_cover_every_record_of_every_epoch_once(trial):
    rng = random.Random(trial)
    one_record = trial % 3 == 0  # like the synthetic/jsonl sources: a unit is one sample
    records = [1] * rng.randint(8, 30) if one_record else [rng.randint(0, 9) for _ in range(rng.randint(6, 14))]
    sizes = [rng.choice([1, 2, 3, 4, 5, 6]) for _ in range(rng.randint(2, 4))]
    sizes = [min(p, len(records)) for p in sizes]
    works = [Work(len(records), r, sizes[0]) for r in range(sizes[0])]
    kept, saved = [], []
    for n, size in enumerate(sizes):
        if n:  # a layout change: every saved rank's (work, position) → the new ranks' plans
            plans, then = redistribute(saved, size)
            through = max(w.horizon(p) for w, p in saved)
            unread = [seg for w, p in saved for seg in w.unread(p, through)]
            assert sum(map(units_left, plans)) == sum(map(len, unread)) and then == through + 1
            assert sum(map(len, plans)) <= len(unread) + size - 1  # the segment count grows additively
            works = [Work(len(records), r, size, plans[r], then) for r in range(size)]
        saved = []
        for rank, work in enumerate(works):
            source = _FakeShards(records, rank, size, work, one_record)
            got, pos = _read(source, work.position(), rng.randint(0, 2 * sum(records) // size + 3))
            kept += got
            saved.append((work, json.loads(json.dumps(pos))))
    # finish: the last layout reads on until every rank is past epoch `last`, keeping what is in epochs <= last
    last = max(w.horizon(p) for w, p in saved)
    for rank, (work, pos) in enumerate(saved):
        stream = _FakeShards(records, rank, sizes[-1], work, one_record).stream(pos)
        for item, p in stream:
            if p["epoch"] > last:
                break
            if isinstance(item, BadSample):
                kind = "left_out" if item.reason == "left_out_shards" else "bad"
                kept.append((kind, p["epoch"], int(item.detail), None) if kind == "left_out"
                            else (kind, p["epoch"], *item.detail.split(":")))
            else:
                kept.append(item)
    for epoch in range(last + 1):
        assert _covered(kept, records, epoch) == _expected(records, epoch), (epoch, sizes, records)


def test_segments_split_and_rest():
    seg = Segment(3, 1, 20, 3, first=2)  # slots 1, 4, ..., 19
    head, tail = seg.split(2)
    assert list(head.slots) == [1, 4] and head.first == 2 and list(tail.slots) == list(range(7, 20, 3))
    assert tail.first == 0 and seg.rest(0, 0).first == 2 and seg.rest(0, 5).first == 5
    assert seg.rest(1, 4) == Segment(3, 4, 22, 3, 4) and seg.rest(len(seg), 0) is None
    work = Work(10, 0, 3, (seg,), then=4)
    assert work.segment(1) == Segment(4, 0, 9, 3) and work.left_out(1) == range(9, 10) and not work.left_out(0)
    assert Work.from_state(10, 0, 3, json.loads(json.dumps(work.to_state()))) == work


def test_a_plan_stays_a_few_segments_per_rank_at_600k_shards():
    size, num_shards = 64, 600_000
    saved = [(Work(num_shards, r, size, (), 0), Work(num_shards, r, size).position(0, 1000 + r, 17 * r))
             for r in range(size)]
    plans, then = redistribute(saved, 96)  # 64 → 96 readers
    assert then == 1 and max(len(p) for p in plans) <= 3
    assert sum(map(units_left, plans)) == num_shards - sum(1000 + r for r in range(size))
    state = Work(num_shards, 0, 96, plans[0], then).to_state()
    assert len(json.dumps(state)) < 200


# -- real loaders ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return resolve_tokenizer(DataConfig(), max_length=16, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 shards of unequal size: 4 of 14 records (3 bad each) and 2 of 5 good ones."""
    root = tmp_path_factory.mktemp("pos")
    big = write_mixed_shards(root / "big", num_shards=4, per_shard=14)
    small = write_mixed_shards(root / "small", num_shards=2, per_shard=5, seed=9, bad=False)
    return [big, small]


def _loader(cfg, tok, rank, size, b=1, seed=1):  # seed 1: epoch 0 gives one DP-2 rank 3 big shards
    return build_train_loader(cfg, tokenizer=tok, image_size=32, micro_batch_size=b, seed=seed, dp_rank=rank,
                              dp_size=size, gpu=False)


def _run_ranks(cfg, tok, size, steps, states=None, b=1):
    """Each of `size` ranks returns `steps` batches of b (after load_global_state(states) if given):
    (keys by epoch, the states through JSON, the loaders' skip counts)."""
    keys, out, skipped = collections.defaultdict(list), [], []
    for rank in range(size):
        loader = _loader(cfg, tok, rank, size, b)
        if states is not None:
            loader.load_global_state(states)
        for _ in range(steps):
            batch = next(loader)
            keys[loader.epoch] += batch["keys"]  # exact per sample with b = 1
        out.append(json.loads(json.dumps(loader.state_dict())))
        skipped.append(loader.skipped())
        loader.close()
    return keys, out, skipped


def _rest_of_epochs(cfg, tok, size, states, through_epoch):
    """Each new rank, resumed from `states`, reads until it is past `through_epoch`: keys by epoch."""
    keys = collections.defaultdict(list)
    for rank in range(size):
        loader = _loader(cfg, tok, rank, size)
        loader.load_global_state(states)
        while True:
            batch = next(loader)
            if loader.epoch > through_epoch:
                break
            keys[loader.epoch] += batch["keys"]
        loader.close()
    return keys


def _good_keys_of_an_epoch(cfg, tok):
    loader = _loader(cfg, tok, 0, 1)
    keys = []
    while True:
        batch = next(loader)
        if loader.epoch > 0:
            break
        keys += batch["keys"]
    loader.close()
    return collections.Counter(keys)


@pytest.mark.parametrize("new_size", [4, 1, 3])
def test_webdataset_resume_at_another_dp_size_reads_each_unread_sample_once(tok, shards, new_size):
    cfg = DataConfig(source="webdataset", shards=shards, decoder="pil", num_workers=0, shuffle_block=4, prefetch=2)
    epoch = _good_keys_of_an_epoch(cfg, tok)
    assert len(epoch) == 4 * 11 + 2 * 5
    before, states, _ = _run_ranks(cfg, tok, 2, 24)
    assert sorted(s["position"]["epoch"] for s in states) == [0, 1]  # unequal shards: one rank is in epoch 1
    after = _rest_of_epochs(cfg, tok, new_size, states, max(before))
    for e in range(max(before) + 1):
        assert collections.Counter(before[e] + after[e]) == epoch, f"epoch {e}"


def test_webdataset_two_layout_changes_in_one_epoch(tok, shards):
    cfg = DataConfig(source="webdataset", shards=shards, decoder="pil", num_workers=1, shuffle_block=3, prefetch=2,
                     augment=True)
    epoch = _good_keys_of_an_epoch(cfg, tok)
    first, states, _ = _run_ranks(cfg, tok, 2, 6, b=2)  # 2 × 12 of the epoch's 54 good samples
    assert list(first) == [0]
    second, states, _ = _run_ranks(cfg, tok, 3, 4, states)  # DP 2 → 3: 12 more
    assert list(second) == [0] and all(s["plan"] for s in states)
    rest = _rest_of_epochs(cfg, tok, 2, states, 0)  # DP 3 → 2: the rest of the epoch
    assert collections.Counter(first[0] + second[0] + rest[0]) == epoch


@pytest.mark.parametrize("source", ["synthetic", "jsonl"])
def test_indexed_sources_resume_at_dp_4_and_1(tok, tmp_path, source):
    cfg = DataConfig(source=source, synthetic_train_samples=24, decoder="pil", num_workers=0, prefetch=2,
                     jsonl=str(write_jsonl_set(tmp_path, num_samples=24)) if source == "jsonl" else None)
    epoch = _good_keys_of_an_epoch(cfg, tok)
    assert len(epoch) == (24 if source == "synthetic" else 23)  # jsonl sample 4 fails to decode
    before, states, skipped = _run_ranks(cfg, tok, 2, 3, b=3)
    for new_size in (4, 1):
        after = _rest_of_epochs(cfg, tok, new_size, states, 0)
        assert collections.Counter(before[0] + after[0]) == epoch, new_size


def test_skip_counts_carry_over_summed_into_dp_rank_0(tok, shards):
    cfg = DataConfig(source="webdataset", shards=shards, decoder="pil", num_workers=0, shuffle_block=4, prefetch=0)
    _, states, skipped = _run_ranks(cfg, tok, 2, 20)
    total = collections.Counter(skipped[0]) + collections.Counter(skipped[1])
    assert total["decode_error"] >= 2
    for new_size in (3, 1):
        counts = []
        for rank in range(new_size):
            loader = _loader(cfg, tok, rank, new_size)
            loader.load_global_state(states)
            counts.append(loader.skipped())
        assert counts[0] == dict(total) and all(c == {} for c in counts[1:])
    same = _loader(cfg, tok, 1, 2)
    same.load_global_state(states)  # the same DP size: each rank takes its own state
    assert same.state_dict() == states[1]


def test_an_epochs_left_out_shards_are_counted_and_logged_by_dp_rank_0(tok, tmp_path, caplog):
    write_synthetic_shards(tmp_path, num_samples=25, per_shard=5, seed=5, image_size=32)  # 5 shards
    cfg = DataConfig(source="webdataset", shards=[str(tmp_path / "train-{000000..000004}.tar")], decoder="pil",
                     num_workers=0, prefetch=0)
    seen, counts = set(), []
    with caplog.at_level(logging.INFO, logger="m2megatron.data"):
        for rank in range(2):
            loader = _loader(cfg, tok, rank, 2, b=5)
            keys = [k for _ in range(2) for k in next(loader)["keys"]]  # the rank's 2 shards of epoch 0
            seen |= {k.split(":")[0] for k in keys}
            counts.append(loader.skipped())
            next(loader)  # into epoch 1
            counts.append(loader.skipped())
            loader.close()
    assert len(seen) == 4  # 5 % 2: one shard is left out of epoch 0
    assert counts == [{"left_out_shards": 1}, {"left_out_shards": 2}, {}, {}]
    assert "epoch 0 leaves out 1 of 5 shards" in caplog.text and "epoch 1 leaves out 1 of 5 shards" in caplog.text
    synthetic = _loader(DataConfig(synthetic_train_samples=25), tok, 0, 3, b=4)
    next(synthetic)
    assert synthetic.skipped() == {"left_out_samples": 1}  # 25 % 3


def test_state_errors_and_version_1_states(tok):
    cfg = DataConfig(synthetic_train_samples=24)
    loader = _loader(cfg, tok, 0, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="load_global_state"):
        _loader(cfg, tok, 0, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="24 samples"):
        _loader(DataConfig(synthetic_train_samples=30), tok, 0, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="every DP rank"):
        _loader(cfg, tok, 0, 4).load_global_state([state])
    straight = [k for _ in range(8) for k in next(loader)["keys"]]
    old = {"version": 1, "kind": "synthetic", "seed": 1, "dp_rank": 0, "dp_size": 2,
           "position": {"epoch": 0, "index": 3}, "skipped": {}, "batches": 3}  # saved before this change
    resumed = _loader(cfg, tok, 0, 2)
    resumed.load_state_dict(old)
    assert [k for _ in range(5) for k in next(resumed)["keys"]] == straight[3:]


def test_the_trainer_hands_over_saved_positions_also_from_a_resharded_checkpoint():
    from types import SimpleNamespace

    from m2megatron.train.checkpointing import restore_data_position

    class Batches:
        def load_state_dict(self, state):
            self.got = ("own", state)

        def load_global_state(self, states):
            self.got = ("global", states)

    a, b = {"kind": "x", "dp_rank": 0}, {"kind": "x", "dp_rank": 1}
    cases = [  # (rank_state, saved_rank_states, extra_state) → what the loader gets
        ({"loader": a}, None, {}, ("own", a)),
        (None, {(0, 0, 0): {"loader": a}, (0, 1, 0): {"loader": {"stage_batches": "follower"}},
                (0, 0, 1): {"loader": b}}, {}, ("global", [a, {"stage_batches": "follower"}, b])),
        ({}, None, {"saved_rank_states": {"0,0,0": {"loader": a}, "0,0,1": {"loader": b}}}, ("global", [a, b])),
        (None, {(0, 0, 0): {}}, {"saved_rank_states": {"0,0,0": {"loader": a}}}, ("global", [a])),
    ]
    for rank_state, saved, extra, want in cases:
        batches = Batches()
        restore_data_position(batches, SimpleNamespace(rank_state=rank_state, saved_rank_states=saved,
                                                       extra_state=extra))
        assert batches.got == want
