"""Train a bilingual SentencePiece model with the GLM special pieces (tools/train_tokenizer.py uses this).

The model has the reference's settings (SPEC.md §3): BPE, `nmt_nfkc`, a dummy prefix, extra whitespace
kept, digits split, no byte fallback, `<unk>`=0, `<s>`=1, `</s>`=2. The 20 GLM special pieces
(`<|endoftext|>`, `[SEP]`, `[CLS]`, … `<|blank_10|>` … `<|blank_2|>`, `<pad>`) are user-defined
pieces, atomic during training and encoding.

Ids: SentencePiece puts user-defined pieces first, so after training the pieces are reordered
"normal pieces first": the ids below `SPECIAL_BASE` (50000) are the model's own pieces and the
specials follow at 50000…50019, as in the reference, when the model has at least 50000 pieces of its
own (`vocab_size` ≥ 50000). A smaller model cannot hold ids up to 50000, so its specials follow its
last normal piece (ids vocab_size … vocab_size+19). The tokenizer looks specials up by name, so it
works either way; only the numeric ids differ.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from m2megatron.data.tokenizer import encode_whitespaces

SPECIAL_BASE = 50000
SPECIAL_PIECES = (
    "<|endoftext|>", "[SEP]", "[CLS]", "[MASK]", "[UNK]", "<|endofpiece|>", "<|startofpiece|>",
    "[gMASK]", "[sMASK]", "[dBLOCK]", *(f"<|blank_{n}|>" for n in range(10, 1, -1)), "<pad>",
)
SYNTHETIC_VOCAB_SIZE = 256
SYNTHETIC_CORPUS_VERSION = 1  # bump when synthetic captions change, so cached models are retrained


def train_sentencepiece(lines: Iterable[str], out_path: str | Path, vocab_size: int, *,
                        character_coverage: float = 0.9995, input_sentence_size: int = 2_000_000,
                        num_threads: int = 1, seed_sentencepiece_size: int = 1_000_000,
                        special_base: int = SPECIAL_BASE) -> Path:
    """Train on `lines` and write the model to `out_path` atomically; return the path.

    `vocab_size` counts the model's own pieces (with `<unk>`, `<s>`, `</s>`); the 20 specials come on
    top. If the corpus cannot fill `vocab_size`, SentencePiece stops early (hard_vocab_limit=False).
    """
    import sentencepiece as spm

    if vocab_size < 8:
        raise ValueError(f"train_sentencepiece: vocab_size must be >= 8, got {vocab_size}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=(encode_whitespaces(line) for line in lines if line.strip()),
        model_writer=model, vocab_size=vocab_size + len(SPECIAL_PIECES), model_type="bpe",
        character_coverage=character_coverage, normalization_rule_name="nmt_nfkc", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, byte_fallback=False, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=list(SPECIAL_PIECES),
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True, num_threads=num_threads,
        seed_sentencepiece_size=seed_sentencepiece_size, minloglevel=2,
    )
    data = reorder_specials(model.getvalue(), special_base)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=out_path.name + ".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, out_path)  # atomic: concurrent ranks may train the same cached model
    return out_path


def reorder_specials(model_bytes: bytes, base: int = SPECIAL_BASE) -> bytes:
    """Move the special pieces after the normal ones: to id `base` if possible, else to the end."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    by_name = {p.piece: p for p in proto.pieces}
    missing = [s for s in SPECIAL_PIECES if s not in by_name]
    if missing:
        raise ValueError(f"train_sentencepiece: special pieces missing after training: {missing}")
    specials = [_copy_piece(pb, by_name[s]) for s in SPECIAL_PIECES]
    others = [_copy_piece(pb, p) for p in proto.pieces if p.piece not in set(SPECIAL_PIECES)]
    at = min(base, len(others))
    del proto.pieces[:]
    proto.pieces.extend(others[:at] + specials + others[at:])
    return proto.SerializeToString()


def _copy_piece(pb, piece):
    new = pb.ModelProto.SentencePiece()
    new.CopyFrom(piece)
    return new


def synthetic_tokenizer_path(cache_dir: str | Path, vocab_size: int = SYNTHETIC_VOCAB_SIZE) -> Path:
    """A small SentencePiece model trained on every synthetic caption (EN+ZH), cached in `cache_dir`.

    The synthetic caption set is fixed (it does not depend on the data seed), so the cache key is the
    vocab size and the corpus version. Training takes well under a second.
    """
    from m2megatron.data.synthetic import all_captions

    path = Path(cache_dir) / f"synthetic_sp_v{SYNTHETIC_CORPUS_VERSION}_{vocab_size}.model"
    if not path.is_file():
        train_sentencepiece(all_captions(), path, vocab_size, character_coverage=1.0)
    return path
