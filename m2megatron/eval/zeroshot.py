"""Zero-shot classification: top-1 / top-5 accuracy with prompt templates in English or Chinese.

    python -m m2megatron.eval.zeroshot --checkpoint CKPT --images DIR/ --classes classes.json \\
        [--shards 'val-{000..049}.tar'] [--eval.templates=zh] [--tokenizer sp.model] [--config recipe.yaml] \\
        [--out DIR] [--name imagenet-cn] [--parallel.tensor_parallel=2 ...]

Each class's embedding is the mean of its L2-normalized prompt embeddings over all templates,
normalized again; an image's prediction is the class with the largest dot product (ties: lower index).
--images is a folder with one sub-folder per class (sorted names = labels); --shards are webdataset
tars with <key>.jpg and <key>.cls. See docs/EVAL.md for the class-file formats.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from m2megatron.eval.batches import image_features, prepare_texts, text_features
from m2megatron.eval.features import ReplicaEncoder
from m2megatron.eval.metrics import topk_accuracy


def class_embeddings(text_feats: torch.Tensor, num_classes: int, num_templates: int) -> torch.Tensor:
    """[C·T, E] prompt features (class-major) → [C, E]: mean over templates, then L2-normalized."""
    mean = text_feats.reshape(num_classes, num_templates, -1).mean(dim=1)  # [C, E]
    return mean / mean.norm(dim=-1, keepdim=True)


def zeroshot_report(model_chunks, groups, images, labels: Sequence[int], class_names: Sequence[str],
                    templates: Sequence[str], *, tokenizer, batch_size: int = 64,
                    reference_text_preprocessing: bool = True, decoder: str = "pil", num_workers: int = 1,
                    where: Sequence[str] | None = None) -> dict:
    """{"metrics": {"top1", "top5"}, "num_images", "num_classes", "num_templates", "images_per_s",
    "texts_per_s"}. Collective: every rank of the job calls it."""
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
    return {"metrics": metrics, "num_images": len(images), "num_classes": len(class_names),
            "num_templates": len(templates), "images_per_s": image_rate, "texts_per_s": text_rate,
            "text_preprocessing": "reference" if reference_text_preprocessing else "none"}


def evaluate_zeroshot(model_chunks, groups, images, labels: Sequence[int], class_names: Sequence[str],
                      templates: Sequence[str] | str = "en", *, tokenizer, batch_size: int = 64,
                      reference_text_preprocessing: bool = True) -> dict[str, float]:
    """{top1, top5} (percent) of in-memory model stages; `templates` is a list or a built-in set name."""
    from m2megatron.eval.prompts import load_templates

    if isinstance(templates, str):
        templates = load_templates(templates)
    return zeroshot_report(model_chunks, groups, images, labels, class_names, templates, tokenizer=tokenizer,
                           batch_size=batch_size,
                           reference_text_preprocessing=reference_text_preprocessing)["metrics"]


def _read_dataset(args, bad):
    from m2megatron.eval.inputs import read_image_folder, read_label_shards
    from m2megatron.eval.prompts import load_class_names

    if bool(args.images) == bool(args.shards):
        raise ValueError("zero-shot: give exactly one of --images (class sub-folders) or --shards")
    if args.images:
        folders, samples = read_image_folder(args.images)
    else:
        folders, samples = None, read_label_shards(args.shards, bad)
    num_labels = max(s.label for s in samples) + 1
    names = load_class_names(args.classes, folders=folders, num_labels=num_labels)
    return samples, names


def main() -> int:
    from pathlib import Path

    from m2megatron.eval import launcher
    from m2megatron.eval.prompts import BUILTIN_TEMPLATES, load_templates

    parser = launcher.common_parser("python -m m2megatron.eval.zeroshot", __doc__)
    parser.add_argument("--images", help="image folder with one sub-folder per class")
    parser.add_argument("--shards", nargs="+", help="webdataset shards with <key>.jpg and <key>.cls")
    parser.add_argument("--classes", required=True, help="class-name file (.txt or .json)")
    with launcher.session(parser) as s:
        samples, names = _read_dataset(s.args, s.bad)
        templates = load_templates(s.cfg.eval.templates)
        report = zeroshot_report(s.model, s.groups, [x.image for x in samples], [x.label for x in samples], names,
                                 templates, tokenizer=s.tokenizer, batch_size=s.cfg.eval.batch_size,
                                 reference_text_preprocessing=s.cfg.eval.reference_text_preprocessing,
                                 decoder=s.cfg.eval.decoder, num_workers=s.cfg.eval.num_workers,
                                 where=[x.where for x in samples])
        report["templates"] = s.cfg.eval.templates
        tag = s.cfg.eval.templates if s.cfg.eval.templates in BUILTIN_TEMPLATES else Path(s.cfg.eval.templates).stem
        default = Path(s.args.images).name if s.args.images else "shards"
        s.write("zeroshot", s.args.name or f"{default}-{tag}", report)
    return 0


if __name__ == "__main__":
    from m2megatron.cli import run_main

    run_main(main)
