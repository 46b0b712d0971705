"""Retrieval and zero-shot metrics on hand-built similarity matrices with known answers, and against a
literal loop implementation of SPEC.md §6.1 on random tie-heavy features."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from m2megatron.eval.metrics import RETRIEVAL_KEYS, CaptionIndex, best_rank, retrieval_metrics, topk_accuracy

pytestmark = pytest.mark.unit


def literal_reference_recall(img: np.ndarray, txt_flat: np.ndarray, captions: list[list[str]]) -> dict[str, float]:
    """SPEC.md §6.1 step by step: flat caption list, last-occurrence ids, both ground-truth matrices,
    argsort(-sim) per query (stable, the one well-defined order of the reference's ties), any-hit in top K."""
    texts, text_ids = [], {}
    for caps in captions:
        for c in caps:
            text_ids[c] = len(texts)  # a later duplicate overwrites: the last occurrence
            texts.append(c)
    assert txt_flat.shape[0] == len(texts)
    img2txt_gt = np.zeros((len(captions), len(texts)), dtype=bool)
    images_of = defaultdict(set)
    for i, caps in enumerate(captions):
        for c in caps:
            img2txt_gt[i, text_ids[c]] = True
            images_of[c].add(i)
    txt2img_gt = np.zeros((len(texts), len(captions)), dtype=bool)
    for t, c in enumerate(texts):
        for j in images_of[c]:
            txt2img_gt[t, j] = True
    out = {}
    for name, sim, gt in (("t2i", txt_flat @ img.T, txt2img_gt), ("i2t", img @ txt_flat.T, img2txt_gt)):
        for k in (1, 5, 10):
            hits = 0
            for q in range(sim.shape[0]):
                order = np.argsort(-sim[q], kind="stable")
                if gt[q, order[:k]].any():
                    hits += 1
            out[f"{name}_r{k}"] = 100.0 * hits / sim.shape[0]
    out["mr"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)) / 6
    return out


def metrics_of_similarity(sim: list[list[float]], captions: list[list[str]]) -> dict[str, float]:
    """Metrics for a given image × unique-caption similarity (one-hot image features, text features = simᵀ)."""
    s = torch.tensor(sim, dtype=torch.float32)
    index = CaptionIndex.from_captions(captions)
    assert s.shape == (index.num_images, len(index.unique_texts))
    return retrieval_metrics(torch.eye(index.num_images), s.T.contiguous(), index)


def test_perfect_diagonal_scores_100_everywhere():
    m = metrics_of_similarity([[0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.0, 0.3, 0.7]], [["a"], ["b"], ["c"]])
    assert set(m) == set(RETRIEVAL_KEYS)
    assert all(v == 100.0 for v in m.values())


def test_multi_caption_image_is_any_hit_for_i2t_and_every_caption_is_a_t2i_query():
    # image 0: captions a, b; image 1: c. Unique order a, b, c.
    sim = [[0.1, 0.9, 0.5],   # image 0 ranks b (positive) first → hit at 1
           [0.6, 0.2, 0.4]]   # image 1 ranks a first, c second → miss at 1, hit at 5
    m = metrics_of_similarity(sim, [["a", "b"], ["c"]])
    assert m["i2t_r1"] == 50.0 and m["i2t_r5"] == 100.0
    # t2i queries a, b, c: a → [0.1, 0.6] ranks image 1 first (miss), b → image 0 (hit), c → [0.5, 0.4] image 0 (miss)
    assert m["t2i_r1"] == pytest.approx(100 / 3) and m["t2i_r5"] == 100.0
    assert m["mr"] == pytest.approx((50 + 100 + 100 + 100 / 3 + 100 + 100) / 6)


def test_duplicate_captions_follow_the_reference_ground_truth():
    # Flat captions x(0) y(1) x(2) z(3); x belongs to both images; only its last copy (2) is an i2t positive.
    sim = [[0.9, 0.1, 0.5],   # image 0 vs (x, y, z): flat scores 0.9, 0.1, 0.9, 0.5
           [0.2, 0.3, 0.8]]   # image 1: flat 0.2, 0.3, 0.2, 0.8
    m = metrics_of_similarity(sim, [["x", "y"], ["x", "z"]])
    # image 0: the first copy of x (not a positive) ties with the last and comes first → miss at 1.
    assert m["i2t_r1"] == 50.0 and m["i2t_r5"] == 100.0
    # t2i queries x, y, x, z: x is positive for both images (hit), y → image 1 first (miss), z → image 1 (hit).
    assert m["t2i_r1"] == 75.0 and m["t2i_r10"] == 100.0
    assert m["mr"] == pytest.approx((50 + 100 + 100 + 75 + 100 + 100) / 6)


def test_duplicate_caption_within_one_image_counts_every_copy_as_a_t2i_query():
    index = CaptionIndex.from_captions([["same", "same"], ["other"]])
    assert index.num_texts == 3 and index.unique_texts == ["same", "other"]
    assert index.i2t_positives().tolist() == [[1], [2]]
    m = metrics_of_similarity([[0.1, 0.9], [0.9, 0.1]], [["same", "same"], ["other"]])
    # both copies of "same" rank image 1 first: 0 of 3 t2i queries hit at 1
    assert m["t2i_r1"] == 0.0 and m["i2t_r1"] == 0.0 and m["i2t_r5"] == 100.0


def test_ties_between_images_rank_the_lower_index_first():
    m = metrics_of_similarity([[0.5, 0.0], [0.5, 0.0]], [["a"], ["b"]])
    assert m["t2i_r1"] == 50.0  # query a hits (image 0 first), query b: b's scores tie at 0.0 → image 0 first, miss


def test_best_rank_counts_strictly_greater_plus_earlier_ties():
    scores = torch.tensor([[0.3, 0.7, 0.7, 0.1]])
    assert best_rank(scores, torch.tensor([[2, -1]])).item() == 1
    assert best_rank(scores, torch.tensor([[3, 0]])).item() == 2
    assert best_rank(scores, torch.tensor([[-1, -1]])).item() == 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_literal_reference_on_random_tie_heavy_features(seed):
    rng = np.random.default_rng(seed)
    vocab = [f"c{i}" for i in range(40)]  # few strings → many duplicates across and within images
    captions = [list(rng.choice(vocab, size=rng.integers(1, 4))) for _ in range(30)]
    index = CaptionIndex.from_captions(captions)
    # small integers / 4: exact float32 dot products, lots of exact ties
    img = rng.integers(-2, 3, size=(30, 6)).astype(np.float32) / 4
    txt_u = rng.integers(-2, 3, size=(len(index.unique_texts), 6)).astype(np.float32) / 4
    txt_flat = txt_u[index.text_unique.numpy()]
    ours = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt_u), index)
    assert ours == literal_reference_recall(img, txt_flat, captions)


def test_chunked_ranks_equal_unchunked(monkeypatch):
    import m2megatron.eval.metrics as metrics

    rng = np.random.default_rng(5)
    captions = [[f"t{i}", f"u{i}"] for i in range(50)]
    index = CaptionIndex.from_captions(captions)
    img, txt = torch.from_numpy(rng.normal(size=(50, 8))), torch.from_numpy(rng.normal(size=(100, 8)))
    whole = retrieval_metrics(img, txt, index)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 7)
    assert retrieval_metrics(img, txt, index) == whole


def test_bad_inputs_raise_instead_of_scoring():
    with pytest.raises(ValueError, match="image 1 needs a non-empty list"):
        CaptionIndex.from_captions([["a"], []])
    index = CaptionIndex.from_captions([["a"], ["b"]])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan")], [1.0]]), torch.ones(2, 1), index)
    with pytest.raises(ValueError, match="text features must be"):
        retrieval_metrics(torch.ones(2, 1), torch.ones(3, 1), index)


def test_topk_accuracy_known_answers_and_ties():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.4], [0.0, 0.0, 0.0]])
    labels = torch.tensor([1, 1, 0, 2])
    # ranks of the true class: 0, 1 (tie with class 0, lower index first), 2, 2
    acc = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert acc == {"top1": 25.0, "top2": 50.0, "top5": 100.0}
    with pytest.raises(ValueError, match="NaN"):
        topk_accuracy(torch.tensor([[float("inf"), 0.0]]), torch.tensor([0]))
