"""The tokenizer against the reference GLM tokenizer's golden ids, and the tokenize command."""

from __future__ import annotations

import json

import pytest

from m2megatron.data.tokenizer import Tokenizer, encode_whitespaces, preprocess_eval_text, split_no_split_tokens
from tests.harness import run_module

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def ref_tokenizer(reference_dir):
    return Tokenizer(reference_dir / "sp.model", max_length=52)


def test_golden_ids_every_entry(reference_dir, ref_tokenizer):
    golden = json.loads((reference_dir / "tokenizer_golden_ids.json").read_text(encoding="utf-8"))
    assert set(golden) >= {"edge_cases"}
    total = 0
    for name, entries in golden.items():
        ids, mask = ref_tokenizer.encode([e["text"] for e in entries])
        for i, e in enumerate(entries):
            assert ids[i].tolist() == e["input_ids"], f"{name}[{i}] ids differ for {e['text']!r}"
            assert mask[i].tolist() == e["attention_mask"], f"{name}[{i}] mask differs for {e['text']!r}"
        total += len(entries)
    assert total >= 6053


def test_special_ids_and_spec_example(ref_tokenizer):
    t = ref_tokenizer
    assert (t.cls_id, t.eos_id, t.pad_id, t.vocab_size) == (50002, 50000, 50000, 115244)
    ids, mask = t.encode(["皮卡丘"])
    assert ids[0, :6].tolist() == [50002, 13687, 43861, 45415, 50000, 50000]
    assert ids.shape == mask.shape == (1, 52) and int(mask.sum()) == 5


def test_left_truncation_keeps_last_tokens(ref_tokenizer):
    t = ref_tokenizer
    text = " ".join(f"w{i}" for i in range(80))
    full = t.tokenize_ids(text)
    ids, mask = t.encode([text])
    assert ids[0].tolist() == [t.cls_id, *full[-50:], t.eos_id] and int(mask.sum()) == 52


def test_text_helpers():
    assert encode_whitespaces("a" + " " * 12 + "b") == "a<|blank_10|><|blank_2|>b"
    assert encode_whitespaces("a b  c") == "a b<|blank_2|>c"
    assert preprocess_eval_text("A \u201cQuote\u201d") == 'a "quote"'
    assert split_no_split_tokens("x [CLS]  y[MASK]") == ["x", "[CLS]", "y", "[MASK]"]


def test_tokenize_command(reference_dir, tmp_path):
    run = run_module("m2megatron.tokenize", "--sp-model", str(reference_dir / "sp.model"), "--max-length", "8",
                     input="皮卡丘\n\na  b\n", timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout.splitlines()
    rows = [json.loads(line) for line in out]
    assert len(rows) == 3
    assert rows[0] == {"input_ids": [50002, 13687, 43861, 45415, 50000, 50000, 50000, 50000],
                       "attention_mask": [1, 1, 1, 1, 1, 0, 0, 0]}
    assert rows[1]["input_ids"][:2] == [50002, 50000]
    assert rows[2]["input_ids"][:4] == [50002, 778, 50018, 43658]
