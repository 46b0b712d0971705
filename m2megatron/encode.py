"""Normalized embeddings of image files and texts from any single-file checkpoint.

    python -m m2megatron.encode --checkpoint m2_encoder_0.4B.ckpt --preset m2-0.4b \\
        --images pokemon.jpeg --texts-file names.txt --sp-model sp.model --out emb.json

Writes {"image_embeddings": [[...]], "text_embeddings": [[...]], "text_ids": [[...]], "logit_scale": x}
(x is the learnable log temperature; the demo's scale is exp(x)). With both images and texts it prints, per
image, the softmax over the texts of exp(logit_scale) · cosine, as the reference demo does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from m2megatron.cli import UserError, run_main

DESCRIPTION = """\
Compute L2-normalized M2-Encoder embeddings for image files and texts (one model, one process).

--checkpoint takes our consolidated .safetensors file (tools/import_reference.py) or a released reference
checkpoint (.ckpt/.pt/.pth, imported on the fly: sizes from the tensor shapes, heads from --preset or
--num-heads, or from the released preset of the same width). Images get the reference eval preprocessing
(RGB, bicubic squash to the model's image size, no crop, (x-0.5)/0.5). --texts-file has one text per line
(the newline is removed, nothing else), tokenized with the reference rules ([CLS] … <|endoftext|>, padded to
52 with <|endoftext|>, left truncation) using --sp-model.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m m2megatron.encode", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="consolidated .safetensors or reference .ckpt")
    heads = parser.add_mutually_exclusive_group()
    heads.add_argument("--preset", help="preset giving the head count of a reference checkpoint")
    heads.add_argument("--num-heads", type=int, help="attention heads of a reference checkpoint")
    parser.add_argument("--images", nargs="*", default=[], help="image files")
    parser.add_argument("--texts-file", help="UTF-8 file with one text per line")
    parser.add_argument("--sp-model", help="SentencePiece model (the released sp.model)")
    parser.add_argument("--batch-size", type=int, default=16, help="images or texts per forward pass")
    parser.add_argument("--out", required=True, help="output JSON file")
    return parser.parse_args(argv)


def read_texts(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--texts-file {path}: cannot read ({exc})") from None
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    return [line.removesuffix("\r") for line in lines]


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """[n, 3, size, size] in [-1, 1] with the reference eval transform."""
    from PIL import Image

    from m2megatron.data.image import eval_preprocess

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as im:
                arrays.append(torch.from_numpy(eval_preprocess(im, size)))
        except OSError as exc:
            raise UserError(f"--images {path}: cannot read the image ({exc})") from None
    return torch.stack(arrays)


def build_model(args):
    """(stage modules, groups, model config) of the whole model on one process, weights from --checkpoint."""
    from m2megatron.checkpoint.files import load_any
    from m2megatron.config import ParallelConfig, RunConfig
    from m2megatron.models import load_full_state_dict
    from m2megatron.parallel import initialize, seed_everything
    from m2megatron.runtime import build_stages

    cfg, full, _ = load_any(args.checkpoint, num_heads=args.num_heads, preset=args.preset)
    groups = initialize(ParallelConfig(tensor_parallel=1, pipeline_parallel=1))
    seed_everything(0, groups)
    modules = build_stages(RunConfig(model=cfg), groups, training=False, init=False).modules
    for module in modules:
        load_full_state_dict(module, full)
    return modules, groups, cfg


def encode_images(modules, groups, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[n, E] embeddings (host) of preprocessed pixels, through the stage runtime's schedule."""
    from m2megatron.eval.batches import image_features
    from m2megatron.eval.features import ReplicaEncoder

    feats, _ = image_features(ReplicaEncoder(modules, groups), pixels, batch_size=batch_size, groups=groups)
    return feats.cpu()


def encode_texts(modules, groups, texts: list[str], sp_model: str, cfg, batch_size: int):
    """([n, E] embeddings (host), [n, L] token ids) of raw texts (reference tokenization, no eval preprocessing)."""
    from m2megatron.data.tokenizer import Tokenizer
    from m2megatron.eval.batches import text_features
    from m2megatron.eval.features import ReplicaEncoder

    tokenizer = Tokenizer(sp_model, max_length=cfg.max_text_len)
    feats, _ = text_features(ReplicaEncoder(modules, groups), texts, tokenizer, batch_size=batch_size, groups=groups)
    return feats.cpu(), tokenizer.encode(texts)[0]


def encode(args) -> dict:
    if not args.images and not args.texts_file:
        raise UserError("nothing to encode: give --images and/or --texts-file")
    texts = read_texts(args.texts_file) if args.texts_file else []
    if texts and not args.sp_model:
        raise UserError("--sp-model: needed to tokenize --texts-file")
    modules, groups, cfg = build_model(args)
    result = {"image_embeddings": [], "text_embeddings": [], "text_ids": [],
              "logit_scale": float(modules[-1].logit_scale.item())}
    if args.images:
        pixels = load_images(args.images, cfg.image_size)
        result["image_embeddings"] = encode_images(modules, groups, pixels, args.batch_size).tolist()
    if texts:
        feats, ids = encode_texts(modules, groups, texts, args.sp_model, cfg, args.batch_size)
        result["text_embeddings"], result["text_ids"] = feats.tolist(), ids.tolist()
    return result


def softmax_table(result: dict) -> torch.Tensor:
    """Per image, the softmax over texts of exp(logit_scale) · cosine (the reference demo)."""
    img, txt = torch.tensor(result["image_embeddings"]), torch.tensor(result["text_embeddings"])
    return (torch.tensor(result["logit_scale"]).exp() * img @ txt.t()).softmax(dim=-1)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = encode(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, ensure_ascii=False) + "\n", encoding="utf-8")
    if result["image_embeddings"] and result["text_embeddings"]:
        probs = softmax_table(result)
        for path, row in zip(args.images, probs.tolist()):
            print(f"{path}: " + " ".join(f"{p:.7g}" for p in row))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
