"""End to end with the real tiny model: 1,000 images + 5,000 captions of synthetic data through the
retrieval API well inside the 2-minute budget, and both launchers as subprocesses on files."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.harness import run_module

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    from m2megatron.data.sp_train import synthetic_tokenizer_path

    return synthetic_tokenizer_path(tmp_path_factory.mktemp("sp"))


def test_tiny_model_evaluates_1000_images_and_5000_captions_quickly(sp_model):
    from m2megatron.config import ParallelConfig, RunConfig
    from m2megatron.data.synthetic import SyntheticScenes, caption
    from m2megatron.data.tokenizer import Tokenizer
    from m2megatron.eval.launcher import build_eval_model
    from m2megatron.eval.retrieval import evaluate_retrieval
    from m2megatron.models import init_weights
    from m2megatron.parallel import initialize, seed_everything, shutdown

    cfg = RunConfig()
    scenes = SyntheticScenes(seed=11, image_size=cfg.model.image_size, split="eval")
    tic = time.perf_counter()
    samples = [scenes[i] for i in range(1000)]
    images = [s.image for s in samples]
    captions = [[caption(s.scene, lang, t) for lang, t in (("en", 0), ("en", 1), ("en", 2), ("zh", 0), ("zh", 1))]
                for s in samples]
    groups = initialize(ParallelConfig(backend="gloo"))
    try:
        seed_everything(1, groups)
        _, (model,) = build_eval_model(cfg, groups, None, "none")
        init_weights(model, seed=2)
        metrics = evaluate_retrieval(model, groups, images, captions, tokenizer=Tokenizer(sp_model, 52),
                                     batch_size=128)
    finally:
        shutdown()
    seconds = time.perf_counter() - tic
    assert sum(len(c) for c in captions) == 5000
    assert all(0 <= v <= 100 for v in metrics.values())
    assert seconds < 120, f"eval of 1000 images + 5000 captions took {seconds:.0f} s"


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return run_module(module, "--checkpoint-format", "none", *args, cwd=cwd, env=env, timeout=300)


def test_zeroshot_launcher_on_an_image_folder_in_chinese(tmp_path, sp_model):
    rng = np.random.default_rng(0)
    for cls in ("red", "blue"):
        for i in range(3):
            path = tmp_path / "imgs" / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, size=(20, 12, 3), dtype=np.uint8)).save(path)
    (tmp_path / "classes.txt").write_text("blue\t蓝色\nred\t红色\n", encoding="utf-8")
    run = _cli("m2megatron.eval.zeroshot", "--images", str(tmp_path / "imgs"), "--classes",
               str(tmp_path / "classes.txt"), "--tokenizer", str(sp_model), "--out", str(tmp_path / "out"),
               "--eval.templates=zh", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (entry,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert entry["task"] == "zeroshot" and entry["name"] == "imgs-zh"
    assert entry["num_images"] == 6 and entry["num_classes"] == 2 and entry["metrics"]["top5"] == 100.0
    assert "texts/s" in run.stderr and "images/s" in run.stderr
    assert "Zero-shot classification" in (tmp_path / "out" / "results.md").read_text()


def test_retrieval_launcher_reports_a_malformed_line_by_file_and_line(tmp_path, sp_model):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "img" / "a.png")
    (tmp_path / "caps.jsonl").write_text('{"image": "a.png", "caption": ["x"]}\n{"image": "a.png", "caption": [\n')
    run = _cli("m2megatron.eval.retrieval", "--captions", str(tmp_path / "caps.jsonl"), "--image-root",
               str(tmp_path / "img"), "--tokenizer", str(sp_model), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert run.returncode == 2
    assert f"error: {tmp_path / 'caps.jsonl'}:2: malformed JSON" in run.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_class_embeddings_average_templates_then_normalize():
    from m2megatron.eval.zeroshot import class_embeddings

    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # class 0: two templates, class 1: two
    out = class_embeddings(feats, num_classes=2, num_templates=2)
    torch.testing.assert_close(out, torch.tensor([[2 ** -0.5, 2 ** -0.5], [0.0, 1.0]]))
