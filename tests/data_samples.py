"""Small data sets with bad samples for the loader tests (32 px synthetic scenes, a few bad records)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from m2megatron.data.shard_writer import encode_jpeg, write_shard
from m2megatron.data.synthetic import SyntheticScenes


def corrupt_png(seed: int = 0) -> bytes:
    """A PNG whose header is fine (it passes the probe) but whose pixel data is broken: fails to decode."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.find(b"IDAT") + 8
    data[start:start + 50] = bytes(b ^ 0x5A for b in data[start:start + 50])
    return bytes(data)


def garbage(seed: int, n: int = 300) -> bytes:
    return bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8))


BAD_KINDS = {  # record number inside each shard → (members, skip reason)
    3: (lambda s: {"png": corrupt_png(s), "txt": b"a broken png"}, "decode_error"),
    7: (lambda s: {"jpg": garbage(s), "txt": b"garbage bytes"}, "corrupt_image"),
    11: (lambda s: {"png": corrupt_png(s + 1), "txt": b"another broken png"}, "decode_error"),
}


def write_mixed_shards(root: str | Path, *, num_shards: int, per_shard: int, seed: int = 5, image_size: int = 32,
                       bad: bool = True) -> str:
    """`num_shards` shards of `per_shard` records; with `bad`, records 3, 7 and 11 of each shard are bad
    (two decode errors that pass the header probe, one corrupt image). Returns a brace pattern."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes(seed=seed, image_size=image_size)
    for shard in range(num_shards):
        records = []
        for r in range(per_shard):
            i = shard * per_shard + r
            if bad and r in BAD_KINDS:
                records.append((f"bad{i:05d}", BAD_KINDS[r][0](i)))
                continue
            s = scenes[i]
            caption = json.dumps({"caption": s.caption}).encode()
            records.append((f"{i:05d}", {"jpg": encode_jpeg(s.image), "json": caption}))
        write_shard(root / f"mixed-{shard:03d}.tar", records)
    return str(root / f"mixed-{{000..{num_shards - 1:03d}}}.tar")


def write_jsonl_set(root: str | Path, *, num_samples: int, seed: int = 6, image_size: int = 32) -> Path:
    """A reference-format jsonl with images on disk; sample 4 is a broken PNG (decode_error)."""
    root = Path(root)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes(seed=seed, image_size=image_size)
    lines = []
    for i in range(num_samples):
        name = f"imgs/{i}.png" if i == 4 else f"imgs/{i}.jpg"
        (root / name).write_bytes(corrupt_png(i) if i == 4 else encode_jpeg(scenes[i].image))
        lines.append(json.dumps({"image": name, "caption": [scenes[i].caption]}, ensure_ascii=False))
    (root / "set.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "set.jsonl"

