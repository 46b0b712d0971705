"""Import a released M2-Encoder checkpoint into our consolidated single-file format.

    python tools/import_reference.py m2_encoder_0.4B.ckpt runs/m2-0.4b.safetensors [--preset m2-0.4b | --num-heads 12]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2megatron.cli import run_main  # noqa: E402

DESCRIPTION = """\
Import a released M2-Encoder checkpoint into m2megatron's consolidated format.

Input (reference layout, SPEC.md §2): a torch file (.ckpt/.pt/.pth) read with torch.load(weights_only=True)
(a file that needs pickled code is refused), or the .safetensors of a port. The dict may be wrapped in
'state_dict', 'module' or 'model'; the '_forward_module.' prefix is stripped and 'visual_tokenizer*' keys are
dropped, as the reference loader does. Sizes are read from the tensor shapes; the number of attention heads
comes from --num-heads, --preset, or the released preset of the same width (768→12, 1024→16, 4096→32).
Every missing, unexpected or misshaped key is reported in one error.

Output (ours): one .safetensors file holding the full state dict of m2megatron.models.M2Encoder (local-spec
names, e.g. vision_layers.0.self_attention.linear_qkv.weight with q/k/v fused per head in Megatron's layout;
unpadded vocabulary), the reference tensors the model never reads under 'reference_unused.', and the model
config as JSON metadata. Any TP/PP layout loads it (m2megatron.models.load_full_state_dict). The mapping is
in docs/MODEL.md.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="released checkpoint (.ckpt/.pt/.pth/.safetensors)")
    parser.add_argument("dst", help="output consolidated file (.safetensors)")
    heads = parser.add_mutually_exclusive_group()
    heads.add_argument("--preset", help="take the head count from this preset (tiny, m2-0.4b, m2-1b, m2-10b)")
    heads.add_argument("--num-heads", type=int, help="number of attention heads")
    args = parser.parse_args()
    from m2megatron.checkpoint.files import import_reference

    cfg = import_reference(args.src, args.dst, num_heads=args.num_heads, preset=args.preset)
    print(f"imported {args.src} → {args.dst}: D={cfg.hidden_size} L={cfg.num_layers} VL={cfg.num_vl_layers} "
          f"heads={cfg.num_attention_heads} image={cfg.image_size}/{cfg.patch_size} embed={cfg.embed_dim}")
    return 0


if __name__ == "__main__":
    run_main(main)
