"""A stand-in for `python -m m2megatron.train` that keeps its run-directory contract, so the launch,
preemption and requeue mechanics are proven on the real local Slurm before the trainer lands.

It comes up through m2megatron's bootstrap without Megatron's layout (`megatron_state=False`): the batch
script exports MASTER_ADDR and MASTER_PORT, and the rank comes from torchrun (RANK) or from srun
(SLURM_PROCID).
Each step sleeps M2_FAKE_STEP_S seconds and all-reduces the step number; rank 0 appends
{"step", "loss", "attempt"} to metrics.jsonl. A "checkpoint" is checkpoints/step-N/state.json plus an
atomically replaced `latest` file naming it. Preemption uses the real m2megatron.train.preemption.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from m2megatron.config import load_config
from m2megatron.parallel import initialize, shutdown
from m2megatron.train.preemption import PreemptionHandler, write_json_atomic


def latest_step(ckpt_dir: Path) -> int:
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return 0
    return json.loads((ckpt_dir / latest.read_text().strip() / "state.json").read_text())["step"]


def save(ckpt_dir: Path, step: int) -> Path:
    dist.barrier()
    path = ckpt_dir / f"step-{step}"
    if dist.get_rank() == 0:
        write_json_atomic(path / "state.json", {"step": step})
        tmp = ckpt_dir / ".latest.tmp"
        tmp.write_text(path.name + "\n")
        os.replace(tmp, ckpt_dir / "latest")
    dist.barrier()
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    cfg = load_config(parser.parse_args().config)
    run_dir = Path(cfg.train.run_dir)
    print(f"{time.strftime('%T')} started", flush=True)
    handler = PreemptionHandler(run_dir).install()
    initialize(dataclasses.replace(cfg.parallel, backend="gloo"), megatron_state=False)
    rank, attempt = dist.get_rank(), int(os.environ.get("SLURM_RESTART_COUNT", 0))
    ckpt_dir = run_dir / "checkpoints"
    start = latest_step(ckpt_dir)
    step_s = float(os.environ.get("M2_FAKE_STEP_S", "0.3"))
    print(f"{time.strftime('%T')} rank {rank}/{dist.get_world_size()} attempt {attempt} resumes after step {start}",
          flush=True)
    for step in range(start + 1, cfg.train.train_steps + 1):
        time.sleep(step_s)
        total = torch.tensor([float(step)])
        dist.all_reduce(total)
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": 1.0 / step, "attempt": attempt}) + "\n")
        if handler.requested():
            path = save(ckpt_dir, step)
            handler.mark_preempted(step=step, checkpoint=path)
            print(f"rank {rank} preempted ({handler.reason}) at step {step}", flush=True)
            return 0
        if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
            save(ckpt_dir, step)
    save(ckpt_dir, cfg.train.train_steps)
    print(f"rank {rank} finished at step {cfg.train.train_steps}", flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
