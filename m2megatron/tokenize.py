"""`python -m m2megatron.tokenize --sp-model PATH [--max-length 52] < texts.txt`.

Prints one JSON object per input line: {"input_ids": [...], "attention_mask": [...]}. Only the line
break is removed from each line; other whitespace is part of the text, as the tokenizer expects.

`python -m m2megatron.tokenize --check PATH [--golden tokenizer_golden_ids.json]` checks that PATH is the
released M2-Encoder tokenizer (m2megatron/data/released_tokenizer.py): it prints `OK …` (exit 0) or one
line naming the first mismatch (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys

from m2megatron.cli import UserError, run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2megatron.tokenize", description=__doc__.splitlines()[0])
    parser.add_argument("--sp-model", help="SentencePiece model (e.g. the reference sp.model)")
    parser.add_argument("--check", metavar="FILE", help="check FILE against the released GLM tokenizer; print OK or "
                                                        "the mismatch")
    parser.add_argument("--golden", metavar="FILE", help="with --check: also compare every entry of this golden-ids "
                                                         "file ({set: [{text, input_ids, attention_mask}]})")
    parser.add_argument("--max-length", type=int, default=52, help="tokens per row incl. [CLS] and <|endoftext|>")
    parser.add_argument("--batch", type=int, default=1024, help="lines encoded per batch")
    args = parser.parse_args(argv)
    if args.check:
        return _check(args.check, args.golden)
    if not args.sp_model:
        raise UserError("tokenize: give --sp-model FILE (encode stdin) or --check FILE")

    from m2megatron.data.tokenizer import Tokenizer

    try:
        tok = Tokenizer(args.sp_model, max_length=args.max_length)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    stdin = open(sys.stdin.fileno(), encoding="utf-8", errors="strict", newline="\n", closefd=False)
    batch: list[str] = []
    for line in stdin:
        batch.append(line[:-1] if line.endswith("\n") else line)
        if len(batch) >= args.batch:
            _emit(tok, batch)
            batch = []
    _emit(tok, batch)
    return 0


def _check(path: str, golden: str | None) -> int:
    from m2megatron.data.released_tokenizer import SHA256, VOCAB_SIZE, released_tokenizer_mismatch

    try:
        mismatch = released_tokenizer_mismatch(path, golden)
    except ValueError as exc:
        mismatch = str(exc)
    if mismatch is not None:
        print(f"MISMATCH {path}: {mismatch}")
        return 1
    print(f"OK {path}: the released M2-Encoder tokenizer ({VOCAB_SIZE:,} pieces, sha256 {SHA256})")
    return 0


def _emit(tok, texts: list[str]) -> None:
    for text in texts:
        ids, mask = tok.encode_one(text)
        sys.stdout.write(json.dumps({"input_ids": ids, "attention_mask": mask}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    run_main(main)
