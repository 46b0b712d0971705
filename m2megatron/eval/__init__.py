"""Evaluation: retrieval (SPEC.md §6.1 protocol) and zero-shot classification, at any TP/PP/DP layout.

    python -m m2megatron.eval.retrieval ...   /   python -m m2megatron.eval.zeroshot ...   (docs/EVAL.md)

In-process, every rank calls `evaluate_retrieval(model_chunks, groups, images, captions, tokenizer=...)`.
"""

from m2megatron.eval.metrics import RETRIEVAL_KEYS, CaptionIndex, retrieval_metrics, topk_accuracy
from m2megatron.eval.retrieval import evaluate_retrieval, retrieval_report
from m2megatron.eval.zeroshot import evaluate_zeroshot, zeroshot_report

__all__ = ["RETRIEVAL_KEYS", "CaptionIndex", "evaluate_retrieval", "evaluate_zeroshot", "retrieval_metrics",
           "retrieval_report", "topk_accuracy", "zeroshot_report"]
