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


def write_img2dataset_shards(root: str | Path, *, num_shards: int, per_shard: int, seed: int = 1, image_size: int = 16,
                             language: str = "en", zh_field: bool = False, failed_every: int = 0) -> Path:
    """Shards exactly as img2dataset's webdataset writer lays them out: `{shard:05d}.tar` with `key.jpg`,
    `key.txt` and `key.json` (its metadata keys, indented; key = shard id and index), `{shard:05d}.parquet`
    and `{shard:05d}_stats.json` beside each tar. Captions in `language` (en/zh), scenes from a synthetic set;
    `zh_field` adds a "caption_zh" column (a translated source); every `failed_every`-th sample failed to
    download: it is in the stats' count, not in the tar. Similarity cycles 0.15, 0.20, ..., 0.45."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes(seed=seed, image_size=image_size, language=language)
    for shard in range(num_shards):
        records, successes = [], 0
        for i in range(per_shard):
            n = shard * per_shard + i
            if failed_every and n % failed_every == failed_every - 1:
                continue
            s, both = scenes[n], scenes.captions(n)
            key = f"{shard:05d}{i:04d}"
            meta = {"url": f"https://example.com/{n}.jpg", "caption": s.caption, "key": key, "status": "success",
                    "error_message": None, "width": image_size, "height": image_size,
                    "original_width": 2 * image_size, "original_height": 2 * image_size, "exif": "{}",
                    "sha256": f"{n:064x}", "similarity": round(0.15 + 0.05 * (n % 7), 2)}
            if zh_field:
                meta["caption_zh"] = both["zh"]
            records.append((key, {"jpg": encode_jpeg(s.image), "txt": s.caption.encode("utf-8"),
                                  "json": json.dumps(meta, indent=4).encode("utf-8")}))
            successes += 1
        write_shard(root / f"{shard:05d}.tar", records)
        (root / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read by the loader PAR1")
        stats = {"count": per_shard, "successes": successes, "failed_to_download": per_shard - successes,
                 "failed_to_resize": 0, "duration": 1.5, "status_dict": {"success": successes}}
        (root / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
    return root
