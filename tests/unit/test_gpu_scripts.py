"""The GPU check's scripts run only on a lent GPU; their logic is exercised here on the CPU, at the tiny size,
so that an API change cannot break them unseen (the CUDA memory counters are stood in for)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.unit
GPU = Path(__file__).resolve().parents[1] / "gpu"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_perf_table_variant_runs_a_training_step_at_the_tiny_size(monkeypatch):
    from tests.reference_model import single_groups

    perf = _script("perf_table")
    monkeypatch.setattr(perf, "PRESET", "tiny")
    for name in ("reset_peak_memory_stats", "synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H200")
    row = perf.run_variant(single_groups(), "local-bf16", batch=4, steps=5)
    assert row["samples_s"] > 0 and 0 < row["mfu"] <= row["hfu"] and row["planned_gib"] > 0
