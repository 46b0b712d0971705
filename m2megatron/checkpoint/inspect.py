"""Describe a checkpoint (step, layout, config, tensors, files) without loading any tensor data.

Everything comes from m2meta.json (JSON) and, for the optimizer keys, the DCP `.metadata` read with the
restricted unpickler, so inspecting an untrusted checkpoint runs no code from it.
"""

from __future__ import annotations

import math
from pathlib import Path

from m2megatron.checkpoint import atomic, manifest, safety


def describe(path_or_root: str | Path, *, verify: bool = False) -> dict:
    """A JSON-able description; `verify=True` also checks every file's size and CRC-32."""
    path = atomic.resolve(path_or_root)
    meta = manifest.read(path)
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    dcp_meta = safety.read_dcp_metadata(path)
    other_tensors, objects = {}, []
    for key, md in sorted(dcp_meta.state_dict_metadata.items()):
        if isinstance(md, TensorStorageMetadata) and key not in meta["model_tensors"]:
            other_tensors[key] = {"shape": list(md.size), "dtype": str(md.properties.dtype).removeprefix("torch.")}
        elif isinstance(md, BytesStorageMetadata):
            objects.append(key)
    out = {
        "path": str(path), "step": meta["step"], "saved_at": meta["saved_at"], "layout": meta["layout"],
        "optimizer": meta["optimizer"], "has_scheduler": meta["has_scheduler"], "versions": meta["versions"],
        "config": meta["config"], "model_tensors": meta["model_tensors"], "other_tensors": other_tensors,
        "objects": objects,
        "num_model_parameters": sum(math.prod(t["shape"]) for t in meta["model_tensors"].values()),
        "files": meta["files"], "total_bytes": sum(f["size"] for f in meta["files"].values()),
    }
    if verify:
        out["problems"] = safety.check_files(path, meta["files"], sorted(meta["files"]), verify_crc=True)
    return out


def format_report(desc: dict, *, all_keys: bool = False) -> str:
    lay = desc["layout"]
    lines = [
        f"checkpoint  {desc['path']}",
        f"step        {desc['step']}  (saved {desc['saved_at']})",
        f"layout      world {lay['world_size']} = TP {lay['tensor_parallel']} × PP {lay['pipeline_parallel']} × "
        f"DP {lay['data_parallel']}" + (f", VPP {lay['virtual_pipeline']}" if lay.get("virtual_pipeline") else ""),
        f"optimizer   {desc['optimizer']['kind']}" + (f" ({desc['optimizer']['format']})"
                                                      if desc["optimizer"]["format"] else "")
        + f"; scheduler {'yes' if desc['has_scheduler'] else 'no'}",
        f"model       {len(desc['model_tensors'])} tensors, {desc['num_model_parameters']:,} parameters",
        f"files       {len(desc['files'])}, {desc['total_bytes'] / 2**20:.1f} MiB",
        f"versions    torch {desc['versions']['torch']}, megatron-core {desc['versions']['megatron_core']}",
    ]
    model = (desc.get("config") or {}).get("model")
    if model:
        lines.append("config      " + ", ".join(f"{k}={v}" for k, v in model.items()))
    if "problems" in desc:
        lines.append("verify      " + ("all files intact" if not desc["problems"] else "PROBLEMS:"))
        lines += [f"  {p}" for p in desc["problems"]]
    shown = desc["model_tensors"] if all_keys else dict(list(desc["model_tensors"].items())[:20])
    lines.append("model tensors:")
    lines += [f"  {k:70s} {str(v['shape']):>20s} {v['dtype']}" for k, v in shown.items()]
    if len(shown) < len(desc["model_tensors"]):
        lines.append(f"  ... {len(desc['model_tensors']) - len(shown)} more (--all-keys)")
    if all_keys:
        lines.append("optimizer and other tensors:")
        lines += [f"  {k:70s} {str(v['shape']):>20s} {v['dtype']}" for k, v in desc["other_tensors"].items()]
        lines.append("objects:")
        lines += [f"  {k}" for k in desc["objects"]]
    return "\n".join(lines)
