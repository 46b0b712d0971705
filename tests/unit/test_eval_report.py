"""The run report reads metrics.jsonl (loss, evaluation during training), the end-of-training results.json
and the launchers' results.json files, and writes one markdown and JSON table and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import run_module

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
RETRIEVAL = {"i2t_r1": 10.0, "i2t_r5": 30.0, "i2t_r10": 50.0, "t2i_r1": 12.0, "t2i_r5": 32.0, "t2i_r10": 52.0,
             "mr": 31.0}


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    records = [{"step": 1, "loss": 4.0, "lr": 1e-3}, {"step": 2, "loss": 3.5},
               {"step": 2, "eval/synthetic/i2t_r1": 5.0, "eval/synthetic/t2i_r1": 6.0, "eval/synthetic/mr": 9.0,
                "eval/synthetic/num_images": 256, "eval/synthetic/skipped": 0,
                "eval/imagenet-1k-zh/top1": 1.5, "eval/imagenet-1k-zh/top5": 4.0,
                "eval/imagenet-1k-zh/skipped": 2, "eval/imagenet-1k-zh/skipped_unlabeled_image": 2},
               {"step": 3, "loss": 3.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')
    (run / "results.json").write_text(json.dumps({**RETRIEVAL, "num_images": 256, "step": 3}))
    launcher = [{"task": "zeroshot", "name": "colours-zh", "metrics": {"top1": 25.0, "top5": 75.0}, "step": 3,
                 "checkpoint": "runs/tiny/checkpoints", "checkpoint_path": "/abs/iter_0000003", "skipped": {}},
                {"task": "retrieval", "name": "coco-cn", "metrics": RETRIEVAL, "step": None,
                 "checkpoint": "m2.ckpt", "checkpoint_path": "/abs/m2.ckpt", "skipped": {"missing_image": 1}}]
    (run / "eval" / "results.json").write_text(json.dumps(launcher))
    return run


def test_report_tables_every_checkpoint_and_set_and_plots_against_step(tmp_path):
    from m2megatron.eval.report import write_report

    run = _run_dir(tmp_path)
    paths = write_report(run)
    report = json.loads(paths["json"].read_text())
    rows = [(r["source"], r["step"], r["set"], r["task"]) for r in report["rows"]]
    assert rows == [("during training", 2, "synthetic", "retrieval"),
                    ("during training", 2, "imagenet-1k-zh", "zeroshot"),
                    ("end of training", 3, "synthetic", "retrieval"),
                    (str(run / "eval"), 3, "colours-zh", "zeroshot"),
                    (str(run / "eval"), None, "coco-cn", "retrieval")]
    assert report["rows"][1]["skipped"] == {"unlabeled_image": 2}
    assert report["loss"] == {"steps": [1, 2, 3], "values": [4.0, 3.5, 3.0]}  # the cut-off last line is skipped
    md = paths["markdown"].read_text()
    assert "loss 4.0000 at step 1 → 3.0000 at step 3" in md
    assert ("| 3 | end of training | in memory | synthetic | 10.00 | 30.00 | 50.00 | 12.00 | 32.00 | 52.00 | 31.00 "
            "| 0 |") in md
    assert f"| – | {run / 'eval'} | /abs/m2.ckpt | coco-cn | 10.00 |" in md and "| 2 | during training" in md
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_command_and_its_errors(tmp_path):
    run = _run_dir(tmp_path)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    ok = run_module("m2megatron.eval.report", str(run), env=env, timeout=120)
    assert ok.returncode == 0 and "report.md" in ok.stdout, ok.stderr
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2}\n')
    bad = run_module("m2megatron.eval.report", str(run), env=env, timeout=120)
    assert bad.returncode == 2 and f"error: report: {run / 'metrics.jsonl'}:2 is not JSON" in bad.stderr
