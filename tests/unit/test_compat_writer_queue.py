"""m2megatron.compat.writer_queue (Q1): Megatron's writer result queue, forked before process groups,
survives the job's stop signals and dies with its rank."""

import contextlib
import json
import os
import signal
import time

from tests.harness import start_fresh_process


def _rank(report: str) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from m2megatron.compat import writer_queue

    started = writer_queue.start_before_process_groups()
    pid = writer_queue.server_pid()
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):  # what Slurm sends every process of a step
        os.kill(pid, sig)
    time.sleep(0.3)
    queue = filesystem_async._get_write_results_queue()
    queue.put({"rank": 0})
    with open(report + ".tmp", "w") as f:
        json.dump({"started": started, "again": writer_queue.start_before_process_groups(), "pid": pid,
                   "echo": queue.get(timeout=10), "same": queue is filesystem_async._results_queue}, f)
    os.replace(report + ".tmp", report)
    time.sleep(600)  # until the test kills this "rank"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_the_queue_server_ignores_stop_signals_and_dies_with_its_rank(tmp_path):
    report = tmp_path / "report.json"
    proc = start_fresh_process(_rank, str(report), log_path=tmp_path / "rank.log")
    try:
        deadline = time.monotonic() + 120
        while not report.exists():
            assert proc.is_alive() and time.monotonic() < deadline, (tmp_path / "rank.log").read_text()
            time.sleep(0.1)
        seen = json.loads(report.read_text())
        assert seen["started"] and not seen["again"] and seen["same"] and seen["echo"] == {"rank": 0}
        assert _alive(seen["pid"])
        os.kill(proc.pid, signal.SIGKILL)  # the rank alone, as an OOM kill would
        proc.join(10)
        deadline = time.monotonic() + 10
        while _alive(seen["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(seen["pid"]), "the queue server outlived its rank"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its session
        proc.join(10)
