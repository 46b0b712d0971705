"""Writing webdataset tar shards in img2dataset's layout (used by tools/make_synthetic_shards.py and tests)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
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


MIXTURE_SOURCES = {"web_en": ("en", False), "web_zh": ("zh", False), "web_en_translated": ("en", True)}
"""The toy bilingual mixture of configs/bilingual_mixture.yaml: folder → (caption language, caption_zh column)."""


def write_bilingual_mixture(out: str | Path, *, shards_per_source: int = 4, per_shard: int = 64, image_size: int = 32,
                            seed: int = 1) -> Path:
    """The data of configs/bilingual_mixture.yaml under `out`: three img2dataset-layout sources (English,
    Chinese, English images with a translated caption_zh column; every 9th sample failed to download), a
    held-out caption set (heldout/eval-*.tar, distinct synthetic scenes) and the synthetic SentencePiece
    model as sp.model."""
    from m2megatron.data.sp_train import synthetic_tokenizer_path

    out = Path(out)
    for n, (name, (language, zh_field)) in enumerate(MIXTURE_SOURCES.items()):
        write_img2dataset_shards(out / name, num_shards=shards_per_source, per_shard=per_shard, seed=seed + n,
                                 image_size=image_size, language=language, zh_field=zh_field, failed_every=9)
    write_synthetic_shards(out / "heldout", num_samples=128, per_shard=64, seed=seed, image_size=image_size,
                           split="eval")
    with tempfile.TemporaryDirectory() as cache:
        (out / "sp.model").write_bytes(synthetic_tokenizer_path(cache).read_bytes())
    return out
