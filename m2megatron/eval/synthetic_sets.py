"""Write held-out synthetic scenes in every eval input format, to try the launchers without real data:

    python -m m2megatron.eval.synthetic_sets --out data/synth-eval [--num-samples 64] [--image-size 32]

    captions.jsonl + images/       retrieval, the reference jsonl format (English and Chinese caption per image)
    colours/<colour>/*.png         zero-shot, a class-folder tree (8 colour classes), colours_zh.txt the Chinese names
    wds_captions/                  retrieval, CLIP_benchmark's webdataset format (dataset_type.txt: retrieval)
    wds_colours/                   zero-shot, CLIP_benchmark's webdataset format (classnames.txt, templates)

The scenes are the eval split (never drawn by training), one distinct scene per image.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np

COLOUR_TEMPLATES = ("a photo of {c} shapes.", "{c} objects on a grey background.", "something {c}.")


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, records: list[dict[str, bytes]]) -> None:
    """records: {"__key__": key, ext: bytes, ...} in order (CLIP_benchmark's keys s0000000, …)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for record in records:
            key = record["__key__"].decode()
            for ext, data in record.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def _write_wds(root: Path, records: list[dict[str, bytes]], meta: dict[str, str]) -> None:
    _write_tar(root / "test" / "0.tar", records)
    (root / "test" / "nshards.txt").write_text("1\n")
    for name, text in meta.items():
        (root / name).write_text(text, encoding="utf-8")


def write_synthetic_sets(out: str | Path, *, num_samples: int = 64, image_size: int = 32, seed: int = 0) -> Path:
    """Write the four sets of the module docstring under `out`; returns `out`."""
    from m2megatron.data.synthetic import COLOURS, NUM_SCENES, SyntheticScenes

    if not 0 < num_samples <= NUM_SCENES:
        raise ValueError(f"--num-samples: must be in [1, {NUM_SCENES}] (distinct scenes), got {num_samples}")
    out = Path(out)
    scenes = SyntheticScenes(seed=seed, image_size=image_size, split="eval")
    lines, caption_records, colour_records = [], [], []
    for i in range(num_samples):
        sample, captions = scenes[i], list(scenes.captions(i).values())
        png = _png(sample.image)
        colour = COLOURS[sample.scene.colour][0]
        for path in (out / "images" / f"{i:05d}.png", out / "colours" / colour / f"{i:05d}.png"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
        lines.append(json.dumps({"image": f"images/{i:05d}.png", "caption": captions}, ensure_ascii=False))
        key = f"s{i:07d}".encode()
        caption_records.append({"__key__": key, "png": png, "txt": "\n".join(captions).encode()})
        colour_records.append({"__key__": key, "png": png, "cls": str(sample.scene.colour).encode()})
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "colours_zh.txt").write_text("".join(f"{en}\t{zh}\n" for en, zh, _ in sorted(COLOURS)), encoding="utf-8")
    _write_wds(out / "wds_captions", caption_records, {"dataset_type.txt": "retrieval\n"})
    _write_wds(out / "wds_colours", colour_records, {
        "classnames.txt": "".join(f"{en}\n" for en, _, _ in COLOURS),
        "zeroshot_classification_templates.txt": "".join(f"{t}\n" for t in COLOUR_TEMPLATES)})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m m2megatron.eval.synthetic_sets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-samples", type=int, default=64, help="images (distinct scenes, at most 384)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the written images in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the eval split")
    args = parser.parse_args()
    out = write_synthetic_sets(args.out, num_samples=args.num_samples, image_size=args.image_size, seed=args.seed)
    print(f"synthetic eval sets written to {out}")
    return 0


if __name__ == "__main__":
    from m2megatron.eval.run_command import run

    run(main)
