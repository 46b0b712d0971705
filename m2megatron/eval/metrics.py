"""Retrieval and classification metrics of the reference protocol (SPEC.md §6.1).

The reference (`eval_retrieval.py`) builds a flat list of every caption in file order, duplicates
included, and ranks with `np.argsort(-sim)`:

- image→text: the positives of image i are, for each of its captions c, the index of the *last*
  occurrence of the string c in the flat list; a query hits at K when any positive is in its top K;
- text→image: every flat caption is a query; its positives are all images that have that string;
- R@K is the percentage of queries that hit; MR is the mean of the six recalls (K = 1, 5, 10).

Ranks are counted, not sorted: the position of item p in a descending ranking is
#{j: s_j > s_p} + #{j < p: s_j = s_p}. That is `np.argsort(-sim, kind="stable")`; the reference's
default sort leaves the order of exact ties (e.g. the copies of a duplicated caption) unspecified, and
a stable order is the one well-defined choice among its possible outcomes.

Text features are given per *unique* caption string: the reference's copies of a duplicated caption
have bit-identical features, and computing the similarity once per string and indexing it keeps the
copies exactly tied whatever the GEMM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

RECALL_KS = (1, 5, 10)
RETRIEVAL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mr")
_CHUNK_ELEMENTS = 1 << 24  # comparisons per chunk of the rank count (≈16 M booleans)


@dataclass(frozen=True)
class CaptionIndex:
    """Which flat caption belongs to which image, and which unique string each caption is."""

    unique_texts: list[str]
    """Distinct caption strings in order of first appearance (U of them)."""
    text_unique: torch.Tensor
    """[T] long: unique-string id of each flat caption (file order, duplicates included)."""
    text_image: torch.Tensor
    """[T] long: image index of each flat caption."""
    num_images: int
    """I, the number of images."""

    @classmethod
    def from_captions(cls, captions: Sequence[Sequence[str]]) -> CaptionIndex:
        """Build from per-image caption lists (already preprocessed). Every image needs ≥ 1 caption."""
        ids: dict[str, int] = {}
        text_unique, text_image = [], []
        for image, caps in enumerate(captions):
            if isinstance(caps, str) or len(caps) == 0:
                raise ValueError(f"retrieval: image {image} needs a non-empty list of captions, got {caps!r}")
            for cap in caps:
                text_unique.append(ids.setdefault(cap, len(ids)))
                text_image.append(image)
        return cls(unique_texts=list(ids), text_unique=torch.tensor(text_unique, dtype=torch.long),
                   text_image=torch.tensor(text_image, dtype=torch.long), num_images=len(captions))

    @property
    def num_texts(self) -> int:
        return int(self.text_unique.numel())

    def i2t_positives(self) -> torch.Tensor:
        """[I, P] long: flat indices of the last occurrence of each caption of each image, padded with -1."""
        last = torch.zeros(len(self.unique_texts), dtype=torch.long)
        last[self.text_unique] = torch.arange(self.num_texts)  # later writes win → last occurrence
        per_image: list[set[int]] = [set() for _ in range(self.num_images)]
        for u, image in zip(self.text_unique.tolist(), self.text_image.tolist()):
            per_image[image].add(int(last[u]))
        return _pad([sorted(s) for s in per_image])

    def t2i_positives(self) -> torch.Tensor:
        """[U, P] long: images that have each unique string among their captions, padded with -1."""
        per_unique: list[set[int]] = [set() for _ in self.unique_texts]
        for u, image in zip(self.text_unique.tolist(), self.text_image.tolist()):
            per_unique[u].add(image)
        return _pad([sorted(s) for s in per_unique])


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=1)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def best_rank(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """[Q] long: the best (smallest) 0-based stable descending rank among each query's positives.

    scores [Q, N]; positives [Q, P] column indices padded with -1 (a row of only -1 gets rank N).
    """
    num_items = scores.shape[1]
    valid = positives >= 0
    pos = positives.clamp(min=0)
    pos_score = scores.gather(1, pos)  # [Q, P]
    column = torch.arange(num_items, device=scores.device)
    s = scores[:, None, :]  # [Q, 1, N]
    p = pos_score[:, :, None]  # [Q, P, 1]
    ahead = (s > p) | ((s == p) & (column < pos[:, :, None]))  # [Q, P, N]
    rank = ahead.sum(-1)
    rank = torch.where(valid, rank, torch.full_like(rank, num_items))
    return rank.min(dim=1).values


def _ranks_chunked(queries: torch.Tensor, items: torch.Tensor, positives: torch.Tensor,
                   columns: torch.Tensor | None = None) -> torch.Tensor:
    """Best positive rank of each query row against `items` ([Q,E] @ [M,E]ᵀ), chunked over queries.

    `columns` [N] re-indexes the similarity columns (image→text: unique string → flat caption).
    """
    num_cols = items.shape[0] if columns is None else columns.numel()
    step = max(1, _CHUNK_ELEMENTS // max(1, positives.shape[1] * num_cols))
    ranks = []
    for start in range(0, queries.shape[0], step):
        sim = queries[start:start + step] @ items.T  # [q, M]
        if columns is not None:
            sim = sim[:, columns]  # [q, T]: copies of one string are exactly tied
        ranks.append(best_rank(sim, positives[start:start + step]))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=queries.device)


def _percent(hits: torch.Tensor) -> float:
    """100 · hits / queries, from integer counts (so equal hit counts give bit-equal floats)."""
    return 100.0 * int(hits.sum()) / hits.numel()


def _check_features(name: str, feats: torch.Tensor, rows: int) -> torch.Tensor:
    if feats.dim() != 2 or feats.shape[0] != rows:
        raise ValueError(f"retrieval: {name} features must be [{rows}, E], got {tuple(feats.shape)}")
    if not torch.isfinite(feats).all():
        raise ValueError(f"retrieval: {name} features contain NaN or Inf; refusing to compute metrics")
    return feats.float()


def retrieval_metrics(image_feats: torch.Tensor, unique_text_feats: torch.Tensor,
                      index: CaptionIndex) -> dict[str, float]:
    """R@1/5/10 both ways and MR (percentages), exactly as the reference protocol.

    image_feats [I, E]; unique_text_feats [U, E] in `index.unique_texts` order. Features are compared
    by plain dot product (the model's embeddings are already L2-normalized).
    """
    img = _check_features("image", image_feats, index.num_images)
    txt = _check_features("text", unique_text_feats, len(index.unique_texts))
    device = img.device  # the ground truth joins the features on their device (the GPU in a GPU job)
    text_unique = index.text_unique.to(device)
    i2t_rank = _ranks_chunked(img, txt, index.i2t_positives().to(device), columns=text_unique)  # [I]
    t2i_rank = _ranks_chunked(txt, img, index.t2i_positives().to(device))[text_unique]  # [T], per flat query
    out: dict[str, float] = {}
    for direction, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in RECALL_KS:
            out[f"{direction}_r{k}"] = _percent(rank < k)
    out["mr"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS) / 6.0
    return out


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (percent) of [N, C] scores against [N] labels; ties broken by the lower class index."""
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"zero-shot: logits [N, C] and labels [N] expected, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("zero-shot: no images to score")
    if not torch.isfinite(logits).all():
        raise ValueError("zero-shot: scores contain NaN or Inf; refusing to compute accuracy")
    rank = best_rank(logits.float(), labels.long().to(logits.device)[:, None])
    return {f"top{k}": _percent(rank < k) for k in ks}
