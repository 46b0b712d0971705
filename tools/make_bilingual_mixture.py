"""Write the toy bilingual mixture of configs/bilingual_mixture.yaml (img2dataset layout, three sources).

    python tools/make_bilingual_mixture.py --out data/bilingual [--shards-per-source 4] [--per-shard 64]
    python -m m2megatron.train --config configs/bilingual_mixture.yaml --dry-run --world-size 2
    torchrun --nproc-per-node 2 -m m2megatron.train --config configs/bilingual_mixture.yaml

Sources (synthetic scenes): web_en (English captions), web_zh (Chinese), web_en_translated (English images
with a translated `caption_zh` column), each `{shard:05d}.tar` + `.parquet` + `_stats.json`; a held-out
caption set in heldout/; the synthetic SentencePiece model as sp.model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2megatron.cli import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/bilingual", help="output folder (the recipe reads data/bilingual)")
    parser.add_argument("--shards-per-source", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    from m2megatron.data.shard_writer import write_bilingual_mixture

    t0 = time.perf_counter()
    out = write_bilingual_mixture(args.out, shards_per_source=args.shards_per_source, per_shard=args.per_shard,
                                  image_size=args.image_size, seed=args.seed)
    print(f"wrote 3 sources of {args.shards_per_source} shards, a held-out set and sp.model to {out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
