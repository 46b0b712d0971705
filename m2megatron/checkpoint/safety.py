"""Refuse checkpoints that are incomplete, damaged, or would run pickled code when loaded.

A Megatron torch_dist checkpoint holds three kinds of pickle:
- `.metadata`, read by torch.distributed.checkpoint with a plain `pickle.load`;
- the bytes of every ShardedObject inside the `*.distcp` files, read with `torch.load(weights_only=False)`;
- `common.pt`, read with `torch.load` (weights_only by default only unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD).
`check_loadable` reads each of them first through a loader that cannot execute code: an unpickler
that allows only the metadata classes of torch.distributed.checkpoint, and `torch.load(weights_only=True)`.
A pickle that needs anything else is refused with CheckpointError before Megatron touches the files,
so the later, unrestricted reads only ever see pickles already proven harmless.

`m2meta.json` records the size and CRC-32 of every file at save time; a missing, truncated or
changed file is refused with the file's name.
"""

from __future__ import annotations

import io
import pickle
import zlib
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

from m2megatron.config.base import InputError

COMMON_FILE = "common.pt"
DCP_METADATA_FILE = ".metadata"
_CRC_CHUNK = 16 << 20


class CheckpointError(InputError):
    """A checkpoint that cannot or must not be loaded; the message names the file or setting."""


# --- restricted unpickling of torch.distributed.checkpoint's .metadata -------------------------

_ALLOWED_PREFIXES = ("torch.distributed.checkpoint.",)
_ALLOWED_GLOBALS = {
    ("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "slice"), ("torch.serialization", "_get_layout"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        allowed = (module, name) in _ALLOWED_GLOBALS or module.startswith(_ALLOWED_PREFIXES)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            allowed = True
        if not allowed:
            raise CheckpointError(
                f"{self.source}: refusing to load, the pickle wants to import {module}.{name} "
                "(a checkpoint must not need pickled code)")
        return super().find_class(module, name)


def read_dcp_metadata(ckpt_dir: Path):
    """torch.distributed.checkpoint Metadata of `ckpt_dir`, unpickled without running foreign code."""
    path = Path(ckpt_dir) / DCP_METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f, str(path)).load()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{path}: corrupted ({type(exc).__name__}: {exc})") from None


# --- weights_only loading -----------------------------------------------------------------------

def safe_torch_load(source, what: str):
    """torch.load(weights_only=True) of a path or bytes; CheckpointError naming `what` on refusal."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{what}: refusing to load, it needs pickled code that weights_only loading "
                              f"does not allow ({str(exc).splitlines()[0]})") from None
    except FileNotFoundError:
        raise CheckpointError(f"{what}: missing") from None
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{what}: corrupted ({type(exc).__name__}: {exc})") from None


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """Megatron's common-state loader with weights_only loading made explicit."""

    def load_common(self, checkpoint_dir):
        return safe_torch_load(Path(checkpoint_dir) / COMMON_FILE, str(Path(checkpoint_dir) / COMMON_FILE))


def check_sharded_object_pickles(ckpt_dir: Path, metadata) -> None:
    """weights_only-load the bytes of every ShardedObject stored in the *.distcp files."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    storage = metadata.storage_data or {}
    for index, info in storage.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        path = Path(ckpt_dir) / info.relative_path
        if info.transform_descriptors:
            raise CheckpointError(f"{path}: object {index.fqn} uses storage transforms "
                                  f"{info.transform_descriptors}, which we do not read")
        with open(path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        if len(blob) != info.length:
            raise CheckpointError(f"{path}: truncated (object {index.fqn} ends past the end of the file)")
        safe_torch_load(io.BytesIO(blob), f"{path} (object {index.fqn})")


# --- file manifest ---------------------------------------------------------------------------------

def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def describe_files(ckpt_dir: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"size": (ckpt_dir / n).stat().st_size, "crc32": file_crc32(ckpt_dir / n)} for n in names}


def check_files(ckpt_dir: Path, manifest: dict[str, dict], names: list[str], verify_crc: bool) -> list[str]:
    """Problems with `names` (a subset of the manifest): missing, truncated, or changed files."""
    problems = []
    for name in names:
        want, path = manifest[name], Path(ckpt_dir) / name
        if not path.is_file():
            problems.append(f"{path}: missing shard file (the checkpoint is incomplete or was damaged)")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path}: size {path.stat().st_size} bytes, expected {want['size']} (truncated or "
                            "corrupted)")
        elif verify_crc and file_crc32(path) != want["crc32"]:
            problems.append(f"{path}: corrupted (CRC-32 differs from the one recorded at save time)")
    return problems


def check_no_unlisted_shards(ckpt_dir: Path, metadata, manifest: dict[str, dict]) -> None:
    """Every file the DCP metadata points into must be in the manifest."""
    for info in (metadata.storage_data or {}).values():
        if info.relative_path not in manifest:
            raise CheckpointError(f"{Path(ckpt_dir) / info.relative_path}: referenced by .metadata but not "
                                  "recorded in m2meta.json (a foreign or modified checkpoint)")
