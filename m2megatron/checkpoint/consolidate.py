"""Consolidate a distributed checkpoint into one safetensors file (+ config JSON), and load it back.

Reading: torch.distributed.checkpoint assembles each full tensor from the slices every rank wrote,
a batch of tensors at a time, in this single process (no process group needed). Writing: the
safetensors header is known from m2meta.json before any data is read, so the file is streamed
tensor by tensor. Peak memory is about one batch (at least the largest tensor; `batch_bytes`).

Loading back (`load_consolidated`): every rank reads, through safetensors' memory map, only the
slices its ShardedTensors cover, so a consolidated file loads at any TP/PP layout. For the M2 model the
file is the project's consolidated format (docs/MODEL.md), which `m2megatron.checkpoint.files.load_any`,
eval and encode read as well.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from m2megatron.checkpoint import atomic, manifest, safety

_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
DEFAULT_BATCH_BYTES = 512 << 20


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def _nbytes(info: dict) -> int:
    return _numel(info["shape"]) * torch.empty((), dtype=getattr(torch, info["dtype"])).element_size()


def tensor_index(ckpt_dir: Path, include_optimizer: bool = False) -> dict[str, dict]:
    """{key: {'shape', 'dtype'}} of the model tensors (and plain-optimizer state tensors) in a checkpoint."""
    meta = manifest.read(ckpt_dir)
    index = dict(meta["model_tensors"])
    if include_optimizer:
        if meta["optimizer"]["kind"] == "distributed" and meta["optimizer"].get("format") == "dp_reshardable":
            raise safety.CheckpointError(f"{ckpt_dir}: its distributed-optimizer state (dp_reshardable, an older "
                                         "checkpoint) is stored in flat buckets, not per tensor; consolidate the "
                                         "model only")
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        dcp_meta = safety.read_dcp_metadata(ckpt_dir)
        for key, md in dcp_meta.state_dict_metadata.items():
            if key.startswith("optimizer.") and isinstance(md, TensorStorageMetadata):
                index[key] = {"shape": list(md.size), "dtype": str(md.properties.dtype).removeprefix("torch.")}
    return index


def read_full_tensors(ckpt_dir: str | Path, index: dict[str, dict], batch_bytes: int = DEFAULT_BATCH_BYTES
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, full tensor) for every key of `index`, reading about `batch_bytes` at a time."""
    import torch.distributed.checkpoint as dcp

    ckpt_dir = Path(ckpt_dir)
    safety.read_dcp_metadata(ckpt_dir)  # refuse a .metadata that needs foreign code before DCP unpickles it
    batch: dict[str, torch.Tensor] = {}
    size = 0
    for key, info in index.items():
        batch[key] = torch.empty(info["shape"], dtype=getattr(torch, info["dtype"]))
        size += _nbytes(info)
        if size >= batch_bytes:
            dcp.load(batch, storage_reader=dcp.FileSystemReader(str(ckpt_dir)), no_dist=True)
            yield from batch.items()
            batch, size = {}, 0
    if batch:
        dcp.load(batch, storage_reader=dcp.FileSystemReader(str(ckpt_dir)), no_dist=True)
        yield from batch.items()


def _safetensors_header(index: dict[str, dict], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, info in index.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise safety.CheckpointError(f"tensor {key}: dtype {info['dtype']} has no safetensors code")
        end = offset + _nbytes(info)
        header[key] = {"dtype": _SAFETENSORS_DTYPES[info["dtype"]], "shape": info["shape"],
                       "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # data starts 8-byte aligned


class _M2FileFormat:
    """For M2 checkpoints, write the project's consolidated file (m2megatron.checkpoint.files, docs/MODEL.md):
    local-spec names, the unpadded vocabulary, metadata `format` and `model_config`; other models keep
    their checkpoint keys."""

    def __init__(self, config: dict | None):
        self.model = (config or {}).get("model")

    def name(self, key: str) -> str:
        if not self.model:
            return key
        from m2megatron.models.layer_specs import TE_FUSED_NORM_NAMES

        for local, te in TE_FUSED_NORM_NAMES.items():
            key = key.replace(te, local)
        return key

    def rows(self, key: str) -> int | None:
        from m2megatron.models.state import VOCAB_KEY

        return self.model["vocab_size"] if self.model and key == VOCAB_KEY else None

    def index(self, index: dict[str, dict]) -> dict[str, dict]:
        out = {}
        for key, info in index.items():
            rows = self.rows(key)
            out[self.name(key)] = dict(info, shape=[rows] + info["shape"][1:]) if rows else info
        return out

    def tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        rows = self.rows(key)
        return tensor[:rows] if rows else tensor

    def metadata(self) -> dict[str, str]:
        if not self.model:
            return {}
        from m2megatron.checkpoint.files import FORMAT

        return {"format": FORMAT, "model_config": json.dumps(self.model)}


def consolidate(path_or_root: str | Path, out_dir: str | Path, *, include_optimizer: bool = False,
                batch_bytes: int = DEFAULT_BATCH_BYTES, progress: Callable[[str], None] | None = None) -> Path:
    """Write out_dir/model.safetensors and out_dir/config.json; returns the safetensors path."""
    ckpt_dir = atomic.resolve(path_or_root)
    meta = manifest.read(ckpt_dir)
    index = tensor_index(ckpt_dir, include_optimizer)
    fmt = _M2FileFormat(meta["config"])
    out_index = fmt.index(index)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target, tmp = out_dir / "model.safetensors", out_dir / ".model.safetensors.tmp"
    header = _safetensors_header(out_index, {"source": str(ckpt_dir), "step": str(meta["step"]), **fmt.metadata()})
    total, done, started = sum(_nbytes(i) for i in out_index.values()), 0, time.perf_counter()
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for n, (key, tensor) in enumerate(read_full_tensors(ckpt_dir, index, batch_bytes), 1):
            tensor = fmt.tensor(key, tensor)
            if tensor.numel():
                f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
            done += tensor.numel() * tensor.element_size()
            if progress and (n == len(index) or n % 50 == 0):
                progress(f"{n}/{len(index)} tensors, {done / 2**20:.0f}/{total / 2**20:.0f} MiB, "
                         f"{time.perf_counter() - started:.1f}s")
    tmp.replace(target)
    config = {"step": meta["step"], "layout": meta["layout"], "config": meta["config"], "source": str(ckpt_dir),
              "tensors": out_index}
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    return target


def sharded_region(sh) -> tuple[slice, ...]:
    """The slices of the full tensor that ShardedTensor `sh` holds (prepended axes, e.g. layers, have size 1)."""
    lead = sh.prepend_axis_num
    return (tuple(slice(o, o + 1) for o in sh.global_offset[:lead])
            + tuple(slice(o, o + n) for o, n in zip(sh.global_offset[lead:], sh.local_shape)))


def load_consolidated(file: str | Path, model_chunks: list, groups) -> None:
    """Copy a consolidated safetensors file into this rank's slices of `model_chunks` (any layout)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from safetensors import safe_open

    from m2megatron.checkpoint import optimizer_state, state

    with safe_open(str(file), framework="pt") as f:
        m2_format = "model_config" in (f.metadata() or {})
    if m2_format:  # the project's consolidated M2 file: local names, unpadded vocab (docs/MODEL.md)
        from megatron.core.utils import unwrap_model

        from m2megatron.checkpoint.start_file import load_weights_file

        # The training start's loader: each rank reads only its stages' TP slices through the memory map.
        modules = list(unwrap_model(model_chunks))
        load_weights_file(file, modules, modules[0].cfg)
        return
    sharded = state.model_sharded_state_dict(model_chunks, optimizer_state.sharding_metadata(groups, None))
    with safe_open(str(file), framework="pt") as f, torch.no_grad():
        available = set(f.keys())
        for sh in nested_values(sharded["model"]):
            if not isinstance(sh, ShardedTensor):
                continue
            if sh.key not in available:
                raise safety.CheckpointError(f"{file}: has no tensor {sh.key} (needed by the current model)")
            full_shape = list(f.get_slice(sh.key).get_shape())
            if full_shape != list(sh.global_shape):
                raise safety.CheckpointError(f"{file}: tensor {sh.key} has shape {full_shape}, the current model "
                                             f"needs {list(sh.global_shape)}")
            sh.data.copy_(f.get_slice(sh.key)[sharded_region(sh)].reshape(sh.data.shape))
