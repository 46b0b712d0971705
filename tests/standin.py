"""A stand-in accelerator for device-correctness tests on a host without a GPU: the `meta` device.

A GPU run fails on the first tensor left on the host: NCCL refuses CPU tensors and CUDA kernels refuse
to mix devices. Here nothing would fail, because everything is on the CPU. So these tests make `meta` the
runtime device (the bootstrap's `device=` argument, through m2megatron.parallel.fake_world) and run the
real code as rank r of an N-rank world on torch's `fake` process-group backend (every collective a no-op),
in a fresh process (the CPU patches are process-wide). A `DeviceRecorder` then fails the test on:

- any ATen op that mixes a host tensor (more than a 0-d scalar, which CUDA accepts too) with a device
  tensor, other than the copies that move data on purpose (`.to(device)`, `.cpu()`);
- any collective, p2p or object collective whose tensor is not on the runtime device (c10d ops are ATen
  ops, so the same dispatch mode sees them however Megatron calls torch.distributed);
- any tensor input to a stage module's forward that is not on the runtime device.

`meta` tensors hold no data, so where the host reads a device value the recorder answers for it: a
scalar read is 0 (`.item()`) or True (`bool()`), a device → host copy is zeros, and object collectives keep this
rank's own objects (broadcast) or replicate them (all-gather), as the fake backend would for tensors.
"""

from __future__ import annotations

import contextlib
import os
import traceback

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

DEVICE = torch.device("meta")
_COPIES = {"aten::_to_copy", "aten::copy_", "aten::_copy_from", "aten::_copy_from_and_resize", "aten::lift_fresh",
           "aten::lift_fresh_copy", "aten::set_"}
_OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")


def _where() -> str:
    """The innermost frames of our code or Megatron's that led here."""
    frames = [f for f in traceback.extract_stack()[:-3]
              if ("m2megatron" in f.filename or "megatron/core" in f.filename) and "tests/standin" not in f.filename]
    return " ← ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))


class DeviceRecorder(TorchDispatchMode):
    """Records every host tensor that reaches device work (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []
        self.collectives: list[str] = []
        self.forward_inputs = 0

    def _flag(self, what: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(f"{what}  [{_where()}]")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = any(t.device.type == DEVICE.type for t in tensors)
        host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        if name.startswith("c10d::"):
            self.collectives.append(name)
            # barrier's dummy tensor is torch's choice (the device the group is bound to under NCCL).
            if host and name != "c10d::barrier":
                self._flag(f"{name} got a host tensor {tuple(host[0].shape)} {host[0].dtype}")
        elif on_device and host and name not in _COPIES:
            self._flag(f"{name} mixes a host tensor {tuple(host[0].shape)} {host[0].dtype} with device tensors")
        if name == "aten::_to_copy" and tensors[0].device.type == DEVICE.type and \
                torch.device(kwargs.get("device") or DEVICE).type == "cpu":
            return torch.zeros(tensors[0].shape, dtype=kwargs.get("dtype") or tensors[0].dtype)
        if name == "aten::copy_" and args[0].device.type == "cpu" and args[1].device.type == DEVICE.type:
            return args[0].zero_()
        if name.startswith("c10d::") and not torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta"):
            # Some c10d ops (the coalesced ones) have no meta kernel; their host kernel only hands the
            # tensors to the fake backend, which does nothing with them.
            return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        return func(*args, **kwargs)

    def watch_forward_inputs(self, modules) -> None:
        """Check every tensor argument of every (sub)module forward of `modules`."""
        def hook(module, args, kwargs):
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor):
                    self.forward_inputs += 1
                    if t.device.type != DEVICE.type:
                        self._flag(f"{type(module).__name__}.forward got a {t.device} tensor {tuple(t.shape)}")
        for module in modules:
            for sub in module.modules():
                sub.register_forward_pre_hook(hook, with_kwargs=True)


def _emulated_object_collective(name: str, original, recorder: DeviceRecorder):
    def call(*args, **kwargs):
        device = kwargs.get("device")
        recorder.collectives.append(name)
        if device is not None and torch.device(device).type != DEVICE.type:
            recorder._flag(f"{name} asked to use {device}")
        if name == "all_gather_object":
            out, obj = args[0], args[1]
            out[:] = [obj] * len(out)
        elif name == "gather_object" and len(args) > 1 and args[1] is not None:
            args[1][:] = [args[0]] * len(args[1])
        elif name == "scatter_object_list":
            args[0][0] = args[1][0] if args[1] else args[0][0]
        return None
    return call


@contextlib.contextmanager
def recording():
    """DeviceRecorder active, object collectives emulated (the fake backend cannot carry objects)."""
    recorder = DeviceRecorder()
    saved = {name: getattr(dist, name) for name in _OBJECT_COLLECTIVES}
    for name, original in saved.items():
        setattr(dist, name, _emulated_object_collective(name, original, recorder))
    try:
        with recorder:
            yield recorder
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)


_SCALAR_READS = None


def _answer_scalar_reads() -> None:
    """`.item()` of a meta tensor answers 0 and `bool()` True, so sanity checks (`isfinite(x).all()`, a zero
    count of bad values) pass; also where torch reads scalars below the dispatch modes, as
    `torch.tensor(list_of_tensors)` in Megatron's fallback grad-norm does."""
    global _SCALAR_READS
    if _SCALAR_READS is None:
        import warnings

        _SCALAR_READS = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it overrides torch's own meta kernel, which raises
            _SCALAR_READS.impl("_local_scalar_dense", lambda t: True if t.dtype == torch.bool else 0, "Meta")


def join_fake_world(rank: int, world_size: int) -> None:
    """(Re)join a fake world as `rank` of `world_size`; the runtime device is the stand-in."""
    from m2megatron.parallel.fake_world import join_fake_world as join

    join(rank, world_size, DEVICE)
    _answer_scalar_reads()


def _child(fn, args, out) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        out.put(("ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put(("error", traceback.format_exc()))


def run_in_fresh_process(fn, *args, timeout_s: float = 600):
    """fn(*args) in a new process forked from the preloaded test forkserver (module-level fn; nothing there
    is patched or on a device yet); its return value, or its traceback raised."""
    from tests.harness import forkserver_context

    ctx = forkserver_context()
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, out), daemon=False)
    proc.start()
    try:
        status, payload = out.get(timeout=timeout_s)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise AssertionError(f"stand-in process failed:\n{payload}")
    return payload
