"""The `te` layer spec (Transformer Engine; bf16 and FP8 delayed/current) against the `local` spec, on a GPU.

Skipped without CUDA (tests/conftest.py). The checks live in tests/gpu/te_check.py, which also runs as a
standalone script on a lent GPU.
"""

import dataclasses

import pytest

from tests.gpu.ngc import require_te

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def report():
    from tests.gpu.te_check import run_checks

    require_te()
    return run_checks()


@pytest.mark.parametrize("variant", ["local-bf16", "te-bf16", "te-fp8-delayed", "te-fp8-current"])
def test_variant_matches_local_fp32(report, variant):
    row = report[variant]
    assert row["backward_finite"], f"{variant}: non-finite or missing gradients"
    assert row["ok"], f"{variant}: {row}"


def test_te_spec_state_dict_names_map_to_local_names():
    require_te()
    from m2megatron.config import preset
    from m2megatron.models import M2Encoder, local_state_dict
    from tests.gpu.te_check import _groups

    groups = _groups()
    cfg = preset("tiny")
    local = M2Encoder(cfg, groups).cuda()
    te = M2Encoder(dataclasses.replace(cfg, layer_spec="te"), groups).cuda()
    ours, theirs = local_state_dict(local), local_state_dict(te)
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)
