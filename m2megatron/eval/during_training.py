"""Evaluation during and at the end of training: the sets configured in `eval.*`, scored with the training
model's own stage modules at the training layout (no second model build).

    sets = configured_sets(cfg)            # at start-up: names every set, fails early on a missing path
    metrics = evaluate_configured_sets(model_chunks, groups, cfg, tokenizer, step)   # every rank
    # {"eval/synthetic/i2t_r1": 85.9, ..., "eval/imagenet-1k-zh/top1": 41.2, "eval/<set>/skipped": 0, ...}

Metric keys are `eval/<set>/<metric>` with the launchers' metric names (i2t_r1 … mr, top1, top5),
`eval/<set>/num_images`, and the skipped inputs as `eval/<set>/skipped` (the total) and
`eval/<set>/skipped_<reason>`. The held-out synthetic set is a set only for data.source=synthetic.
The run report (m2megatron.eval.report) reads these keys back from metrics.jsonl.
"""

from __future__ import annotations

import logging
from pathlib import Path

from m2megatron.eval.inputs import BadInputs
from m2megatron.eval.scoring import score_set
from m2megatron.eval.sets import EvalSet, read_set, set_name

log = logging.getLogger("m2megatron.eval")
KEY_PREFIX = "eval"


def _exists(setting: str, path: str, *, folder: bool) -> None:
    ok = Path(path).is_dir() if folder else Path(path).exists()
    if not ok:
        raise ValueError(f"{setting}: {path} does not exist")


def _specs(cfg) -> list[EvalSet]:
    ev = cfg.eval
    specs = [EvalSet(name="synthetic", kind="synthetic")] if cfg.data.source == "synthetic" else []
    for path in ev.retrieval_jsonl:
        _exists("eval.retrieval_jsonl", path, folder=False)
        specs.append(EvalSet(name=set_name(path), kind="jsonl", source=(path,), image_root=ev.image_root))
    specs += [EvalSet(name=set_name(p), kind="caption_shards", source=(p,)) for p in ev.retrieval_shards]
    for entry in ev.zeroshot_folders:
        folder, _, classes = entry.partition("=")
        _exists("eval.zeroshot_folders", folder, folder=True)
        specs.append(EvalSet(name=set_name(folder), kind="folder", source=(folder,), classes=classes or None))
    if ev.imagenet is not None:
        _exists("eval.imagenet", ev.imagenet, folder=True)
        specs += [EvalSet(name=f"imagenet-1k-{lang}", kind="imagenet", source=(ev.imagenet,), lang=lang,
                          labels=ev.imagenet_labels) for lang in ev.imagenet_languages]
    for root in ev.benchmark_wds:
        _exists("eval.benchmark_wds", root, folder=True)
        specs.append(EvalSet(name=set_name(root), kind="benchmark_wds", source=(root,), split=ev.benchmark_split))
    return specs


def configured_sets(cfg) -> list[EvalSet]:
    """Every set of `cfg.eval` (plus the synthetic held-out set for synthetic data), with distinct names.

    Raises ValueError naming the eval.* setting whose file or folder does not exist."""
    import dataclasses

    seen: dict[str, int] = {}
    out = []
    for spec in _specs(cfg):
        count = seen[spec.name] = seen.get(spec.name, 0) + 1
        out.append(spec if count == 1 else dataclasses.replace(spec, name=f"{spec.name}-{count}"))
    return out


def by_set(values: dict) -> dict[str, dict]:
    """{set: {metric: value}} of the flat `eval/<set>/<metric>` entries of a record (other keys ignored)."""
    sets: dict[str, dict] = {}
    for key, value in values.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == KEY_PREFIX:
            sets.setdefault(parts[1], {})[parts[2]] = value
    return sets


def flat_metrics(name: str, report: dict, skipped: dict[str, int]) -> dict[str, float]:
    """`eval/<name>/<metric>` entries of one set's report and its skipped-input counts."""
    prefix = f"{KEY_PREFIX}/{name}"
    out = {f"{prefix}/{k}": float(v) for k, v in report["metrics"].items()}
    out[f"{prefix}/num_images"] = float(report["num_images"])
    out[f"{prefix}/skipped"] = float(sum(skipped.values()))
    out.update({f"{prefix}/skipped_{reason}": float(n) for reason, n in skipped.items()})
    return out


def evaluate_configured_sets(model_chunks, groups, cfg, tokenizer, step: int) -> dict[str, float]:
    """Score every configured set with this rank's (training-layout) model chunks; collective over the job.

    Returns the same flat `eval/<set>/<metric>` dict on every rank (module docstring); the caller logs
    it. Bad inputs follow eval.on_bad_input (skip: counted in eval/<set>/skipped_<reason>).
    """
    out: dict[str, float] = {}
    for spec in configured_sets(cfg):
        bad = BadInputs(cfg.eval.on_bad_input)
        report = score_set(model_chunks, groups, cfg, tokenizer, read_set(spec, cfg, bad))
        out.update(flat_metrics(spec.name, report, bad.counts()))
        log.info("eval at step %d, %s: %s", step, spec.name, {k: round(v, 2) for k, v in report["metrics"].items()})
    return out
