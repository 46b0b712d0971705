"""m2meta.json: what a checkpoint holds, the layout and config that wrote it, and its file manifest.

Written last into the temporary directory, so its presence marks a complete checkpoint. It is JSON
(never pickle), so tools can read a checkpoint's step, layout, config and tensor shapes without
torch and without trusting the checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any

import torch

from m2megatron.checkpoint.atomic import META_NAME
from m2megatron.checkpoint.safety import CheckpointError

FORMAT = "m2megatron-dist-v1"
# Model settings that do not change the parameters' names or shapes: a checkpoint may be resumed with
# another value (e.g. a different drop-path rate, or the TE layer spec on a GPU host).
NON_ARCHITECTURE_FIELDS = frozenset({"drop_path_rate", "init_method_std", "logit_scale_init", "layer_spec", "fp8"})


def config_to_dict(config: Any) -> dict | None:
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return config
    raise TypeError(f"config: expected a RunConfig dataclass or a dict, got {type(config).__name__}")


def layout_dict(layout) -> dict:
    return {"world_size": layout.world_size, "tensor_parallel": layout.tensor_parallel,
            "pipeline_parallel": layout.pipeline_parallel, "data_parallel": layout.data_parallel,
            "virtual_pipeline": layout.virtual_pipeline}


def build(*, step: int, layout, optimizer_kind: str, optimizer_format: str | None, has_scheduler: bool,
          config: dict | None, model_tensors: dict, files: dict) -> dict:
    from megatron.core import __version__ as mcore_version

    return {
        "format": FORMAT,
        "step": int(step),
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "layout": layout_dict(layout),
        "optimizer": {"kind": optimizer_kind, "format": optimizer_format},
        "has_scheduler": has_scheduler,
        "config": config,
        "model_tensors": model_tensors,
        "files": files,
        "versions": {"torch": torch.__version__, "megatron_core": mcore_version},
    }


def write(ckpt_dir: Path, meta: dict) -> None:
    tmp = ckpt_dir / f".{META_NAME}.tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / META_NAME)


def read(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / META_NAME
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete m2megatron checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupted ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: unknown checkpoint format {got!r} (expected {FORMAT!r})")
    return meta


def model_config_differences(saved: dict | None, current: dict | None) -> list[str]:
    """'model.<field>: checkpoint X, current Y' for every architecture field that differs."""
    if not saved or not current or "model" not in saved or "model" not in current:
        return []
    diffs = []
    old, new = saved["model"], current["model"]
    for name in sorted(set(old) | set(new)):
        if name in NON_ARCHITECTURE_FIELDS:
            continue
        was, now = old.get(name, "<absent>"), new.get(name, "<absent>")
        if was != now:
            diffs.append(f"model.{name}: checkpoint {was!r}, current {now!r}")
    return diffs


def tensor_differences(saved: dict[str, dict], current: dict[str, dict], limit: int = 20) -> list[str]:
    """Model tensors missing from the checkpoint, unexpected in it, or of another global shape."""
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    shapes = sorted(k for k in set(saved) & set(current) if list(saved[k]["shape"]) != list(current[k]["shape"]))
    out = [f"missing in checkpoint: {k} {current[k]['shape']}" for k in missing[:limit]]
    out += [f"not in the current model: {k} {saved[k]['shape']}" for k in unexpected[:limit]]
    out += [f"shape of {k}: checkpoint {saved[k]['shape']}, current {current[k]['shape']}" for k in shapes[:limit]]
    extra = max(0, len(missing) - limit) + max(0, len(unexpected) - limit) + max(0, len(shapes) - limit)
    if extra:
        out.append(f"... and {extra} more")
    return out
