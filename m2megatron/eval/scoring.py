"""Score a read eval set with in-memory model stages, whatever its task (evaluation during training and
tests; each launcher calls its own task's report directly)."""

from __future__ import annotations

from m2megatron.eval.sets import SetData, report_options


def score_set(model_chunks, groups, cfg, tokenizer, data: SetData) -> dict:
    """The retrieval or zero-shot report of `data` (collective: every rank of the job calls it)."""
    # Imported here: the trainer imports this module, and the launcher modules loaded before
    # `python -m m2megatron.eval.retrieval` runs would make runpy warn "found in sys.modules".
    from m2megatron.eval.retrieval import retrieval_report
    from m2megatron.eval.zeroshot import zeroshot_report

    if data.task == "retrieval":
        return retrieval_report(model_chunks, groups, data.images, data.captions, tokenizer=tokenizer,
                                **report_options(cfg, data))
    return zeroshot_report(model_chunks, groups, data.images, data.labels, data.class_names, data.templates,
                           tokenizer=tokenizer, templates_source=data.templates_source, **report_options(cfg, data))
