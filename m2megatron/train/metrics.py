"""Training logs: a line per interval, metrics.jsonl, TensorBoard events and a progress bar.

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
    """metrics.jsonl + TensorBoard + a tqdm bar; a no-op object on non-logging ranks."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, total_steps: int,
                 start_step: int = 0, progress: bool = True) -> None:
        self.enabled = enabled
        self._tb = None
        self._bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (run_dir / "metrics.jsonl").open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
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
        if self._tb is not None:
            for key, value in metrics.items():  # eval/<set>/<metric> keys keep their own namespace
                self._tb.add_scalar(key if "/" in key else f"train/{key}", float(value), step)
            self._tb.flush()
        line = " | ".join(f"{k} {_fmt(v)}" for k, v in record.items())
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
        self._jsonl.close()


def _fmt(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e12:
        return str(int(value))
    return f"{value:.4g}"
