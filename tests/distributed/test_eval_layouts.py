"""Eval at TP2·PP2 (pipeline forward through Megatron's schedule) and at DP4 gives the same features and
metrics as a single process (fp32, same seeded weights at every layout)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.distributed

NUM_IMAGES, BATCH = 13, 4  # uneven DP shards and a padded last pipeline microbatch


def _eval_set():
    from m2megatron.config.model import preset
    from m2megatron.data.synthetic import SyntheticScenes

    cfg = preset("tiny")
    scenes = SyntheticScenes(seed=7, image_size=cfg.image_size, language="both", split="eval")
    images = [scenes[i].image for i in range(NUM_IMAGES)]
    captions = [list(scenes.captions(i).values()) for i in range(NUM_IMAGES)]  # [en, zh]
    captions[3].append(captions[5][0])  # a duplicate caption across images
    return cfg, images, captions


def _run(tp: int, pp: int, sp_path: str):
    import torch.distributed as dist

    from m2megatron.config import RunConfig
    from m2megatron.data.tokenizer import Tokenizer
    from m2megatron.eval.batches import text_features
    from m2megatron.eval.features import ReplicaEncoder
    from m2megatron.eval.launcher import build_eval_model
    from m2megatron.eval.retrieval import evaluate_retrieval
    from m2megatron.models import init_weights
    from m2megatron.parallel import Layout, build_groups, seed_everything

    model_cfg, images, captions = _eval_set()
    groups = build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=tp, pipeline_parallel=pp))
    seed_everything(1, groups)
    _, (model,) = build_eval_model(RunConfig(model=model_cfg), groups, None, "none")
    init_weights(model, seed=3)
    tokenizer = Tokenizer(sp_path, model_cfg.max_text_len)
    texts = [c for cs in captions for c in cs]
    feats, _ = text_features(ReplicaEncoder(model, groups), texts, tokenizer, batch_size=BATCH, groups=groups)
    metrics = evaluate_retrieval([model], groups, images, captions, tokenizer=tokenizer, batch_size=BATCH)
    return feats, metrics


def _single_process_reference(sp_path: str):
    from m2megatron.config import ParallelConfig
    from m2megatron.parallel import initialize, shutdown

    initialize(ParallelConfig(backend="gloo"))
    try:
        return _run(1, 1, sp_path)
    finally:
        shutdown()


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    from m2megatron.data.sp_train import synthetic_tokenizer_path

    return str(synthetic_tokenizer_path(tmp_path_factory.mktemp("sp")))


def test_tp2_pp2_and_dp4_match_a_single_process(dist_pool, sp_model):
    ref_feats, ref_metrics = _single_process_reference(sp_model)
    assert 0 < ref_metrics["mr"] <= 100
    for tp, pp in ((2, 2), (1, 1)):  # (1, 1) on 4 ranks = DP4
        results = dist_pool(4).run(_run, tp, pp, sp_model)
        for rank, (feats, metrics) in enumerate(results):
            torch.testing.assert_close(feats, ref_feats, atol=2e-6, rtol=0, msg=f"TP{tp} PP{pp} rank {rank}")
            assert metrics == ref_metrics, f"TP{tp} PP{pp} rank {rank}"
