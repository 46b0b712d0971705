"""Zero-shot prompts: templates (English ImageNet set and our Chinese set) and class-name files.

Template files hold one template per line with `{}` where the class name goes. `en` is the usual
80-template English ImageNet set, `zh` a Chinese set written for this project; any other value is a
path to such a file.

Class-name files:
- `.txt`: one class per line in label order, or `folder<TAB>name` lines that name image sub-folders;
- `.json`: a list of names in label order, or an object {folder name or label index: name}.
Anything else is rejected, naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = {"en": TEMPLATE_DIR / "en_imagenet.txt", "zh": TEMPLATE_DIR / "zh_imagenet.txt"}


def load_templates(name_or_path: str) -> list[str]:
    """Templates of a built-in set ('en', 'zh') or a file; each must contain exactly one '{}'."""
    path = BUILTIN_TEMPLATES.get(name_or_path, Path(name_or_path))
    if not path.is_file():
        raise ValueError(f"zero-shot: template file {path} does not exist (built-in sets: en, zh)")
    templates = [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    for number, template in enumerate(templates, start=1):
        if template.count("{}") != 1:
            raise ValueError(f"zero-shot: {path}: template {number} {template!r} needs exactly one '{{}}'")
    if not templates:
        raise ValueError(f"zero-shot: template file {path} is empty")
    return templates


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
