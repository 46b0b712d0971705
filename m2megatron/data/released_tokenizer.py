"""Is this file the released M2-Encoder tokenizer? The GLM `sp.model` of the reference repository
(alipay/Ant-Multi-Modal-Framework, prj/M2_Encoder/vlmo/tokenizer/sp.model; SPEC.md §3), checked by its
vocabulary, its special ids, a few encodings whose ids the reference tokenizer gave, optionally every
entry of a golden-ids file, and its sha256.

    python -m m2megatron.tokenize --check sp.model [--golden tokenizer_golden_ids.json]
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SHA256 = "b7fe3bcc8d284fcb782691411e8b6fd4f45d7245565b094de6ab795e66bcd32f"
VOCAB_SIZE = 115_244
SPECIAL_IDS = {"<|endoftext|>": 50000, "[SEP]": 50001, "[CLS]": 50002, "[MASK]": 50003, "[UNK]": 50004}
# Unpadded ids ([CLS] … <|endoftext|>) the reference GLMChineseTokenizer gives (SPEC.md §3 and its golden ids).
EXAMPLES = {
    "皮卡丘": [50002, 13687, 43861, 45415, 50000],
    "a  b   c    d": [50002, 778, 50018, 43658, 50017, 43510, 50016, 43513, 50000],
    "trailing space ": [50002, 64203, 50293, 43358, 50000],
    "𠀀 unknown char": [50002, 43358, 0, 52227, 26438, 50000],
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _golden_mismatch(tokenizer, golden: Path) -> str | None:
    try:
        sets = json.loads(golden.read_text(encoding="utf-8"))
        entries = [e for name in sorted(sets) for e in sets[name]]
        texts = [e["text"] for e in entries]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"{golden}: not a golden-ids file ({{set: [{{text, input_ids, attention_mask}}]}}; {exc})"
    ids, mask = tokenizer.encode(texts)
    for i, entry in enumerate(entries):
        if ids[i].tolist() != entry["input_ids"] or mask[i].tolist() != entry["attention_mask"]:
            return f"encodes {entry['text']!r} differently from {golden}"
    return None


def released_tokenizer_mismatch(path: str | Path, golden: str | Path | None = None) -> str | None:
    """None when `path` is the released tokenizer, else what differs (one line). Raises ValueError when the
    file is not a SentencePiece model at all."""
    from m2megatron.data.tokenizer import Tokenizer

    path = Path(path)
    tokenizer = Tokenizer(path, max_length=52)
    if tokenizer.vocab_size != VOCAB_SIZE:
        return f"{tokenizer.vocab_size} pieces, the released tokenizer has {VOCAB_SIZE:,}"
    for piece, expected in SPECIAL_IDS.items():
        if tokenizer.sp.PieceToId(piece) != expected:
            return f"{piece} has id {tokenizer.sp.PieceToId(piece)}, the released tokenizer's is {expected}"
    for text, expected in EXAMPLES.items():
        ids, mask = tokenizer.encode_one(text)
        got = [i for i, m in zip(ids, mask, strict=True) if m]
        if got != expected:
            return f"encodes {text!r} as {got}, the released tokenizer as {expected}"
    if golden is not None and (mismatch := _golden_mismatch(tokenizer, Path(golden))):
        return mismatch
    digest = sha256(path)
    if digest != SHA256:
        return f"sha256 {digest} is not the released file's {SHA256} (its encodings agree: a re-saved copy?)"
    return None
