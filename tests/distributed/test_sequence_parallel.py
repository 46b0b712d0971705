"""Sequence parallelism reproduces TP=1 without it: the loss and every gradient, fp32, through the runtime.

The segments are chosen to need padding at TP=2 (5 image tokens, 7 text tokens → 6 and 8), so the
padding masks and the CLS gather are exercised; TP2·SP alone (both core attentions, one with selective
recompute) and TP2·SP·PP2 with full recompute (the packed shards cross a pipeline boundary, and the
recomputed layers run SP's collectives in backward). Gradients are Megatron DDP's main grads after the
schedule's finalize step (which all-reduces the sequence-split LayerNorms and row-parallel biases over
TP), gathered to full tensors. Eval's image-only and text-only passes (their own padded p2p lengths)
give the TP1 embeddings too.
"""

from __future__ import annotations

import pytest
import torch

from m2megatron.config import load_config
from m2megatron.models import gather_full
from m2megatron.parallel import initialize, seed_everything
from m2megatron.runtime import ContrastiveStep, build_stages

pytestmark = pytest.mark.distributed

TOL = 1e-5
SIZES = ["--model.hidden_size=32", "--model.num_attention_heads=4", "--model.ffn_hidden_size=64",
         "--model.num_layers=2", "--model.num_vl_layers=1", "--model.image_size=16", "--model.patch_size=8",
         "--model.max_text_len=7", "--model.vocab_size=64", "--model.embed_dim=16", "--model.drop_path_rate=0",
         "--optim.optimizer=sgd", "--optim.clip_grad=0", "--train.seed=7", "--train.micro_batch_size=3"]
NUM_MICRO, ROWS = 2, 3


def _microbatches(cfg) -> list[dict]:
    gen = torch.Generator().manual_seed(5)
    s, out = cfg.model.max_text_len, []
    for i in range(NUM_MICRO):
        lengths = torch.randint(2, s + 1, (ROWS,), generator=gen)
        lengths[0] = s  # one caption fills the segment: its last real token is next to the SP padding
        mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
        ids = torch.randint(0, cfg.model.vocab_size, (ROWS, s), generator=gen) * mask
        images = torch.rand(ROWS, 3, cfg.model.image_size, cfg.model.image_size, generator=gen) * 2 - 1
        out.append({"images": images, "text_ids": ids, "text_mask": mask, "microbatch": i})
    return out


def training_stages(cfg):
    """Groups, seeded streams and the training stages of `cfg`, gradient buffers zeroed."""
    groups = initialize(cfg.parallel)
    seed_everything(cfg.train.seed, groups)
    stages = build_stages(cfg, groups)
    for chunk in stages.chunks:
        chunk.zero_grad_buffer()
    return groups, stages


def _loss_and_grads(overrides: list[str]) -> dict:
    """One training step's forward and backward; the loss (last stage) and this stage's full gradients."""
    cfg = load_config(overrides=SIZES + overrides)
    groups, stages = training_stages(cfg)
    loss = ContrastiveStep(stages)(_microbatches(cfg))
    grads = {}
    for module in stages.modules:
        local = {name: p.main_grad for name, p in module.named_parameters()}
        grads.update({k: v.clone() for k, v in gather_full(local, cfg.model, groups.tp).items()})
    return {"loss": None if loss is None else float(loss), "grads": grads}


def _merge(results: list[dict]) -> tuple[float, dict]:
    grads, losses = {}, [r["loss"] for r in results if r["loss"] is not None]
    for r in results:
        grads.update(r["grads"])
    assert len(set(losses)) == 1, losses  # every TP rank of the last stage has the same loss
    return losses[0], grads


_REFERENCES: dict = {}


def _reference(dist_pool, model_overrides: list[str]):
    """TP1 without SP, for the same model settings (cached per settings)."""
    key = tuple(model_overrides)
    if key not in _REFERENCES:
        _REFERENCES[key] = _merge(dist_pool(1).run(_loss_and_grads, model_overrides))
    return _REFERENCES[key]


SP2 = ["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=true"]
DROP_PATH = ["--model.drop_path_rate=0.3"]  # one pipeline stage: TP1 and TP2 draw the same per-sample masks


@pytest.mark.parametrize("world,model,layout", [
    (2, DROP_PATH, SP2),
    (2, [], SP2 + ["--model.attention=megatron", "--train.recompute=selective"]),
    (4, [], SP2 + ["--parallel.pipeline_parallel=2", "--train.recompute=full"]),
], ids=["tp2-sp-drop-path", "tp2-sp-megatron-attention-selective-recompute", "tp2-sp-pp2-full-recompute"])
def test_sequence_parallel_reproduces_tp1_loss_and_gradients(dist_pool, world, model, layout):
    ref_loss, ref_grads = _reference(dist_pool, model)
    loss, grads = _merge(dist_pool(world).run(_loss_and_grads, model + layout))
    assert loss == pytest.approx(ref_loss, abs=TOL)
    assert grads.keys() == ref_grads.keys()
    diffs = {k: (grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"{worst}: {diffs[worst]}"
    assert all(g.abs().sum() > 0 for k, g in ref_grads.items() if "norm" in k), "a LayerNorm got no gradient"


def _eval_embeddings(overrides: list[str]) -> dict:
    """Image-only and text-only forward passes through the eval encoder (Megatron's forward-only schedule)."""
    from m2megatron.eval.features import ReplicaEncoder

    cfg = load_config(overrides=SIZES + overrides)
    groups = initialize(cfg.parallel)
    seed_everything(cfg.train.seed, groups)
    stages = build_stages(cfg, groups, training=False)
    encoder = ReplicaEncoder(stages.modules, groups)
    mbs = _microbatches(cfg)
    images = encoder.encode("image", iter([{"images": m["images"]} for m in mbs]), NUM_MICRO, ROWS)
    texts = encoder.encode("text", iter([{"text_ids": m["text_ids"], "text_mask": m["text_mask"]} for m in mbs]),
                           NUM_MICRO, ROWS)
    return {"image": torch.cat(images) if images else None, "text": torch.cat(texts) if texts else None}


def test_sequence_parallel_eval_passes_reproduce_tp1_embeddings(dist_pool):
    (ref,) = dist_pool(1).run(_eval_embeddings, [])
    results = [r for r in dist_pool(4).run(_eval_embeddings, SP2 + ["--parallel.pipeline_parallel=2"])
               if r["image"] is not None]
    assert len(results) == 2  # the last stage's two TP ranks
    for r in results:
        for kind in ("image", "text"):
            torch.testing.assert_close(r[kind], ref[kind], rtol=0, atol=TOL)
