"""A stand-in for `python -m m2megatron.eval.retrieval --checkpoint DIR --out DIR`: rank 0 writes
results.json naming the checkpoint step it found, so the chained-eval mechanics are proven now."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ckpt = Path(args.checkpoint)
    state = json.loads((ckpt / (ckpt / "latest").read_text().strip() / "state.json").read_text())
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps({"checkpoint_step": state["step"]}) + "\n")
    print(f"rank {rank} evaluated checkpoint step {state['step']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
