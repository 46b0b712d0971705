"""Launch environments: torchrun, Slurm (faked), and the single-process default."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from m2megatron.parallel.bootstrap import first_host, read_launch_env
from tests.harness import run_module

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("nodelist,host", [
    ("node1", "node1"), ("gpu[003-005,009]", "gpu003"), ("gpu[12,14],cpu1", "gpu12"), ("a-b-7", "a-b-7")])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_environment_wins_over_slurm():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (
        3, 4, 1, "h", 1234, "torchrun")


def test_slurm_environment_gives_rank_master_and_a_job_specific_port():
    env = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (5, 16, 1, "gpu007", "slurm")
    assert env.master_port == 20000 + 4242


def test_plain_python_is_a_world_of_one():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


def test_bootstrap_from_a_faked_slurm_environment_builds_the_groups():
    """Two processes started the way `srun --ntasks=2` would start them, with no torchrun variables."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}

    def rank(r: int):
        env = dict(base, SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r),
                   SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(os.getpid() % 9000 + 1000), OMP_NUM_THREADS="1")
        return run_module("m2megatron.parallel.selftest", "--parallel.tensor_parallel=2", env=env, timeout=240)

    with ThreadPoolExecutor(2) as pool:  # both processes at once: they rendezvous
        runs = list(pool.map(rank, range(2)))
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert "rank 0/2: tp=0 dp=0 pp=0" in runs[0].stdout and "all_reduce=2" in runs[0].stdout
    assert "rank 1/2: tp=1 dp=0 pp=0" in runs[1].stdout
