"""PIL decode worker processes and the pipelined DALI path: same batches in the same order as the loader's
own thread, exact resume, the same skip counts, clean shutdown, and a clear error when a worker dies."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal

import pytest
import torch

from m2megatron.config.data import DataConfig
from m2megatron.data.build import build_train_loader, resolve_tokenizer
from m2megatron.data.image import FULL_BOX, ImageLimits
from m2megatron.data.shard_writer import encode_jpeg
from m2megatron.data.synthetic import SyntheticScenes
from m2megatron.data.worker_pool import DataWorkerError, PilWorkerPool
from tests.data_samples import write_mixed_shards

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return resolve_tokenizer(DataConfig(), max_length=16, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards of 14 records, 3 bad ones in each (2 decode errors that pass the probe, 1 corrupt image)."""
    return write_mixed_shards(tmp_path_factory.mktemp("mixed"), num_shards=3, per_shard=14)


def _loader(tok, shards, **kw):
    cfg = DataConfig(source="webdataset", shards=[shards], shuffle_block=4, augment=True,
                     **{"decoder": "pil", "num_workers": 0, **kw})
    return build_train_loader(cfg, tokenizer=tok, image_size=32, micro_batch_size=5, seed=7, gpu=False)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _assert_same(a: list[dict], b: list[dict], exact_images: bool = True):
    for x, y in zip(a, b, strict=True):
        assert x["keys"] == y["keys"]
        assert torch.equal(x["text_ids"], y["text_ids"]) and torch.equal(x["text_mask"], y["text_mask"])
        if exact_images:
            assert torch.equal(x["images"], y["images"])
        else:  # DALI vs PIL: JPEG decoder and cubic kernel differences only
            assert float((x["images"].float() - y["images"].float()).abs().mean()) < 0.01 * 127.5  # uint8


@pytest.fixture(scope="module")
def single_thread(tok, shards):
    """The reference: PIL in the loader's own thread, 18 batches (> 2 epochs of 33 good samples)."""
    loader = _loader(tok, shards, num_workers=0)
    batches = _take(loader, 18)
    out = batches, loader.skipped(), loader.state_dict()
    loader.close()
    return out


@pytest.mark.parametrize("workers,prefetch", [(1, 2), (2, 0), (2, 3)])
def test_workers_give_the_single_thread_batches_and_skips(tok, shards, single_thread, workers, prefetch):
    ref, ref_skipped, ref_state = single_thread
    loader = _loader(tok, shards, num_workers=workers, prefetch=prefetch)
    _assert_same(_take(loader, 18), ref)
    assert loader.skipped() == ref_skipped and ref_skipped["decode_error"] >= 4 and ref_skipped["corrupt_image"] >= 2
    assert loader.state_dict() == ref_state
    pids = loader.decoder.pids
    assert len(pids) == workers
    loader.close()
    _assert_joined(pids)
    assert all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in pids)


def _assert_joined(pids: list[int]) -> None:
    """The pool's own workers were joined. Other children (a session's gloo pools) may be alive."""
    assert pids
    alive = {p.pid for p in multiprocessing.active_children()}
    assert not alive & set(pids)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except OSError:
        return True


def test_workers_resume_exactly(tok, shards, single_thread):
    ref = single_thread[0]
    first = _loader(tok, shards, num_workers=2)
    head = _take(first, 7)  # mid-shard, mid-block, with decode errors before and after
    state = first.state_dict()
    first.close()
    resumed = _loader(tok, shards, num_workers=2)
    resumed.load_state_dict(state)
    _assert_same(head + _take(resumed, 11), ref)
    assert resumed.skipped() == single_thread[1]
    resumed.close()


def test_dali_pipelined_same_order_skips_and_resume(tok, shards, single_thread):
    pytest.importorskip("nvidia.dali")
    ref, ref_skipped, _ = single_thread
    loader = _loader(tok, shards, decoder="dali", num_workers=1, decode_depth=3)
    assert loader.decoder.depth == 3 and loader.decoder.pipe.depth == 3
    _assert_same(_take(loader, 18), ref, exact_images=False)
    assert loader.skipped() == ref_skipped
    assert loader.decoder.fallbacks >= 4  # each broken PNG failed its chunk, which PIL decoded again
    loader.close()
    first = _loader(tok, shards, decoder="dali", num_workers=1)
    head = _take(first, 7)
    state = first.state_dict()
    first.close()
    resumed = _loader(tok, shards, decoder="dali", num_workers=1)
    resumed.load_state_dict(state)
    _assert_same(head + _take(resumed, 11), ref, exact_images=False)
    assert resumed.skipped() == ref_skipped
    resumed.close()


def test_auto_logs_its_choice(tok, shards, caplog):
    with caplog.at_level(logging.INFO, logger="m2megatron.data"):
        loader = _loader(tok, shards, decoder="auto", num_workers=0)
    assert "data.decoder=auto: decoding with PIL" in caplog.text  # a CPU host: PIL, not DALI's CPU pipeline
    loader.close()


def _jpegs(n: int) -> list[bytes]:
    scenes = SyntheticScenes(seed=1, image_size=32)
    return [encode_jpeg(scenes[i].image) for i in range(n)]


def test_a_dead_worker_is_a_clear_error_and_close_cleans_up():
    pool = PilWorkerPool(32, ImageLimits(), num_workers=2, chunk=4)
    jpegs = _jpegs(4)
    pool.submit(jpegs, [FULL_BOX] * 4, [False] * 4)
    assert all(isinstance(r, torch.Tensor) and r.shape == (3, 32, 32) for r in pool.result())
    os.kill(pool.pids[1], signal.SIGKILL)
    pool.submit(jpegs, [FULL_BOX] * 4, [False] * 4)  # worker 1's chunk: never answered
    with pytest.raises(DataWorkerError, match=r"data worker 1 \(pid \d+\) died with exit code -9"):
        pool.result()
    pids = pool.pids
    pool.close()
    _assert_joined(pids)
    pool.submit(jpegs, [FULL_BOX] * 4, [False] * 4)  # a closed pool starts afresh
    assert len(pool.result()) == 4 and pool.starts == 2
    pool.close()


def test_a_worker_exception_is_raised_with_its_traceback():
    pool = PilWorkerPool(32, ImageLimits(), num_workers=1, chunk=2)
    pool.submit(_jpegs(2), [FULL_BOX, (0.0, 0.0, 2.0, 1.0)], [False, False])  # a box past the image: a bug
    with pytest.raises(DataWorkerError, match="Traceback"):
        pool.result()
    pids = pool.pids
    pool.close()
    _assert_joined(pids)


def test_a_worker_crash_reaches_the_training_loop(tok, shards):
    loader = _loader(tok, shards, num_workers=1, prefetch=1)
    next(loader)
    pids = loader.decoder.pids
    os.kill(pids[0], signal.SIGKILL)
    with pytest.raises(DataWorkerError, match="died"):
        for _ in range(20):  # batches decoded before the kill may still arrive first
            next(loader)
    loader.close()
    _assert_joined(pids)
