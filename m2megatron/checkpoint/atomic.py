"""Where checkpoints live on disk, and how one becomes visible only when it is complete.

    <root>/
      latest                      text file: the name of the newest complete checkpoint ("iter_0000100")
      iter_0000100/               a complete checkpoint (Megatron torch_dist files + m2meta.json)
      iter_0000200/
      .tmp.iter_0000300.<nonce>/  a save in progress (or one that a crash left behind)

A save writes everything into a `.tmp.*` directory, then renames it to `iter_NNNNNNN` (one atomic
`rename` on a POSIX file system), then rewrites `latest` through a temporary file and `os.replace`.
A SIGKILL at any moment therefore leaves `latest` naming a complete checkpoint (or missing). A
checkpoint is complete when its directory has the `iter_` name and holds `m2meta.json`, which is
written last inside the temporary directory. (tests/distributed/test_checkpoint_crash.py SIGKILLs a save
at each step of this sequence.)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

LATEST = "latest"
META_NAME = "m2meta.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def new_temp_dir(root: Path, step: int, nonce: str | None = None) -> Path:
    """The temporary directory for a save of `step` (all ranks must use the same nonce)."""
    return root / f".tmp.{iter_name(step)}.{nonce or uuid.uuid4().hex[:8]}"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_complete(path: Path) -> bool:
    return _ITER_RE.match(path.name) is not None and (path / META_NAME).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_ITER_RE.match(p.name).group(1)))


def publish(temp_dir: Path, root: Path, step: int) -> Path:
    """Rename a finished temporary directory into place and point `latest` at it (rank 0 only)."""
    final = root / iter_name(step)
    if final.exists():
        # Re-saving the same step (e.g. after a resume without progress): keep the old one until
        # the new one is complete, then swap. The window where neither exists is covered by
        # `resolve` falling back to the newest complete checkpoint.
        old = root / f".old.{final.name}.{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(temp_dir, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(temp_dir, final)
    fsync_dir(root)
    write_latest(root, final.name)
    return final


def write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def read_latest(root: Path) -> Path | None:
    """The checkpoint `latest` names, when it names a complete one; else the newest complete one."""
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        candidate = root / name
        if _ITER_RE.match(name) and is_complete(candidate):
            return candidate
        log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one",
                    pointer, name)
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve(path_or_root: str | os.PathLike) -> Path:
    """A checkpoint directory from itself, from a root (its latest), or from 'root/latest'."""
    path = Path(path_or_root)
    if path.name == LATEST:
        path = path.parent
    if (path / META_NAME).is_file():
        if not _ITER_RE.match(path.name):
            return path  # a copied or renamed checkpoint: accept any name that holds m2meta.json
        return path
    if path.is_dir():
        found = read_latest(path)
        if found is not None:
            return found
    from m2megatron.checkpoint.safety import CheckpointError

    if path.name.startswith(".tmp."):
        raise CheckpointError(f"{path}: an incomplete checkpoint (a save that did not finish); not loadable")
    raise CheckpointError(f"{path}: no complete checkpoint here (no {META_NAME}, no '{LATEST}' pointer, "
                          "no iter_* directory)")


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints and stale temporary directories."""
    removed = []
    complete = complete_checkpoints(root)
    latest = read_latest(root)
    for old in complete[:-keep_last] if keep_last > 0 else []:
        if latest is not None and old.resolve() == latest.resolve():
            continue
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


def remove_stale_temps(root: Path, keep: Path | None = None) -> None:
    """Remove `.tmp.*` / `.old.*` leftovers of earlier crashed saves (call before a new save starts)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if (p.name.startswith(".tmp.") or p.name.startswith(".old.")) and p != keep:
            shutil.rmtree(p, ignore_errors=True)
