#!/usr/bin/env python
"""What the phase timers (logging.timers) cost per training step, against a run without them.

    python tools/bench_timers.py                        # tiny model, 4 microbatches per step
    python tools/bench_timers.py --shape m2-0.4b-d2 --microbatches 8

One process (gloo world of 1, or one GPU when CUDA is present), the stage runtime's training step with the
trainer's timed phases (step, data wait, optimizer; Megatron's own inside the schedule), at
logging.timers=0 (no timers), 1 (the default) and 2, the settings taking turns round by round. Prints:
- the fastest step of each level (the one least disturbed by other processes) and `ratio_timers_<L>` =
  level L / level 0, beside `ratio_control`: a second level-0 model against the first, the noise floor of
  those ratios (on a shared machine it is larger than the timers' cost), so also
- the timers' own cost: the start/stop pairs a step makes at each level (counted in a real step) times the
  measured cost of one pair, plus the interval read (one wait and an all-gather) spread over
  --log-interval steps, as a share of the level-0 step: `overhead_pct_<L>`.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

LEVELS = (0, 1, 2)
CONTROL = "0-again"
"""A second model without timers: the ratio of two identical settings shows the measurement's noise."""


def _setup(args):
    from m2megatron.config import load_config
    from m2megatron.parallel import Layout, build_groups, initialize, read_launch_env, seed_everything
    from m2megatron.planning.measure import synthetic_microbatches
    from m2megatron.runtime import ContrastiveStep, build_stages
    from m2megatron.train.run_monitor import RunMonitor

    # One process: NCCL on GPU 0 where CUDA exists, else gloo with the CPU patches.
    initialize(env=read_launch_env({}), megatron_state=False)
    groups = build_groups(Layout(world_size=1))
    seed_everything(0, groups)
    runs = {}
    for level in (*LEVELS, CONTROL):
        cfg = load_config(overrides=args.shape_overrides + [f"--train.micro_batch_size={args.batch}",
                                                          f"--train.global_batch_size={args.batch * args.microbatches}",
                                                          f"--logging.timers={0 if level == CONTROL else level}"])
        stages = build_stages(cfg, groups)
        monitor = RunMonitor(cfg, groups, stages.config.timers, None, samples_per_step=args.batch * args.microbatches,
                             tokens_per_sample=cfg.model.num_image_tokens + cfg.model.max_text_len)
        runs[level] = (stages, monitor, ContrastiveStep(stages), synthetic_microbatches(cfg, args.microbatches))
    return runs


def _step(stages, monitor, step, batches) -> None:
    """The trainer's step with its phases: step ⊃ data wait, the schedule (Megatron's timers), optimizer."""
    with monitor.step():
        with monitor.phase("data-wait"):
            microbatches = list(batches)
        for chunk in stages.chunks:
            chunk.zero_grad_buffer()
        stages.optimizer.zero_grad()
        step(microbatches)
        with monitor.phase("optimizer"):
            stages.optimizer.step()
    _sync(stages)


def _sync(stages) -> None:
    import torch

    if stages.device.type == "cuda":
        torch.cuda.synchronize()


def _interval_read(monitor) -> float:
    """Seconds of one log record's monitor part: read the timers and memory, all-gather them, reduce (the
    fastest of a few)."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        monitor.interval(step=1)
        times.append(time.perf_counter() - start)
    return min(times)


def _pairs_per_step(stages, monitor, step, batches) -> int:
    from m2megatron.runtime.timers import PhaseTimer

    count = [0]
    real = PhaseTimer.start

    def counting(self, barrier=False):
        count[0] += 1
        real(self, barrier)

    PhaseTimer.start = counting
    try:
        _step(stages, monitor, step, batches)
    finally:
        PhaseTimer.start = real
    return count[0]


def _pair_cost(stages, n: int = 2000) -> float:
    """Seconds of one start/stop pair on this device (host side: what the step waits for)."""
    timers = stages.config.timers
    timer = timers("bench-pair", 1)
    start = time.perf_counter()
    for _ in range(n):
        timer.start()
        timer.stop()
    seconds = (time.perf_counter() - start) / n
    timers.read(["bench-pair"])
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "kernels"),
                    str(Path(__file__).resolve().parent)]
    from bench_train_step import SHAPES

    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="steps per level per round")
    p.add_argument("--log-interval", type=int, default=10, help="steps per interval read (train.log_interval)")
    args = p.parse_args(argv)
    args.shape_overrides = SHAPES[args.shape]
    runs = _setup(args)
    device = runs[0][0].device
    print(f"# timers on {device.type}: shape {args.shape}, {args.microbatches} microbatches of {args.batch}, "
          f"{args.rounds} rounds × {args.steps} steps per level")
    times = {level: [] for level in runs}
    for level in runs:  # warm-up: Adam allocates its state on the first step
        _step(*runs[level])
    for _ in range(args.rounds):
        for level in runs:
            for _ in range(args.steps):
                start = time.perf_counter()
                _step(*runs[level])
                times[level].append(time.perf_counter() - start)
            runs[level][1].interval(step=1)  # a log record per round
    medians = {level: min(t) for level, t in times.items()}
    results = {"ratio_control": medians[CONTROL] / medians[0]}
    for level in LEVELS[1:]:
        stages, monitor = runs[level][:2]
        pairs, pair_s = _pairs_per_step(*runs[level]), _pair_cost(stages)
        per_step = pairs * pair_s + max(_interval_read(monitor) - _interval_read(runs[0][1]), 0) / args.log_interval
        results[f"ratio_timers_{level}"] = medians[level] / medians[0]
        results[f"overhead_pct_{level}"] = 100 * per_step / medians[0]
        print(f"level {level}: {medians[level] * 1e3:.1f} ms/step (level 0: {medians[0] * 1e3:.1f}), fastest; "
              f"{pairs} start/stop pairs per step × {pair_s * 1e6:.1f} µs + interval read / {args.log_interval} = "
              f"{per_step * 1e6:.0f} µs per step")
    print(" ".join(f"{k}={v:.4f}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
