"""Decode throughput per CPU core: the DALI CPU pipeline vs the PIL pipeline, on the same JPEG shards, one run.

    python tools/bench_decode.py --shards 'data/shards/*.tar' [--image-size 224] [--batch 32] [--rounds 3]
    python tools/bench_decode.py --make 256            # writes photo-like 500x375 JPEG shards to a temp dir

Both pipelines do the same work: decode → bicubic squash to image-size → normalize to float CHW (the
eval transform). Records are read into memory first, so disk I/O is not measured. Rounds alternate
DALI and PIL; CPU time (all threads of this process) gives images/s per core, which is robust on a
shared machine; wall-clock images/s is printed too. Each pipeline gets --threads threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from m2megatron.cli import UserError, run_main  # noqa: E402


def make_photo_shards(out: Path, n: int, per_shard: int = 128, captions: list[str] | None = None) -> list[str]:
    """Photo-like JPEGs (smooth colour fields + texture noise, 500x375, q90): ~50-100 KB each; the caption
    of image i is captions[i % len(captions)] (default "a photo")."""
    from PIL import Image

    from m2megatron.data.shard_writer import encode_jpeg, write_shard

    rng = np.random.default_rng(0)

    def photo(i):
        low = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(low).resize((500, 375), Image.Resampling.BICUBIC), np.float32)
        img += rng.normal(0, 18, size=img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)

    paths = []
    for s, start in enumerate(range(0, n, per_shard)):
        recs = ((f"{i:09d}", {"jpg": encode_jpeg(photo(i), 90),
                              "txt": (captions[i % len(captions)] if captions else "a photo").encode("utf-8")})
                for i in range(start, min(n, start + per_shard)))
        write_shard(out / f"bench-{s:04d}.tar", recs)
        paths.append(str(out / f"bench-{s:04d}.tar"))
    return paths


def load_jpegs(shards: list[str]) -> list[bytes]:
    from m2megatron.data.formats import iter_tar_records, record_sample

    out = []
    for shard in shards:
        for rec in iter_tar_records(shard):
            try:
                out.append(record_sample(rec)[0])
            except Exception:  # noqa: BLE001 - the benchmark just ignores bad records
                continue
    return out


def run_once(decoder, jpegs: list[bytes], batch: int) -> tuple[float, float]:
    from m2megatron.data.image import FULL_BOX

    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(jpegs), batch):
        chunk = jpegs[i:i + batch]
        images, bad = decoder.decode(chunk, [FULL_BOX] * len(chunk), [False] * len(chunk))
        assert not bad and images.shape[0] == len(chunk)
    return time.perf_counter() - w0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", nargs="*", default=[], help="tar shards or globs")
    parser.add_argument("--make", type=int, default=0, help="instead: generate this many photo-like JPEGs")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="decoder threads of each pipeline")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from m2megatron.data.decode import DaliDecoder, PilDecoder
    from m2megatron.data.formats import expand_shards
    from m2megatron.data.image import ImageLimits

    tmp = None
    if args.make:
        tmp = tempfile.TemporaryDirectory(prefix="bench_decode_")
        shards = make_photo_shards(Path(tmp.name), args.make)
    elif args.shards:
        shards = expand_shards(args.shards)
    else:
        raise UserError("bench_decode: give --shards or --make N")
    jpegs = load_jpegs(shards)
    if not jpegs:
        raise UserError("bench_decode: no images found in the shards")
    limits = ImageLimits()
    decoders = {"dali_cpu": DaliDecoder(args.image_size, limits, args.batch, args.threads, gpu=False),
                "pil": PilDecoder(args.image_size, limits, args.threads)}
    for d in decoders.values():  # warm-up (DALI builds its pipeline)
        run_once(d, jpegs[: args.batch], args.batch)
    cpu = {k: [] for k in decoders}
    wall = {k: [] for k in decoders}
    for _ in range(args.rounds):
        for name, d in decoders.items():
            w, c = run_once(d, jpegs, args.batch)
            wall[name].append(len(jpegs) / w)
            cpu[name].append(len(jpegs) / c)
    kb = sum(map(len, jpegs)) / len(jpegs) / 1024
    print(f"{len(jpegs)} JPEGs (avg {kb:.0f} KiB) -> {args.image_size}x{args.image_size}, batch {args.batch}, "
          f"threads {args.threads}, {args.rounds} rounds; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    for name in decoders:
        print(f"  {name:8s}: {statistics.median(cpu[name]):7.1f} img/s per core (median), "
              f"{statistics.median(wall[name]):7.1f} img/s wall (median)")
    ratio = statistics.median(cpu["dali_cpu"]) / statistics.median(cpu["pil"])
    print(f"ratio dali_cpu / pil (img/s per core): {ratio:.2f}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    run_main(main)
