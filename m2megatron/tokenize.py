"""`python -m m2megatron.tokenize --sp-model PATH [--max-length 52] < texts.txt`.

Prints one JSON object per input line: {"input_ids": [...], "attention_mask": [...]}. Only the line
break is removed from each line; other whitespace is part of the text, as the tokenizer expects.
"""

from __future__ import annotations

import argparse
import json
import sys

from m2megatron.cli import UserError, run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2megatron.tokenize", description=__doc__.splitlines()[0])
    parser.add_argument("--sp-model", required=True, help="SentencePiece model (e.g. the reference sp.model)")
    parser.add_argument("--max-length", type=int, default=52, help="tokens per row incl. [CLS] and <|endoftext|>")
    parser.add_argument("--batch", type=int, default=1024, help="lines encoded per batch")
    args = parser.parse_args(argv)

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


def _emit(tok, texts: list[str]) -> None:
    for text in texts:
        ids, mask = tok.encode_one(text)
        sys.stdout.write(json.dumps({"input_ids": ids, "attention_mask": mask}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    run_main(main)
