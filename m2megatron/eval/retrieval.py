"""Image–text retrieval: R@1/5/10 both ways and MR, as the reference protocol (SPEC.md §6.1).

    python -m m2megatron.eval.retrieval --checkpoint CKPT --captions coco-cn_test.jsonl --image-root DIR \\
        [--shards 'val-{000..009}.tar'] [--tokenizer sp.model] [--config recipe.yaml] [--preset m2-0.4b] \\
        [--out DIR] [--name coco-cn] [--eval.batch_size=128] [--parallel.tensor_parallel=2 ...]

Without --captions/--shards it evaluates the held-out synthetic set of the config (data.synthetic_*).
Runs under plain python, torchrun or srun (one task per rank); see docs/EVAL.md.

In-process (e.g. at the end of training), every rank of the job calls
`evaluate_retrieval(model_chunks, groups, images, captions, tokenizer=...)` and gets the same metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from m2megatron.eval.batches import image_features, prepare_texts, text_features
from m2megatron.eval.features import ReplicaEncoder
from m2megatron.eval.metrics import CaptionIndex, retrieval_metrics

log = logging.getLogger(__name__)


def retrieval_report(model_chunks, groups, images, captions: Sequence[Sequence[str]], *, tokenizer,
                     batch_size: int = 64, reference_text_preprocessing: bool = True, decoder: str = "pil",
                     num_workers: int = 1, where: Sequence[str] | None = None) -> dict:
    """Metrics plus counts and throughput: {"metrics": {...}, "num_images", "num_texts", "num_unique_texts",
    "images_per_s", "texts_per_s", "text_preprocessing"}. Collective: every rank of the job calls it.

    images: one per caption list (paths, bytes, uint8 HWC arrays, PIL images, or a preprocessed float
    tensor [I, 3, H, W]); captions[i]: the non-empty caption list of image i; where[i]: a name for errors.
    """
    if len(images) != len(captions):
        raise ValueError(f"retrieval: {len(images)} images but {len(captions)} caption lists")
    encoder = ReplicaEncoder(model_chunks, groups)
    index = CaptionIndex.from_captions([prepare_texts(c, reference_text_preprocessing) for c in captions])
    image_feats, image_rate = image_features(encoder, images, batch_size=batch_size, groups=groups, decoder=decoder,
                                             num_workers=num_workers, where=where)
    # Each distinct string is encoded once; its copies share the features, as in the reference.
    text_feats, text_rate = text_features(encoder, index.unique_texts, tokenizer, batch_size=batch_size,
                                          groups=groups)
    metrics = retrieval_metrics(image_feats, text_feats, index)
    return {"metrics": metrics, "num_images": index.num_images, "num_texts": index.num_texts,
            "num_unique_texts": len(index.unique_texts), "images_per_s": image_rate, "texts_per_s": text_rate,
            "text_preprocessing": "reference" if reference_text_preprocessing else "none"}


def evaluate_retrieval(model_chunks, groups, images, captions: Sequence[Sequence[str]], *, tokenizer,
                       batch_size: int = 64, reference_text_preprocessing: bool = True, decoder: str = "pil",
                       num_workers: int = 1) -> dict[str, float]:
    """Retrieval metrics of in-memory model stage modules (percent):
    {i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10, mr}, the same on every rank.

    model_chunks: this rank's M2Encoder stage module (or a one-element list); groups: the run's
    ParallelGroups (None for a single process); images/captions as in `retrieval_report`;
    tokenizer: an m2megatron.data.tokenizer.Tokenizer (anything with .encode(texts) -> (ids, mask)).
    """
    return retrieval_report(model_chunks, groups, images, captions, tokenizer=tokenizer, batch_size=batch_size,
                            reference_text_preprocessing=reference_text_preprocessing, decoder=decoder,
                            num_workers=num_workers)["metrics"]


def _read_dataset(args, cfg, bad):
    """(name, images, captions, where) of the chosen eval set."""
    from m2megatron.eval.inputs import read_caption_jsonl, read_caption_shards
    from m2megatron.eval.launcher import synthetic_eval_set

    if args.captions and args.shards:
        raise ValueError("retrieval: give --captions (with --image-root) or --shards, not both")
    if args.captions:
        if not args.image_root:
            raise ValueError("retrieval: --captions needs --image-root (the folder the image paths are relative to)")
        samples = read_caption_jsonl(args.captions, args.image_root, bad)
        name = args.name or _stem(args.captions)
    elif args.shards:
        samples = read_caption_shards(args.shards, bad)
        name = args.name or "shards"
    else:
        images, captions = synthetic_eval_set(cfg)
        return args.name or "synthetic", images, captions, None
    return name, [s.image for s in samples], [list(s.captions) for s in samples], [s.where for s in samples]


def _stem(path: str) -> str:
    from pathlib import Path

    return Path(path).name.removesuffix(".jsonl")


def main() -> int:
    from m2megatron.eval import launcher

    parser = launcher.common_parser("python -m m2megatron.eval.retrieval", __doc__)
    parser.add_argument("--captions", help="caption jsonl in the reference format ({'image': path, 'caption': [..]})")
    parser.add_argument("--image-root", help="folder the jsonl image paths are relative to")
    parser.add_argument("--shards", nargs="+", help="webdataset shards (globs, {000..009} ranges) instead of jsonl")
    with launcher.session(parser) as s:
        name, images, captions, where = _read_dataset(s.args, s.cfg, s.bad)
        report = retrieval_report(s.model, s.groups, images, captions, tokenizer=s.tokenizer,
                                  batch_size=s.cfg.eval.batch_size,
                                  reference_text_preprocessing=s.cfg.eval.reference_text_preprocessing,
                                  decoder=s.cfg.eval.decoder, num_workers=s.cfg.eval.num_workers, where=where)
        s.write("retrieval", name, report)
    return 0


if __name__ == "__main__":
    from m2megatron.cli import run_main

    run_main(main)
