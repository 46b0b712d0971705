"""Zero-shot prompts: templates and class-name files.

Templates hold one `{}` (or CLIP_benchmark's `{c}`) where the class name goes. The built-in sets `en`
and `zh` are clip-benchmark's ImageNet-1k templates (80 each, read from the installed package at run
time, see m2megatron/eval/imagenet.py); any other value is a file with one template per line.

Class-name files:
- `.txt`: one class per line in label order, or `folder<TAB>name` lines that name image sub-folders;
- `.json`: a list of names in label order, or an object {folder name or label index: name}.
Anything else is rejected, naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

BUILTIN_TEMPLATES = ("en", "zh")


def check_templates(templates: list[str], source: str) -> list[str]:
    """Templates with their slot as '{}'; each needs exactly one '{}' or '{c}' (ValueError naming `source`)."""
    out = []
    for number, template in enumerate(templates, start=1):
        if template.count("{}") + template.count("{c}") != 1:
            raise ValueError(f"zero-shot: {source}: template {number} {template!r} needs exactly one '{{}}' or '{{c}}'")
        out.append(template.replace("{c}", "{}"))
    if not out:
        raise ValueError(f"zero-shot: {source} holds no templates")
    return out


def load_templates(name_or_path: str) -> list[str]:
    """Templates of a built-in set ('en', 'zh': clip-benchmark's ImageNet-1k sets) or of a file."""
    if name_or_path in BUILTIN_TEMPLATES:
        from m2megatron.eval.imagenet import package_templates

        return check_templates(package_templates(name_or_path), f"clip-benchmark's {name_or_path} templates")
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"zero-shot: template file {path} does not exist (built-in sets: en, zh)")
    return check_templates([t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()], str(path))


def _read_mapping(path: Path) -> list[str] | dict[str, str]:
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"zero-shot: class file {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if isinstance(data, list) and all(isinstance(v, str) for v in data):
            return data
        if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            return {str(k): v for k, v in data.items()}
        raise ValueError(f"zero-shot: class file {path} must hold a list of names or an object of names")
    if suffix == ".txt":
        lines = [line.rstrip("\r\n") for line in text.splitlines()]
        while lines and not lines[-1].strip():
            lines.pop()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                raise ValueError(f"zero-shot: {path}:{number}: empty class name")
        if lines and all("\t" in line for line in lines):
            return dict(line.split("\t", 1) for line in lines)
        if any("\t" in line for line in lines):
            raise ValueError(f"zero-shot: {path}: mixes 'folder<TAB>name' lines with plain name lines")
        return [line.strip() for line in lines]
    raise ValueError(f"zero-shot: unknown class file format {path} (use .txt or .json)")


def load_class_names(path: str | Path, folders: list[str] | None = None,
                     num_labels: int | None = None) -> list[str]:
    """Class names in label order.

    `folders` (image-folder input) are the sorted sub-folder names, which define the labels; a mapping
    file is keyed by folder name. Without folders (shards) a mapping is keyed by label index.
    `num_labels` is the number of labels the data needs (max label + 1); names must cover them.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"zero-shot: class file {path} does not exist")
    mapping = _read_mapping(path)
    if isinstance(mapping, dict):
        keys = folders if folders is not None else [str(i) for i in range(len(mapping))]
        missing = [k for k in keys if k not in mapping]
        if missing:
            raise ValueError(f"zero-shot: class file {path} has no name for {missing[:5]}")
        names = [mapping[k].strip() for k in keys]
    else:
        names = mapping
        if folders is not None and len(names) != len(folders):
            raise ValueError(f"zero-shot: class file {path} lists {len(names)} names but the image folder "
                             f"has {len(folders)} class sub-folders")
    if not names:
        raise ValueError(f"zero-shot: class file {path} lists no classes")
    if num_labels is not None and num_labels > len(names):
        raise ValueError(f"zero-shot: the data has label {num_labels - 1} but class file {path} "
                         f"lists only {len(names)} classes")
    return names
