"""StageBatches at TP2·PP2 (4 gloo ranks, one DP replica): only the reading rank reads, images are decoded
once per TP group, every rank gets exactly the single loader's batches, resume is exact, skips are counted."""

from __future__ import annotations

import json

import pytest
import torch

from m2megatron.config.data import DataConfig
from m2megatron.data.build import build_train_loader, resolve_tokenizer
from m2megatron.data.image import normalize_images
from m2megatron.data.stage_batches import FOLLOWER_STATE, StageBatches
from m2megatron.data.tokenizer import Tokenizer
from tests.data_samples import write_jsonl_set, write_mixed_shards

pytestmark = pytest.mark.distributed

B, M, SIZE, SEED, STEPS, RESUME_AT = 4, 2, 32, 3, 4, 2


def _host(steps: list[list[dict]]) -> list[list[dict]]:
    return [[{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in mb.items()} for mb in step]
            for step in steps]


def _stage_batches_run(cfg_kwargs: dict, sp_model: str) -> dict:
    """Straight run of STEPS steps, and a run stopped after RESUME_AT steps then resumed from its state."""
    from m2megatron.parallel import Layout, build_groups

    groups = build_groups(Layout(world_size=4, tensor_parallel=2, pipeline_parallel=2))
    cfg, tok = DataConfig(**cfg_kwargs), Tokenizer(sp_model, max_length=16)
    kw = dict(image_size=SIZE, micro_batch_size=B, num_microbatches=M, groups=groups, seed=SEED)
    straight = StageBatches(cfg, tok, **kw)
    steps = [straight.next_step() for _ in range(STEPS)]
    result = {"steps": _host(steps), "decoded": straight.images_decoded, "skipped": straight.skipped()}
    straight.close()
    first = StageBatches(cfg, tok, **kw)
    for _ in range(RESUME_AT):
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))  # through the checkpoint's JSON
    first.close()
    resumed = StageBatches(cfg, tok, **kw)
    resumed.load_state_dict(state)
    result.update(tail=_host([resumed.next_step() for _ in range(STEPS - RESUME_AT)]), state=state,
                  resumed_skipped=resumed.skipped())
    resumed.close()
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage")
    tok = resolve_tokenizer(DataConfig(), max_length=16, cache_dir=root / "tok")
    return {"tok": tok, "shards": write_mixed_shards(root / "wds", num_shards=2, per_shard=14),
            "jsonl": str(write_jsonl_set(root / "jsonl", num_samples=12))}


def _reference(cfg: DataConfig, tok) -> tuple[list[dict], dict, int]:
    """The single loader's STEPS·M batches (DP rank 0 of 1), its skip counts and decoded-image count."""
    loader = build_train_loader(cfg, tokenizer=tok, image_size=SIZE, micro_batch_size=B, seed=SEED, gpu=False)
    batches = [next(loader) for _ in range(STEPS * M)]
    out = (batches, loader.skipped(), loader.images_decoded)
    loader.close()
    return out


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                    for k in a)


def _check_batches(results, ref_batches):
    for rank, res in enumerate(results):
        got = [mb for step in res["steps"] for mb in step]
        tail = [mb for step in res["tail"] for mb in step]
        assert len(tail) == (STEPS - RESUME_AT) * M
        assert all(_same(a, b) for a, b in zip(tail, got[RESUME_AT * M:])), f"rank {rank}: resume is not exact"
        first_stage = rank in (0, 1)  # rank = tp + 2·pp
        for i, (mb, ref) in enumerate(zip(got, ref_batches)):
            assert mb["microbatch"] == i % M
            assert set(mb) == ({"images", "text_ids", "text_mask", "microbatch"} if first_stage
                               else {"text_mask", "microbatch"}), f"rank {rank}"
            assert torch.equal(mb["text_mask"], ref["text_mask"]), f"rank {rank} microbatch {i}"
            if first_stage:
                assert torch.equal(mb["text_ids"], ref["text_ids"])
                # uint8 from the loader, normalized on the device: bit for bit the host normalization
                want = normalize_images(ref["images"])
                assert mb["images"].dtype == torch.float32 and torch.equal(mb["images"], want), f"rank {rank} mb {i}"


@pytest.mark.parametrize("mode", ["broadcast", "split"])
def test_webdataset_tp2_pp2_decode_once_exact_batches_resume_and_skips(dist_pool, data, mode):
    cfg_kwargs = dict(source="webdataset", shards=[data["shards"]], decoder="pil", num_workers=0, prefetch=0,
                      shuffle_block=4, augment=True, tp_decode=mode)
    results = dist_pool(4).run(_stage_batches_run, cfg_kwargs, str(data["tok"].path))
    ref_batches, ref_skipped, ref_decoded = _reference(DataConfig(**cfg_kwargs), data["tok"])
    _check_batches(results, ref_batches)
    decoded = [r["decoded"] for r in results]
    assert decoded[2] == decoded[3] == 0  # later pipeline stages decode nothing
    if mode == "broadcast":
        assert decoded == [ref_decoded, 0, 0, 0]  # only the reading rank decodes
    else:
        assert decoded[0] > 0 and decoded[1] > 0 and decoded[0] + decoded[1] == ref_decoded  # each image once
    assert ref_skipped.get("decode_error", 0) >= 2 and ref_skipped.get("corrupt_image", 0) >= 1
    assert results[0]["skipped"] == results[0]["resumed_skipped"] == ref_skipped  # the logging rank has them
    assert [r["skipped"] for r in results[1:]] == [{}, {}, {}]
    assert results[0]["state"]["kind"] == "webdataset"
    assert all(r["state"] == FOLLOWER_STATE for r in results[1:])


@pytest.mark.parametrize("source", ["synthetic", "jsonl"])
def test_other_sources_tp2_pp2(dist_pool, data, source):
    cfg_kwargs = dict(source=source, synthetic_train_samples=40, decoder="pil", num_workers=0, prefetch=0,
                      tp_decode="split")  # synthetic renders its images: it broadcasts them
    if source == "jsonl":
        cfg_kwargs["jsonl"] = data["jsonl"]
    results = dist_pool(4).run(_stage_batches_run, cfg_kwargs, str(data["tok"].path))
    ref_batches, ref_skipped, _ = _reference(DataConfig(**cfg_kwargs), data["tok"])
    _check_batches(results, ref_batches)
    assert results[0]["skipped"] == ref_skipped
    if source == "jsonl":
        assert ref_skipped.get("decode_error", 0) >= 1
    else:
        assert [r["decoded"] for r in results] == [0, 0, 0, 0]
