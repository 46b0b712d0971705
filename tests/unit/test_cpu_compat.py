"""Each Megatron-Core CPU workaround is still needed with the pinned version, and works once applied.

One process forked from the test forkserver (which imported Megatron-Core but patched nothing: the
workarounds are applied after the fork, per process) records which CUDA-only calls fail, then applies
`cpu_compat` and runs the same calls again.
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
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
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
        check("W3_cuda_factory", lambda: torch.zeros([], dtype=torch.int, device="cuda"))
        check("W4_synchronize", lambda: torch.cuda.synchronize())
        p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
        check("W5_type_assert", lambda: torch.nn.Parameter(torch.ones(1)).type() == "torch.cuda.FloatTensor" or
              (_ for _ in ()).throw(AssertionError("cpu tensor type")))
        check("W7_checkpoint_without_output", lambda: mrandom.CheckpointWithoutOutput(fp8=False).fp8 is False or
              (_ for _ in ()).throw(AssertionError("fp8=False treated as enabled")))
        check("W8_causal_mask", lambda: tutils.get_default_causal_mask(4))
        return out

    before = probe()
    from m2megatron.parallel import cpu_compat
    applied = cpu_compat.apply()
    after = probe()
    print(json.dumps({"applied": applied, "before": before, "after": after}))
''')


@pytest.fixture(scope="module")
def probe_result():
    if __import__("torch").cuda.is_available():
        pytest.skip("CUDA present: the CPU workarounds are not applied")
    run = run_code(PROBE, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["W1_current_device", "W2_rng_tracker", "W3_cuda_factory",
                                  "W5_type_assert", "W7_checkpoint_without_output", "W8_causal_mask"])
def test_workaround_is_still_needed_and_fixes_the_call(probe_result, name):
    assert probe_result["applied"] is True
    assert probe_result["before"][name] != "ok", f"{name}: the pinned Megatron-Core no longer needs it"
    assert probe_result["after"][name] == "ok", probe_result["after"][name]


def test_synchronize_becomes_a_no_op(probe_result):
    # On a CPU build torch.cuda.synchronize raises; Megatron calls it in p2p, checkpoint writer and timers.
    assert probe_result["after"]["W4_synchronize"] == "ok"
