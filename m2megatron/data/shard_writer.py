"""Writing webdataset tar shards in img2dataset's layout (used by tools/make_synthetic_shards.py and tests)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from m2megatron.data.synthetic import SyntheticScenes


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_shard(path: str | Path, records: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write records (key, {extension: bytes}) as consecutive tar members `key.ext`; returns the count.

    Written to a temporary name and renamed, so a reader never sees a half-written shard.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in records:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tf.addfile(info, io.BytesIO(data))
            n += 1
    os.replace(tmp, path)
    return n


def synthetic_records(scenes: SyntheticScenes, start: int, stop: int, quality: int = 95):
    """img2dataset-style records of synthetic samples [start, stop): key.jpg, key.txt, key.json."""
    for i in range(start, stop):
        s = scenes[i]
        meta = {"caption": s.caption, "lang": s.lang, "captions": scenes.captions(i),
                "scene": s.scene._asdict(), "scene_id": s.scene.id, "index": i}
        yield f"{i:09d}", {"jpg": encode_jpeg(s.image, quality), "txt": s.caption.encode("utf-8"),
                           "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def write_synthetic_shards(out_dir: str | Path, *, num_samples: int, per_shard: int, seed: int, image_size: int,
                           language: str = "both", split: str = "train", quality: int = 95) -> list[Path]:
    """Write `num_samples` synthetic samples as shards `{split}-000000.tar`, … of `per_shard` samples."""
    if num_samples < 1 or per_shard < 1:
        raise ValueError("write_synthetic_shards: num_samples and per_shard must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes(seed=seed, image_size=image_size, language=language, split=split)
    paths = []
    for shard, start in enumerate(range(0, num_samples, per_shard)):
        path = out / f"{split}-{shard:06d}.tar"
        write_shard(path, synthetic_records(scenes, start, min(start + per_shard, num_samples), quality))
        paths.append(path)
    return paths
