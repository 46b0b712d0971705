"""The session's local Slurm cluster (tests/slurm/cluster.py); skipped with the reason where the machine can't."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import time

import pytest

from tests.slurm.cluster import LocalSlurm, SlurmUnavailable, check_machine, reap_stale_clusters

TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running LocalSlurm; torn down by saved PIDs at the end of the session, also after failures."""
    if os.environ.get("M2_SLURM_TESTS", "1") == "0":
        pytest.skip("slurm tier disabled by M2_SLURM_TESTS=0")
    try:
        check_machine()
    except SlurmUnavailable as exc:
        pytest.skip(f"local Slurm cluster unavailable: {exc}")
    reap_stale_clusters()
    cluster = LocalSlurm()
    # SIGTERM (CI timeouts, `timeout`) would end Python without running the teardown below.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield from _started(cluster)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _started(cluster: LocalSlurm):
    t0 = time.monotonic()
    atexit.register(cluster.stop)  # in case pytest never finalizes this fixture; stop() is idempotent
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        cluster.stop()
        pytest.skip(f"local Slurm cluster unavailable: {exc}")
    except BaseException:
        cluster.stop()
        raise
    TIMINGS.update(cluster.timings, start_s=time.monotonic() - t0)
    session_t0 = time.monotonic()
    try:
        yield cluster
    finally:
        TIMINGS["tests_s"] = time.monotonic() - session_t0
        t1 = time.monotonic()
        cluster.stop()
        atexit.unregister(cluster.stop)
        TIMINGS["teardown_s"] = time.monotonic() - t1
        if os.environ.get("M2_SLURM_KEEP") == "1":
            (cluster.base / "log" / "timings.json").write_text(json.dumps(TIMINGS, indent=2))
        else:
            shutil.rmtree(cluster.base, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_runs_dir(slurm_cluster):
    """Run directories of the slurm tests: inside the cluster's own folder, not pytest's basetemp, which
    concurrent pytest sessions of the same user may rotate away while the jobs still run."""
    path = slurm_cluster.base / "runs"
    path.mkdir(exist_ok=True)
    return path


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: tearing the local Slurm cluster down")


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_line("local Slurm timings: " + ", ".join(f"{k}={v:.1f}" for k, v in TIMINGS.items()))
