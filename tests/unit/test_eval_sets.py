"""CLIP_benchmark's webdataset format as input, the sets configured in eval.* and their evaluation with
in-memory model stages (what the trainer calls every eval.interval steps), and the launchers' layout choice."""

from __future__ import annotations

import dataclasses
import io
import tarfile

import pytest

from m2megatron.config import RunConfig
from m2megatron.config.base import ConfigError
from m2megatron.eval.inputs import BadInputs

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    from m2megatron.eval.synthetic_sets import write_synthetic_sets

    return write_synthetic_sets(tmp_path_factory.mktemp("sets"), num_samples=24, image_size=16, seed=2)


def test_benchmark_wds_classification_and_retrieval_folders(sets):
    from m2megatron.eval.benchmark_wds import read_benchmark_wds

    colours = read_benchmark_wds(sets / "wds_colours", "test", BadInputs())
    assert colours.task == "zeroshot" and len(colours.samples) == 24
    assert colours.class_names[:3] == ["red", "green", "blue"] and "{c}" in colours.templates[0]
    captions = read_benchmark_wds(sets / "wds_captions", "test", BadInputs())
    assert captions.task == "retrieval" and captions.class_names is None
    assert [len(s.captions) for s in captions.samples] == [2] * 24  # English and Chinese, one per .txt line
    with pytest.raises(ValueError, match="train/nshards.txt does not exist"):
        read_benchmark_wds(sets / "wds_colours", "train", BadInputs())


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_benchmark_wds_bad_records_and_unsupported_types(tmp_path, sets):
    from m2megatron.eval.benchmark_wds import read_benchmark_wds

    png = next((sets / "images").iterdir()).read_bytes()
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "nshards.txt").write_text("1\n")
    _tar(tmp_path / "test" / "0.tar", {"s0.jpg": png, "s0.webp": png, "s0.cls": b"1", "s1.png": png, "s1.cls": b"x",
                                       "s2.cls": b"0"})
    bad = BadInputs("skip")
    result = read_benchmark_wds(tmp_path, "test", bad)
    assert [s.label for s in result.samples] == [1] and result.class_names is None
    assert bad.counts() == {"bad_label": 1, "missing_image": 1}
    with pytest.raises(ValueError, match=r"0.tar:s1: needs a .cls member"):
        read_benchmark_wds(tmp_path, "test", BadInputs())
    (tmp_path / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(ValueError, match="'multilabel'; only classification and retrieval"):
        read_benchmark_wds(tmp_path, "test", BadInputs())


def _cfg(**eval_fields) -> RunConfig:
    cfg = RunConfig()
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **eval_fields))


def test_configured_sets_are_named_and_checked(sets, tmp_path):
    from m2megatron.eval.during_training import configured_sets

    cfg = _cfg(retrieval_jsonl=[str(sets / "captions.jsonl")], zeroshot_folders=[
        str(sets / "colours"), f"{sets / 'colours'}={sets / 'colours_zh.txt'}"],
        benchmark_wds=[str(sets / "wds_colours"), str(sets / "wds_captions")], imagenet=str(sets / "colours"))
    specs = configured_sets(cfg)
    assert [(s.name, s.kind) for s in specs] == [
        ("synthetic", "synthetic"), ("captions", "jsonl"), ("colours", "folder"), ("colours-2", "folder"),
        ("imagenet-1k-en", "imagenet"), ("imagenet-1k-zh", "imagenet"), ("wds_colours", "benchmark_wds"),
        ("wds_captions", "benchmark_wds")]
    assert specs[3].classes == str(sets / "colours_zh.txt")
    webdataset = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="webdataset"))
    assert "synthetic" not in [s.name for s in configured_sets(webdataset)]  # the held-out set only for synthetic
    with pytest.raises(ValueError, match="eval.retrieval_jsonl: .*nope.jsonl does not exist"):
        configured_sets(_cfg(retrieval_jsonl=[str(tmp_path / "nope.jsonl")]))


def test_eval_config_fields_are_validated():
    for fields, message in (({"interval": -1}, "eval.interval"), ({"imagenet_languages": ["fr"]}, "imagenet_lang"),
                            ({"imagenet_labels": "x.txt"}, "eval.imagenet_labels"),
                            ({"zeroshot_folders": ["dir="]}, "eval.zeroshot_folders")):
        with pytest.raises(ConfigError, match=message):
            _cfg(**fields).eval.validate()


def test_evaluate_configured_sets_scores_every_set_like_the_launchers_and_counts_skips(sets, tmp_path):
    from m2megatron.config import ParallelConfig
    from m2megatron.eval.during_training import evaluate_configured_sets
    from m2megatron.eval.launcher import build_eval_model, resolve_tokenizer
    from m2megatron.eval.scoring import score_set
    from m2megatron.eval.sets import EvalSet, read_set
    from m2megatron.parallel import initialize, seed_everything, shutdown

    lines = (sets / "captions.jsonl").read_text().splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([*lines[:6], '{"image": "images/missing.png", "caption": ["lost"]}']) + "\n")
    cfg = _cfg(retrieval_jsonl=[str(broken)], image_root=str(sets), benchmark_wds=[str(sets / "wds_colours")],
               zeroshot_folders=[str(sets / "colours")], on_bad_input="skip", batch_size=16, num_workers=1)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(tmp_path)),
                              data=dataclasses.replace(cfg.data, synthetic_eval_samples=16))
    groups = initialize(ParallelConfig(backend="gloo"))
    try:
        seed_everything(cfg.train.seed, groups)
        cfg, chunks = build_eval_model(cfg, groups, None, "none")
        tokenizer = resolve_tokenizer(cfg, None)
        metrics = evaluate_configured_sets(chunks, groups, cfg, tokenizer, step=7)
        wds = score_set(chunks, groups, cfg, tokenizer, read_set(
            EvalSet(name="w", kind="benchmark_wds", source=(str(sets / "wds_colours"),)), cfg, BadInputs()))
    finally:
        shutdown()
    assert {k.split("/")[1] for k in metrics} == {"synthetic", "broken", "wds_colours", "colours"}
    assert metrics["eval/broken/num_images"] == 6 and metrics["eval/broken/skipped_missing_image"] == 1
    assert metrics["eval/broken/skipped"] == 1 and metrics["eval/synthetic/skipped"] == 0
    assert metrics["eval/synthetic/num_images"] == 16 and 0 <= metrics["eval/synthetic/mr"] <= 100
    assert {k: metrics[f"eval/wds_colours/{k}"] for k in ("top1", "top5")} == wds["metrics"]


def test_launchers_fit_the_layout_to_the_launch_unless_it_is_given():
    from m2megatron.eval.launcher import explicit_layout_keys, fit_layout

    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tensor_parallel=2, pipeline_parallel=2,
                                                                loss_group_size=2))
    single = fit_layout(cfg, 1, explicit_layout_keys([]))
    assert (single.parallel.tensor_parallel, single.parallel.pipeline_parallel) == (1, 1)
    kept = fit_layout(cfg, 8, set())
    assert (kept.parallel.tensor_parallel, kept.parallel.pipeline_parallel, kept.parallel.loss_group_size) == (2, 2,
                                                                                                             None)
    assert explicit_layout_keys(["--parallel.tensor_parallel=2", "--eval.batch_size", "8"]) == {"tensor_parallel"}
    with pytest.raises(ConfigError, match=r"world size 1 is not divisible .* 2×2 \(given on the command line\); "
                                          r"launch a multiple of 4 ranks"):
        fit_layout(cfg, 1, {"tensor_parallel"})


def test_the_eval_package_imports_its_launchers_lazily():
    """`python -m m2megatron.eval.retrieval` imports the package first; an eager import of the launcher
    module there made runpy warn that the module is already in sys.modules."""
    import subprocess
    import sys

    code = ("import sys, m2megatron.eval as e; assert 'm2megatron.eval.retrieval' not in sys.modules; "
            "assert callable(e.evaluate_retrieval) and 'm2megatron.eval.retrieval' in sys.modules")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
