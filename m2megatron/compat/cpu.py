"""W1–W8 of m2megatron.compat: Megatron-Core (0.16.1) on a runtime device that is not CUDA (the CPU, gloo).

Megatron-Core assumes CUDA in a few hundred places. None of the patches below changes numerics; each
one redirects a CUDA-only call to the runtime device, which is the CPU (or, in tests, a stand-in
accelerator such as `meta`). `apply(device)` installs them once per process, when the process's runtime
device is not CUDA (also on a host that has CUDA, e.g. the checkpoint tools' local gloo ranks).
Each patch has a test (tests/unit/test_compat_cpu.py) that shows the original failure still exists in the
pinned version, so an upgrade tells us when a patch can go. Measurements: ../shared/notes/megatron_core_cpu.md §3.

- W1 `torch.cuda.current_device()` → the runtime device ("cpu"): Megatron allocates buffers with
  `device=torch.cuda.current_device()` (global memory buffer of attention, TP gathers, p2p receive
  buffers, DDP grad buffers, checkpoint finalisation).
- W2 CPU RNG tracker: `model_parallel_cuda_manual_seed` and the tracker's `fork()` (called by
  attention even with dropout 0, and by activation recompute) read and write the CUDA generator.
  We keep the tracked states as CPU generator states instead.
- W3 a TorchFunctionMode that rewrites `device="cuda"` in factory calls to the runtime device and makes
  `Tensor.cuda()` a no-op. It is entered only for the duration of the Megatron functions listed in
  `_NEEDS_MODE` (pipeline schedules' token counter, optimizer constants, clip_grads, broadcast_data,
  the checkpoint exchange), never for the process lifetime. Torch-function modes are not active inside
  autograd backward, which is why W8 is a direct patch.
- W4 `torch.cuda.synchronize()` → no-op (p2p batch sync, checkpoint writer, timers).
- W5 inside the same mode, `Tensor.type()` with no argument reports `torch.cuda.*Tensor` for CPU
  tensors, satisfying clip_grads' and the mixed-precision optimizers' type asserts.
- W7 `CheckpointWithoutOutput` treats `fp8=False` as enabled and then needs Transformer Engine.
- W8 the default causal and sliding-window masks are built with `device="cuda"` (also during
  recompute in backward, where W3 is inactive).

W3's mode puts a Python call in front of every torch function, which cost our forward+backward 15-20%
at small sizes (tools/bench_model.py). The schedules run our forward inside the mode; inside a Megatron
TransformerLayer every CUDA-only call is one of the direct patches (W1, W2, W8), so TransformerLayer.forward
runs with the mode lifted.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)
_APPLIED = False
_MODE = None
"""W3/W5's mode, once applied."""
_TARGET = "cpu"
"""The device type that stands for CUDA (W1, W3): the runtime device of this process."""
_FACTORY_FUNCTIONS = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange, torch.rand,
    torch.randn, torch.randint, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
    torch.as_tensor, torch.linspace, torch.eye,
}


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class _CpuDeviceMode(TorchFunctionMode):
    """W3 + W5: keep tensors Megatron asks to put on CUDA on the CPU."""

    _TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                   torch.bfloat16: "torch.cuda.BFloat16Tensor"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORY_FUNCTIONS and _is_cuda(kwargs.get("device")):
            kwargs["device"] = _TARGET
        elif func is torch.Tensor.cuda:
            return args[0] if args[0].device.type == _TARGET else args[0].to(_TARGET)
        elif func is torch.Tensor.to and args and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _TARGET, *args[2:])
        elif func is torch.Tensor.to and _is_cuda(kwargs.get("device")):
            kwargs["device"] = _TARGET
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = self._TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        return func(*args, **kwargs)


def _patch_rng_tracker() -> None:
    """W2: the Megatron RNG tracker, backed by the CPU generator."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            original = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(original)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom.initialize_rng_tracker(force_reset=True)


def _patch_masks() -> None:
    """W8: causal masks on the CPU (the fused-softmax module imported them by name)."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    def causal(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    def sliding(sq, skv, window_size):
        m = torch.ones(sq, skv, dtype=torch.bool)
        x = torch.arange(sq).unsqueeze(-1)
        y = torch.arange(skv).unsqueeze(0)
        return ~(m & (y <= x) & (y >= x - window_size)) if window_size else ~(m & (y <= x))

    for mod in (utils, fused_softmax):
        mod.get_default_causal_mask = causal
        mod.get_sliding_window_causal_mask = sliding


def _patch_checkpoint_without_output() -> None:
    """W7: `CheckpointWithoutOutput(fp8=False)` must not switch FP8 (and TE) on."""
    from megatron.core.tensor_parallel import random as mrandom

    original = mrandom.CheckpointWithoutOutput.__init__

    def init(self, fp8=False):
        original(self, fp8=fp8)
        self.fp8 = bool(fp8)

    mrandom.CheckpointWithoutOutput.__init__ = init


_NEEDS_MODE = {
    # module: functions (or Class.method) that ask for CUDA tensors with device="cuda", .cuda() or .type()
    "megatron.core.pipeline_parallel.schedules": (
        "forward_backward_no_pipelining", "forward_backward_pipelining_with_interleaving",
        "forward_backward_pipelining_without_interleaving"),
    "megatron.core.optimizer.clip_grads": ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32", "count_zeros_fp32"),
    "megatron.core.optimizer.optimizer": (
        "MegatronOptimizer.restore_from_cpu", "MixedPrecisionOptimizer.__init__",
        "Float16OptimizerWithFloat16Params.__init__", "FP32Optimizer.__init__"),
    "megatron.core.optimizer.distrib_optimizer": (
        "DistributedOptimizer.__init__", "DistributedOptimizer.get_parameter_state_dp_zero"),
    "megatron.core.optimizer.grad_scaler": (
        "MegatronGradScaler.__init__", "DynamicGradScaler.__init__", "DynamicGradScaler.load_state_dict"),
    "megatron.core.tensor_parallel.data": ("broadcast_data",),
    "megatron.core.utils": ("check_param_hashes_across_dp_replicas",),
    "megatron.core.dist_checkpointing.exchange_utils": (
        "_get_empty_tensor_for_exchange", "exchange_loaded_tensors_gather_rounds", "exchange_loaded_tensors_broadcast"),
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": ("verify_global_md_reuse",),
}
"""W3/W5: the Megatron-Core functions (found by a scan of 0.16.1 for CUDA-only factory calls, `.cuda()` and
`.type()` asserts) that run with the mode entered, for the duration of the call."""


def _mode_is_active(mode: _CpuDeviceMode) -> bool:
    return mode in torch.overrides._get_current_function_mode_stack()


def _with_mode(fn, mode: _CpuDeviceMode):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if _mode_is_active(mode):
            return fn(*args, **kwargs)
        with mode:
            return fn(*args, **kwargs)

    call.without_cpu_mode = fn
    return call


def _enter_mode_in_cuda_only_functions(mode: _CpuDeviceMode) -> None:
    """Wrap each function of _NEEDS_MODE, also in every module that imported it by name already (e.g.
    clip_grads' functions in optimizer.py, broadcast_data in megatron.core.tensor_parallel)."""
    replaced = {}
    for module_name, names in _NEEDS_MODE.items():
        module = importlib.import_module(module_name)
        for name in names:
            owner, attr = (getattr(module, name.split(".")[0]), name.split(".")[1]) if "." in name else (module, name)
            original = owner.__dict__[attr]
            setattr(owner, attr, _with_mode(original, mode))
            if owner is module:
                replaced[id(original)] = (original, getattr(module, attr))
    for holder in list(sys.modules.values()):
        for attr, value in list(getattr(holder, "__dict__", {}).items()):
            if id(value) in replaced and value is replaced[id(value)][0]:
                setattr(holder, attr, replaced[id(value)][1])


def _lift_mode_in_transformer_layers(mode: _CpuDeviceMode) -> None:
    """Run TransformerLayer.forward without W3's mode on top (see the module docstring): the schedules enter
    the mode, and our forward step runs inside them."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    original = TransformerLayer.forward

    def forward(self, *args, **kwargs):
        if torch._C._len_torch_function_stack() and torch.overrides._get_current_function_mode() is mode:
            with torch.overrides._pop_mode_temporarily():
                return original(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    TransformerLayer.forward = forward


def apply(device: torch.device | str = "cpu") -> bool:
    """Install every workaround once, if the runtime `device` (what stands for CUDA: the CPU, or a test's
    stand-in accelerator) is not CUDA. Returns True if they are active."""
    global _APPLIED, _TARGET
    if torch.device(device).type == "cuda":
        return False
    _TARGET = torch.device(device).type
    if _APPLIED:
        return True
    from m2megatron import benign_warnings

    benign_warnings.install_cpu_host()
    torch.cuda.current_device = lambda: _TARGET  # W1
    torch.cuda.synchronize = lambda *a, **k: None  # W4
    _patch_rng_tracker()  # W2
    _patch_masks()  # W8
    _patch_checkpoint_without_output()  # W7
    global _MODE
    mode = _MODE = _CpuDeviceMode()
    _enter_mode_in_cuda_only_functions(mode)  # W3 + W5, only while those functions run
    _lift_mode_in_transformer_layers(mode)
    _APPLIED = True
    log.debug("Megatron-Core CPU workarounds applied")
    return True


def is_applied() -> bool:
    return _APPLIED


@contextlib.contextmanager
def mode_entered():
    """W3/W5's mode entered as the wrapped Megatron functions enter it (a no-op before `apply`): what a
    benchmark needs to time our forward as the schedules run it."""
    if _MODE is None or _mode_is_active(_MODE):
        yield
        return
    with _MODE:
        yield
