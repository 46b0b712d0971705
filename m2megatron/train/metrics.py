"""Training logs: a line per interval, metrics.jsonl, TensorBoard events, optionally wandb, and a progress bar.

Only the logging rank (global rank 0) writes. The trainer brings the loss there from the last
pipeline stage with one broadcast per log interval.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("m2megatron.train")


class ThroughputMeter:
    """Samples and tokens per second over the steps since the last `read()`."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._samples = 0
        self._tokens = 0

    def add(self, samples: int, tokens: int) -> None:
        self._samples += samples
        self._tokens += tokens

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        out = {"samples_per_s": self._samples / elapsed, "tokens_per_s": self._tokens / elapsed,
               "interval_s": elapsed}
        self._start, self._samples, self._tokens = now, 0, 0
        return out


class MetricsWriter:
    """metrics.jsonl + TensorBoard + wandb (`wandb`: WandbWriter's settings) + a tqdm bar; a no-op object on
    non-logging ranks."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, total_steps: int,
                 start_step: int = 0, progress: bool = True, wandb: dict | None = None) -> None:
        self.enabled = enabled
        self._tb = None
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (run_dir / "metrics.jsonl").open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb is not None:
            from m2megatron.train.wandb_writer import WandbWriter

            self._wandb = WandbWriter(run_dir, **wandb)
        if progress:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # disable=None: no bar when stderr is not a terminal (Slurm logs); log lines go around the bar.
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, leave=True, disable=None)
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def step(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {scalar_name(k): float(v) for k, v in metrics.items()}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step)
        for line in log_lines(record):
            if self._bar is not None:
                self._bar.write(line)
            else:
                log.info(line)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._redirect.__exit__(None, None, None)
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()
        self._jsonl.close()


def wandb_settings(cfg) -> dict | None:
    """WandbWriter's settings from logging.wandb_*; None when logging.wandb_project is unset."""
    if not cfg.logging.wandb_project:
        return None
    return {"project": cfg.logging.wandb_project, "name": cfg.logging.wandb_name, "config": cfg.to_dict()}


def scalar_name(key: str) -> str:
    """TensorBoard / wandb name of a record key: train/<key>; keys with a namespace (eval/, time/, mem/) keep it."""
    return key if "/" in key else f"train/{key}"


def log_lines(record: dict) -> list[str]:
    """The interval's log lines: the plain keys, then phase times as `phase max_ms@rank`, then memory."""
    per_rank = ("/min_ms", "/max_ms", "/max_rank")
    plain = " | ".join(f"{k} {_fmt(v)}" for k, v in record.items()
                       if not k.startswith("mem/") and not k.endswith(per_rank))
    lines = [plain]
    times = []
    for key in (k for k in record if k.startswith("time/") and k.endswith("/max_ms")):
        rank = record.get(key.removesuffix("/max_ms") + "/max_rank")
        times.append(f"{key[5:-7]} {record[key]:.1f}" + ("" if rank is None else f"@{int(rank)}"))
    if times:
        lines.append("  time ms/step, max over ranks @rank: " + " | ".join(times))
    memory = [f"{k[4:]} {_fmt(v)}" for k, v in record.items() if k.startswith("mem/")]
    if memory:
        lines.append("  memory, max over ranks: " + " | ".join(memory))
    return lines


def _fmt(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e12:
        return str(int(value))
    return f"{value:.4g}"
