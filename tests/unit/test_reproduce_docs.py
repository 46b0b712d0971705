"""Acceptance: every command of docs/REPRODUCE.md's `bash tested` blocks runs as written, in a folder holding
small fake sets in the layouts that page documents, a tiny checkpoint in the released format named
`m2_encoder_0.4B.ckpt` (12 heads, as `--preset m2-0.4b` says) and `sp.model` (the reference tokenizer
when ../shared has it). Each `python -m MODULE …` runs in this process (`MODULE.main()` with that argv),
one after the other, on one rank. clip-benchmark's template lists are cut to their first two templates
(80 templates × 1000 ImageNet classes would take minutes on a CPU; the fakes are small)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests import eval_fakes
from tests.distributed.test_eval_docs import commands_of_tested_blocks

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "REPRODUCE.md"


def _write_released_checkpoint(path: Path) -> None:
    """A tiny model (D=48, 12 heads, one layer per tower) saved in the released .ckpt format."""
    from m2megatron.checkpoint.reference_format import ours_to_reference
    from m2megatron.config import ParallelConfig, RunConfig
    from m2megatron.eval.launcher import build_eval_model
    from m2megatron.models import full_state_dict
    from m2megatron.parallel import initialize, seed_everything, shutdown

    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden_size=48, num_attention_heads=12,
                                                             ffn_hidden_size=96, num_layers=1, embed_dim=48))
    groups = initialize(ParallelConfig(backend="gloo"))
    try:
        seed_everything(3, groups)
        _, (model,) = build_eval_model(cfg, groups, None, "none")
        full = full_state_dict(model)
    finally:
        shutdown()
    torch.save({"state_dict": ours_to_reference(full, cfg.model)}, path)


def _write_sets(root: Path) -> None:
    from m2megatron.eval import imagenet

    data = root / "data"
    for n, index in enumerate((0, 151, 999)):
        for k in range(2):
            eval_fakes.jpeg(data / "imagenet" / "val" / imagenet.synsets()[index] / f"v{n}{k}.JPEG", seed=10 * n + k)
    flickr = data / "flickr30k" / "flickr30k_images"
    eval_fakes.write_karpathy(data / "karpathy" / "dataset_flickr30k.json", flickr)
    eval_fakes.write_karpathy(data / "karpathy" / "dataset_coco.json", data / "coco" / "coco_dataset", dataset="coco")
    f30k = [{"image": f"flickr30k_images/{1000 + i}.jpg", "caption": [f"图片{i}第{k}句" for k in range(5)]}
            for i in range(4)]
    (data / "f30k-cn_test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in f30k))
    (data / "f30k_caption_karpathy_test.jsonl").write_text(
        "".join(json.dumps({"image": r["image"], "caption": [f"picture {i}"]}) + "\n" for i, r in enumerate(f30k)))
    eval_fakes.write_coco_cn(data / "coco-cn_test.jsonl", data / "coco")
    eval_fakes.write_cub(data / "CUB_200_2011")
    eval_fakes.write_dogs(data / "stanford-dogs")
    eval_fakes.write_cars(data / "stanford-cars")
    (root / "cub_classes_zh.txt").write_text("".join(f"{f}\t鸟类{i}\n" for i, f in enumerate(eval_fakes.CUB_FOLDERS)))
    (root / "cars_classes_zh.txt").write_text("".join(f"汽车{i}\n" for i in range(len(eval_fakes.CAR_NAMES))))


@pytest.fixture(scope="module")
def docs_folder(tmp_path_factory, request):
    from m2megatron.data.sp_train import synthetic_tokenizer_path
    from tests.conftest import REFERENCE_DIR

    root = tmp_path_factory.mktemp("reproduce")
    reference_sp = REFERENCE_DIR / "sp.model"
    shutil.copy(reference_sp if reference_sp.is_file() else synthetic_tokenizer_path(root), root / "sp.model")
    _write_released_checkpoint(root / "m2_encoder_0.4B.ckpt")
    _write_sets(root)
    return root


def _run(command: str, monkeypatch) -> int:
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"], f"docs/REPRODUCE.md tested commands start with `python -m`: {command}"
    module = importlib.import_module(words[2])
    monkeypatch.setattr(sys, "argv", [words[2], *words[3:]])
    return module.main()


def test_every_tested_command_of_the_reproduce_docs_runs_as_written(docs_folder, monkeypatch, caplog):
    from m2megatron.eval import imagenet

    package_templates = imagenet.package_templates
    monkeypatch.setattr(imagenet, "package_templates", lambda *args: package_templates(*args)[:2])
    monkeypatch.chdir(docs_folder)
    has_reference_sp = (docs_folder / "sp.model").stat().st_size > 1_000_000
    commands = commands_of_tested_blocks(DOC.read_text(encoding="utf-8"))
    assert len(commands) == 14, commands
    for command in commands:
        code = _run(command, monkeypatch)
        checks_the_tokenizer = command.split()[2] == "m2megatron.tokenize"
        expected = 1 if checks_the_tokenizer and not has_reference_sp else 0  # the stand-in tokenizer is not it
        assert code == expected, command
    entries = {e["name"]: e for e in json.loads((docs_folder / "results" / "m2-0.4b" / "results.json").read_text())}
    images = {"imagenet-1k-en": 6, "imagenet-1k-zh": 6, "flickr30k": 4, "coco-5k": 4, "f30k_caption_karpathy_test": 4,
              "flickr30k-cn": 4, "coco-cn": 6, "cub-200-en": 6, "cub-200-zh": 6, "stanford-dogs-en": 6,
              "stanford-dogs-zh": 6, "stanford-cars-en": 6, "stanford-cars-zh": 6}
    assert {name: e["num_images"] for name, e in entries.items()} == images
    assert entries["imagenet-1k-zh"]["num_classes"] == 1000 and entries["cub-200-zh"]["num_classes"] == 3
    assert entries["imagenet-1k-zh"]["num_templates"] == 2
    assert entries["stanford-cars-en"]["templates"] == "en cars" and entries["flickr30k"]["num_texts"] == 20
    warned = [name for name, e in entries.items() if "warning" in e]
    assert warned == ["f30k_caption_karpathy_test"], warned
    assert any("has 1 caption per image" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
