"""Benchmark of the contrastive loss against OpenCLIP's ClipLoss: peak memory, bytes sent, wall time.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_loss.py            # P = 8 gloo ranks, ~7 min on 2 cores

Each of P gloo processes on this machine runs one loss step (forward + backward) per configuration:
OpenCLIP's ClipLoss(local_loss=True, gather_with_grad=True) over the world, and ours for every loss
group size G in {1, 2, 4, ..., P}, dense and chunked. Per rank it measures
- peak memory: the highest total of CPU tensor bytes allocated during the step above what was allocated
  before it, from the allocator events torch.profiler(profile_memory=True) records (torch has no
  max_memory_allocated for CPU); gloo's internal buffers are not tensors and are not counted;
- bytes sent: counted at the collective calls, as the data each rank must send whatever the algorithm:
  (G − 1) × its chunk for an all-gather or a reduce-scatter, and its G − 1 outgoing chunks for a
  scatter (the gloo emulation of all-to-all in OpenCLIP's backward);
- wall time: the slowest rank's time of one step, the best of a few rounds that interleave the
  configurations (P processes share 2 cores here, so only the ratios within one run mean anything).
It prints a table of ratios against OpenCLIP, the analytic model of docs/LOSS.md for the 10B model on
256 GPUs, and last a key=value summary line.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import math
import os
import socket
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from m2megatron.config import LossConfig
from m2megatron.loss import contrastive_loss
from m2megatron.parallel.groups import new_loss_groups
from m2megatron.parallel.layout import Layout

FP32 = 4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=8, help="P, gloo processes (default 8)")
    parser.add_argument("--batches", default="4096,16384,24576", help="global batches N, comma-separated")
    parser.add_argument("--dim", type=int, default=128, help="embedding dim d")
    parser.add_argument("--chunk", type=int, default=256, help="column tile of the chunked loss")
    parser.add_argument("--iters", type=int, default=2, help="timed rounds over all configurations")
    return parser.parse_args(argv)


# --- what is measured ------------------------------------------------------------------------------


def nbytes(t: torch.Tensor) -> int:
    return t.nelement() * t.element_size()


class SentBytes:
    """Counts bytes each rank sends, wrapping the collectives the two losses call."""

    def __init__(self):
        self.total = 0

    def install(self) -> None:
        from megatron.core.tensor_parallel import mappings

        def ring(fn, nbytes_of):
            @functools.wraps(fn)
            def counted(*args, group=None, **kwargs):
                self.total += (dist.get_world_size(group) - 1) * nbytes_of(*args)
                return fn(*args, group=group, **kwargs)
            return counted

        def scatter(fn):
            @functools.wraps(fn)
            def counted(tensor, scatter_list=None, src=0, group=None, **kwargs):
                if scatter_list is not None:  # only the source sends; its own chunk stays home
                    own = scatter_list[dist.get_rank(group)]
                    self.total += sum(nbytes(t) for t in scatter_list) - nbytes(own)
                return fn(tensor, scatter_list, src, group=group, **kwargs)
            return counted

        mappings.dist_all_gather_func = ring(mappings.dist_all_gather_func, lambda out, inp: nbytes(inp))
        mappings.dist_reduce_scatter_func = ring(mappings.dist_reduce_scatter_func, lambda out, inp: nbytes(out))
        dist.all_gather = ring(dist.all_gather, lambda outs, inp: nbytes(inp))
        dist.scatter = scatter(dist.scatter)


def peak_allocated_bytes(step, rank: int) -> int:
    """Max over the step of (CPU tensor bytes allocated − bytes allocated at its start)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"trace{rank}.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    # "Total Allocated" is the allocator's running total since the profiler started.
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


def make_step(loss_fn, image, text, log_scale):
    def step():
        leaves = [x.detach().clone().requires_grad_() for x in (image, text, log_scale)]
        loss_fn(*leaves).backward()
    return step


def measure_bytes_and_memory(step, counter: SentBytes, rank: int, repeats: int = 2) -> dict:
    """Bytes sent in one step; peak memory as the least of `repeats` profiled steps (a tensor whose free
    happens to land after the profiled window — seen on random ranks, ±2 MiB — can only raise a reading)."""
    counter.total = 0
    step()  # also the warm-up
    sent = counter.total
    peak = min(peak_allocated_bytes(step, rank) for _ in range(repeats))
    return {"sent": sent, "peak": peak}


def slowest_rank_seconds(step) -> float:
    dist.barrier()
    start = time.perf_counter()
    step()
    seconds = torch.tensor(time.perf_counter() - start)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds.item()


def openclip_loss_module():
    """open_clip/loss.py by file path: the package __init__ imports torchvision (not installable beside
    the CPU torch); loss.py needs only torch. open-clip-torch is installed with --no-deps."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise SystemExit("bench_loss: open-clip-torch is not installed (make test-venv installs it)")
    path = f"{spec.submodule_search_locations[0]}/loss.py"
    module_spec = importlib.util.spec_from_file_location("openclip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def loss_variants(world: int, rank: int, chunk: int) -> dict:
    """name → (G, chunked, loss_fn(image, text, log_scale)); creates every loss group (all ranks)."""
    clip = openclip_loss_module().ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    variants = {"openclip": (world, False, lambda i, t, s: clip(i, t, s.exp()))}
    size = world
    while size >= 1:
        group = new_loss_groups(Layout(world_size=world, loss_group_size=size), rank)
        for chunked in (False, True):
            config = LossConfig(chunk_size=chunk if chunked else None)
            fn = functools.partial(lambda i, t, s, g, c: contrastive_loss(i, t, s, group=g, config=c),
                                   g=group, c=config)
            variants[f"G={size} {'chunked' if chunked else 'dense'}"] = (size, chunked, fn)
        size //= 2
    return variants


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results_path: str) -> None:
    warnings.simplefilter("ignore")  # deprecation notices of torch/OpenCLIP collectives, TE/apex absence, × P ranks
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    from m2megatron.parallel import cpu_compat

    cpu_compat.apply()  # Megatron's gather allocates on torch.cuda.current_device()
    counter = SentBytes()
    counter.install()
    variants = loss_variants(world, rank, args.chunk)
    rows = []
    for batch in (int(n) for n in args.batches.split(",")):
        gen = torch.Generator().manual_seed(rank)
        image = F.normalize(torch.randn(batch // world, args.dim, generator=gen), dim=1)
        text = F.normalize(image + 0.5 * torch.randn(batch // world, args.dim, generator=gen), dim=1)
        steps = {name: make_step(fn, image, text, torch.tensor(math.log(1 / 0.07)))
                 for name, (_, _, fn) in variants.items()}
        measured = {name: measure_bytes_and_memory(step, counter, rank) for name, step in steps.items()}
        # Time the variants in interleaved rounds and keep each one's best round, so that a burst of
        # load from elsewhere on the machine hits all of them alike.
        seconds = {name: math.inf for name in steps}
        for _ in range(args.iters):
            for name, step in steps.items():
                seconds[name] = min(seconds[name], slowest_rank_seconds(step))
        for name, (size, chunked, _) in variants.items():
            peaks = [None] * world
            dist.all_gather_object(peaks, measured[name]["peak"])
            rows.append(dict(batch=batch, name=name, G=size, chunked=chunked, sent=measured[name]["sent"],
                             peak=max(peaks), time=seconds[name]))
    if rank == 0:
        with open(results_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


# --- the analytic model (docs/LOSS.md) ------------------------------------------------------------


def model_sent_bytes(group: int, rows: int, dim: int, elem: int) -> int:
    """All-gather of the image+text rows forward, reduce-scatter of their gradients backward."""
    return 4 * (group - 1) * rows * dim * elem


def model_peak_bytes(rows: int, cols: int, dim: int, elem: int, chunk: int | None) -> int:
    """Peak loss-step memory per rank (docs/LOSS.md §5): logits terms plus the gathered columns and their
    gradients; backend working memory of the collectives is left out."""
    if chunk is None:  # 2 saved log-softmax outputs + 2 backward temporaries; pairs, fp32 ∂cols, their stack
        return 4 * rows * cols * FP32 + 2 * cols * dim * (2 * elem + FP32)
    return 3 * rows * min(chunk, cols) * FP32 + 4 * cols * dim * elem  # a tile, p − y, a product; pairs, ∂pairs


def analytic_rows(world=256, per_rank=64, dim=1024, elem=2, accumulation=(1, 8, 32), chunk=4096):
    rows = []
    for steps in accumulation:
        m = steps * per_rank
        for group in (world, world // 2, 8, 1):
            for chunked in (False, True):
                rows.append(dict(A=steps, G=group, chunked=chunked, sent=model_sent_bytes(group, m, dim, elem),
                                 peak=model_peak_bytes(m, group * m, dim, elem, chunk if chunked else None)))
    return rows


# --- report ------------------------------------------------------------------------------------------


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:10.2f}"


def print_measured(rows, world: int, dim: int, chunk: int) -> None:
    print(f"# measured: P={world} gloo ranks, d={dim}, fp32, chunk={chunk}; ratios are ours / OpenCLIP")
    print(f"{'N':>6} {'config':<16} {'sent MiB':>10} {'peak MiB':>10} {'model MiB':>10} {'time s':>8} "
          f"{'sent×':>7} {'peak×':>7} {'time×':>7}")
    for batch in sorted({r["batch"] for r in rows}):
        ref = next(r for r in rows if r["batch"] == batch and r["name"] == "openclip")
        for r in (r for r in rows if r["batch"] == batch):
            b = batch // world
            model = model_peak_bytes(b, r["G"] * b, dim, FP32, chunk if r["chunked"] else None)
            ratios = r["sent"] / max(ref["sent"], 1), r["peak"] / ref["peak"], r["time"] / ref["time"]
            print(f"{batch:>6} {r['name']:<16} {mib(r['sent'])} {mib(r['peak'])} {mib(model)} {r['time']:8.3f} "
                  + " ".join(f"{x:7.3f}" for x in ratios))


def print_analytic() -> None:
    print("# analytic: 10B model (d=1024, bf16 embeddings, fp32 loss), P=256 GPUs, b=64, chunk=4096")
    print(f"{'A':>3} {'G':>4} {'mode':<8} {'sent MiB':>10} {'peak MiB':>10} {'sent/global':>12}")
    rows = analytic_rows()
    for r in rows:
        global_sent = next(x["sent"] for x in rows if x["A"] == r["A"] and x["G"] == 256)
        print(f"{r['A']:>3} {r['G']:>4} {'chunked' if r['chunked'] else 'dense':<8} {mib(r['sent'])} "
              f"{mib(r['peak'])} {r['sent'] / global_sent:12.4f}")


def summary(rows, world: int) -> str:
    largest = max(r["batch"] for r in rows)
    at = {r["name"]: r for r in rows if r["batch"] == largest}
    grouped = at[f"G={world // 2} dense"]["sent"] / at[f"G={world} dense"]["sent"]
    memory = at["openclip"]["peak"] / at[f"G={world} chunked"]["peak"]
    speed = at[f"G={world} dense"]["time"] / at["openclip"]["time"]
    return f"grouped_comm_ratio={grouped:.4f} chunked_mem_ratio={memory:.2f} time_ratio={speed:.3f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        mp.start_processes(worker, args=(args.world, port, args, path), nprocs=args.world, start_method="spawn")
        with open(path) as f:
            rows = json.load(f)
    print_measured(rows, args.world, args.dim, args.chunk)
    print(f"# expected grouped/global bytes at G=P/2: (G-1)/(P-1) = {(args.world // 2 - 1) / (args.world - 1):.4f}")
    print_analytic()
    print(f"# total {time.perf_counter() - started:.0f} s")
    print(summary(rows, args.world))


if __name__ == "__main__":
    main()
