"""Each Megatron-Core CPU patch of m2megatron.compat (W1–W8) is still needed with the pinned version, works
once applied, and leaves no TorchFunctionMode entered.

One process forked from the test forkserver (which imported Megatron-Core but patched nothing: the
patches are applied after the fork, per process) records which CUDA-only calls fail, then applies them
and runs the same calls again.
"""

import json
import textwrap

import pytest

from tests.harness import run_code

pytestmark = pytest.mark.unit

PROBE = textwrap.dedent('''
    import json, torch
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.utils import GlobalMemoryBuffer
    from megatron.core.transformer import utils as tutils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler
    from megatron.core.pipeline_parallel import schedules

    def probe():
        out = {}
        def check(name, fn):
            try:
                fn()
                out[name] = "ok"
            except BaseException as exc:
                out[name] = f"{type(exc).__name__}: {exc}"
        check("W1_current_device", lambda: GlobalMemoryBuffer().get_tensor((2, 2), torch.float32, "x"))
        check("W2_rng_tracker", lambda: tensor_parallel.model_parallel_cuda_manual_seed(
            1, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True))
        # W3 and W5 hold inside the Megatron functions that need them (here: a grad scaler's constant on
        # "cuda", clip_grads' type assert), and nowhere else.
        check("W3_cuda_factory", lambda: ConstantGradScaler(1.0).scale.device.type == "cpu" or
              (_ for _ in ()).throw(AssertionError("not on the runtime device")))
        check("W3_elsewhere", lambda: torch.zeros([], dtype=torch.int, device="cuda"))
        check("W4_synchronize", lambda: torch.cuda.synchronize())
        p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
        check("W5_type_assert", lambda: clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=0.5))
        check("W7_checkpoint_without_output", lambda: mrandom.CheckpointWithoutOutput(fp8=False).fp8 is False or
              (_ for _ in ()).throw(AssertionError("fp8=False treated as enabled")))
        check("W8_causal_mask", lambda: tutils.get_default_causal_mask(4))
        return out

    before = probe()
    from m2megatron import compat
    applied = compat.apply("cpu")
    after = probe()
    modes = torch._C._len_torch_function_stack()
    print(json.dumps({"applied": applied, "before": before, "after": after, "modes_left_entered": modes}))
''')


@pytest.fixture(scope="module")
def probe_result():
    if __import__("torch").cuda.is_available():
        pytest.skip("CUDA present: the probe's 'before' calls would succeed")
    run = run_code(PROBE, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["W1_current_device", "W2_rng_tracker", "W3_cuda_factory",
                                  "W5_type_assert", "W7_checkpoint_without_output", "W8_causal_mask"])
def test_workaround_is_still_needed_and_fixes_the_call(probe_result, name):
    assert probe_result["applied"] is True
    assert probe_result["before"][name] != "ok", f"{name}: the pinned Megatron-Core no longer needs it"
    assert probe_result["after"][name] == "ok", probe_result["after"][name]


def test_no_mode_is_left_entered_and_cuda_calls_outside_megatron_still_fail(probe_result):
    assert probe_result["modes_left_entered"] == 0
    assert probe_result["after"]["W3_elsewhere"] != "ok"


def test_synchronize_becomes_a_no_op(probe_result):
    # On a CPU build torch.cuda.synchronize raises; Megatron calls it in p2p, checkpoint writer and timers.
    assert probe_result["after"]["W4_synchronize"] == "ok"
