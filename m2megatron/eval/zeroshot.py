"""Zero-shot classification: top-1 / top-5 accuracy with prompt templates in English or Chinese.

    python -m m2megatron.eval.zeroshot --checkpoint CKPT --dataset imagenet-1k --lang zh --data /data/imagenet/val
    python -m m2megatron.eval.zeroshot --checkpoint CKPT --dataset cub-200|stanford-dogs|stanford-cars --data DIR \\
        [--lang en|zh] [--classes FILE]
    python -m m2megatron.eval.zeroshot --checkpoint CKPT --images DIR/ [--classes classes.json] \\
        [--shards 'val-{000..049}.tar' --classes F | --wds DIR] [--eval.templates=zh] [--tokenizer sp.model] \\
        [--config recipe.yaml] [--out DIR] [--name NAME] [--parallel.tensor_parallel=2 ...]

Each class's embedding is the mean of its L2-normalized prompt embeddings over all templates,
normalized again; an image's prediction is the class with the largest dot product (ties: lower index).
--images is a folder with one sub-folder per class (sorted names = labels); --shards are webdataset
tars with <key>.jpg and <key>.cls; --wds is CLIP_benchmark's webdataset format; --dataset imagenet-1k
reads ImageNet's val folder with clip-benchmark's class names and templates, --dataset cub-200 /
stanford-dogs / stanford-cars the test split of the paper's fine-grained sets (m2megatron/eval/finegrained.py).
See docs/EVAL.md and docs/REPRODUCE.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from m2megatron.eval.batches import image_features, prepare_texts, text_features
from m2megatron.eval.features import ReplicaEncoder
from m2megatron.eval.metrics import topk_accuracy
from m2megatron.eval.prompts import BUILTIN_TEMPLATES, load_templates
from m2megatron.eval.sets import FINE_GRAINED, EvalSet, read_set, report_options, set_name


def class_embeddings(text_feats: torch.Tensor, num_classes: int, num_templates: int) -> torch.Tensor:
    """[C·T, E] prompt features (class-major) → [C, E]: mean over templates, then L2-normalized."""
    mean = text_feats.reshape(num_classes, num_templates, -1).mean(dim=1)  # [C, E]
    return mean / mean.norm(dim=-1, keepdim=True)


def zeroshot_report(model_chunks, groups, images, labels: Sequence[int], class_names: Sequence[str],
                    templates: Sequence[str], *, tokenizer, batch_size: int = 64,
                    reference_text_preprocessing: bool = True, decoder: str = "pil", num_workers: int = 1,
                    where: Sequence[str] | None = None, templates_source: str | None = None) -> dict:
    """{"metrics": {"top1", "top5"}, "num_images", "num_classes", "num_templates", "images_per_s",
    "texts_per_s"} (and "templates": `templates_source` when given). Collective: every rank of the job calls it."""
    if len(images) != len(labels):
        raise ValueError(f"zero-shot: {len(images)} images but {len(labels)} labels")
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    if labels_t.numel() and (int(labels_t.min()) < 0 or int(labels_t.max()) >= len(class_names)):
        raise ValueError(f"zero-shot: labels must lie in [0, {len(class_names)}), got "
                         f"[{int(labels_t.min())}, {int(labels_t.max())}]")
    encoder = ReplicaEncoder(model_chunks, groups)
    prompts = prepare_texts([t.format(c) for c in class_names for t in templates], reference_text_preprocessing)
    text_feats, text_rate = text_features(encoder, prompts, tokenizer, batch_size=batch_size, groups=groups)
    classes = class_embeddings(text_feats, len(class_names), len(templates))
    image_feats, image_rate = image_features(encoder, images, batch_size=batch_size, groups=groups, decoder=decoder,
                                             num_workers=num_workers, where=where)
    metrics = topk_accuracy(image_feats @ classes.T, labels_t, ks=(1, 5))
    report = {"metrics": metrics, "num_images": len(images), "num_classes": len(class_names),
              "num_templates": len(templates), "images_per_s": image_rate, "texts_per_s": text_rate,
              "text_preprocessing": "reference" if reference_text_preprocessing else "none"}
    if templates_source is not None:
        report["templates"] = templates_source
    return report


def evaluate_zeroshot(model_chunks, groups, images, labels: Sequence[int], class_names: Sequence[str],
                      templates: Sequence[str] | str = "en", *, tokenizer, batch_size: int = 64,
                      reference_text_preprocessing: bool = True) -> dict[str, float]:
    """{top1, top5} (percent) of in-memory model stages; `templates` is a list or a built-in set name."""
    if isinstance(templates, str):
        templates = load_templates(templates)
    return zeroshot_report(model_chunks, groups, images, labels, class_names, templates, tokenizer=tokenizer,
                           batch_size=batch_size,
                           reference_text_preprocessing=reference_text_preprocessing)["metrics"]


def _builtin_set(args) -> EvalSet:
    """--dataset imagenet-1k | cub-200 | stanford-dogs | stanford-cars with --data DIR."""
    if not args.data:
        raise ValueError(f"zero-shot: --dataset {args.dataset} needs --data DIR (the dataset's folder)")
    name = args.name or f"{args.dataset}-{args.lang}"
    if args.dataset == "imagenet-1k":
        if args.classes:
            raise ValueError("zero-shot: --dataset imagenet-1k brings its class names; drop --classes")
        return EvalSet(name=name, kind="imagenet", source=(args.data,), lang=args.lang, labels=args.labels)
    if args.labels:
        raise ValueError("zero-shot: --labels goes with --dataset imagenet-1k")
    return EvalSet(name=name, kind=args.dataset, source=(args.data,), lang=args.lang, classes=args.classes)


def set_from_args(args, templates: str):
    """The EvalSet the command line names: --dataset NAME --data DIR, --images, --shards or --wds."""
    given = [flag for flag, value in (("--dataset", args.dataset), ("--images", args.images),
                                      ("--shards", args.shards), ("--wds", args.wds)) if value]
    if len(given) != 1:
        raise ValueError("zero-shot: give exactly one of --dataset NAME --data DIR, --images DIR, --shards, "
                         f"--wds DIR (got {', '.join(given) or 'none'})")
    if args.dataset:
        return _builtin_set(args)
    if args.data or args.labels:
        raise ValueError("zero-shot: --data and --labels go with --dataset")
    tag = templates if templates in BUILTIN_TEMPLATES else Path(templates).stem
    if args.images:
        return EvalSet(name=args.name or f"{set_name(args.images)}-{tag}", kind="folder", source=(args.images,),
                       classes=args.classes)
    if args.shards:
        return EvalSet(name=args.name or f"{set_name(args.shards[0])}-{tag}", kind="label_shards",
                       source=tuple(args.shards), classes=args.classes)
    return EvalSet(name=args.name or set_name(args.wds), kind="benchmark_wds", source=(args.wds,),
                   classes=args.classes, split=args.split)


def main() -> int:
    from m2megatron.eval import launcher

    parser = launcher.common_parser("python -m m2megatron.eval.zeroshot", __doc__)
    parser.add_argument("--dataset", choices=["imagenet-1k", *FINE_GRAINED],
                        help="a built-in dataset (class names and templates from the installed clip-benchmark "
                             "package where it has them; docs/REPRODUCE.md)")
    parser.add_argument("--data", help="with --dataset: its folder (ImageNet: the val folder with synset sub-folders, "
                                       "or the flat ILSVRC layout with --labels; the fine-grained sets: their "
                                       "download layout)")
    parser.add_argument("--labels", help="with --dataset and a flat folder: '<image file> <label>' lines or "
                                         "LOC_val_solution.csv")
    parser.add_argument("--lang", choices=["en", "zh"], default="en",
                        help="with --dataset: the language of the class names and templates (default: en)")
    parser.add_argument("--images", help="image folder with one sub-folder per class")
    parser.add_argument("--shards", nargs="+", help="webdataset shards with <key>.jpg and <key>.cls")
    parser.add_argument("--wds", help="a CLIP_benchmark webdataset classification folder (classnames.txt and "
                                      "zeroshot_classification_templates.txt beside the shards)")
    parser.add_argument("--split", default="test", help="the split sub-folder of --wds (default: test)")
    parser.add_argument("--classes", help="class-name file (.txt or .json); --images without it uses the "
                                          "sub-folder names; replaces a fine-grained set's built-in names")
    with launcher.session(parser) as s:
        spec = set_from_args(s.args, s.cfg.eval.templates)
        data = read_set(spec, s.cfg, s.bad)
        if data.task != "zeroshot":
            raise ValueError(f"zero-shot: {spec.source[0]} is a retrieval set; use m2megatron.eval.retrieval")
        report = zeroshot_report(s.model_chunks, s.groups, data.images, data.labels, data.class_names, data.templates,
                                 tokenizer=s.tokenizer, templates_source=data.templates_source,
                                 **report_options(s.cfg, data))
        s.write("zeroshot", spec.name, report)
    return 0


if __name__ == "__main__":
    from m2megatron.eval.run_command import run

    run(main)
