"""Acceptance: `python -m m2megatron.eval.retrieval` on the reference caption files (beside SPEC.md) with
synthetic stand-in images reproduces a literal loop implementation of SPEC.md §6.1.

The model is a deterministic fake: each image file is a solid colour that encodes its line number, and
the fake maps it to a fixed feature vector; a caption's features depend only on its token ids. Features
are small integers / 8, so every similarity is exact in float32 and the many exact ties exercise the
tie order. Everything else is the real launcher: jsonl reading, the image root, PIL decoding, the
reference tokenizer and text preprocessing, feature extraction, metrics and the results files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from m2megatron.data.tokenizer import Tokenizer, preprocess_eval_text
from tests.unit.test_eval_metrics import literal_reference_recall

pytestmark = pytest.mark.unit

SIDE, DIM = 8, 16


class _Out(NamedTuple):
    image: torch.Tensor | None
    text: torch.Tensor | None


class FakeM2(torch.nn.Module):
    """Stands in for an M2Encoder stage: image → table row of the colour-coded index; text → table row by ids."""

    def __init__(self, image_table: torch.Tensor, text_table: dict[tuple[int, ...], torch.Tensor]):
        super().__init__()
        from megatron.core.enums import ModelType
        from megatron.core.model_parallel_config import ModelParallelConfig

        self.cfg = SimpleNamespace(image_size=SIDE, embed_dim=DIM, max_text_len=52, num_image_tokens=2)
        self.config = ModelParallelConfig()  # what Megatron's schedule reads off a model
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process = self.post_process = True
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.image_table, self.text_table = image_table, text_table

    def set_input_tensor(self, tensor) -> None:
        """One stage: nothing arrives from a previous one."""

    def forward(self, images=None, text_ids=None, text_mask=None):
        if images is not None:
            rgb = torch.round((images[:, :, SIDE // 2, SIDE // 2] * 0.5 + 0.5) * 255).long()  # [b, 3]
            assert (images == images[:, :, :1, :1]).all(), "stand-in images are solid colours"
            return _Out(self.image_table[rgb[:, 0] + 256 * rgb[:, 1]], None)
        rows = [self.text_table[tuple(i[m.bool()].tolist())] for i, m in zip(text_ids, text_mask)]
        return _Out(None, torch.stack(rows))


def _write_images(captions_file: Path, root: Path) -> list[dict]:
    records = [json.loads(line) for line in captions_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, rec in enumerate(records):
        path = root / rec["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (SIDE, SIDE), (i % 256, i // 256, 0)).save(path, format="PNG")  # lossless, whatever the name
    return records


def _fake_model(records, tokenizer: Tokenizer, seed: int):
    """Integer-valued features: each caption string near the features of the first image that has it."""
    rng = np.random.default_rng(seed)
    image_table = rng.integers(-3, 4, size=(len(records), DIM)).astype(np.float32) / 8
    text_vectors: dict[str, np.ndarray] = {}
    for i, rec in enumerate(records):
        for cap in rec["caption"]:
            cap = preprocess_eval_text(cap)
            noise = rng.integers(-3, 4, size=DIM).astype(np.float32) / 8
            text_vectors.setdefault(cap, image_table[i] + noise)
    strings = list(text_vectors)
    ids, mask = tokenizer.encode(strings)
    table = {}
    for s, row, m in zip(strings, ids, mask):
        key = tuple(row[m.bool()].tolist())
        assert key not in table or np.array_equal(table[key], text_vectors[s]), "token collision"
        table[key] = torch.from_numpy(text_vectors[s])
    return FakeM2(torch.from_numpy(image_table), table), image_table, text_vectors


def _run_launcher(monkeypatch, tmp_path, argv, model):
    from m2megatron.eval import launcher, retrieval

    monkeypatch.setattr(launcher, "build_eval_model", lambda cfg, groups, checkpoint, fmt: (cfg, [model]))
    monkeypatch.setattr(sys, "argv", ["m2megatron.eval.retrieval", *argv])
    assert retrieval.main() == 0
    return json.loads((tmp_path / "out" / "results.json").read_text())


@pytest.mark.parametrize("name", ["coco-cn_test", "f30k-cn_test", "f30k_caption_karpathy_test"])
def test_launcher_matches_literal_reference_on_reference_caption_files(name, reference_dir, tmp_path, monkeypatch):
    captions_file = reference_dir / f"{name}.jsonl"
    records = _write_images(captions_file, tmp_path / "images")
    tokenizer = Tokenizer(reference_dir / "sp.model", 52)
    model, image_table, text_vectors = _fake_model(records, tokenizer, seed=len(name))
    results = _run_launcher(monkeypatch, tmp_path, [
        "--captions", str(captions_file), "--image-root", str(tmp_path / "images"),
        "--tokenizer", str(reference_dir / "sp.model"), "--out", str(tmp_path / "out"),
        "--eval.batch_size=100", "--eval.num_workers=1", "--checkpoint-format", "none"], model)
    (entry,) = results
    caps = [[preprocess_eval_text(c) for c in rec["caption"]] for rec in records]
    txt_flat = np.stack([text_vectors[c] for cs in caps for c in cs])
    expected = literal_reference_recall(image_table, txt_flat, caps)
    assert entry["metrics"] == expected
    assert entry["name"] == name and entry["num_images"] == len(records)
    assert entry["num_texts"] == sum(len(r["caption"]) for r in records)
    assert entry["images_per_s"] > 0 and entry["texts_per_s"] > 0 and entry["skipped"] == {}
    table = (tmp_path / "out" / "results.md").read_text()
    assert f"| {name} | {expected['i2t_r1']:.2f} |" in table
    assert 0 < expected["mr"] < 100  # a non-trivial ranking, not all hits or all misses


def test_reference_preprocessing_flag_changes_only_the_texts(tmp_path):
    from m2megatron.eval.batches import prepare_texts

    assert prepare_texts(["A “Big” Dog"], True) == ['a "big" dog']
    assert prepare_texts(["A “Big” Dog"], False) == ["A “Big” Dog"]
