"""GPU performance figures for tests/gpu/run.sh (a script, not a test; needs CUDA, ~2-3 minutes on an H200).

    python tests/gpu/perf_table.py [--out perf.json]

- MFU of the m2-1b shape, forward+backward with the contrastive loss, microbatch --batch, one GPU:
  local spec bf16, te spec bf16, te spec FP8 (delayed scaling). MFU = train FLOPs per sample
  (m2megatron.planning.flops) × samples/s over the device's dense peak for that precision.
- DALI `mixed` (nvJPEG) decoding + bicubic squash to 224: images/s on photo-like 500×375 JPEGs.
Prints a table and a last key=value line; writes the rows as JSON with --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

VARIANTS = {"local-bf16": ("local", "none"), "te-bf16": ("te", "none"), "te-fp8": ("te", "delayed")}


def _groups():
    from m2megatron.config import ParallelConfig
    from m2megatron.parallel import initialize, seed_everything

    groups = initialize(ParallelConfig())
    seed_everything(0, groups)
    return groups


def _batch(cfg, b: int):
    gen = torch.Generator().manual_seed(0)
    s = cfg.max_text_len
    mask = (torch.arange(s)[None] < torch.randint(2, s + 1, (b,), generator=gen)[:, None]).long()
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=gen) * mask
    images = torch.rand(b, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
    return images.cuda().bfloat16(), ids.cuda(), mask.cuda()


def mfu_row(groups, variant: str, batch: int, iters: int) -> dict:
    from m2megatron.config import preset
    from m2megatron.models import M2Encoder, init_weights
    from m2megatron.planning.flops import peak_tflops, train_flops_per_sample

    spec, fp8 = VARIANTS[variant]
    cfg = dataclasses.replace(preset("m2-1b"), layer_spec=spec, fp8=fp8)
    model = M2Encoder(cfg, groups, params_dtype=torch.bfloat16).cuda().train()
    init_weights(model, 0)
    images, ids, mask = _batch(cfg, batch)

    def step():
        out = model(images=images, text_ids=ids, text_mask=mask)
        logits = out.logit_scale.exp() * out.image.float() @ out.text.float().t()
        labels = torch.arange(batch, device="cuda")
        ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2).backward()
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    precision = "fp8" if fp8 != "none" else "bf16"
    peak = peak_tflops(torch.cuda.get_device_name(), precision) or float("nan")
    achieved = train_flops_per_sample(cfg) * batch / seconds / 1e12
    model = None  # free it before the next variant
    torch.cuda.empty_cache()
    return dict(variant=variant, batch=batch, step_ms=seconds * 1e3, samples_s=batch / seconds,
                tflops=achieved, mfu=achieved / peak, peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def dali_row(num_images: int, batch: int, rounds: int) -> dict:
    from m2megatron.data.decode import DaliDecoder
    from m2megatron.data.image import FULL_BOX, ImageLimits
    from tools.bench_decode import load_jpegs, make_photo_shards

    with tempfile.TemporaryDirectory() as tmp:
        jpegs = load_jpegs(make_photo_shards(Path(tmp), num_images))
    decoder = DaliDecoder(224, ImageLimits(), 4, gpu=True)
    chunks = [jpegs[i:i + batch] for i in range(0, len(jpegs) - batch + 1, batch)]
    decoder.decode(chunks[0], [FULL_BOX] * batch, [False] * batch)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        for chunk in chunks:
            decoder.decode(chunk, [FULL_BOX] * batch, [False] * batch)
    torch.cuda.synchronize()
    images = rounds * len(chunks) * batch
    return dict(images=images, images_s=images / (time.perf_counter() - start))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("perf_table: CUDA is not available", file=sys.stderr)
        return 1
    groups = _groups()
    rows, summary = [], {}
    for variant in VARIANTS:
        try:
            rows.append(mfu_row(groups, variant, args.batch, args.iters))
        except Exception as exc:  # report and go on: one broken variant must not hide the others
            rows.append(dict(variant=variant, error=f"{type(exc).__name__}: {exc}"))
    print(f"# m2-1b forward+backward, b={args.batch}, {torch.cuda.get_device_name()}")
    print(f"{'variant':<11} {'ms/step':>8} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<11} ERROR {r['error'][:200]}")
            continue
        print(f"{r['variant']:<11} {r['step_ms']:8.1f} {r['samples_s']:10.1f} {r['tflops']:8.1f} {r['mfu']:6.1%} "
              f"{r['peak_gib']:9.1f}")
        summary[f"mfu_{r['variant']}"] = f"{r['mfu']:.3f}"
    try:
        dali = dali_row(512, 64, 3)
        print(f"# DALI mixed decode + resize to 224: {dali['images_s']:.0f} images/s ({dali['images']} images)")
        summary["dali_images_s"] = f"{dali['images_s']:.0f}"
    except Exception as exc:
        dali = dict(error=f"{type(exc).__name__}: {exc}")
        print(f"# DALI mixed: ERROR {dali['error'][:300]}")
    if args.out:
        Path(args.out).write_text(json.dumps({"mfu": rows, "dali": dali}, indent=2))
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
