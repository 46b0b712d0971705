"""The main job on one GPU, end to end (a script of tests/gpu/run.sh; needs CUDA, about a minute on an H200).

    python tests/gpu/end_to_end.py --out DIR

1. writes webdataset shards of the synthetic bilingual scenes (JPEG) and a held-out caption jsonl;
2. trains the tiny preset (NCCL with world size 1 on a GPU; the same script runs on gloo elsewhere) for 25
   steps with PIL decoding and a checkpoint;
3. starts again with train_steps=50: it must resume from step 25, train to 50 and save;
4. evaluates the held-out set at the end (eval_at_end over eval.retrieval_jsonl).
Prints a "[figure] end to end: ..." key=value line and writes DIR/e2e.json. Exit status 0 only if every check holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _train(run_dir: Path, shards: Path, tokenizer: Path, heldout: Path, steps: int) -> float:
    cmd = [sys.executable, "-m", "m2megatron.train", "--config", str(REPO / "configs" / "tiny.yaml"),
           "--parallel.tensor_parallel=1", "--parallel.pipeline_parallel=1",
           f"--train.run_dir={run_dir}", f"--train.train_steps={steps}", "--train.log_interval=5",
           "--data.source=webdataset", f"--data.shards={shards}/train-*.tar", "--data.decoder=pil",
           f"--data.tokenizer={tokenizer}", "--checkpoint.save_interval=25",
           f"--eval.retrieval_jsonl={heldout / 'captions.jsonl'}", f"--eval.image_root={heldout}"]
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels"),
                                                       os.environ.get("PYTHONPATH", "")]))
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return time.perf_counter() - start


def record_line(record: dict) -> str:
    """The run's figures as one figure line (tests/gpu/figures.py)."""
    from tests.gpu.figures import figure

    return figure("end to end: " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in record.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "kernels")]
    from m2megatron.data.shard_writer import write_synthetic_shards
    from m2megatron.data.sp_train import synthetic_tokenizer_path
    from m2megatron.eval.synthetic_sets import write_synthetic_sets

    out = Path(args.out)
    shards, heldout, run_dir = out / "shards", out / "heldout", out / "run"
    write_synthetic_shards(shards, num_samples=4096, per_shard=512, seed=1234, image_size=32, language="both",
                           split="train")
    write_synthetic_sets(heldout, num_samples=256, image_size=32, seed=1234)
    tokenizer = synthetic_tokenizer_path(out / "tokenizer")
    first = _train(run_dir, shards, tokenizer, heldout, 25)
    second = _train(run_dir, shards, tokenizer, heldout, 50)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    results = json.loads((run_dir / "results.json").read_text())
    r1 = {k.split("/")[-1]: v for k, v in results.items() if k.startswith("eval/captions/")}
    checks = {
        "resumed_from_25": steps[:5] == [5, 10, 15, 20, 25] and steps[5:] == [30, 35, 40, 45, 50],
        "checkpoint_50": (run_dir / "checkpoints" / "iter_0000050").is_dir(),
        "heldout_evaluated": results.get("step") == 50 and "i2t_r1" in r1,
    }
    record = {"first_run_s": first, "resumed_run_s": second, "i2t_r1": r1.get("i2t_r1"), "t2i_r1": r1.get("t2i_r1"),
              **checks}
    (out / "e2e.json").write_text(json.dumps(record, indent=2))
    print(record_line(record))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
