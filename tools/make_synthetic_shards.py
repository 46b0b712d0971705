"""Write the synthetic bilingual dataset as webdataset tar shards (img2dataset layout: key.jpg/.txt/.json).

    python tools/make_synthetic_shards.py --out data/synthetic --num-samples 8192 --per-shard 1024 \
        [--seed 1234] [--image-size 64] [--language both] [--split train]

The samples equal those the in-memory synthetic source renders for the same seed, split and size
(JPEG-compressed here). Train with `--data.source=webdataset --data.shards='data/synthetic/train-*.tar'`.
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
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-samples", type=int, default=8192)
    parser.add_argument("--per-shard", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--image-size", type=int, default=64, help="side of the rendered images in pixels")
    parser.add_argument("--language", choices=["en", "zh", "both"], default="both")
    parser.add_argument("--split", choices=["train", "eval"], default="train")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    args = parser.parse_args(argv)

    from m2megatron.data.shard_writer import write_synthetic_shards

    t0 = time.perf_counter()
    paths = write_synthetic_shards(args.out, num_samples=args.num_samples, per_shard=args.per_shard, seed=args.seed,
                                   image_size=args.image_size, language=args.language, split=args.split,
                                   quality=args.quality)
    print(f"wrote {len(paths)} shard(s), {args.num_samples} samples, to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
