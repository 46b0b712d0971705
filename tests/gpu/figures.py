"""The one line format of every figure the GPU check's stages print, so that its summary carries them all.

tests/gpu/run.sh copies every line holding TAG from every stage's log into summary.txt (pytest -s may put
progress dots before it, so the tag is searched anywhere in the line). Torch-free: the CPU rehearsal's
stand-in stages print through it too.
"""

from __future__ import annotations

TAG = "[figure] "


def figure(text: str) -> str:
    """`text` as a figure line."""
    return TAG + text


def print_figure(text: str) -> None:
    print(figure(text), flush=True)


def attention_kernel(op_names) -> str:
    """The SDPA kernel a profiler saw run, from its op names: flash, efficient, cudnn or math (several: joined)."""
    kinds = [kind for kind in ("flash", "efficient", "cudnn", "math") if any(kind in op for op in op_names)]
    return "+".join(kinds) or "unknown"


def attention_line(case: str, op_names) -> str:
    return figure(f"attention kernel ({case}): {attention_kernel(op_names)}  ops={sorted(op_names)}")
