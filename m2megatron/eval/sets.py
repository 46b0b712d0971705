"""One eval set, whatever its format: what to read (`EvalSet`) and reading it (`read_set`). The launchers and
evaluation during training both read through here, so every input kind is read one way; scoring is
`retrieval.retrieval_report` / `zeroshot.zeroshot_report` (both, by the set's task: `scoring.score_set`).
Imports point one way: retrieval, zeroshot → sets → readers; scoring → retrieval, zeroshot, sets.

Kinds: retrieval from a reference caption jsonl (`jsonl`), a Karpathy split file (`karpathy`), webdataset
caption shards (`caption_shards`) or the held-out synthetic set (`synthetic`); zero-shot from a class-folder
tree (`folder`), label shards (`label_shards`), ImageNet-1k (`imagenet`) or a fine-grained set (`cub-200`,
`stanford-dogs`, `stanford-cars`); and CLIP_benchmark's webdataset format (`benchmark_wds`), either task,
as its dataset_type.txt says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from m2megatron.eval.finegrained import DATASETS as FINE_GRAINED
from m2megatron.eval.inputs import BadInputs, Sample

RETRIEVAL_KINDS = ("jsonl", "karpathy", "caption_shards", "synthetic")
ZEROSHOT_KINDS = ("folder", "label_shards", "imagenet", *FINE_GRAINED)


@dataclass(frozen=True)
class EvalSet:
    name: str
    """The set's name in results and metric keys."""
    kind: str
    """jsonl, karpathy, caption_shards, synthetic, folder, label_shards, imagenet, cub-200, stanford-dogs, stanford-cars
    or benchmark_wds."""
    source: tuple[str, ...] = ()
    """The jsonl or Karpathy split file, the folder, or the shard patterns."""
    image_root: str | None = None
    """jsonl, karpathy: the folder the image paths are relative to (None: the file's folder)."""
    classes: str | None = None
    """A class-name file (folder: optional, the sub-folder names otherwise; label_shards: required;
    fine-grained sets: replaces the built-in names)."""
    lang: str = "en"
    """imagenet and the fine-grained sets: the language of the class names and templates (en, zh)."""
    labels: str | None = None
    """imagenet: the labels file of the flat ILSVRC layout."""
    split: str = "test"
    """benchmark_wds: the split sub-folder; karpathy: the Karpathy split."""


@dataclass
class SetData:
    task: str
    """retrieval or zeroshot."""
    images: list
    where: list[str] | None
    captions: list[list[str]] | None = None
    labels: list[int] | None = None
    class_names: list[str] | None = None
    templates: list[str] | None = None
    templates_source: str | None = None


def set_name(source: str) -> str:
    """A readable set name from a path or shard pattern: 'data/val-{000..009}.tar' → 'val'."""
    base = Path(source.rstrip("/")).name
    base = re.split(r"[{*?\[]", base)[0].removesuffix(".tar").removesuffix(".jsonl").rstrip("-_.")
    return base or Path(source).parent.name or "set"


def _retrieval(samples: list[Sample]) -> SetData:
    return SetData("retrieval", [s.image for s in samples], [s.where for s in samples],
                   captions=[list(s.captions) for s in samples])


def _zeroshot(samples: list[Sample], names: list[str], templates: list[str], source: str) -> SetData:
    return SetData("zeroshot", [s.image for s in samples], [s.where for s in samples],
                   labels=[s.label for s in samples], class_names=names, templates=templates, templates_source=source)


def _config_templates(cfg) -> tuple[list[str], str]:
    from m2megatron.eval.prompts import load_templates

    return load_templates(cfg.eval.templates), cfg.eval.templates


def _read_retrieval(spec: EvalSet, cfg, bad: BadInputs) -> SetData:
    from m2megatron.eval.inputs import read_caption_jsonl, read_caption_shards, synthetic_held_out

    if spec.kind == "synthetic":
        images, captions = synthetic_held_out(seed=cfg.train.seed, image_size=cfg.model.image_size,
                                              language=cfg.data.language, num_samples=cfg.data.synthetic_eval_samples)
        return SetData("retrieval", images, None, captions=captions)
    if spec.kind == "jsonl":
        (path,) = spec.source
        return _retrieval(read_caption_jsonl(path, spec.image_root or Path(path).parent, bad))
    if spec.kind == "karpathy":
        from m2megatron.eval.karpathy import read_karpathy

        (path,) = spec.source
        return _retrieval(read_karpathy(path, spec.image_root or Path(path).parent, spec.split, bad))
    return _retrieval(read_caption_shards(list(spec.source), bad))


def _read_fine_grained(spec: EvalSet, cfg, bad: BadInputs) -> SetData:
    from m2megatron.eval import finegrained, imagenet
    from m2megatron.eval.prompts import BUILTIN_TEMPLATES, check_templates, load_class_names

    found = finegrained.read_fine_grained(spec.kind, spec.source[0], bad)
    if spec.classes is not None:
        names = load_class_names(spec.classes, folders=found.class_keys, num_labels=len(found.names["en"]))
    elif spec.lang in found.names:
        names = found.names[spec.lang]
    else:
        raise ValueError(f"{spec.kind}: no maintained {spec.lang} class names exist for this set (docs/REPRODUCE.md); "
                         "pass your own class-name file with --classes FILE")
    if cfg.eval.templates in BUILTIN_TEMPLATES:  # --lang picks the templates too
        key = finegrained.templates_key(spec.kind, spec.lang)
        templates = check_templates(imagenet.package_templates(spec.lang, key), f"clip-benchmark {spec.lang} {key}")
        return _zeroshot(found.samples, names, templates, f"{spec.lang} {key}")
    return _zeroshot(found.samples, names, *_config_templates(cfg))


def _read_zeroshot(spec: EvalSet, cfg, bad: BadInputs) -> SetData:
    from m2megatron.eval.inputs import read_image_folder, read_label_shards
    from m2megatron.eval.prompts import BUILTIN_TEMPLATES, check_templates, load_class_names

    if spec.kind in FINE_GRAINED:
        return _read_fine_grained(spec, cfg, bad)
    if spec.kind == "imagenet":
        from m2megatron.eval import imagenet

        samples = imagenet.read_imagenet(spec.source[0], spec.labels, bad)
        if cfg.eval.templates in BUILTIN_TEMPLATES:  # --lang picks the names and the templates
            templates = check_templates(imagenet.package_templates(spec.lang), f"clip-benchmark {spec.lang}")
            return _zeroshot(samples, imagenet.class_names(spec.lang), templates, spec.lang)
        return _zeroshot(samples, imagenet.class_names(spec.lang), *_config_templates(cfg))
    if spec.kind == "folder":
        folders, samples = read_image_folder(spec.source[0])
        names = load_class_names(spec.classes, folders=folders) if spec.classes else folders
        return _zeroshot(samples, names, *_config_templates(cfg))
    if spec.classes is None:
        raise ValueError("zero-shot: label shards need a class-name file (--classes)")
    samples = read_label_shards(list(spec.source), bad)
    names = load_class_names(spec.classes, num_labels=max(s.label for s in samples) + 1)
    return _zeroshot(samples, names, *_config_templates(cfg))


def _read_benchmark(spec: EvalSet, cfg, bad: BadInputs) -> SetData:
    from m2megatron.eval.benchmark_wds import read_benchmark_wds
    from m2megatron.eval.prompts import check_templates, load_class_names

    root = spec.source[0]
    bench = read_benchmark_wds(root, spec.split, bad)
    if bench.task == "retrieval":
        return _retrieval(bench.samples)
    num_labels = max(s.label for s in bench.samples) + 1
    if spec.classes is not None:
        names = load_class_names(spec.classes, num_labels=num_labels)
    elif bench.class_names is not None:
        names = bench.class_names
        if num_labels > len(names):
            raise ValueError(f"CLIP_benchmark wds: {root} has label {num_labels - 1} but classnames.txt lists "
                             f"only {len(names)} classes")
    else:
        raise ValueError(f"CLIP_benchmark wds: {root}/classnames.txt does not exist; pass a class-name file")
    if bench.templates is not None:
        source = f"{root}/zeroshot_classification_templates.txt"
        return _zeroshot(bench.samples, names, check_templates(bench.templates, source), source)
    return _zeroshot(bench.samples, names, *_config_templates(cfg))


def read_set(spec: EvalSet, cfg, bad: BadInputs) -> SetData:
    """Read `spec` (every rank reads the same files); bad samples go through `bad`."""
    if spec.kind in RETRIEVAL_KINDS:
        return _read_retrieval(spec, cfg, bad)
    if spec.kind in ZEROSHOT_KINDS:
        return _read_zeroshot(spec, cfg, bad)
    if spec.kind == "benchmark_wds":
        return _read_benchmark(spec, cfg, bad)
    raise ValueError(f"eval: unknown set kind {spec.kind!r}")


def report_options(cfg, data: SetData) -> dict:
    """The keyword arguments of retrieval_report / zeroshot_report that the config and the set decide."""
    return dict(batch_size=cfg.eval.batch_size, reference_text_preprocessing=cfg.eval.reference_text_preprocessing,
                decoder=cfg.eval.decoder, num_workers=cfg.eval.num_workers, where=data.where)
