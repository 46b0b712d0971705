"""Train a bilingual SentencePiece model with the GLM special pieces from a text corpus.

    python tools/train_tokenizer.py --input corpus.txt [more.txt captions.jsonl ...] --out sp.model \
        [--vocab-size 50000] [--character-coverage 0.9995] [--threads 2]

Each non-empty line of a text file is a sentence; in a .jsonl file, each record's "caption" (a string
or a list of strings) is. `--synthetic` trains on the built-in synthetic captions instead.
With --vocab-size >= 50000 the special pieces sit at the reference ids (50000…50019); with a
smaller vocabulary they follow the model's own pieces (see m2megatron/data/sp_train.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2megatron.cli import UserError, run_main  # noqa: E402


def read_corpus(paths: list[str]):
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"train_tokenizer: corpus file not found: {p}")
        with p.open(encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if p.suffix != ".jsonl":
                    yield line
                    continue
                if not line.strip():
                    continue
                try:
                    cap = json.loads(line).get("caption", [])
                except (json.JSONDecodeError, AttributeError):
                    raise UserError(f"train_tokenizer: {p}:{n} is not a JSON object") from None
                yield from ([cap] if isinstance(cap, str) else cap)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="*", default=[], help="text files (one sentence per line) or .jsonl")
    parser.add_argument("--synthetic", action="store_true", help="train on the built-in synthetic captions")
    parser.add_argument("--out", required=True, help="output .model path")
    parser.add_argument("--vocab-size", type=int, default=50000, help="the model's own pieces (specials on top)")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000, help="sentences sampled")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if bool(args.input) == args.synthetic:
        raise UserError("train_tokenizer: give either --input FILES or --synthetic")

    from m2megatron.data.sp_train import SPECIAL_PIECES, train_sentencepiece
    from m2megatron.data.synthetic import all_captions
    from m2megatron.data.tokenizer import Tokenizer

    lines = all_captions() if args.synthetic else read_corpus(args.input)
    try:
        out = train_sentencepiece(lines, args.out, args.vocab_size, character_coverage=args.character_coverage,
                                  input_sentence_size=args.input_sentence_size, num_threads=args.threads)
    except RuntimeError as exc:  # SentencePiece reports bad corpora/settings as RuntimeError
        raise UserError(f"train_tokenizer: {exc}") from None
    tok = Tokenizer(out)
    print(f"wrote {out}: {tok.vocab_size} pieces, [CLS]={tok.cls_id} <|endoftext|>={tok.eos_id}")
    own = tok.vocab_size - len(SPECIAL_PIECES)
    if own < args.vocab_size:
        print(f"note: the corpus gave only {own} of the {args.vocab_size} pieces asked for (--vocab-size): "
              f"SentencePiece found no more merges; the model has {own} + {len(SPECIAL_PIECES)} special pieces. "
              "Train on a larger corpus for the full size (a model's vocabulary follows its tokenizer).",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
