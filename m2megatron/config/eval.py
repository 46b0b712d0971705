"""Evaluation: the launchers' settings, and the sets evaluated during and at the end of training (docs/EVAL.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from m2megatron.config.base import ConfigError


@dataclass(kw_only=True)
class EvalConfig:
    batch_size: int = 64
    """Images or texts per feature-extraction batch per data-parallel rank (with PP > 1: per pipeline microbatch)."""
    reference_text_preprocessing: bool = True
    """Lower-case every eval text (captions, prompts) and turn curly double quotes into straight ones, as the
    reference eval does."""
    on_bad_input: Literal["error", "skip"] = "error"
    """A malformed caption line, missing image or empty caption list: stop with an error naming the file and
    line (error), or drop the sample, log it and count it in the results (skip). Undecodable images always stop."""
    decoder: Literal["pil", "dali", "auto"] = "pil"
    """Image decoder: PIL reproduces the reference's bicubic squash exactly; DALI (or auto) is faster on GPU."""
    num_workers: int = 4
    """Image-decoding threads per rank."""
    templates: str = "en"
    """Zero-shot prompt templates: 'en' or 'zh' (clip-benchmark's 80 ImageNet-1k templates in that language, read
    from the installed package) or a file with one template per line containing '{}' or '{c}'."""
    output_dir: str | None = None
    """Where results.json and results.md go; None = <train.run_dir>/eval."""
    interval: int = 0
    """During training: evaluate the configured sets below every N steps at the training layout, with the
    training model (no second build); 0 = never during training. train.eval_at_end uses the same sets. With
    data.source=synthetic the held-out synthetic set is always one of them."""
    retrieval_jsonl: list[str] = field(default_factory=list)
    """Training-time retrieval sets in the reference jsonl format ({"image": path, "caption": [...]} per line),
    one set per file, named by its stem."""
    image_root: str | None = None
    """The folder the image paths of eval.retrieval_jsonl are relative to; None = each jsonl's own folder."""
    retrieval_shards: list[str] = field(default_factory=list)
    """Training-time retrieval sets as webdataset caption shards: each entry is one set, a path, glob or
    {000..009} range of tars with <key>.jpg and <key>.txt/.json."""
    zeroshot_folders: list[str] = field(default_factory=list)
    """Training-time zero-shot sets: 'DIR' (one sub-folder per class, the sub-folder names are the class names)
    or 'DIR=CLASSES' (a .txt/.json class-name file); prompts from eval.templates."""
    imagenet: str | None = None
    """Training-time ImageNet-1k zero-shot: the val folder (synset sub-folders, or the flat ILSVRC layout with
    eval.imagenet_labels); class names and templates from clip-benchmark."""
    imagenet_labels: str | None = None
    """The labels file of a flat eval.imagenet folder ('<image file> <label>' lines or LOC_val_solution.csv)."""
    imagenet_languages: list[str] = field(default_factory=lambda: ["en", "zh"])
    """Languages eval.imagenet is evaluated in: 'en' (ImageNet-1k) and/or 'zh' (ImageNet-CN names and templates)."""
    benchmark_wds: list[str] = field(default_factory=list)
    """Training-time sets in CLIP_benchmark's webdataset format: each entry a dataset folder (nshards.txt under
    <split>/, classnames.txt, templates); retrieval or zero-shot as its dataset_type.txt says."""
    benchmark_split: str = "test"
    """The split sub-folder of the eval.benchmark_wds folders."""

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size: must be >= 1, got {self.batch_size}")
        if self.num_workers < 1:
            raise ConfigError(f"eval.num_workers: must be >= 1, got {self.num_workers}")
        if self.interval < 0:
            raise ConfigError(f"eval.interval: must be >= 0 (0 = not during training), got {self.interval}")
        bad = [lang for lang in self.imagenet_languages if lang not in ("en", "zh")]
        if bad or not self.imagenet_languages:
            raise ConfigError(f"eval.imagenet_languages: must be a non-empty list of 'en' and 'zh', got "
                              f"{self.imagenet_languages}")
        if self.imagenet_labels is not None and self.imagenet is None:
            raise ConfigError("eval.imagenet_labels: set eval.imagenet (the flat val folder) too")
        for entry in self.zeroshot_folders:
            folder, sep, classes = entry.partition("=")
            if not folder or (sep and not classes):
                raise ConfigError(f"eval.zeroshot_folders: {entry!r} is not 'DIR' or 'DIR=CLASSES'")
