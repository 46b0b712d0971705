"""The weighted mixture of sources (m2megatron.data.mixture): realized proportions, per-source epochs, mixing
inside every microbatch, and an exact position across data-parallel layout changes."""

from __future__ import annotations

import collections
import json
import math
import random

import numpy as np
import pytest

from m2megatron.config.base import ConfigError
from m2megatron.config.data import DataConfig
from m2megatron.config.data_source import SourceConfig
from m2megatron.data.build import build_source, build_train_loader, resolve_tokenizer
from m2megatron.data.captions import CaptionFields
from m2megatron.data.formats import TarRecord
from m2megatron.data.mixture import MIX_BLOCK, Component, MixtureSource
from m2megatron.data.position import Work
from m2megatron.data.shard_writer import write_synthetic_shards
from m2megatron.data.skips import BadSample
from m2megatron.data.sources import _Source

pytestmark = pytest.mark.unit


class _Lane(_Source):
    """A source's lane on fake shards: record i of unit u in epoch e is (name, e, u, i); some records are bad."""

    kind, left_out_reason, unit_name = "fake", "left_out_shards", "shards"

    def __init__(self, name: str, records: list[int], vrank: int, vsize: int, bad: bool = True, share=False):
        super().__init__(len(records), 11, vrank, vsize, 777, share)
        self.name, self.records, self.bad = name, records, bad

    def _unit_items(self, epoch, unit, start):
        for i in range(start, self.records[unit]):
            bad = self.bad and (unit * 31 + i * 7 + epoch) % 5 == 0
            yield i + 1, (BadSample("decode_error", f"{unit}:{i}") if bad else (self.name, epoch, unit, i))

    def describe(self, unit):
        return str(unit)


SOURCES = {"a": ([5, 3, 7, 4, 6, 2], 0.5), "b": ([9, 8, 10, 7, 9, 12, 8, 11], 0.3), "c": ([3, 2, 4, 3], 0.2)}


def _mixture(rank: int, size: int, lanes: dict[str, int], bad: bool = True, share=()) -> MixtureSource:
    """`share`: the sources whose lanes share an epoch's remainder (as real mixtures do) instead of leaving it out."""
    comps = [Component(name, w, [_Lane(name, recs, rank * lanes[name] + j, size * lanes[name], bad, name in share)
                                 for j in range(lanes[name])]) for name, (recs, w) in SOURCES.items()]
    return MixtureSource(comps, seed=3, dp_rank=rank, dp_size=size)


def _tagged(mix: MixtureSource, position: dict, count: int):
    """Read `count` draws: ([(source, epoch, unit, record, good)] of each record read, the position after the
    last good one); the left-out units of an epoch become all their records."""
    out, pending, last = [], [], position
    for _, (item, pos) in zip(range(count), mix.stream(position)):
        d = pos["draw"] - 1  # the draw's lane, as the mixture chose it
        c, j = mix._flat[mix.lane_choices(d // MIX_BLOCK)[d % MIX_BLOCK]]
        comp, epoch = mix.components[c], pos["lanes"][c][j]["epoch"]
        if isinstance(item, BadSample):
            recs = comp.lanes[0].records
            if item.reason == "left_out_shards":
                u = int(item.detail)
                pending += [(comp.name, epoch, u, i) for i in range(recs[u])]
            else:
                pending.append((comp.name, epoch, *map(int, item.detail.split(":"))))
            continue
        out += pending + [item]
        pending, last = [], pos
    return out, json.loads(json.dumps(last))


def test_realized_proportions_match_the_weights_and_each_source_runs_its_own_epochs():
    mix = _mixture(0, 1, {"a": 2, "b": 2, "c": 1}, bad=False)  # all good, nothing left out: a draw is a sample
    n = 10_000
    picked, end = _tagged(mix, mix.start_position(), n)
    got = collections.Counter(name for name, *_ in picked)
    assert sum(got.values()) == n
    for name, (_, weight) in SOURCES.items():
        assert abs(got[name] - n * weight) <= 4 * math.sqrt(n * weight * (1 - weight)), (name, got)
    # each source goes through its epochs at its own pace, every record of each finished epoch exactly once
    last = {}
    for c, (name, (records, _)) in enumerate(SOURCES.items()):
        done = collections.Counter((e, u, i) for src, e, u, i in picked if src == name)
        last[name] = min(p["epoch"] for p in end["lanes"][c])  # every lane is past the epochs before it
        for e in range(last[name]):
            want = collections.Counter((e, u, i) for u, k in enumerate(records) for i in range(k))
            assert collections.Counter({k: v for k, v in done.items() if k[0] == e}) == want, (name, e)
    assert last["c"] > 3 * last["b"] > 3  # the small source is upsampled: it runs more epochs


def test_the_same_layout_resumes_exactly():
    mix = _mixture(1, 2, {"a": 2, "b": 2, "c": 1})
    straight, _ = _tagged(mix, mix.start_position(), 700)
    first, pos = _tagged(mix, mix.start_position(), 300)
    state = json.loads(json.dumps({"version": 3, **mix.state(pos)}))
    again = _mixture(1, 2, {"a": 2, "b": 2, "c": 1})
    rest, _ = _tagged(again, again.restore(state), 700 - 300 + 50)
    assert (first + rest)[:len(straight)] == straight
    plain = {"version": 2, "kind": "webdataset", "seed": 3, "dp_rank": 0, "dp_size": 1, "position": {}}
    with pytest.raises(ValueError, match="cannot change from one list of shards to a mixture"):
        again.same_layout([plain])  # load_global_state asks this first
    with pytest.raises(ValueError, match=r"sources \(name, shards\) \[\('a', 6\), \('b', 8\)\]"):
        again.restore({**state, "sources": state["sources"][:2]})


@pytest.mark.parametrize("trial", range(12))
def test_layout_changes_of_three_sources_cover_every_record_of_every_source_epoch_once(trial):
    rng = random.Random(trial)
    layouts = [(rng.choice([1, 2, 3]), {n: rng.choice([1, 2]) for n in SOURCES}) for _ in range(rng.randint(2, 3))]
    share = {n for n in SOURCES if rng.random() < 0.5}
    kept, states = [], None
    for size, lanes in layouts:
        lanes = {n: max(1, min(k, len(SOURCES[n][0]) // size)) for n, k in lanes.items()}
        mixes = [_mixture(r, size, lanes, share=share) for r in range(size)]
        positions = [m.restore_global(states) if states else m.start_position() for m in mixes]
        states = []
        for mix, pos in zip(mixes, positions):
            got, last = _tagged(mix, pos, rng.randint(5, 60))
            kept += got
            states.append({"version": 3, **mix.state(last)})
        states = json.loads(json.dumps(states))
    # finish: one reader reads on until every lane of each source is past the last epoch any saved lane entered
    horizon = {c["name"]: max(Work.from_state(c["units"], 0, 1, lane, c["name"] in share).horizon(lane["position"])
                              for s in states for c2 in s["sources"] if c2["name"] == c["name"] for lane in c2["lanes"])
               for c in states[0]["sources"]}
    final = _mixture(0, 1, {n: 1 for n in SOURCES}, share=share)
    got, _ = _tagged(final, final.restore_global(states), 3000)
    kept += got
    for name, (records, _) in SOURCES.items():
        done = collections.Counter((e, u, i) for src, e, u, i in kept if src == name)
        for e in range(horizon[name] + 1):
            want = collections.Counter((e, u, i) for u, k in enumerate(records) for i in range(k))
            assert collections.Counter({k: v for k, v in done.items() if k[0] == e}) == want, (name, e, layouts)


# -- real shards through the loader ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return resolve_tokenizer(DataConfig(), max_length=16, cache_dir=tmp_path_factory.mktemp("tok"))


def _sources(root, spec: dict[str, tuple[int, int, str]], **extra) -> list[SourceConfig]:
    out = []
    for seed, (name, (shards, per_shard, lang)) in enumerate(spec.items()):
        write_synthetic_shards(root / name, num_samples=shards * per_shard, per_shard=per_shard, seed=seed + 1,
                               image_size=16, language=lang)
        out.append(SourceConfig(name=name, shards=[str(root / name / "train-*.tar")], language=lang, **extra))
    return out


def _is_zh(caption: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in caption)


def test_every_microbatch_of_a_50_50_mixture_of_single_language_shards_mixes(tok, tmp_path):
    sources = _sources(tmp_path, {"en": (4, 40, "en"), "zh": (4, 40, "zh")})
    cfg = DataConfig(source="webdataset", sources=sources, decoder="pil", num_workers=0, prefetch=0, open_shards=2)
    loader = build_train_loader(cfg, tokenizer=tok, image_size=16, micro_batch_size=32, seed=0, gpu=False)
    zh = [sum(map(_is_zh, next(loader)["captions"])) for _ in range(8)]
    seen = loader.samples_seen()  # what the log reports as samples_seen/<source> and samples_seen/lang/<tag>
    loader.close()
    assert all(0 < n < 32 for n in zh), zh
    assert 0.4 < sum(zh) / (8 * 32) < 0.6
    assert seen == {"zh": sum(zh), "lang/zh": sum(zh), "en": 256 - sum(zh), "lang/en": 256 - sum(zh)}
    assert cfg.samples_seen_keys() == ["en", "zh", "lang/en", "lang/zh"]


def test_the_run_report_shows_the_realized_mixture_against_the_weights(tmp_path):
    from m2megatron.eval.report import collect, markdown

    sources = [{"name": "en", "weight": 3.0}, {"name": "zh", "weight": 1.0}]
    (tmp_path / "config.json").write_text(json.dumps({"data": {"sources": sources}}))
    records = [{"step": 1, "loss": 2.0, "samples_seen/en": 20, "samples_seen/zh": 12, "samples_seen/lang/en": 20,
                "samples_seen/lang/zh": 12}, {"step": 2, "loss": 1.5, "samples_seen/en": 50, "samples_seen/zh": 14,
                                              "samples_seen/lang/en": 50, "samples_seen/lang/zh": 14}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = markdown(collect(tmp_path), None)
    assert "## Data mixture (samples seen by step 2)" in text
    assert "| en | 50 | 0.781 | 0.750 |" in text and "| zh | 14 | 0.219 | 0.250 |" in text
    assert "| language zh | 14 | 0.219 | – |" in text


def _lane_epoch_of_last_sample(before: dict, after: dict) -> tuple[int, int, int]:
    (moved,) = [(c, j, p["epoch"]) for c, row in enumerate(after["lanes"]) for j, p in enumerate(row)
                if p != before["lanes"][c][j]]
    return moved


def test_three_sources_dp_change_mid_epoch_reads_every_sample_once(tok, tmp_path):
    sources = _sources(tmp_path, {"a": (6, 5, "en"), "b": (12, 4, "zh"), "c": (5, 6, "en")})
    cfg = DataConfig(source="webdataset", sources=sources, decoder="pil", num_workers=0, prefetch=2,
                     shuffle_block=3, open_shards=3)
    sizes = {"a": 30, "b": 48, "c": 30}  # c: 5 shards on 4 and 3 lanes, nothing left out

    def loader(rank, size):
        return build_train_loader(cfg, tokenizer=tok, image_size=16, micro_batch_size=1, seed=7, dp_rank=rank,
                                  dp_size=size, gpu=False)

    seen, states = collections.Counter(), []
    for rank in range(2):  # DP 2, 3 lanes per source: 15 samples each, all in epoch 0
        ld = loader(rank, 2)
        seen.update(k for _ in range(15) for k in next(ld)["keys"])
        states.append(json.loads(json.dumps(ld.state_dict())))
        ld.close()
    assert all(p["epoch"] == 0 for s in states for c in s["sources"] for lane in c["lanes"]
               for p in [lane["position"]])
    cfg.open_shards = 2
    for rank in range(3):  # DP 3, 2 lanes per source: read on until every lane is past epoch 0
        ld = loader(rank, 3)
        ld.load_global_state(states)
        while ld.epoch == 0:
            before = ld._position
            keys = next(ld)["keys"]
            _, _, epoch = _lane_epoch_of_last_sample(before, ld._position)
            if epoch == 0:
                seen.update(keys)
        ld.close()
    by_source = collections.Counter(k.split("/")[-2] for k in seen)
    assert by_source == sizes and set(seen.values()) == {1}


def test_config_checks_and_the_shorthand(tmp_path):
    with pytest.raises(ConfigError, match=r"data.sources\[1\].name: 'a' names two sources"):
        DataConfig(source="webdataset", sources=[SourceConfig(name="a", shards=["x"]),
                                                 SourceConfig(name="a", shards=["y"])]).validate()
    with pytest.raises(ConfigError, match=r"data.sources\[0\].captions: 'caption' is not a caption field"):
        DataConfig(source="webdataset", sources=[SourceConfig(name="a", shards=["x"], captions={"caption": 1})]
                   ).validate()
    with pytest.raises(ConfigError, match="not both"):
        DataConfig(source="webdataset", shards=["x"], sources=[SourceConfig(name="a", shards=["x"])]).validate()
    write_synthetic_shards(tmp_path, num_samples=6, per_shard=2, seed=1, image_size=16)
    one = [SourceConfig(name="a", shards=[str(tmp_path / "train-*.tar")])]
    with pytest.raises(ConfigError, match=r"data.sources\[0\].shards: source 'a' has 3 shard\(s\), fewer than the 4"):
        build_source(DataConfig(source="webdataset", sources=one), image_size=16, dp_rank=0, dp_size=4, seed=0)
    plain = build_source(DataConfig(source="webdataset", shards=[str(tmp_path / "train-*.tar")]),
                         image_size=16, dp_rank=0, dp_size=1, seed=0)
    assert plain.kind == "webdataset"  # the shorthand reads as before (same order, same state)
    interleaved = build_source(DataConfig(source="webdataset", shards=[str(tmp_path / "train-*.tar")], open_shards=2),
                               image_size=16, dp_rank=0, dp_size=1, seed=0)
    assert interleaved.kind == "mixture" and [c.name for c in interleaved.components] == ["default"]
    assert len(interleaved.components[0].lanes) == 2


def test_resampled_mode_draws_shards_with_replacement_and_resumes_exactly(tmp_path):
    sources = _sources(tmp_path, {"a": (5, 3, "en"), "b": (4, 2, "zh")})
    cfg = DataConfig(source="webdataset", sources=sources, resampled=True, open_shards=2, shuffle_block=2)

    def stream(position=None, state=None):
        src = build_source(cfg, image_size=16, dp_rank=1, dp_size=2, seed=4)
        start = src.restore(state) if state else src.start_position()
        return src, src.stream(start)

    src, items = stream()
    got = [(item.key, pos) for _, (item, pos) in zip(range(120), items)]
    keys = [k for k, _ in got]
    state = json.loads(json.dumps({"version": 3, **src.state(got[49][1])}))
    _, again = stream(state=state)
    assert [item.key for _, (item, _) in zip(range(70), again)] == keys[50:]
    draws = [[lane.shard_of_draw(k) for k in range(5)] for lane in src.components[0].lanes]
    assert any(len(set(d)) < 5 for d in draws)  # with replacement: a shard comes back before all 5 were read
    assert all(p["epoch"] == 0 for _, pos in got for row in pos["lanes"] for p in row)


def test_caption_fields_are_drawn_with_their_probabilities_and_tag_the_language():
    fields = CaptionFields({"json:caption": 0.5, "json:caption_zh": 0.5, "txt": 0.0}, "en", {"json:caption_zh": "zh"})
    both = TarRecord(0, "k", {"jpg": b"x", "json": json.dumps({"caption": "a dog", "caption_zh": ["一只狗"]}).encode()})
    picks = collections.Counter(fields.pick(both, np.random.default_rng(i))[1:] for i in range(400))
    assert set(picks) == {("a dog", "en"), ("一只狗", "zh")} and 150 < picks["a dog", "en"] < 250
    only_en = TarRecord(1, "k", {"jpg": b"x", "txt": b"t", "json": b'{"caption": "a cat"}'})
    assert fields.pick(only_en, np.random.default_rng(0)) == (b"x", "a cat", "en")  # draws among the fields it has
    with pytest.raises(BadSample, match="missing_caption"):
        fields.pick(TarRecord(2, "k", {"jpg": b"x", "json": b"{}"}), np.random.default_rng(0))
    assert CaptionFields({}).pick(only_en, np.random.default_rng(0)) == (b"x", "t", "und")  # .txt first, as before
