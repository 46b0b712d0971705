"""Acceptance: every command of docs/EVAL.md's `bash tested` blocks runs as written on the main job's run
directory, and that run directory gets the run report.

The run is the demo itself (`python -m m2megatron.demo`: torchrun, TP=2 × PP=2 on 4 ranks) cut to a few
steps. The commands are read from docs/EVAL.md, so the docs and this test cannot drift apart: a leading
`python -m` runs as written, in a new interpreter of the venv (tests.harness.run_module); `torchrun` becomes
`python -m torch.distributed.run`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import run_module

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "EVAL.md"


def commands_of_tested_blocks(markdown: str) -> list[str]:
    """The shell commands of the ```bash tested blocks, comments dropped and continuation lines joined."""
    commands, block, current = [], None, ""
    for line in markdown.splitlines():
        if block is None:
            if line.strip() == "```bash tested":
                block = []
            continue
        if line.strip() == "```":
            block = None
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    if words[:2] == ["python", "-m"]:
        return run_module(words[2], *words[3:], cwd=cwd, env=_env(), timeout=600)
    if words[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
        return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    raise AssertionError(f"docs/EVAL.md tested command must start with `python -m` or torchrun: {command}")


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'kernels'}")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The folder holding runs/tiny: the demo's own job, 4 steps."""
    root = tmp_path_factory.mktemp("docs")
    run = subprocess.run([sys.executable, "-m", "m2megatron.demo", "--nproc", "4", "--run-dir", "runs/tiny",
                          "--train.train_steps=4", "--train.micro_batch_size=8", "--train.log_interval=1"],
                         cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "run report: runs/tiny/report.md" in run.stdout
    return root


def test_the_main_jobs_run_directory_gets_the_report(demo_run):
    run_dir = demo_run / "runs" / "tiny"
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["set"] for r in report["rows"]] == ["synthetic"] and report["rows"][0]["step"] == 4
    assert report["loss"]["steps"] == [1, 2, 3, 4]
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 4 | end of training | in memory | synthetic |" in (run_dir / "report.md").read_text()


@pytest.fixture(scope="module")
def docs_run(demo_run):
    """Every tested command of docs/EVAL.md, in order, in the folder of the demo's run: {command: result}."""
    commands = commands_of_tested_blocks(DOC.read_text(encoding="utf-8"))
    assert len(commands) >= 7, commands
    results = {}
    for command in commands:
        run = _run(command, demo_run)
        assert run.returncode == 0, f"{command}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
        results[command] = run
    return results


def test_every_tested_command_of_the_eval_docs_runs_as_written(demo_run, docs_run):
    for command, run in docs_run.items():
        assert "found in sys.modules" not in run.stderr, command  # the eager package import is gone
    plain = "python -m m2megatron.eval.retrieval --config runs/tiny/config.yaml --checkpoint runs/tiny/checkpoints"
    assert "evaluating data-parallel only (TP=1, PP=1, DP=1)" in docs_run[plain].stderr
    entries = json.loads((demo_run / "runs" / "tiny" / "eval" / "results.json").read_text())
    names = {e["name"]: e for e in entries}
    assert set(names) == {"synthetic", "captions", "wds_captions", "colours-zh", "wds_colours"}
    assert names["synthetic"]["step"] == 4 and names["synthetic"]["checkpoint_format"] == "ours"
    assert (names["synthetic"]["tensor_parallel"], names["synthetic"]["pipeline_parallel"]) == (1, 1)
    end_of_training = json.loads((demo_run / "runs" / "tiny" / "results.json").read_text())  # scored at TP2·PP2
    assert all(names["synthetic"]["metrics"][k] == end_of_training[f"eval/synthetic/{k}"]
               for k in names["synthetic"]["metrics"])
    assert names["captions"]["metrics"] == names["wds_captions"]["metrics"]  # the same scenes in two formats
    report = (demo_run / "runs" / "tiny" / "report.md").read_text()
    assert all(f"| {name} |" in report for name in names)


def test_the_clip_benchmark_adapter_loads_the_tp2_pp2_run_and_matches_the_launcher(demo_run, docs_run, monkeypatch):
    """Our checkpoint directory (saved at TP=2 × PP=2) through the adapter on one process, scored by
    CLIP_benchmark's own retrieval evaluate: the launcher's numbers on the same jsonl (run by the docs test)."""
    import torch
    from clip_benchmark.metrics import zeroshot_retrieval

    from m2megatron.eval.clip_benchmark_adapter import load_m2megatron
    from tests.unit.test_eval_clip_benchmark import _captions_collate, _CaptionSet

    monkeypatch.chdir(demo_run)  # the run's config names its run directory relative to here
    model, transform, tokenizer = load_m2megatron(model_name="runs/tiny/config.yaml",
                                                  pretrained="runs/tiny/checkpoints", cache_dir=None, device="cpu")
    loader = torch.utils.data.DataLoader(_CaptionSet(demo_run / "data" / "synth-eval" / "captions.jsonl", transform),
                                         batch_size=8, collate_fn=_captions_collate)
    theirs = zeroshot_retrieval.evaluate(model, loader, tokenizer, device="cpu", amp=False, recall_k_list=[1, 5, 10])
    entries = json.loads((demo_run / "runs" / "tiny" / "eval" / "results.json").read_text())
    ours = next(e for e in entries if e["name"] == "captions")["metrics"]
    for k in (1, 5, 10):
        assert abs(ours[f"t2i_r{k}"] / 100 - theirs[f"image_retrieval_recall@{k}"]) <= 1e-6, k
        assert abs(ours[f"i2t_r{k}"] / 100 - theirs[f"text_retrieval_recall@{k}"]) <= 1e-6, k
