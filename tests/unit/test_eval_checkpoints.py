"""The retrieval launcher loads a consolidated file and a released-layout reference .ckpt (sizes taken
from the file) and scores exactly what the same weights score when built in place."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytestmark = pytest.mark.unit


def _write_checkpoints(tmp_path):
    from m2megatron.checkpoint.files import save_consolidated
    from m2megatron.checkpoint.reference_format import ours_to_reference
    from m2megatron.config import ParallelConfig, RunConfig
    from m2megatron.eval.launcher import build_eval_model
    from m2megatron.models import full_state_dict
    from m2megatron.parallel import initialize, seed_everything, shutdown

    cfg = RunConfig()
    groups = initialize(ParallelConfig(backend="gloo"))
    try:
        seed_everything(1, groups)
        _, (model,) = build_eval_model(cfg, groups, None, "none")  # seeded: what --checkpoint-format none evaluates
        full = full_state_dict(model)
    finally:
        shutdown()
    save_consolidated(tmp_path / "model.safetensors", full, cfg.model)
    torch.save({"state_dict": ours_to_reference(full, cfg.model)}, tmp_path / "model.ckpt")


def _evaluate(monkeypatch, tmp_path, sp_model, *checkpoint_args):
    from m2megatron.eval import retrieval

    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    monkeypatch.setattr(sys, "argv", ["retrieval", *checkpoint_args, "--tokenizer", str(sp_model), "--out", str(out),
                                      "--data.synthetic_eval_samples=24", "--eval.batch_size=8"])
    assert retrieval.main() == 0
    (entry,) = json.loads((out / "results.json").read_text())
    return entry


def test_consolidated_and_reference_files_score_like_the_weights_in_place(tmp_path, monkeypatch):
    from m2megatron.data.sp_train import synthetic_tokenizer_path

    sp_model = synthetic_tokenizer_path(tmp_path)
    _write_checkpoints(tmp_path)
    seeded = _evaluate(monkeypatch, tmp_path, sp_model, "--checkpoint-format", "none")
    consolidated = _evaluate(monkeypatch, tmp_path, sp_model, "--checkpoint", str(tmp_path / "model.safetensors"))
    reference = _evaluate(monkeypatch, tmp_path, sp_model, "--checkpoint", str(tmp_path / "model.ckpt"))
    assert consolidated["checkpoint_format"] == "consolidated" and reference["checkpoint_format"] == "reference"
    assert seeded["metrics"] == consolidated["metrics"] == reference["metrics"]
    assert seeded["num_images"] == 24
