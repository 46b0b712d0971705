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


def _pretend_cuda_exists() -> None:
    """What a GPU host looks like to the code under test, on a CPU build (a CUDA call would still fail)."""
    import torch

    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1


def _tool_rank_on_a_cuda_host(report: str) -> None:
    """One spawned rank of the checkpoint tools (reshard, bench_checkpoint) on a host with CUDA."""
    from m2megatron.parallel.bootstrap import free_port
    from m2megatron.parallel.local_ranks import _spawned_rank

    _pretend_cuda_exists()
    _spawned_rank(0, 1, free_port(), _toy_buffers, (report,))


def _toy_buffers(report: str) -> None:
    import json

    import torch.distributed as dist

    from m2megatron.parallel import Layout, build_groups
    from tests.checkpoint_toy import build_toy

    chunks, optimizer, _ = build_toy(build_groups(Layout(world_size=1)))
    devices = {str(b.grad_data.device) for c in chunks for b in c.buffers}
    with open(report, "w") as f:
        json.dump({"backend": dist.get_backend(), "buffers": sorted(devices)}, f)


def test_the_tools_local_gloo_ranks_keep_megatron_buffers_on_the_cpu_on_a_cuda_host(tmp_path):
    """Issue 23: the reshard tool's spawned gloo ranks skipped the CPU patches where CUDA exists, and Megatron
    put every rank's DDP buffers on cuda:0."""
    import json

    from tests.standin import run_in_fresh_process

    run_in_fresh_process(_tool_rank_on_a_cuda_host, str(tmp_path / "report.json"))
    assert json.loads((tmp_path / "report.json").read_text()) == {"backend": "gloo", "buffers": ["cpu"]}


def _adapter_groups_on_a_cuda_host() -> dict:
    import torch
    import torch.distributed as dist

    from m2megatron.eval.clip_benchmark_adapter import _groups

    _pretend_cuda_exists()
    groups = _groups(torch.device("cpu"))
    return {"backend": dist.get_backend(), "device": str(groups.device)}


def test_the_clip_benchmark_adapter_binds_the_device_it_is_given():
    """Issue 23: the adapter started NCCL on GPU 0 whatever `device` CLIP_benchmark passed."""
    from tests.standin import run_in_fresh_process

    assert run_in_fresh_process(_adapter_groups_on_a_cuda_host) == {"backend": "gloo", "device": "cpu"}


@pytest.mark.parametrize("tp,user,expected,logged", [
    (1, None, None, False), (2, None, "1", False), (2, "1", "1", False), (2, "8", "8", True)])
def test_cuda_device_max_connections_only_for_tensor_parallel_and_never_silently_over_a_users_value(
        monkeypatch, caplog, tp, user, expected, logged):
    import torch

    from m2megatron.parallel.device import choose_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    if user is None:
        monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    else:
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", user)
    assert choose_device("nccl", 3, tensor_parallel=tp) == torch.device("cuda", 1)
    assert os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == expected
    assert ("CUDA_DEVICE_MAX_CONNECTIONS=8 kept" in caplog.text) == logged
