"""One clean line per error under torchrun (issue 26): a config or input error that needs no process group is
found by every rank before one starts, printed once (by rank 0) and named by torchrun's summary as the root
cause; one found later is printed by the rank that found it, and its peers, whose collectives lose the
connection, stop without a word. No rank prints a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TINY = ["--preset", "tiny", "--parallel.tensor_parallel=2", "--train.micro_batch_size=2", "--train.train_steps=1"]
CASES = {  # name: (overrides, what the one line must name)
    "bad shard glob": (["--data.source=webdataset", "--data.shards={tmp}/none/*.tar"], "data.shards"),
    "unknown key": (["--train.no_such_setting=1"], "no_such_setting"),
    # docs/TRAINING.md's 8-rank example scaled to 4 ranks: 8 microbatches per step and rank, accumulation 4.
    "accumulation conflict": (["--loss.accumulation_steps=4", "--train.global_batch_size=32"],
                              "loss.accumulation_steps"),
    # Found by rank 0 alone, after the process group started (the trainer resolves the tokenizer there).
    "late: jsonl without tokenizer": (["--data.source=jsonl", "--data.jsonl={tmp}/none.jsonl"], "data.tokenizer"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_error_is_one_line_under_torchrun_with_four_ranks(tmp_path, case):
    overrides, setting = CASES[case]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "-m", "m2megatron.train", *TINY,
           f"--train.run_dir={tmp_path / 'run'}", *(o.format(tmp=tmp_path) for o in overrides)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = run.stdout + run.stderr
    ours = [line for line in out.splitlines() if line.startswith("error:")]
    assert run.returncode != 0
    assert len(ours) == 1 and setting in ours[0], out
    # No traceback from a rank: torchrun prefixes rank output with [rankN], and a frame of ours names the package.
    assert not [line for line in out.splitlines() if line.startswith("[rank") or "/m2megatron/" in line], out
    root_cause = out.split("Root Cause")[-1]
    assert f"traceback : {ours[0]}" in root_cause, out
