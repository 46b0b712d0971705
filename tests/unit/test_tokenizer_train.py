"""Training a new SentencePiece model with the GLM special pieces, and the cached synthetic tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from m2megatron.data.sp_train import SPECIAL_PIECES, synthetic_tokenizer_path, train_sentencepiece
from m2megatron.data.synthetic import all_captions
from m2megatron.data.tokenizer import Tokenizer
from tests.harness import run_script

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.unit


def test_special_pieces_match_reference_ids(reference_dir):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor()
    ref.Load(str(reference_dir / "sp.model"))
    assert [ref.IdToPiece(50000 + i) for i in range(len(SPECIAL_PIECES))] == list(SPECIAL_PIECES)


def test_specials_at_base_when_vocab_is_large_enough(tmp_path):
    """With `special_base` inside the vocab (50000 for the real size), specials sit at base…base+19."""
    caps = all_captions()
    at_end = Tokenizer(train_sentencepiece(caps, tmp_path / "end.model", 200))
    at_base = Tokenizer(train_sentencepiece(caps, tmp_path / "base.model", 200, special_base=100))
    assert [at_base.sp.PieceToId(p) for p in SPECIAL_PIECES] == list(range(100, 120))
    n = at_end.vocab_size - len(SPECIAL_PIECES)
    assert [at_end.sp.PieceToId(p) for p in SPECIAL_PIECES] == list(range(n, n + 20))
    assert (at_base.cls_id, at_base.eos_id, at_end.eos_id) == (102, 100, n)
    for text in caps[::97] + ["a  b   c", "[CLS] x <|endoftext|>"]:
        assert at_base.sp.EncodeAsPieces(text) == at_end.sp.EncodeAsPieces(text)


def test_synthetic_tokenizer_cached_and_covers_captions(tmp_path):
    path = synthetic_tokenizer_path(tmp_path)
    mtime = path.stat().st_mtime_ns
    assert synthetic_tokenizer_path(tmp_path) == path and path.stat().st_mtime_ns == mtime
    tok = Tokenizer(path)
    assert tok.vocab_size < 400
    assert all(0 not in tok.tokenize_ids(c) and len(tok.tokenize_ids(c)) <= 50 for c in all_captions())
    assert tok.encode_one("  x")[0][:3] == [tok.cls_id, tok.sp.PieceToId("▁"), tok.sp.PieceToId("<|blank_2|>")]


def test_train_tokenizer_tool(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(all_captions()[:2000]), encoding="utf-8")
    out = tmp_path / "t.model"
    res = run_script("tools/train_tokenizer.py", "--input", str(corpus), "--out", str(out), "--vocab-size", "150",
                     cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert Tokenizer(out).vocab_size == 170 and "note:" not in res.stderr
    short = run_script("tools/train_tokenizer.py", "--input", str(corpus), "--out", str(out), "--vocab-size", "50000",
                       cwd=REPO, timeout=120)
    assert short.returncode == 0, short.stderr
    assert f"note: the corpus gave only {Tokenizer(out).vocab_size - 20} of the 50000 pieces asked for" in short.stderr
    bad = run_script("tools/train_tokenizer.py", "--input", str(tmp_path / "nope.txt"), "--out", str(out),
                     cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "nope.txt" in bad.stderr
