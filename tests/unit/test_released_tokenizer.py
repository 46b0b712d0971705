"""`python -m m2megatron.tokenize --check FILE`: OK for the reference repository's sp.model, one line naming
the mismatch for anything else."""

from __future__ import annotations

import pytest

from m2megatron import tokenize
from m2megatron.data import released_tokenizer

pytestmark = pytest.mark.unit


def _check(capsys, *argv):
    code = tokenize.main(["--check", *map(str, argv)])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1, out
    return code, out[0]


def test_the_reference_sp_model_is_the_released_tokenizer(reference_dir, capsys):
    assert released_tokenizer.sha256(reference_dir / "sp.model") == released_tokenizer.SHA256
    code, line = _check(capsys, reference_dir / "sp.model", "--golden", reference_dir / "tokenizer_golden_ids.json")
    assert code == 0 and line.startswith("OK ") and "115,244 pieces" in line


def test_a_mismatch_is_one_line_naming_it(reference_dir, tmp_path, capsys, monkeypatch):
    from m2megatron.data.sp_train import synthetic_tokenizer_path

    code, line = _check(capsys, synthetic_tokenizer_path(tmp_path))
    assert code == 1 and line.startswith("MISMATCH ") and "276 pieces, the released tokenizer has 115,244" in line
    (tmp_path / "not_a_model").write_text("hello")
    code, line = _check(capsys, tmp_path / "not_a_model")
    assert code == 1 and "cannot load SentencePiece model" in line
    monkeypatch.setattr(released_tokenizer, "SHA256", "0" * 64)
    code, line = _check(capsys, reference_dir / "sp.model")
    assert code == 1 and "is not the released file's 000" in line and "encodings agree" in line
