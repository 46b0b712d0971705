"""Every patch of torch or Megatron-Core (0.16.1) in m2megatron, in one list. Nothing else patches them.

Each entry: what it replaces; why; the test that proves the original failure still exists in the pinned version.

- W1 `torch.cuda.current_device()` → the runtime device. Megatron allocates buffers on it (attention's memory
  buffer, TP gathers, p2p receives, DDP grad buffers). tests/unit/test_compat_cpu.py
- W2 Megatron's CUDA RNG tracker → one that keeps CPU generator states. Attention forks the tracker even
  with dropout 0; recompute restores it. tests/unit/test_compat_cpu.py
- W3 `device="cuda"` in factory calls, `Tensor.cuda()`, `.to("cuda")` → the runtime device, by a
  TorchFunctionMode entered only while the Megatron functions of `cpu._NEEDS_MODE` run (the schedules'
  token counter, optimizer constants, clip_grads, broadcast_data, the checkpoint exchange), never for the
  process lifetime. tests/unit/test_compat_cpu.py
- W4 `torch.cuda.synchronize()` → no-op (p2p batch sync, checkpoint loading, timers).
  tests/unit/test_compat_cpu.py
- W5 `Tensor.type()` → `torch.cuda.*Tensor` names, in W3's mode: clip_grads' and the mixed-precision
  optimizers' type asserts. tests/unit/test_compat_cpu.py
- W7 `CheckpointWithoutOutput.__init__` keeps `fp8=False` off; Megatron treats it as enabled and then needs
  Transformer Engine. tests/unit/test_compat_cpu.py
- W8 `get_default_causal_mask` / `get_sliding_window_causal_mask` → built on the CPU; Megatron builds them
  with `device="cuda"`, also during recompute in backward where W3 is inactive. tests/unit/test_compat_cpu.py
- J1 `megatron.core.jit.jit_fuser` (torch.compile) → compiles at a function's first call (an import hook).
  Decorating ~20 fusions imports Dynamo and Inductor: 3.5 s of every `import megatron.core`, for functions
  M2 never calls. tests/unit/test_compat_jit_fuser.py
- Q1 Megatron's private `filesystem_async._results_queue` → a Manager queue forked before any process
  group. Megatron spawns it at the first save (a re-import of the entry point, 5-8 s per rank), and the
  job's stop signals kill it before the preemption checkpoint. tests/unit/test_compat_writer_queue.py

(W6, a CUDA stream patch, is needed only by Megatron-Core 0.19.x and is not installed.)

W1–W8 are installed by `apply(device)` when a process's runtime device is not CUDA: by
m2megatron.parallel.bootstrap after the process group starts. J1 is installed by `import m2megatron`, before
any Megatron import (`install_import_hooks`). Q1 is started by the bootstrap before the process group and
before any CUDA call (`start_writer_queue`). This package imports neither torch nor Megatron-Core at import
time, so that `import m2megatron` can install J1 first.
"""

from __future__ import annotations

PATCHES = ("W1", "W2", "W3", "W4", "W5", "W7", "W8", "J1", "Q1")
"""The ids of the table above; each one's test module is named in it."""


def install_import_hooks() -> None:
    """J1 (run by `import m2megatron`)."""
    from m2megatron.compat import jit_fuser

    jit_fuser.install()


def start_writer_queue() -> bool:
    """Q1: True if the queue was forked now (see m2megatron.compat.writer_queue)."""
    from m2megatron.compat import writer_queue

    return writer_queue.start_before_process_groups()


def apply(device) -> bool:
    """W1–W8 for a process whose runtime `device` is not CUDA; True if they are active."""
    from m2megatron.compat import cpu

    return cpu.apply(device)
