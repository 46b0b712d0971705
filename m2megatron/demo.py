"""The README's main job: train the tiny model on synthetic bilingual scenes with TP=2 × PP=2 on 4 CPU
ranks (torchrun), then evaluate zero-shot retrieval on held-out scenes. Prints R@1 in both directions
and writes the run report (report.md / report.json / report.png, m2megatron.eval.report); the last line
names the run directory, which also holds results.json, metrics.jsonl, TensorBoard events, checkpoints
and the resolved config.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from m2megatron.cli import run_main
from m2megatron.eval.report import write_report

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nproc", type=int, default=4, help="ranks (TP=2 × PP=2 needs a multiple of 4)")
    parser.add_argument("--run-dir", default=f"runs/tiny-{time.strftime('%Y%m%d-%H%M%S')}")
    args, overrides = parser.parse_known_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "m2megatron.train", "--config", str(RECIPE), f"--train.run_dir={args.run_dir}", *overrides]
    print("+ " + " ".join(cmd), flush=True)
    code = subprocess.call(cmd, env=env)
    if code != 0:
        return code
    run_dir = Path(args.run_dir)  # the trainer printed the held-out results above
    print(f"loss curve: {run_dir / 'metrics.jsonl'}; TensorBoard: {run_dir / 'tensorboard'}")
    paths = write_report(run_dir)
    print(f"run report: {paths['markdown']} (table: {paths['json'].name}, plot: {paths['plot'].name})")
    print(f"run directory: {Path(args.run_dir).resolve()}")
    return 0


if __name__ == "__main__":
    run_main(main)
