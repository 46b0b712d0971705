"""GPU check of the `te` layer spec against the `local` spec (run on a lent GPU; ~1 minute).

    python tests/gpu/te_check.py [--out te_check.json]

Same weights (by-name init, loaded through the full state dict) in four models: local fp32 (the reference),
local bf16, te bf16, te FP8 with delayed scaling and with current scaling. Each encodes the same images and
padded texts; the script reports max |Δ| and the minimum cosine of the L2-normalized embeddings against
local fp32, checks that a backward pass gives finite gradients for every parameter, and exits 1 if a bound
fails. tests/gpu/test_te_spec.py runs the same checks under pytest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from m2megatron.config import ModelConfig  # noqa: E402

# Dimensions FP8 GEMMs accept (tokens·batch divisible by 8/16, widths by 16): 17 image tokens × 16, 32 × 16 text.
CFG = ModelConfig(preset="te-check", hidden_size=256, num_layers=2, num_vl_layers=1, num_attention_heads=4,
                  ffn_hidden_size=1024, image_size=64, patch_size=16, max_text_len=32, embed_dim=128)
BATCH = 16
# (max |Δ| bound, min cosine bound) against local fp32, per variant.
BOUNDS = {"local-bf16": (0.05, 0.995), "te-bf16": (0.05, 0.995), "te-fp8-delayed": (0.15, 0.97),
          "te-fp8-current": (0.15, 0.97)}
VARIANTS = {"local-bf16": ("local", "none", torch.bfloat16), "te-bf16": ("te", "none", torch.bfloat16),
            "te-fp8-delayed": ("te", "delayed", torch.bfloat16), "te-fp8-current": ("te", "current", torch.bfloat16)}


def _groups():
    from m2megatron.config import ParallelConfig
    from m2megatron.parallel import initialize, seed_everything

    groups = initialize(ParallelConfig())
    seed_everything(0, groups)
    return groups


def _inputs():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(BATCH, 3, CFG.image_size, CFG.image_size, generator=gen) * 2 - 1
    ids = torch.randint(0, CFG.vocab_size, (BATCH, CFG.max_text_len), generator=gen)
    lengths = torch.randint(1, CFG.max_text_len + 1, (BATCH,), generator=gen)
    mask = (torch.arange(CFG.max_text_len)[None] < lengths[:, None]).long()
    return images.cuda(), ids.cuda(), mask.cuda()


def _model(groups, spec: str, fp8: str, dtype: torch.dtype, full=None):
    from m2megatron.models import M2Encoder, init_weights, load_full_state_dict

    cfg = dataclasses.replace(CFG, layer_spec=spec, fp8=fp8)
    model = M2Encoder(cfg, groups, params_dtype=dtype).cuda()
    if full is None:
        init_weights(model, 5)
    else:
        load_full_state_dict(model, full)
    return model


def _compare(ref, got) -> dict:
    out = {}
    for name in ("image", "text"):
        a, b = getattr(ref, name).float(), getattr(got, name).float()
        out[f"{name}_max_abs"] = (a - b).abs().max().item()
        out[f"{name}_min_cos"] = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
    return out


def _backward_ok(model, images, ids, mask) -> bool:
    out = model(images=images, text_ids=ids, text_mask=mask)
    logits = (out.image.float() @ out.text.float().t()) * out.logit_scale.exp()
    labels = torch.arange(logits.shape[0], device=logits.device)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    return all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def run_checks() -> dict:
    from m2megatron.models import full_state_dict

    groups = _groups()
    images, ids, mask = _inputs()
    reference = _model(groups, "local", "none", torch.float32)
    full = full_state_dict(reference)
    with torch.no_grad():
        ref_out = reference.eval()(images=images, text_ids=ids, text_mask=mask)
    report = {}
    for name, (spec, fp8, dtype) in VARIANTS.items():
        model = _model(groups, spec, fp8, dtype, full)
        with torch.no_grad():
            got = model.eval()(images=images, text_ids=ids, text_mask=mask)
        row = _compare(ref_out, got)
        row["backward_finite"] = _backward_ok(model.train(), images, ids, mask)
        max_abs, min_cos = BOUNDS[name]
        row["ok"] = (row["backward_finite"] and max(row["image_max_abs"], row["text_max_abs"]) <= max_abs
                     and min(row["image_min_cos"], row["text_min_cos"]) >= min_cos)
        report[name] = row
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("te_check: CUDA is not available", file=sys.stderr)
        return 2
    report = run_checks()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(row["ok"] for row in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
