"""Results files: results.json (everything) and results.md (a markdown table per task).

Each eval appends one entry to results.json (a list, keyed by task and dataset name) and rewrites the
markdown table from it, so several datasets evaluated into one directory end up in one table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RETRIEVAL_COLUMNS = (("i2t_r1", "I→T R@1"), ("i2t_r5", "I→T R@5"), ("i2t_r10", "I→T R@10"),
                     ("t2i_r1", "T→I R@1"), ("t2i_r5", "T→I R@5"), ("t2i_r10", "T→I R@10"), ("mr", "MR"))
ZEROSHOT_COLUMNS = (("top1", "top-1"), ("top5", "top-5"))
_COLUMNS = {"retrieval": RETRIEVAL_COLUMNS, "zeroshot": ZEROSHOT_COLUMNS}
_TITLES = {"retrieval": "Image–text retrieval (%)", "zeroshot": "Zero-shot classification (%)"}


def _load(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"eval: {path} exists but is not valid JSON; move it away or pick another output dir") \
            from None
    if not isinstance(entries, list):
        raise ValueError(f"eval: {path} exists but does not hold a list of results")
    return entries


def markdown_table(entries: list[dict[str, Any]]) -> str:
    """One markdown table per task present in `entries` (metrics with 2 decimals)."""
    out = []
    for task, columns in _COLUMNS.items():
        rows = [e for e in entries if e.get("task") == task]
        if not rows:
            continue
        out += [f"### {_TITLES[task]}", "", "| dataset | " + " | ".join(c[1] for c in columns) + " |",
                "|---|" + "---:|" * len(columns)]
        for e in rows:
            values = [f"{e['metrics'][k]:.2f}" if k in e["metrics"] else "–" for k, _ in columns]
            out.append(f"| {e['name']} | " + " | ".join(values) + " |")
        out.append("")
    return "\n".join(out)


def write_results(out_dir: str | Path, entry: dict[str, Any]) -> tuple[Path, Path]:
    """Add `entry` ({"task", "name", "metrics", ...}) to out_dir/results.json (replacing one with the same
    task and name) and rewrite out_dir/results.md. Returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    entries = [e for e in _load(json_path) if (e.get("task"), e.get("name")) != (entry["task"], entry["name"])]
    entries.append(entry)
    for path, text in ((json_path, json.dumps(entries, indent=2, ensure_ascii=False) + "\n"),
                       (md_path, markdown_table(entries))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)  # readers never see half a file
    return json_path, md_path
