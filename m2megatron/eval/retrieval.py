"""Image–text retrieval: R@1/5/10 both ways and MR, as the reference protocol (SPEC.md §6.1).

    python -m m2megatron.eval.retrieval --checkpoint CKPT --captions coco-cn_test.jsonl --image-root DIR \\
        [--karpathy dataset_flickr30k.json [--split test] | --shards 'val-{000..009}.tar' | --wds DIR [--split test]] \\
        [--tokenizer sp.model] [--config recipe.yaml] [--preset m2-0.4b] [--out DIR] [--name coco-cn] \\
        [--eval.batch_size=128] [--parallel.tensor_parallel=2 ...]

Without --captions/--karpathy/--shards/--wds it evaluates the held-out synthetic set of the config (data.synthetic_*).
When the config's layout does not fit the launch (e.g. plain python on a TP2×PP2 run) it evaluates
data-parallel only; an explicit --parallel.* is kept.
Runs under plain python, torchrun or srun (one task per rank); see docs/EVAL.md.

In-process (e.g. at the end of training), every rank of the job calls
`evaluate_retrieval(model_chunks, groups, images, captions, tokenizer=...)` and gets the same metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from m2megatron.eval.batches import image_features, prepare_texts, text_features
from m2megatron.eval.features import ReplicaEncoder
from m2megatron.eval.metrics import CaptionIndex, retrieval_metrics
from m2megatron.eval.sets import EvalSet, read_set, report_options, set_name

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


def set_from_args(args):
    """The EvalSet the command line names: --captions, --karpathy, --shards, --wds, or the synthetic held-out set."""
    inputs = (("--captions", args.captions), ("--karpathy", args.karpathy), ("--shards", args.shards),
              ("--wds", args.wds))
    given = [flag for flag, value in inputs if value]
    if len(given) > 1:
        raise ValueError(f"retrieval: give one of --captions, --karpathy, --shards, --wds, not {' and '.join(given)}")
    if args.image_root and not (args.captions or args.karpathy):
        raise ValueError("retrieval: --image-root goes with --captions or --karpathy")
    if args.captions:
        return EvalSet(name=args.name or set_name(args.captions), kind="jsonl", source=(args.captions,),
                       image_root=args.image_root)
    if args.karpathy:
        return EvalSet(name=args.name or f"{Path(args.karpathy).stem}-{args.split}", kind="karpathy",
                       source=(args.karpathy,), image_root=args.image_root, split=args.split)
    if args.shards:
        return EvalSet(name=args.name or set_name(args.shards[0]), kind="caption_shards", source=tuple(args.shards))
    if args.wds:
        return EvalSet(name=args.name or set_name(args.wds), kind="benchmark_wds", source=(args.wds,),
                       split=args.split)
    return EvalSet(name=args.name or "synthetic", kind="synthetic")


def one_caption_warning(spec: EvalSet, captions: Sequence[Sequence[str]]) -> str | None:
    """A warning when an English Flickr30K / COCO set has one caption per image: the paper's table (the
    Karpathy test protocol) has five, so its numbers are not comparable (docs/REPRODUCE.md)."""
    source = Path(spec.source[0]).name.lower() if spec.source else ""
    english_set = any(k in source for k in ("f30k", "flickr", "coco")) and "cn" not in source
    if not english_set or any(len(c) > 1 for c in captions):
        return None
    return (f"retrieval: {spec.source[0]} has 1 caption per image, but the Flickr30K / COCO 5k protocol of the "
            "paper has 5 (the Karpathy test split); use --karpathy dataset_flickr30k.json or CLIP_benchmark's "
            "flickr30k (--wds) for numbers comparable with the paper (docs/REPRODUCE.md)")


def main() -> int:
    from m2megatron.eval import launcher

    parser = launcher.common_parser("python -m m2megatron.eval.retrieval", __doc__)
    parser.add_argument("--captions", help="caption jsonl in the reference format ({'image': path, 'caption': [..]})")
    parser.add_argument("--karpathy", help="a Karpathy split json (dataset_flickr30k.json, dataset_coco.json) or "
                                           "CLIP_benchmark's flickr30k_<split>_karpathy.txt: every caption")
    parser.add_argument("--image-root", help="folder the --captions / --karpathy image paths are relative to "
                                             "(default: the file's folder)")
    parser.add_argument("--shards", nargs="+", help="webdataset shards (globs, {000..009} ranges) instead of jsonl")
    parser.add_argument("--wds", help="a CLIP_benchmark webdataset retrieval folder (dataset_type.txt: retrieval)")
    parser.add_argument("--split", default="test", help="the split sub-folder of --wds, or the split of a "
                                                        "--karpathy json (default: test)")
    with launcher.session(parser) as s:
        spec = set_from_args(s.args)
        data = read_set(spec, s.cfg, s.bad)
        if data.task != "retrieval":
            raise ValueError(f"retrieval: {spec.source[0]} is a classification set; use m2megatron.eval.zeroshot")
        warning = one_caption_warning(spec, data.captions)
        if warning:
            log.warning(warning)
        report = retrieval_report(s.model_chunks, s.groups, data.images, data.captions, tokenizer=s.tokenizer,
                                  **report_options(s.cfg, data))
        s.write("retrieval", spec.name, {**report, **({"warning": warning} if warning else {})})
    return 0


if __name__ == "__main__":
    from m2megatron.eval.run_command import run

    run(main)
