"""The bilingual SentencePiece tokenizer, compatible with the released GLM tokenizer (SPEC.md §3).

With the reference `sp.model` it reproduces `GLMChineseTokenizer(texts, padding="max_length",
truncation=True, max_length=52)` under transformers 4.17 exactly:

- literal `<|endoftext|>`, `[CLS]`, `[MASK]`, `[UNK]` in the text stay single tokens, and the text on
  each side of them is stripped (HF's no-split handling);
- runs of 2..10 spaces become `<|blank_N|>` (longest first); the text is otherwise not stripped;
- SentencePiece pieces map to ids with `PieceToId`, so characters outside the vocabulary get `<unk>` = 0;
- truncation is on the left (the last max_length − 2 content tokens are kept), then
  `[CLS] + ids + <|endoftext|>`, padded on the right with `<|endoftext|>`.

Special ids are looked up by piece name, so smaller models trained by `m2megatron.data.sp_train`
(same pieces, other ids) work unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

CLS_PIECE = "[CLS]"
EOS_PIECE = "<|endoftext|>"
# HF's unique_no_split_tokens of the reference tokenizer (tokenizer_config.json's special tokens).
NO_SPLIT_PIECES = ("<|endoftext|>", "[CLS]", "[MASK]", "[UNK]")
MAX_BLANK = 10
_NO_SPLIT_RE = re.compile("(" + "|".join(re.escape(p) for p in NO_SPLIT_PIECES) + ")")


def encode_whitespaces(text: str, max_len: int = MAX_BLANK) -> str:
    """Replace runs of 2..max_len spaces with `<|blank_N|>`, longest first (11 spaces → blank_10 + ' ')."""
    for n in range(max_len, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def preprocess_eval_text(text: str) -> str:
    """The reference eval's caption preprocessing: lower-case, curly double quotes → '"'."""
    return text.lower().replace("\u201c", '"').replace("\u201d", '"')


def split_no_split_tokens(text: str) -> list[str]:
    """Split `text` at the no-split special tokens and strip the text around each one (HF 4.17 rule)."""
    parts = _NO_SPLIT_RE.split(text)  # odd positions are the special tokens
    for i in range(1, len(parts), 2):
        parts[i - 1] = parts[i - 1].rstrip()
        parts[i + 1] = parts[i + 1].lstrip()
    return [p for p in parts if p]


class Tokenizer:
    """SentencePiece tokenizer producing fixed-length [CLS] … <|endoftext|> id rows and masks."""

    def __init__(self, sp_model_path: str | Path, max_length: int = 52):
        import sentencepiece as spm

        path = Path(sp_model_path)
        if not path.is_file():
            raise ValueError(f"tokenizer: SentencePiece model not found: {path}")
        if max_length < 2:
            raise ValueError(f"tokenizer: max_length must be >= 2 ([CLS] and <|endoftext|>), got {max_length}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"tokenizer: cannot load SentencePiece model {path}: {exc}") from None
        self.path = path
        self.max_length = max_length
        self.cls_id = self._special(CLS_PIECE)
        self.eos_id = self._special(EOS_PIECE)
        self.pad_id = self.eos_id
        self._no_split_ids = {p: self.sp.PieceToId(p) for p in NO_SPLIT_PIECES}

    def _special(self, piece: str) -> int:
        pid = self.sp.PieceToId(piece)
        if pid == self.sp.unk_id() and piece != self.sp.IdToPiece(pid):
            raise ValueError(f"tokenizer: {self.path} has no piece {piece!r} (train it with tools/train_tokenizer.py)")
        return pid

    @property
    def vocab_size(self) -> int:
        """Number of pieces (115244 for the reference model); the model's text vocabulary before padding."""
        return self.sp.GetPieceSize()

    def tokenize_ids(self, text: str) -> list[int]:
        """Content ids of one text, without [CLS]/<|endoftext|> and without truncation."""
        ids: list[int] = []
        for part in split_no_split_tokens(text):
            if part in self._no_split_ids:
                ids.append(self._no_split_ids[part])
            else:
                pieces = self.sp.EncodeAsPieces(encode_whitespaces(part))
                ids.extend(self.sp.PieceToId(p) for p in pieces)
        return ids

    def encode_one(self, text: str) -> tuple[list[int], list[int]]:
        """(input_ids, attention_mask) of one text, both of length max_length."""
        content = self.tokenize_ids(text)[-(self.max_length - 2):] if self.max_length > 2 else []
        ids = [self.cls_id, *content, self.eos_id]
        pad = self.max_length - len(ids)
        return ids + [self.pad_id] * pad, [1] * len(ids) + [0] * pad

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention masks, both LongTensor [len(texts), max_length]."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode takes a list of strings, not a single string")
        rows = [self.encode_one(t) for t in texts]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long).reshape(len(rows), self.max_length)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.long).reshape(len(rows), self.max_length)
        return ids, mask
