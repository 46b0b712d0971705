"""m2megatron.compat.jit_fuser (J1): Megatron's torch.compile'd fusion functions compile at their first call."""

import subprocess
import sys

from m2megatron.compat.jit_fuser import _defer


def test_a_deferred_function_is_compiled_once_at_its_first_call():
    compiled = []

    def fake_compile(fn):
        compiled.append(fn)
        return lambda *a, **k: ("compiled", fn(*a, **k))

    @_defer(fake_compile)
    def double(x):
        """Doubles x."""
        return 2 * x

    assert compiled == [] and double.__name__ == "double" and double.__doc__ == "Doubles x."
    assert double(3) == ("compiled", 6) and double(4) == ("compiled", 8)
    assert len(compiled) == 1


def test_importing_megatron_core_after_m2megatron_does_not_import_dynamo():
    code = ("import sys, torch, m2megatron, megatron.core, megatron.core.jit as jit; "
            "from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl; "
            "assert 'torch._dynamo' not in sys.modules and 'torch._inductor' not in sys.modules, 'eager'; "
            "assert jit.jit_fuser.deferred is torch.compile")
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
