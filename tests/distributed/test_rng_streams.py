"""Random streams as Megatron-LM seeds them, and drop-path replayed exactly.

- drop-path masks differ across data-parallel replicas and pipeline stages, and agree on the TP ranks of
  a replica; re-derived streams (a resume at another layout) are deterministic and new;
- accumulated mode with drop_path_rate > 0: the two-pass GradCache step gives the loss and gradients of
  a one-pass reference that keeps every microbatch's graph and backpropagates the joint loss once,
  drawing the same masks in the same order;
- stop and resume with drop_path_rate > 0 (DP2, accumulated) is bit-identical to a straight run.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from m2megatron.config import load_config
from m2megatron.parallel import rng

pytestmark = pytest.mark.distributed


def test_rank_seed_follows_megatron_offsets():
    assert rng.rank_seed(1234, pp_rank=0, dp_rank=0) == 1234
    assert rng.rank_seed(1234, pp_rank=2, dp_rank=3) == 1234 + 200 + 30
    assert rng.base_seed(1234, step=7) == rng.base_seed(1234, step=7) != rng.base_seed(1234, step=8)
    assert rng.base_seed(1234, step=7) != 1234


def _drop_path_mask() -> list[float]:
    from m2megatron.models.layer_specs import DropPathBiasAdd

    ones = torch.ones(1, 64, 1)  # [s, b, h]: one value per sample
    out = DropPathBiasAdd(0.5)(training=True, fused=False)((ones, None), torch.zeros_like(ones), None)
    return (out.flatten() * 0.5).tolist()  # the keep mask


def _masks(tp: int, pp: int, step: int) -> dict:
    from m2megatron.parallel import Layout, build_groups, seed_everything

    groups = build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=tp, pipeline_parallel=pp))
    seed_everything(5, groups, step=step)
    torch.rand(3)  # the default generator is not the drop-path stream: this draw must change nothing
    first = _drop_path_mask()
    return {"coords": (groups.pp_rank, groups.tp_rank, groups.dp_rank), "masks": [first, _drop_path_mask()]}


def test_drop_path_masks_differ_across_dp_and_pp_and_agree_across_tp(dist_pool):
    pool = dist_pool(4)
    for tp, pp in [(2, 1), (1, 2)]:
        by_coords = {tuple(r["coords"]): r["masks"] for r in pool.run(_masks, tp, pp, 0)}
        for (p, t, d), masks in by_coords.items():
            assert masks[0] != masks[1], "a stream repeated itself"
            assert 0 < sum(masks[0]) < 64, "no samples dropped, or all"
            for (p2, t2, d2), other in by_coords.items():
                if (p2, d2) == (p, d):
                    assert other == masks, f"TP ranks of one replica drop different samples: {(p, t, d)}"
                else:
                    assert other[0] != masks[0], f"{(p, t, d)} and {(p2, t2, d2)} drop the same samples"
    again = pool.run(_masks, 2, 1, 0)
    assert again == pool.run(_masks, 2, 1, 0)
    rederived = pool.run(_masks, 2, 1, 9)
    assert rederived == pool.run(_masks, 2, 1, 9)
    assert all(a["masks"][0] != b["masks"][0] for a, b in zip(again, rederived))


SIZES = ["--model.hidden_size=32", "--model.num_attention_heads=4", "--model.ffn_hidden_size=64",
         "--model.num_layers=2", "--model.num_vl_layers=1", "--model.image_size=16", "--model.patch_size=8",
         "--model.max_text_len=8", "--model.vocab_size=64", "--model.embed_dim=16", "--model.drop_path_rate=0.5",
         "--loss.accumulation_steps=4", "--optim.optimizer=sgd", "--optim.lr=0.1", "--train.seed=7"]


def _microbatches(cfg, num: int, rows: int) -> list[dict]:
    gen = torch.Generator().manual_seed(11)
    s = cfg.model.max_text_len
    out = []
    for i in range(num):
        mask = (torch.arange(s)[None, :] < torch.randint(2, s + 1, (rows,), generator=gen)[:, None]).long()
        ids = torch.randint(0, cfg.model.vocab_size, (rows, s), generator=gen) * mask
        images = torch.rand(rows, 3, cfg.model.image_size, cfg.model.image_size, generator=gen) * 2 - 1
        out.append({"images": images, "text_ids": ids, "text_mask": mask, "microbatch": i})
    return out


def _main_grads(stages) -> dict:
    return {n: p.main_grad.clone() for n, p in stages.modules[0].named_parameters()}


def _one_pass_reference(stages, microbatches, loss_cfg, group):
    """Every microbatch's forward with its graph kept, then the joint loss's backward once."""
    from m2megatron.loss import contrastive_loss

    for chunk in stages.chunks:
        chunk.zero_grad_buffer()
    module = stages.modules[0]
    outs = [module(images=mb["images"], text_ids=mb["text_ids"], text_mask=mb["text_mask"]) for mb in microbatches]
    loss = contrastive_loss(torch.cat([o.image for o in outs]), torch.cat([o.text for o in outs]),
                            outs[-1].logit_scale, group=group, config=loss_cfg)
    loss.backward()
    return loss.detach(), _main_grads(stages)


def _accumulated_vs_one_pass() -> dict:
    from m2megatron.parallel import initialize, seed_everything
    from m2megatron.runtime import ContrastiveStep, build_stages

    cfg = load_config(overrides=SIZES)
    groups = initialize(cfg.parallel)
    seed_everything(cfg.train.seed, groups)
    stages = build_stages(cfg, groups)
    microbatches = _microbatches(cfg, 4, 2)
    start = rng.capture()
    for chunk in stages.chunks:
        chunk.zero_grad_buffer()
    two_pass_loss = ContrastiveStep(stages)(microbatches)
    two_pass = _main_grads(stages)
    rng.restore(start)
    ref_loss, reference = _one_pass_reference(stages, microbatches, cfg.loss, groups.loss)
    _, other_masks = _one_pass_reference(stages, microbatches, cfg.loss, groups.loss)  # the streams moved on
    worst = max((two_pass[k] - reference[k]).abs().max().item() for k in reference)
    moved = max((other_masks[k] - reference[k]).abs().max().item() for k in reference)
    return {"losses": (float(two_pass_loss), float(ref_loss)), "worst": worst, "other_masks": moved}


def test_accumulated_two_pass_step_replays_drop_path_exactly(dist_pool):
    (result,) = dist_pool(1).run(_accumulated_vs_one_pass)
    two_pass, reference = result["losses"]
    assert two_pass == pytest.approx(reference, abs=1e-6)
    assert result["worst"] <= 1e-6, result
    assert result["other_masks"] > 1e-3, "drop-path masks do not matter here: the test could not fail"


def test_stop_and_resume_with_drop_path_is_bit_identical(dist_pool, tmp_path):
    from tests.distributed.test_trainer import _final_params, _fit, _fit_preempted_at

    layout = ["--model.drop_path_rate=0.2", "--loss.accumulation_steps=2", "--train.train_steps=4",
              "--train.log_interval=1"]
    pool = dist_pool(2)  # DP2: each replica's streams are its own and restored as such
    pool.run(_fit, str(tmp_path / "straight"), layout + ["--train.eval_at_end=false"])
    assert pool.run(_fit_preempted_at, str(tmp_path / "resumed"), 2, layout) == [2, 2]
    pool.run(_fit, str(tmp_path / "resumed"), layout + ["--train.eval_at_end=false"])

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines)}

    assert losses("resumed") == losses("straight")
    a = pool.run(_final_params, str(tmp_path / "straight"), layout)
    b = pool.run(_final_params, str(tmp_path / "resumed"), layout)
    for rank in range(2):
        assert a[rank].keys() == b[rank].keys()
        assert all(torch.equal(a[rank][k], b[rank][k]) for k in a[rank])
