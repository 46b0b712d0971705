"""On a CPU-only machine, Transformer Engine or apex being importable breaks `import megatron.core`."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.unit


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU host: TE and apex belong there")
@pytest.mark.parametrize("module", ["transformer_engine", "apex"])
def test_gpu_only_package_is_not_importable_on_cpu(module):
    assert importlib.util.find_spec(module) is None, (
        f"{module} is importable on this CPU-only machine; it breaks megatron.core. "
        f"Uninstall it (it belongs to requirements-gpu.txt on GPU hosts only).")
