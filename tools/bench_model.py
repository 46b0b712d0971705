"""Forward+backward throughput of our model against the reference architecture (torchscale 0.3.0).

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_model.py                 # ~5-10 min on 2 idle cores
    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_model.py --no-scaling --repeats 3

Part 1, single process: our M2Encoder (local spec, TP=1, PP=1) and the reference VLMo graph built from
PyPI torchscale==0.3.0 (tools/torchscale_reference.py) with the same sizes, our weights imported from the
reference's, the same images and captions and the same symmetric contrastive loss. Each repeat times
`--iters` forward+backward steps of ours, then of the reference (alternating, so machine load hits both);
the ratio ours/reference in samples/s is reported as the median and the min–max over repeats, in fp32
and in bf16, for `tiny` and a reduced-depth m2-0.4b shape (D=768, 12 heads, 224 px, 2 tower layers,
1 VL layer). bf16 means bf16 weights and inputs on both sides: CPU autocast cannot run our model,
because Megatron-Core's linear autograd functions declare custom_fwd/custom_bwd for CUDA only, so
under CPU autocast their backward multiplies a bf16 gradient with an fp32 weight and fails.
The reference runs as it would stand-alone, outside the CPU patches'
TorchFunctionMode (m2megatron.compat W3); ours runs as the trainer runs it, inside Megatron's
schedules. A third column times ours outside the mode too,
which isolates the mode's cost.

Part 2 (--scaling), gloo processes on this machine: the trainer's pipeline step (Megatron schedules,
DDP, contrastive loss) at TP=1 on one process against TP=2 and PP=2 on two, same global batch.
Scaling efficiency = t(TP1) / (ranks × t(layout)); the communication share is the time spent inside
torch.distributed calls (collectives, and p2p until their requests complete, which includes pipeline
waits) over the step time, from wrappers around those calls. On a shared 2-core machine only the
ordering of these numbers means something.

Part 3 (--attention), single process: the local spec's two core attentions, SDPA (model.attention=sdpa)
against Megatron-Core's DotProductAttention, forward+backward of the module alone and of one Sub-LN
layer around it, on the image segment (no mask) and the text segment (key-padding mask), at `tiny` and
the m2-0.4b width (D=768, 12 heads, 197 image / 52 text tokens). The two alternate within each repeat
(in reversed order every other repeat); speedup = t(megatron) / t(sdpa), median and min–max over repeats.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_model.py --no-reference --no-scaling --attention

Last line: a key=value summary with ratio_vs_reference= (median fp32 ratio of the larger shape) when part 1
ran, and sdpa_speedup_<shape>_<what>_<segment>= for part 3.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from m2megatron.parallel.bootstrap import free_port  # noqa: E402

SHAPES = {
    "tiny": dict(dim=64, layers=2, heads=4, out_dim=64, img_size=32, patch_size=8, vl_layers=1),
    "m2-0.4b-d2": dict(dim=768, layers=2, heads=12, out_dim=768, img_size=224, patch_size=16, vl_layers=1),
}
PRESET_OF = {"tiny": "tiny", "m2-0.4b-d2": "m2-0.4b"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="tiny,m2-0.4b-d2")
    p.add_argument("--batch", default="tiny=32,m2-0.4b-d2=4", help="samples per step per shape")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=2, help="steps per timed block")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="part 1: ours vs the torchscale reference")
    p.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=False,
                   help="part 3: SDPA vs Megatron core attention")
    p.add_argument("--attention-batch", default="tiny=32,m2-0.4b=8", help="samples per step of part 3, per shape")
    p.add_argument("--scaling-batch", type=int, default=32, help="global batch of the scaling runs")
    p.add_argument("--scaling-steps", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


# --- part 1: ours vs the reference -------------------------------------------------------------------


def clip_loss(image, text, log_scale):
    """Symmetric InfoNCE over the batch (identical for both models)."""
    logits = log_scale.exp() * image.float() @ text.float().t()
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def reference_embeddings(ref, pixels, ids, mask):
    """The reference's encode_image / encode_text graph, with autograd (tests' helpers run under no_grad)."""
    pad = 1 - mask
    img = ref.backbone(textual_tokens=None, visual_tokens=pixels)["encoder_out"]
    img = ref.backbone_vl(src_tokens=None, token_embeddings=img, multiway_split_position=-1)["encoder_out"]
    txt = ref.backbone(textual_tokens=ids, visual_tokens=None, text_padding_position=pad)["encoder_out"]
    txt = ref.backbone_vl(src_tokens=None, token_embeddings=txt, encoder_padding_mask=pad,
                          multiway_split_position=-1)["encoder_out"]
    return (F.normalize(ref.itc_vl_image_proj.fc(img[:, 0]), dim=-1, eps=0.0),
            F.normalize(ref.itc_vl_text_proj.fc(txt[:, 0]), dim=-1, eps=0.0))


def build_pair(shape: str, groups):
    from torchscale_reference import ReferenceM2, randomize_  # tools/, beside this script

    from m2megatron.checkpoint.reference_format import infer_model_config, reference_to_ours
    from m2megatron.config import RunConfig
    from m2megatron.models import load_full_state_dict
    from m2megatron.runtime import build_stages

    ref = ReferenceM2(**SHAPES[shape]).train()
    randomize_(ref, seed=0)
    cfg = infer_model_config(ref.state_dict(), preset=PRESET_OF[shape])
    full, _ = reference_to_ours(ref.state_dict(), cfg)
    (ours,) = build_stages(RunConfig(model=cfg), groups, training=False, init=False).modules
    ours.train()
    load_full_state_dict(ours, full)
    return ours, ref, cfg


def inputs(cfg, batch: int):
    gen = torch.Generator().manual_seed(0)
    s = cfg.max_text_len
    lengths = torch.randint(2, s + 1, (batch,), generator=gen)
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    ids = torch.randint(0, cfg.vocab_size, (batch, s), generator=gen) * mask
    pixels = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
    return pixels, ids, mask


def steps(ours, ref, pixels, ids, mask):
    def ours_step():
        out = ours(images=pixels, text_ids=ids, text_mask=mask)
        clip_loss(out.image, out.text, out.logit_scale).backward()
        ours.zero_grad(set_to_none=True)

    def ref_step():
        image, text = reference_embeddings(ref, pixels, ids, mask)
        clip_loss(image, text, ref.logit_scale).backward()
        ref.zero_grad(set_to_none=True)

    return ours_step, ref_step


def timed(fn, iters: int, outside_mode: bool = False) -> float:
    """Seconds per call of fn; inside the CPU patches' mode as Megatron's schedules run our forward, unless
    `outside_mode`."""
    from m2megatron.compat import cpu

    with contextlib.nullcontext() if outside_mode else cpu.mode_entered():
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters


def check_same_math(ours, ref, pixels, ids, mask) -> float:
    with torch.no_grad():
        a, b = ours(images=pixels, text_ids=ids, text_mask=mask), reference_embeddings(ref, pixels, ids, mask)
    return max((a.image - b[0]).abs().max().item(), (a.text - b[1]).abs().max().item())


def compare(shape: str, batch: int, precision: str, groups, args) -> dict:
    ours, ref, cfg = build_pair(shape, groups)
    pixels, ids, mask = inputs(cfg, batch)
    diff = check_same_math(ours, ref, pixels, ids, mask)
    if precision == "bf16":  # bf16 weights and inputs on both sides (CPU autocast: see the module docstring)
        ours, ref, pixels = ours.bfloat16(), ref.bfloat16(), pixels.bfloat16()
    ours_step, ref_step = steps(ours, ref, pixels, ids, mask)
    timed(ours_step, 1)
    timed(ref_step, 1, outside_mode=True)  # warm-up
    ratios, mode_costs, ours_t, ref_t = [], [], [], []
    for _ in range(args.repeats):
        t_ours = timed(ours_step, args.iters)
        t_ref = timed(ref_step, args.iters, outside_mode=True)
        t_bare = timed(ours_step, args.iters, outside_mode=True)
        ratios.append(t_ref / t_ours)
        mode_costs.append(t_ours / t_bare - 1)
        ours_t.append(t_ours)
        ref_t.append(t_ref)
    return dict(shape=shape, precision=precision, batch=batch, max_abs_diff=diff,
                ours_samples_s=batch / statistics.median(ours_t), ref_samples_s=batch / statistics.median(ref_t),
                ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                mode_cost=statistics.median(mode_costs))


def single_process_groups():
    from m2megatron.parallel import build_groups, initialize, seed_everything
    from m2megatron.parallel.bootstrap import local_rank_env
    from m2megatron.parallel.layout import Layout

    initialize(env=local_rank_env(0, 1, store=dist.HashStore()), megatron_state=False)
    groups = build_groups(Layout(world_size=1))
    seed_everything(0, groups)
    return groups


# --- part 3: SDPA vs Megatron core attention ----------------------------------------------------------


def attention_modules(cfg, groups, mask_type, what: str) -> dict:
    """{'megatron': module, 'sdpa': module}: the core attention alone, or one Sub-LN layer around it."""
    import dataclasses

    from megatron.core.transformer.spec_utils import build_module

    from m2megatron.models import transformer_config
    from m2megatron.models.layer_specs import CORE_ATTENTION, local_layer_spec

    config = transformer_config(cfg)
    out = {}
    for name, cls in CORE_ATTENTION.items():
        if what == "core":
            out[name] = cls(config=config, layer_number=1, attn_mask_type=mask_type, attention_type="self",
                            pg_collection=groups.collection)
        else:
            spec = local_layer_spec(dataclasses.replace(cfg, attention=name), mask_type)
            out[name] = build_module(spec, config=config, layer_number=1, pg_collection=groups.collection)
    if what == "layer":
        out["sdpa"].load_state_dict(out["megatron"].state_dict())  # core attention has no parameters
    return out


def attention_inputs(cfg, batch: int, tokens: int, masked: bool, what: str):
    gen = torch.Generator().manual_seed(0)
    mask = None
    if masked:
        lengths = torch.randint(2, tokens + 1, (batch,), generator=gen)
        mask = (torch.arange(tokens)[None] >= lengths[:, None])[:, None, None, :]  # [b, 1, 1, s], True = masked
    if what == "core":
        shape = (tokens, batch, cfg.num_attention_heads, cfg.head_dim)  # [s, b, np, hn]
        return [torch.randn(shape, generator=gen).requires_grad_() for _ in range(3)], mask
    return [torch.randn(tokens, batch, cfg.hidden_size, generator=gen).requires_grad_()], mask


def attention_compare(shape: str, batch: int, what: str, segment: str, groups, args) -> dict:
    from megatron.core.transformer.enums import AttnMaskType

    from m2megatron.config import preset

    cfg = preset(shape)
    masked = segment == "text"
    tokens = cfg.max_text_len if masked else cfg.num_image_tokens
    modules = attention_modules(cfg, groups, AttnMaskType.padding if masked else AttnMaskType.no_mask, what)
    tensors, mask = attention_inputs(cfg, batch, tokens, masked, what)

    def step_of(module):
        def step():
            out = module(*tensors, mask) if what == "core" else module(tensors[0], attention_mask=mask)[0]
            out.float().sum().backward()
        return step

    steps = {name: step_of(m) for name, m in modules.items()}
    for step in steps.values():
        timed(step, 1, outside_mode=True)  # warm-up
    times = {name: [] for name in steps}
    order = list(steps)
    for _ in range(args.repeats):
        for name in order:
            times[name].append(timed(steps[name], args.iters, outside_mode=True))
        order.reverse()  # neither side always runs right after the other
    speedups = [m / s for m, s in zip(times["megatron"], times["sdpa"])]
    return dict(shape=shape, what=what, segment=segment, batch=batch, tokens=tokens,
                megatron_ms=statistics.median(times["megatron"]) * 1e3, sdpa_ms=statistics.median(times["sdpa"]) * 1e3,
                speedup=statistics.median(speedups), speedup_min=min(speedups), speedup_max=max(speedups))


def attention_rows(groups, args) -> list[dict]:
    batches = dict(item.split("=") for item in args.attention_batch.split(","))
    return [attention_compare(shape, int(b), what, segment, groups, args)
            for shape, b in batches.items() for what in ("core", "layer") for segment in ("image", "text")]


# --- part 2: TP / PP scaling with communication share ---------------------------------------------


class CommTimer:
    """Wall time spent inside torch.distributed calls; async requests count until their wait() returns."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
             "send", "recv", "barrier", "_all_gather_base", "_reduce_scatter_base")
    # Not isend/irecv themselves: P2POp checks its op against those very functions.
    ASYNC = ("batch_isend_irecv",)

    def __init__(self):
        self.seconds = 0.0

    def _blocking(self, fn):
        @functools.wraps(fn)
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                work = fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
            return self._wrap_work(work) if kwargs.get("async_op") else work
        return timed_call

    def _wrap_work(self, work):
        if work is None:
            return None
        if isinstance(work, list):
            return [self._wrap_work(w) for w in work]
        timer = self

        class TimedWork:
            def wait(self, *a, **k):
                start = time.perf_counter()
                try:
                    return work.wait(*a, **k)
                finally:
                    timer.seconds += time.perf_counter() - start

            def __getattr__(self, name):
                return getattr(work, name)
        return TimedWork()

    def _async(self, fn):
        @functools.wraps(fn)
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            work = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return self._wrap_work(work)
        return timed_call

    def install(self) -> None:
        for name in self.NAMES:
            if hasattr(dist, name):
                setattr(dist, name, self._blocking(getattr(dist, name)))
        for name in self.ASYNC:
            setattr(dist, name, self._async(getattr(dist, name)))


def scaling_worker(rank: int, world: int, port: int, layout: dict, args, out_path: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from m2megatron.config import ParallelConfig, load_config
    from m2megatron.parallel import build_groups, initialize, seed_everything
    from m2megatron.parallel.bootstrap import local_rank_env
    from m2megatron.parallel.layout import Layout
    from m2megatron.planning.measure import synthetic_microbatches
    from m2megatron.runtime import ContrastiveStep, build_stages

    initialize(ParallelConfig(timeout_s=600), local_rank_env(rank, world, port=port), megatron_state=False)
    cfg = load_config(overrides=[f"--parallel.tensor_parallel={layout['tp']}",
                                 f"--parallel.pipeline_parallel={layout['pp']}",
                                 f"--train.micro_batch_size={layout['b']}",
                                 f"--train.global_batch_size={args.scaling_batch}", "--model.vocab_size=4096"])
    groups = build_groups(Layout(world_size=world, tensor_parallel=layout["tp"], pipeline_parallel=layout["pp"]))
    seed_everything(0, groups)
    stages = build_stages(cfg, groups)
    chunks, optimizer, step = stages.chunks, stages.optimizer, ContrastiveStep(stages)
    batches = synthetic_microbatches(cfg, cfg.num_microbatches(world))
    timer = CommTimer()
    timer.install()
    times, comm = [], []
    for i in range(args.scaling_steps + 1):
        dist.barrier()
        timer.seconds = 0.0
        start = time.perf_counter()
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        step(batches)
        optimizer.step()
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
            comm.append(timer.seconds)
    result = {"step_s": statistics.median(times), "comm_share": statistics.median(c / t for c, t in zip(comm, times))}
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def run_layout(layout: dict, args) -> list[dict]:
    world = layout["tp"] * layout["pp"]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.json")
        mp.start_processes(scaling_worker, args=(world, port, layout, args, path), nprocs=world, start_method="spawn")
        return json.loads(Path(path).read_text())


def scaling(args) -> list[dict]:
    """TP1 on one process, then TP2 and PP2 on two (the tiny preset, a 4096-piece vocabulary)."""
    layouts = [dict(name="TP1", tp=1, pp=1, b=8), dict(name="TP2", tp=2, pp=1, b=8),
               dict(name="PP2", tp=1, pp=2, b=8)]
    rows = []
    for layout in layouts:
        per_rank = run_layout(layout, args)
        rows.append(dict(layout=layout["name"], ranks=len(per_rank), step_s=max(r["step_s"] for r in per_rank),
                         comm_share=statistics.mean(r["comm_share"] for r in per_rank)))
    base = rows[0]["step_s"]
    for r in rows:
        r["efficiency"] = base / (r["ranks"] * r["step_s"])
    return rows


# --- report -------------------------------------------------------------------------------------------


def print_reference(rows: list[dict], args) -> None:
    print(f"# forward+backward, {args.repeats} alternating repeats × {args.iters} steps; "
          f"ratio = ours / reference in samples/s (median [min–max]); mode = cost of the CPU patches' mode")
    print(f"{'shape':<12} {'prec':<5} {'b':>3} {'ours/s':>8} {'ref/s':>8} {'ratio':>6} {'spread':>13} "
          f"{'mode':>6} {'|Δemb| fp32':>11}")
    for r in rows:
        print(f"{r['shape']:<12} {r['precision']:<5} {r['batch']:>3} {r['ours_samples_s']:8.2f} "
              f"{r['ref_samples_s']:8.2f} {r['ratio']:6.3f} [{r['ratio_min']:.3f}–{r['ratio_max']:.3f}] "
              f"{r['mode_cost']:+6.1%} {r['max_abs_diff']:11.2e}")


def print_attention(rows: list[dict], args) -> None:
    print(f"# core attention fp32 forward+backward, {args.repeats} alternating repeats × {args.iters} steps; "
          f"speedup = t(megatron) / t(sdpa) (median [min–max]); text segments carry a key-padding mask")
    print(f"{'shape':<8} {'what':<6} {'segment':<7} {'b':>3} {'s':>4} {'megatron ms':>11} {'sdpa ms':>8} "
          f"{'speedup':>7} {'spread':>13}")
    for r in rows:
        print(f"{r['shape']:<8} {r['what']:<6} {r['segment']:<7} {r['batch']:>3} {r['tokens']:>4} "
              f"{r['megatron_ms']:11.2f} {r['sdpa_ms']:8.2f} {r['speedup']:7.3f} "
              f"[{r['speedup_min']:.3f}–{r['speedup_max']:.3f}]")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    batches = dict(item.split("=") for item in args.batch.split(","))
    groups = single_process_groups()
    started = time.perf_counter()
    rows = [compare(shape, int(batches[shape]), precision, groups, args)
            for shape in args.shapes.split(",") for precision in args.precisions.split(",")] if args.reference else []
    if rows:
        print_reference(rows, args)
    attn_rows = attention_rows(groups, args) if args.attention else []
    if attn_rows:
        print_attention(attn_rows, args)
    scale_rows = []
    if args.scaling:
        dist.destroy_process_group()
        scale_rows = scaling(args)
        print(f"# scaling: tiny preset, global batch {args.scaling_batch}, microbatch 8, gloo on this machine")
        print(f"{'layout':<6} {'ranks':>5} {'step s':>8} {'efficiency':>10} {'comm share':>10}")
        for r in scale_rows:
            print(f"{r['layout']:<6} {r['ranks']:>5} {r['step_s']:8.3f} {r['efficiency']:10.2f} "
                  f"{r['comm_share']:10.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"throughput": rows, "attention": attn_rows, "scaling": scale_rows},
                                              indent=2))
    print(f"# total {time.perf_counter() - started:.0f} s")
    summary = {f"ratio_{r['shape']}_{r['precision']}": f"{r['ratio']:.3f}" for r in rows}
    summary.update({f"sdpa_speedup_{r['shape']}_{r['what']}_{r['segment']}": f"{r['speedup']:.3f}" for r in attn_rows})
    summary.update({f"eff_{r['layout']}": f"{r['efficiency']:.2f}" for r in scale_rows})
    if rows:
        last = [r for r in rows if r["precision"] == rows[0]["precision"]][-1]
        summary["ratio_vs_reference"] = f"{last['ratio']:.3f}"
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
