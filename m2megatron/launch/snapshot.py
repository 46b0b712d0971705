"""Copy the source tree into the run directory, so queued and requeued attempts run the submitted code.

The files are those git knows (tracked plus untracked-but-not-ignored), so virtual environments, run
directories and caches stay out. Without git, the package folders and top-level files are copied.
SNAPSHOT.json records the source, the commit and whether the tree had uncommitted changes; the
uncommitted diff itself is saved as git.diff.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

MAX_FILE_BYTES = 5 * 1024 * 1024
"""Bigger files (data, weights that slipped into the tree) are left out of the snapshot and listed."""
FALLBACK_DIRS = ("m2megatron", "launch", "kernels", "tools", "configs")


def source_files(root: Path) -> list[Path]:
    """Paths relative to `root` that belong in a snapshot."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(root)) for d in FALLBACK_DIRS if (root / d).is_dir()
                 for p in (root / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        names += [p.name for p in root.iterdir() if p.is_file()]
    return sorted(Path(n) for n in names if (root / n).is_file())


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def snapshot_code(root: str | Path, dest: str | Path) -> dict:
    """Copy the source tree `root` to `dest` (replacing an older snapshot there); return the record."""
    root, dest = Path(root).resolve(), Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copied, skipped = 0, []
    for rel in source_files(root):
        src = root / rel
        if src.stat().st_size > MAX_FILE_BYTES:
            skipped.append(str(rel))
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, tmp / rel)
        copied += 1
    diff = _git(root, "diff", "HEAD")
    if diff:
        (tmp / "git.diff").write_text(diff)
    record = {"source": str(root), "commit": _git(root, "rev-parse", "HEAD").strip() or None,
              "dirty": bool(_git(root, "status", "--porcelain").strip()), "files": copied,
              "skipped_large_files": skipped, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / "SNAPSHOT.json").write_text(json.dumps(record, indent=2) + "\n")
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(dest)
    return record
