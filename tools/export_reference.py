"""Export our consolidated file back to the released M2-Encoder checkpoint layout.

    python tools/export_reference.py runs/m2-0.4b.safetensors m2_encoder_0.4B.ckpt [--wrap none]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2megatron.cli import run_main  # noqa: E402

DESCRIPTION = """\
Export an m2megatron consolidated .safetensors file (see tools/import_reference.py) to the released
M2-Encoder layout (SPEC.md §2.1), written with torch.save as a dict of plain tensors in the reference's
registration order, so `VLMo.load_state_dict(strict=True)` (or the torchscale 0.3.0 build) accepts it.

Vision tower → backbone branch A, text tower → branch B, VL block → backbone_vl branch A; the fused QKV is
split back into q/k/v. Branch B of backbone_vl (never read by the reference) is written as a copy of branch A.
The other keys the model never reads (logit_vl_scale, mask_token, norm, pooler, itc_text_proj, itc_image_proj)
are written back from the values kept at import; for a model trained by m2megatron they are: logit_vl_scale =
logit_scale, mask_token = 0, norm = (1, 0), pooler = (identity, 0), itc_{text,image}_proj = copies of the
itc_vl_{text,image}_proj heads. Exported then re-imported, every used tensor is bit-identical.

--wrap none writes the flat state dict (what the reference loader uses as is); state_dict / module / model
nest it under that key (module also adds the '_forward_module.' prefix).
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="our consolidated file (.safetensors)")
    parser.add_argument("dst", help="output reference checkpoint (.ckpt)")
    parser.add_argument("--wrap", default="none", help="none (default), state_dict, module or model")
    args = parser.parse_args()
    from m2megatron.checkpoint.files import export_reference

    cfg = export_reference(args.src, args.dst, wrap=args.wrap)
    print(f"exported {args.src} → {args.dst} ({cfg.num_layers}+{cfg.num_vl_layers} layers, D={cfg.hidden_size})")
    return 0


if __name__ == "__main__":
    run_main(main)
