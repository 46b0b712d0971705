"""Train, then (train.eval_at_end) evaluate the configured eval sets (m2megatron.eval.during_training) with
the training model: the held-out synthetic scenes for synthetic data, plus every `eval.*` set."""

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
        if not trainer.finished or trainer.preemption.reason is not None or not cfg.train.eval_at_end:
            return None
        results = {"step": trainer.step, **trainer.evaluate()}
    finally:
        trainer.close()
    if dist.get_rank() == 0:
        path = trainer.run_dir / "results.json"
        path.write_text(json.dumps(results, indent=2))
        print(format_results(results), flush=True)
        log.info("results written to %s", path)
    return results


def format_results(results: dict) -> str:
    """One line per evaluated set of a flat `eval/<set>/<metric>` dict (the held-out synthetic set with its chance)."""
    from m2megatron.eval.during_training import by_set

    lines = []
    for name, m in by_set(results).items():
        n = int(m.get("num_images", 0))
        if "i2t_r1" in m:
            label = "held-out retrieval" if name == "synthetic" else f"{name} retrieval"
            chance = f" (chance R@1 = {100.0 / n:.2f}%)" if n else ""
            lines.append(f"{label} on {n} images{chance}: image→text R@1 {m['i2t_r1']:.1f}%, "
                         f"text→image R@1 {m['t2i_r1']:.1f}%, MR {m.get('mr', float('nan')):.1f}")
        elif "top1" in m:
            lines.append(f"{name} zero-shot on {n} images: top-1 {m['top1']:.1f}%, "
                         f"top-5 {m.get('top5', float('nan')):.1f}%")
    return "\n".join(lines) or "no eval sets configured"
