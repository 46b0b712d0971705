"""Train, then (train.eval_at_end) evaluate zero-shot retrieval on the held-out synthetic set."""

from __future__ import annotations

import json
import logging

import torch.distributed as dist

from m2megatron.config.run import RunConfig
from m2megatron.train.trainer import Trainer

log = logging.getLogger("m2megatron.train")


def train_and_evaluate(cfg: RunConfig) -> dict | None:
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        if trainer.preemption.reason is not None or not cfg.train.eval_at_end:
            return None
        results = evaluate_held_out(trainer)
    finally:
        trainer.close()
    if dist.get_rank() == 0:
        path = trainer.run_dir / "results.json"
        path.write_text(json.dumps(results, indent=2))
        print(format_results(results), flush=True)
        log.info("results written to %s", path)
    return results


def evaluate_held_out(trainer: Trainer) -> dict:
    """Zero-shot retrieval on the synthetic eval split (scenes the training split never draws)."""
    from m2megatron.eval import evaluate_retrieval
    from m2megatron.eval.launcher import synthetic_eval_set

    images, captions = synthetic_eval_set(trainer.cfg)
    for module in trainer.modules:
        module.eval()
    with trainer.stages.params_in_sync():
        results = evaluate_retrieval(trainer.modules, trainer.groups, images, captions, tokenizer=trainer.tokenizer,
                                     batch_size=trainer.cfg.eval.batch_size)
    return {**results, "num_images": len(images), "step": trainer.step}


def format_results(results: dict) -> str:
    n = results.get("num_images", 0)
    chance = f" (chance R@1 = {100.0 / n:.2f}%)" if n else ""
    return (f"held-out retrieval on {n} images{chance}: image→text R@1 {results['i2t_r1']:.1f}%, "
            f"text→image R@1 {results['t2i_r1']:.1f}%, MR {results.get('mr', float('nan')):.1f}")
