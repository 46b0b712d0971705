"""The training step's finiteness test: NaN and ±Inf anywhere are caught; large finite gradients are not."""

from types import SimpleNamespace

import pytest
import torch

from m2megatron.runtime.train_step import nonfinite_flag


def _buffers(*values):
    return [SimpleNamespace(grad_data=torch.tensor(v, dtype=torch.float32)) for v in values]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_any_nonfinite_gradient_element_raises_the_flag(bad):
    grads = [1.0] * 1000
    grads[537] = bad
    assert nonfinite_flag(torch.tensor(2.0), _buffers([0.5, -0.5], grads), "cpu").item() == 1.0


def test_large_finite_gradients_do_not_overflow_into_a_false_alarm():
    huge = [3e38] * 4 + [-3e38] * 4  # their sum or norm would be inf in fp32
    assert nonfinite_flag(torch.tensor(2.0), _buffers(huge, []), "cpu").item() == 0.0


def test_the_loss_alone_and_no_loss_at_all():
    assert nonfinite_flag(torch.tensor(float("nan")), [], "cpu").item() == 1.0
    assert nonfinite_flag(None, [], "cpu").item() == 0.0  # a rank off the last stage, fp16 (no gradient check)
