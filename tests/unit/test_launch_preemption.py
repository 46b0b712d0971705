"""The preemption handler: signals and the batch shell's request file set the flag, all ranks agree on
the same step, and the PREEMPTED marker is written once, atomically."""

from __future__ import annotations

import json
import os
import signal

import pytest

from m2megatron.train.preemption import PREEMPTED_FILE, REQUEST_FILE, PreemptionHandler, read_preempted


@pytest.mark.unit
def test_sigusr1_sets_the_flag_and_uninstall_restores_the_previous_handler(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler(tmp_path) as handler:
        assert not handler.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.requested() and handler.reason == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


@pytest.mark.unit
def test_sigterm_counts_as_preemption_too(tmp_path):
    with PreemptionHandler(tmp_path) as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.requested() and handler.reason == "SIGTERM"


@pytest.mark.unit
def test_the_batch_shells_request_file_is_seen(tmp_path):
    handler = PreemptionHandler(tmp_path)
    assert not handler.requested()
    (tmp_path / REQUEST_FILE).touch()
    assert handler.requested() and handler.reason == "request file"


@pytest.mark.unit
def test_check_interval_agrees_only_every_nth_call_and_the_answer_is_sticky():
    handler = PreemptionHandler(check_interval=3)
    handler.request("test")
    assert [handler.requested() for _ in range(5)] == [False, False, True, True, True]
    with pytest.raises(ValueError, match="check_interval"):
        PreemptionHandler(check_interval=0)


@pytest.mark.unit
def test_mark_preempted_writes_the_marker_atomically_with_the_job(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    handler = PreemptionHandler(tmp_path)
    handler.request("SIGUSR1")
    assert read_preempted(tmp_path) is None
    path = handler.mark_preempted(step=12, checkpoint=tmp_path / "checkpoints" / "step-12")
    assert path == tmp_path / PREEMPTED_FILE and sorted(p.name for p in tmp_path.iterdir()) == [PREEMPTED_FILE]
    record = read_preempted(tmp_path)
    assert (record["step"], record["reason"], record["job_id"], record["restart_count"]) == (12, "SIGUSR1", "77", 1)
    assert json.loads(path.read_text())["checkpoint"].endswith("step-12")
    with pytest.raises(ValueError, match="run_dir"):
        PreemptionHandler().mark_preempted(step=1)


def _agree_when_one_rank_is_signalled(run_dir: str) -> tuple[list[bool], bool]:
    import torch.distributed as dist

    handler = PreemptionHandler(run_dir)
    answers = [handler.requested()]
    if dist.get_rank() == 1:
        handler.request("SIGUSR1")  # only rank 1 saw the signal
    answers += [handler.requested(), handler.requested()]
    wrote = handler.mark_preempted(step=3) is not None
    dist.barrier()
    return answers, wrote


@pytest.mark.distributed
def test_all_ranks_stop_at_the_same_step_and_only_rank_0_writes_the_marker(dist_pool, tmp_path):
    results = dist_pool(2).run(_agree_when_one_rank_is_signalled, str(tmp_path))
    assert results == [([False, True, True], True), ([False, True, True], False)]
    assert read_preempted(tmp_path)["step"] == 3
