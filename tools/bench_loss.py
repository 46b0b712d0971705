"""Benchmark of the contrastive loss against OpenCLIP's ClipLoss: peak memory, bytes sent, wall time.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_loss.py            # P = 8 gloo ranks, 10-17 min on 2 cores

Each of P gloo processes on this machine runs one loss step (forward + backward) per configuration:
OpenCLIP's ClipLoss(local_loss=True, gather_with_grad=True) over the world, ours with the gather
exchange for every loss group size G in {1, 2, 4, ..., P}, dense and chunked, and ours with the ring
exchange (LossConfig.exchange="ring") at G = P and P/2. Then, at the largest batch's b per rank, worlds
of P = 2, 4, ... (--scaling-worlds) run OpenCLIP and the global ring once more: the ring's per-rank
peak as P doubles at fixed b. Per rank it measures
- peak memory: the highest total of CPU tensor bytes allocated during the step above what was allocated
  before it, from the allocator events torch.profiler(profile_memory=True) records (torch has no
  max_memory_allocated for CPU); gloo's internal buffers are not tensors and are not counted;
- bytes sent: counted at the collective calls, as the data each rank must send whatever the algorithm:
  (G − 1) × its chunk for an all-gather or a reduce-scatter, and its G − 1 outgoing chunks for a
  scatter (the gloo emulation of all-to-all in OpenCLIP's backward); the ring's isends in
  batch_isend_irecv as they are;
- wall time: the slowest rank's time of one step, the best of a few rounds that interleave the
  configurations (P processes share 2 cores here, so only the ratios within one run mean anything).
It prints a table of ratios against OpenCLIP, the fixed-b table, the analytic model of docs/LOSS.md for
the 10B model on 256 GPUs and for Inf-CL's published setting, and last a key=value summary line.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from m2megatron.config import LossConfig
from m2megatron.loss import contrastive_loss
from m2megatron.loss.traffic import sent_bytes
from m2megatron.parallel.bootstrap import free_port
from m2megatron.parallel.groups import new_loss_groups
from m2megatron.parallel.layout import Layout

FP32 = 4
MODES = ("dense", "chunked", "ring")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=8, help="P, gloo processes (default 8)")
    parser.add_argument("--batches", default="4096,16384,24576", help="global batches N, comma-separated")
    parser.add_argument("--dim", type=int, default=128, help="embedding dim d")
    parser.add_argument("--chunk", type=int, default=256, help="column tile of the chunked loss")
    parser.add_argument("--iters", type=int, default=2, help="timed rounds over all configurations")
    parser.add_argument("--scaling-worlds", default="2,4",
                        help="smaller worlds P for the fixed-b ring table (the main world is added; '' skips it)")
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

        def point_to_point(fn):
            @functools.wraps(fn)
            def counted(ops):
                self.total += sum(nbytes(op.tensor) for op in ops if op.op is dist.isend)
                return fn(ops)
            return counted

        mappings.dist_all_gather_func = ring(mappings.dist_all_gather_func, lambda out, inp: nbytes(inp))
        mappings.dist_reduce_scatter_func = ring(mappings.dist_reduce_scatter_func, lambda out, inp: nbytes(out))
        dist.all_gather = ring(dist.all_gather, lambda outs, inp: nbytes(inp))
        dist.scatter = scatter(dist.scatter)
        dist.batch_isend_irecv = point_to_point(dist.batch_isend_irecv)


def peak_allocated_bytes(step, rank: int) -> int:
    """Max over the step of (CPU tensor bytes allocated − bytes allocated at its start)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"trace{rank}.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    events = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not events:
        return 0
    # "Total Allocated" runs on across the profiler sessions of a process, and a free outside every
    # window is never recorded, so the raw total drifts up from one measurement to the next: take it
    # relative to the total just before this window's first event.
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in events) - start


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


def loss_variants(world: int, rank: int, chunk: int, only_global_ring: bool = False) -> dict:
    """name → (G, mode, loss_fn(image, text, log_scale)); creates every loss group (all ranks).

    mode: "dense" | "chunked" (gather exchange) | "ring"; OpenCLIP is listed as G = P "dense"."""
    clip = openclip_loss_module().ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    variants = {"openclip": (world, "dense", lambda i, t, s: clip(i, t, s.exp()))}
    configs = {"dense": LossConfig(), "chunked": LossConfig(chunk_size=chunk),
               "ring": LossConfig(exchange="ring", chunk_size=chunk)}
    size = world
    while size >= 1:
        group = new_loss_groups(Layout(world_size=world, loss_group_size=size), rank)
        modes = ["ring"] if only_global_ring else ["dense", "chunked"] + (["ring"] if size >= world // 2 else [])
        for mode in modes:
            fn = functools.partial(lambda i, t, s, g, c: contrastive_loss(i, t, s, group=g, config=c),
                                   g=group, c=configs[mode])
            variants[f"G={size} {mode}"] = (size, mode, fn)
        if only_global_ring:
            break
        size //= 2
    return variants


def worker(rank: int, world: int, port: int, args: argparse.Namespace, batches: list[int], scaling: bool,
           results_path: str) -> None:
    """One rank: every variant at every batch (scaling: OpenCLIP and the global ring, memory only)."""
    warnings.simplefilter("ignore")  # deprecation notices of torch/OpenCLIP collectives, TE/apex absence, × P ranks
    torch.set_num_threads(1)
    from m2megatron.config.parallel import ParallelConfig
    from m2megatron.parallel.bootstrap import initialize, local_rank_env

    # The bootstrap applies the CPU patches: Megatron's gather allocates on torch.cuda.current_device().
    initialize(ParallelConfig(timeout_s=600), local_rank_env(rank, world, port=port), megatron_state=False)
    counter = SentBytes()
    counter.install()
    variants = loss_variants(world, rank, args.chunk, only_global_ring=scaling)
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(rank)
        image = F.normalize(torch.randn(batch // world, args.dim, generator=gen), dim=1)
        text = F.normalize(image + 0.5 * torch.randn(batch // world, args.dim, generator=gen), dim=1)
        steps = {name: make_step(fn, image, text, torch.tensor(math.log(1 / 0.07)))
                 for name, (_, _, fn) in variants.items()}
        measured = {name: measure_bytes_and_memory(step, counter, rank) for name, step in steps.items()}
        # Time the variants in interleaved rounds and keep each one's best round, so that a burst of
        # load from elsewhere on the machine hits all of them alike.
        seconds = {name: math.inf for name in steps}
        for _ in range(0 if scaling else args.iters):
            for name, step in steps.items():
                seconds[name] = min(seconds[name], slowest_rank_seconds(step))
        for name, (size, mode, _) in variants.items():
            peaks = [None] * world
            dist.all_gather_object(peaks, measured[name]["peak"])
            rows.append(dict(world=world, batch=batch, name=name, G=size, mode=mode, sent=measured[name]["sent"],
                             peak=max(peaks), time=seconds[name]))
    if rank == 0:
        with open(results_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


# --- the analytic model (docs/LOSS.md) ------------------------------------------------------------


def model_peak_bytes(mode: str, rows: int, group: int, dim: int, elem: int, chunk: int | None,
                     triton: bool = False) -> int:
    """Peak loss-step memory per rank (docs/LOSS.md §5), m = rows, n = group · rows; backend working
    memory of the collectives is left out.

    dense: 2 saved log-softmax outputs + 2 backward temporaries [m, n] fp32; gathered pairs, fp32 ∂cols, their stack.
    chunked: a logits tile and p − y [m, t] (the torch kernel works in place); gathered pairs and the
    [n, 2, d] gradient buffer.
    ring (backward): two blocks (image, text [m, d] and the [6, m] fp32 row state; the one in hand, the one
    arriving), the fp32 result [2, m, d], an [m, d] fp32 column buffer and a row gradient [m, d], and two
    [m, t] fp32 tiles of the torch kernel; Triton materialises no tile but ~3 [m, d] fp32 row-gradient partials.
    """
    cols = group * rows
    if mode == "dense":
        return 4 * rows * cols * FP32 + 2 * cols * dim * (2 * elem + FP32)
    if mode == "chunked":
        return 2 * rows * min(chunk, cols) * FP32 + 4 * cols * dim * elem
    work = 3 * rows * dim * FP32 if triton else 2 * rows * min(chunk or rows, rows) * FP32
    return 2 * (2 * rows * dim * elem + 6 * rows * FP32) + (2 + 1 + 1) * rows * dim * FP32 + work


def analytic_rows(world=256, per_rank=64, dim=1024, elem=2, accumulation=(1, 16, 32), chunk=4096):
    """The 10B model on 256 GPUs: gather (dense, chunked) and ring (Triton: the GPU path) per A and G."""
    rows = []
    for steps in accumulation:
        m = steps * per_rank
        for group in (world, world // 2, 8, 1):
            for mode in MODES:
                exchange = "ring" if mode == "ring" else "gather"
                rows.append(dict(A=steps, G=group, mode=mode, sent=sent_bytes(exchange, group, m, dim, elem),
                                 peak=model_peak_bytes(mode, m, group, dim, elem, chunk, triton=True)))
    return rows


def infcl_rows(batch=131072, world=8, dims=(512, 768), elem=FP32):
    """Inf-CL's published setting (128k on 8 GPUs); their embedding width is not restated here, so two."""
    b = batch // world
    return [dict(d=d, mode=mode, peak=model_peak_bytes(mode, b, world, d, elem, 4096, triton=True))
            for d in dims for mode in MODES]


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
            model = model_peak_bytes(r["mode"], batch // world, r["G"], dim, FP32, chunk)
            ratios = r["sent"] / max(ref["sent"], 1), r["peak"] / ref["peak"], r["time"] / ref["time"]
            print(f"{batch:>6} {r['name']:<16} {mib(r['sent'])} {mib(r['peak'])} {mib(model)} {r['time']:8.3f} "
                  + " ".join(f"{x:7.3f}" for x in ratios))


def print_scaling(rows, dim: int, chunk: int) -> None:
    print(f"# fixed b: the global ring (G = P) as P doubles, d={dim}, fp32, chunk={chunk}")
    print(f"{'P':>3} {'b':>6} {'N':>6} {'ring MiB':>10} {'model MiB':>10} {'OpenCLIP MiB':>13} {'OpenCLIP/ring':>14}")
    for r in sorted(rows, key=lambda r: r["world"]):
        b = r["batch"] // r["world"]
        model = model_peak_bytes("ring", b, r["world"], dim, FP32, chunk)
        print(f"{r['world']:>3} {b:>6} {r['batch']:>6} {mib(r['peak'])} {mib(model)} {mib(r['openclip']):>13} "
              f"{r['openclip'] / r['peak']:14.2f}")


def print_analytic() -> None:
    print("# analytic: 10B model (d=1024, bf16 embeddings, fp32 loss), P=256 GPUs, b=64, chunk=4096; ring with Triton")
    print(f"{'A':>3} {'G':>4} {'mode':<8} {'sent MiB':>10} {'peak MiB':>10} {'sent/global':>12}")
    rows = analytic_rows()
    for r in rows:
        global_sent = next(x["sent"] for x in rows if x["A"] == r["A"] and x["G"] == 256 and x["mode"] == r["mode"])
        print(f"{r['A']:>3} {r['G']:>4} {r['mode']:<8} {mib(r['sent'])} {mib(r['peak'])} "
              f"{r['sent'] / global_sent:12.4f}")
    print("# analytic: Inf-CL's setting, N=131072 on P=8 (b=16384), fp32 embeddings; they report OpenCLIP "
          "33.64 GB, Inf-CL 0.72 GB")
    print(f"{'d':>5} {'mode':<8} {'peak GiB':>10}")
    for r in infcl_rows():
        print(f"{r['d']:>5} {r['mode']:<8} {r['peak'] / 2**30:10.3f}")


def summary(rows, scaling, world: int) -> str:
    largest = max(r["batch"] for r in rows)
    at = {r["name"]: r for r in rows if r["batch"] == largest}
    grouped = at[f"G={world // 2} dense"]["sent"] / at[f"G={world} dense"]["sent"]
    ring_grouped = at[f"G={world // 2} ring"]["sent"] / at[f"G={world} ring"]["sent"]
    memory = at["openclip"]["peak"] / at[f"G={world} chunked"]["peak"]
    ring_memory = at["openclip"]["peak"] / at[f"G={world} ring"]["peak"]
    speed = at[f"G={world} dense"]["time"] / at["openclip"]["time"]
    ring_speed = at[f"G={world} ring"]["time"] / at["openclip"]["time"]
    peaks = [r["peak"] for r in scaling]
    by_world = ",".join(f"{r['world']}:{r['peak'] / 2**20:.2f}" for r in sorted(scaling, key=lambda r: r["world"]))
    spread = f" ring_peak_spread={max(peaks) / min(peaks) - 1:.3f} ring_peak_mib={by_world}" if len(peaks) > 1 else ""
    return (f"grouped_comm_ratio={grouped:.4f} ring_grouped_comm_ratio={ring_grouped:.4f} "
            f"chunked_mem_ratio={memory:.2f} ring_mem_ratio={ring_memory:.2f} time_ratio={speed:.3f} "
            f"ring_time_ratio={ring_speed:.3f}{spread}")


def run_world(world: int, args: argparse.Namespace, batches: list[int], scaling: bool) -> list[dict]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        mp.start_processes(worker, args=(world, port, args, batches, scaling, path), nprocs=world,
                           start_method="spawn")
        with open(path) as f:
            return json.load(f)


def scaling_rows(rows, args: argparse.Namespace) -> list[dict]:
    """The global ring's peak at the largest batch's b per rank in worlds P = --scaling-worlds and args.world."""
    largest = max(r["batch"] for r in rows)
    b = largest // args.world
    worlds = [int(p) for p in args.scaling_worlds.split(",") if p]
    runs = [rows] + [run_world(p, args, [b * p], scaling=True) for p in worlds if p != args.world]
    out = []
    for run in runs:
        world = run[0]["world"]
        at = {r["name"]: r for r in run if r["batch"] == b * world}
        out.append(dict(world=world, batch=b * world, peak=at[f"G={world} ring"]["peak"],
                        openclip=at["openclip"]["peak"]))
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    rows = run_world(args.world, args, [int(n) for n in args.batches.split(",")], scaling=False)
    scaling = scaling_rows(rows, args) if args.scaling_worlds else []
    print_measured(rows, args.world, args.dim, args.chunk)
    print(f"# expected grouped/global bytes at G=P/2: (G-1)/(P-1) = {(args.world // 2 - 1) / (args.world - 1):.4f}")
    if scaling:
        print_scaling(scaling, args.dim, args.chunk)
    print_analytic()
    print(f"# total {time.perf_counter() - started:.0f} s")
    print(summary(rows, scaling, args.world))


if __name__ == "__main__":
    main()
