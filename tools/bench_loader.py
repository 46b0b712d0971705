"""Training-loader throughput per CPU core: ours vs the `webdataset` library + torch DataLoader, one run.

    python tools/bench_loader.py --make 512 [--workers 1 2] [--rounds 5] [--batches 8] [--batch 32]
    python tools/bench_loader.py --shards 'data/shards/*.tar' [--tokenizer sp.model]
    python tools/bench_loader.py --mixture [--make 512]  # three weighted sources: ours vs webdataset's RandomMix
    python tools/bench_loader.py --tp-decode [--tp 2]   # StageBatches: broadcast vs split decoding over TP
    python tools/bench_loader.py --dali-mixed           # one line: DALI mixed loader figure (NGC GPU host)

Both pipelines do the same work on the same shards: read tar → PIL decode → augment (random resized
crop inside the bicubic resize to --image-size, horizontal flip) → tokenize the caption (our SentencePiece
tokenizer) → batches of uint8 [b, 3, S, S] + ids/masks (the trainer normalizes on the device; the figures in
docs/DATA.md were measured when both normalized to float32 on the host). The peer is what a user
would otherwise write: `wds.WebDataset(...).decode("pil").to_tuple(...).map(preprocess).batched(b)`
in a `DataLoader` with PIL worker processes. Ours is `build_train_loader` with `data.num_workers` PIL
worker processes.

With --mixture the shards are dealt into three sources mixed 0.5 / 0.3 / 0.2: ours is `data.sources` with
2 open shards per source; the peer is webdataset's `RandomMix` over three such WebDataset pipelines (the
same probabilities) in a DataLoader with default collation.

Rounds alternate between the pipelines (and worker counts); while one runs, the other's worker
processes are stopped (SIGSTOP), so all CPU time of the process tree (this process and all children,
from psutil) in a round belongs to the pipeline that runs: images/s per core = images / CPU seconds.
Wall-clock images/s is printed too but is not meaningful on a shared machine. The last lines are
the ratios ours/peer (per core) per worker count.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Keep the module's top level light: spawned decode workers re-import this file (as __mp_main__).
from m2megatron.cli import UserError, run_main  # noqa: E402

REFERENCE_SP = Path(__file__).resolve().parents[2] / "shared" / "reference" / "m2_encoder" / "sp.model"


# ---- data ------------------------------------------------------------------------------------------
def make_shards(out: Path, n: int) -> list[str]:
    """Photo-like 500x375 JPEGs with the synthetic set's English and Chinese captions."""
    from m2megatron.data.synthetic import all_captions
    from tools.bench_decode import make_photo_shards

    captions = all_captions()
    step = max(1, len(captions) // n)
    return make_photo_shards(out, n, per_shard=64, captions=captions[::step])


def load_tokenizer(path: str | None, cache: Path):
    from m2megatron.config.data import DataConfig
    from m2megatron.data.build import resolve_tokenizer
    from m2megatron.data.tokenizer import Tokenizer

    if path or REFERENCE_SP.is_file():
        return Tokenizer(path or REFERENCE_SP, max_length=52)
    return resolve_tokenizer(DataConfig(), max_length=52, cache_dir=cache)


# ---- the two pipelines ----------------------------------------------------------------------------
class PeerPreprocess:
    """The peer's per-sample map: the same crop/flip draw, resize, normalization and tokenizer as ours."""

    def __init__(self, tokenizer, size: int):
        from m2megatron.data.image import Augment

        self.tokenizer, self.size, self.augment, self.rng = tokenizer, size, Augment(), None

    def __call__(self, sample):
        import numpy as np
        import torch

        from m2megatron.data.image import preprocess_pil

        if self.rng is None:
            self.rng = np.random.default_rng(os.getpid())
        image, caption = sample
        box, flip = self.augment.draw(self.rng)
        ids, mask = self.tokenizer.encode_one(caption)
        image = preprocess_pil(image, self.size, box, flip, normalize=False)  # uint8, as our training loader's
        return torch.from_numpy(image), torch.tensor(ids), torch.tensor(mask)


MIXTURE_WEIGHTS = (0.5, 0.3, 0.2)


def mixture_sources(shards: list[str]) -> list[list[str]]:
    """The shards dealt into len(MIXTURE_WEIGHTS) sources."""
    if len(shards) < len(MIXTURE_WEIGHTS):
        raise UserError(f"bench_loader --mixture: needs at least {len(MIXTURE_WEIGHTS)} shards, got {len(shards)}")
    return [shards[i::len(MIXTURE_WEIGHTS)] for i in range(len(MIXTURE_WEIGHTS))]


def peer_loader(shards: list[str], tokenizer, size: int, batch: int, workers: int, mixture: bool = False):
    """webdataset + DataLoader with `workers` PIL worker processes; returns (iterator, worker pids)."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    def pipeline(urls):
        return (wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=None)
                .decode("pil").to_tuple("jpg;jpeg;png;webp", "txt").map(PeerPreprocess(tokenizer, size)))

    if mixture:
        dataset = wds.RandomMix([pipeline(s) for s in mixture_sources(shards)], list(MIXTURE_WEIGHTS))
        loader = DataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=True,
                            prefetch_factor=2)
    else:
        loader = DataLoader(pipeline(shards).batched(batch, partial=False), batch_size=None, num_workers=workers,
                            persistent_workers=True, prefetch_factor=2)
    it = iter(loader)
    next(it)  # starts the workers
    return it, [w.pid for w in it._workers]


def our_loader(shards: list[str], tokenizer, size: int, batch: int, workers: int, mixture: bool = False):
    from m2megatron.config.data import DataConfig
    from m2megatron.config.data_source import SourceConfig
    from m2megatron.data.build import build_train_loader

    cfg = DataConfig(source="webdataset", shards=shards, decoder="pil", num_workers=workers, augment=True,
                     prefetch=2)
    if mixture:
        cfg.shards, cfg.open_shards = [], 2
        cfg.sources = [SourceConfig(name=f"s{i}", shards=s, weight=w)
                       for i, (s, w) in enumerate(zip(mixture_sources(shards), MIXTURE_WEIGHTS))]
    loader = build_train_loader(cfg, tokenizer=tokenizer, image_size=size, micro_batch_size=batch, gpu=False)
    next(loader)  # starts the workers
    return loader, loader.decoder.pids


# ---- measuring ------------------------------------------------------------------------------------
def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and all its live descendants."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def signal_all(pids: list[int], resume: bool) -> None:
    import psutil

    for pid in pids:
        try:
            (psutil.Process(pid).resume if resume else psutil.Process(pid).suspend)()
        except psutil.NoSuchProcess:
            pass


def timed_round(it, pids: list[int], batches: int, batch: int) -> tuple[float, float]:
    """(images / CPU second, images / wall second) of `batches` batches, the others' workers stopped."""
    signal_all(pids, resume=True)
    c0, w0 = tree_cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        next(it)
    c1, w1 = tree_cpu_seconds(), time.perf_counter()
    signal_all(pids, resume=False)
    images = batches * batch
    return images / max(c1 - c0, 1e-9), images / (w1 - w0)


def compare(args, shards: list[str], tokenizer) -> list[str]:
    # The peer's DataLoader forks its workers: start them before our loaders start any thread.
    pipes = {}
    for w in args.workers:
        pipes[("peer", w)] = peer_loader(shards, tokenizer, args.image_size, args.batch, w, args.mixture)
    for w in args.workers:
        pipes[("ours", w)] = our_loader(shards, tokenizer, args.image_size, args.batch, w, args.mixture)
    every_pid = [p for _, pids in pipes.values() for p in pids]
    signal_all(every_pid, resume=False)
    per_core = {k: [] for k in pipes}
    wall = {k: [] for k in pipes}
    for r in range(args.rounds + 1):  # round 0 warms up (fills every pipeline in steady state)
        for key, (it, pids) in pipes.items():
            c, w = timed_round(it, pids, args.batches if r else 2, args.batch)
            if r:
                per_core[key].append(c)
                wall[key].append(w)
    signal_all(every_pid, resume=True)
    for key, (it, _) in pipes.items():
        if key[0] == "ours":
            it.close()
    lines = []
    for key in pipes:
        lines.append(f"  {key[0]:4s} workers={key[1]}: {statistics.median(per_core[key]):7.1f} img/s per core "
                     f"(median; rounds {', '.join(f'{v:.0f}' for v in per_core[key])}), "
                     f"{statistics.median(wall[key]):7.1f} img/s wall")
    for w in args.workers:
        ratio = statistics.median(per_core[("ours", w)]) / statistics.median(per_core[("peer", w)])
        what = "three-source mixture ours/RandomMix" if args.mixture else "ours/peer"
        lines.append(f"ratio {what} (img/s per core), workers={w}: {ratio:.2f}")
    return lines


# ---- TP decode: broadcast vs split -----------------------------------------------------------------
def _tp_rank(rank: int, world: int, port: int, shards: list[str], sp_model: str, args, out) -> None:
    import warnings

    warnings.simplefilter("ignore")  # Megatron's import-time notes about TE/apex, once per rank

    import torch
    import torch.distributed as dist

    from m2megatron.config.data import DataConfig
    from m2megatron.config.parallel import ParallelConfig
    from m2megatron.data.stage_batches import StageBatches
    from m2megatron.data.tokenizer import Tokenizer
    from m2megatron.parallel import Layout, build_groups
    from m2megatron.parallel.bootstrap import initialize, local_rank_env

    torch.set_num_threads(1)
    initialize(ParallelConfig(timeout_s=300), local_rank_env(rank, world, port=port), megatron_state=False)
    groups = build_groups(Layout(world_size=world, tensor_parallel=world))
    tok = Tokenizer(sp_model, max_length=52)
    results = {}
    for r in range(args.rounds):
        for compute_ms in (0, args.compute_ms):
            for mode in ("broadcast", "split"):
                cfg = DataConfig(source="webdataset", shards=shards, decoder="pil", num_workers=args.tp_workers,
                                 augment=True, tp_decode=mode)
                sb = StageBatches(cfg, tok, image_size=args.image_size, micro_batch_size=args.batch,
                                  num_microbatches=2, groups=groups, seed=r)
                sb.next_step()  # warm-up: workers started, first batches decoded
                dist.barrier()
                waits, t0 = [], time.perf_counter()
                for _ in range(args.batches):
                    t = time.perf_counter()
                    sb.next_step()
                    waits.append(time.perf_counter() - t)
                    time.sleep(compute_ms / 1000)  # the accelerator's step: the CPU is free meanwhile
                step = (time.perf_counter() - t0) / args.batches
                sb.close()
                results.setdefault((mode, compute_ms), []).append((statistics.mean(waits), step))
    out.put((rank, results))
    dist.barrier()
    dist.destroy_process_group()


def tp_decode(args, shards: list[str], tokenizer) -> list[str]:
    import torch.multiprocessing as mp

    from m2megatron.parallel.bootstrap import free_port

    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_tp_rank, args=(r, args.tp, port, shards, str(tokenizer.path), args, out))
             for r in range(args.tp)]
    for p in procs:
        p.start()
    per_rank = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
    images = 2 * args.batch
    lines = [f"StageBatches at TP={args.tp} (gloo, one process per rank), 2 microbatches of {args.batch} per step, "
             f"reader num_workers={args.tp_workers}; data wait = time in next_step (max over ranks, mean over "
             f"{args.batches} steps, median over {args.rounds} rounds)"]
    best = {}
    for compute_ms in (0, args.compute_ms):
        for mode in ("broadcast", "split"):
            rounds = list(zip(*(per_rank[r][(mode, compute_ms)] for r in range(args.tp))))  # per round, per rank
            wait = statistics.median(max(w for w, _ in rnd) for rnd in rounds)
            step = statistics.median(max(s for _, s in rnd) for rnd in rounds)
            best[(mode, compute_ms)] = wait
            lines.append(f"  compute {compute_ms:4d} ms/step, {mode:9s}: data wait {1000 * wait:7.1f} ms/step, "
                         f"{images / step:6.1f} img/s")
    for compute_ms in (0, args.compute_ms):
        lines.append(f"ratio split/broadcast data wait, compute {compute_ms} ms: "
                     f"{best[('split', compute_ms)] / best[('broadcast', compute_ms)]:.2f}")
    return lines


# ---- DALI mixed (GPU) ------------------------------------------------------------------------------
def dali_mixed_line(shards: list[str], tokenizer, size: int = 224, batch: int = 64, batches: int = 20,
                    threads: int = 4) -> str:
    """One line: our loader with DALI's mixed (nvJPEG) decoder, pipelined; needs a GPU host with DALI."""
    import torch

    from m2megatron.config.data import DataConfig
    from m2megatron.data.build import build_train_loader
    from m2megatron.data.dali_decode import dali_available

    if not (torch.cuda.is_available() and dali_available()):
        return "# DALI mixed loader: SKIPPED (needs a CUDA GPU and nvidia-dali, e.g. an NGC PyTorch container)"
    cfg = DataConfig(source="webdataset", shards=shards, decoder="dali", num_workers=threads, augment=True,
                     decode_depth=2, prefetch=2)
    loader = build_train_loader(cfg, tokenizer=tokenizer, image_size=size, micro_batch_size=batch, gpu=True,
                                device=torch.device("cuda", torch.cuda.current_device()))
    for _ in range(3):
        next(loader)
    torch.cuda.synchronize()
    c0, w0 = tree_cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        images = next(loader)["images"]
    torch.cuda.synchronize()
    c1, w1 = tree_cpu_seconds(), time.perf_counter()
    loader.close()
    n = batches * batch
    return (f"# DALI mixed loader (tar → nvJPEG → crop/flip bicubic {size}² → tokenize → batch {batch}, depth 2, "
            f"{threads} threads, on {images.device}): {n / (w1 - w0):.0f} img/s wall, {n / (c1 - c0):.0f} img/s per "
            f"CPU core")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", nargs="*", default=[], help="tar shards or globs (default: --make)")
    parser.add_argument("--make", type=int, default=512, help="generate this many photo-like JPEGs (500x375)")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the reference sp.model)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="batches (steps with --tp-decode) per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="PIL worker processes")
    parser.add_argument("--mixture", action="store_true", help="three weighted sources: ours vs webdataset RandomMix")
    parser.add_argument("--tp-decode", action="store_true", help="instead: StageBatches broadcast vs split")
    parser.add_argument("--tp", type=int, default=2, help="TP ranks for --tp-decode")
    parser.add_argument("--tp-workers", type=int, default=1, help="the reading rank's num_workers (--tp-decode)")
    parser.add_argument("--compute-ms", type=int, default=300, help="simulated accelerator step (--tp-decode)")
    parser.add_argument("--dali-mixed", action="store_true", help="instead: one line, DALI mixed on a GPU")
    args = parser.parse_args(argv)

    from m2megatron.data.formats import expand_shards

    tmp = tempfile.TemporaryDirectory(prefix="bench_loader_")
    shards = expand_shards(args.shards) if args.shards else make_shards(Path(tmp.name), args.make)
    if not shards:
        raise UserError("bench_loader: no shards")
    tokenizer = load_tokenizer(args.tokenizer, Path(tmp.name))
    if args.dali_mixed:
        print(dali_mixed_line(shards, tokenizer, args.image_size))
        return 0
    print(f"{args.make if not args.shards else len(shards)} {'JPEGs' if not args.shards else 'shards'} -> "
          f"{args.image_size}², batch {args.batch}, {args.batches} per round, {args.rounds} rounds; tokenizer "
          f"{tokenizer.path.name} ({tokenizer.vocab_size} pieces); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    lines = tp_decode(args, shards, tokenizer) if args.tp_decode else compare(args, shards, tokenizer)
    print("\n".join(lines))
    print(f"(load at the end {os.getloadavg()[0]:.1f})")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    run_main(main)
