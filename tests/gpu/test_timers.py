"""Phase timers on a GPU: CUDA event pairs measure stream time, and start/stop never wait for the GPU."""

from __future__ import annotations

import time

import pytest
import torch

from m2megatron.runtime.timers import PhaseTimers
from tests.gpu.figures import figure

pytestmark = pytest.mark.gpu


def test_a_cuda_phase_is_stream_time_and_start_stop_do_not_wait():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    timers = PhaseTimers(1, torch.device("cuda"))
    torch.cuda.synchronize()
    host_start = time.perf_counter()
    for _ in range(2):
        timers("forward-backward").start()
        torch.cuda._sleep(100_000_000)  # a kernel that spins ~50 ms on a ~2 GHz GPU
        timers("forward-backward").stop()
    host = time.perf_counter() - host_start  # enqueueing only: no synchronize per phase
    (gpu,) = timers.read(["forward-backward"])  # one wait, for the last event
    print(figure(f"phase timers: host {host * 1e3:.2f} ms for 2 start/stop pairs, stream time {gpu * 1e3:.1f} ms"))
    assert gpu > 0.04 and host < gpu / 4
