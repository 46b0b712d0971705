"""The GPU check's scripts run only on a lent GPU; their logic is exercised here on the CPU, at the tiny size,
so that an API change cannot break them unseen (the CUDA memory counters are stood in for), and run.sh itself
runs in its rehearsal mode (stand-in stages) so that a bug of the script shows here and not on the GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "tests" / "gpu"


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
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a, **k: 2**21)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H100 PCIe")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(total_memory=85e9))
    monkeypatch.delenv("M2_PEAK_TFLOPS", raising=False)
    row = perf.run_variant(single_groups(), "local-sdpa-bf16", batch=4, steps=5)
    assert row["samples_s"] > 0 and 0 < row["mfu"] <= row["hfu"] and row["planned_gib"] > 0
    assert row["peak_tflops"] == 756.0 and row["reserved_gib"] == 2 * row["alloc_gib"]
    assert row["optimizer"].endswith(")") and "Adam" in row["optimizer"], row["optimizer"]
    assert row["attention"] in ("math", "flash", "efficient", "cudnn", "flash+math"), row["attention"]
    lines = perf.table_lines([row], "header")
    assert all(line.startswith("[figure] ") for line in lines) and row["optimizer"] in lines[2]


def _run_sh(tmp_path, **env) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(tmp_path / "out"), PY=sys.executable, OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", str(GPU / "run.sh")], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stop on a host without CUDA")
def test_run_sh_stops_at_once_with_one_line_without_cuda(tmp_path):
    proc = _run_sh(tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    assert lines[0].startswith("gpu-check: stopped: no CUDA") and "make gpu-wheels" in lines[0] and ".whl/" in lines[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["env.txt"]


def test_run_sh_stops_at_once_with_one_line_without_megatron_core(tmp_path):
    (tmp_path / "shadow" / "megatron").mkdir(parents=True)  # a `megatron` package without `core` comes first
    (tmp_path / "shadow" / "megatron" / "__init__.py").write_text("")
    proc = _run_sh(tmp_path, GPU_CHECK_REHEARSAL="1", PYTHONPATH=str(tmp_path / "shadow"))
    assert proc.returncode == 4, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: stopped: Megatron-Core is not importable"), lines
    assert "make gpu-wheels" in lines[0] and ".whl/" in lines[0]


def test_run_sh_rehearsal_shares_the_budget_cuts_a_hung_stage_and_summarises_every_figure(tmp_path):
    proc = _run_sh(tmp_path, GPU_CHECK_REHEARSAL="1", GPU_CHECK_BUDGET_S="90", GPU_CHECK_REHEARSAL_HANG="subln",
                   GPU_CHECK_REHEARSAL_FAIL="e2e")
    out = tmp_path / "out"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    names = ["gpu_tests", "nccl", "subln", "e2e", "perf"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["env.txt", "summary.txt"] + [f"{n}.log" for n in names])
    figures = [line.split("[figure] ", 1)[1] for n in names for line in (out / f"{n}.log").read_text().splitlines()
               if "[figure] " in line]
    assert len(figures) >= 7 and all(f in summary for f in figures), summary
    assert "attention kernel (no mask): cudnn" in summary and "needs an NGC host" in summary
    assert "subln: CUT at its share" in summary and "e2e: FAILED rc=1" in summary, summary
    assert "sub-LN rehearsal vs eager" in summary  # printed before the stage hung
    for name in ("gpu_tests", "nccl", "perf"):
        assert f"{name}: ok in" in summary, summary
    assert "ok=no" in summary and "REHEARSAL" in summary
