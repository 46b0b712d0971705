#!/usr/bin/env python
"""Consolidate a distributed checkpoint into one safetensors file plus config.json (one process, no GPU).

Full tensors are assembled from every rank's slices a batch at a time and streamed into
OUT/model.safetensors, so memory stays near --batch-mib (at least the largest tensor). Load the result
back at any layout with m2megatron.checkpoint.consolidate.load_consolidated.

  python tools/consolidate_checkpoint.py runs/a/checkpoints out/ [--include-optimizer]
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory, or a root with a 'latest' pointer")
    p.add_argument("out", help="output directory (model.safetensors, config.json)")
    p.add_argument("--include-optimizer", action="store_true",
                   help="also write the (plain) optimizer's state tensors, under their 'optimizer.' keys")
    p.add_argument("--batch-mib", type=int, default=512, help="read about this much at a time (default 512)")
    args = p.parse_args(argv)
    from m2megatron.checkpoint import CheckpointError
    from m2megatron.checkpoint.consolidate import consolidate

    try:
        out = consolidate(args.checkpoint, args.out, include_optimizer=args.include_optimizer,
                          batch_bytes=args.batch_mib << 20, progress=lambda msg: print(msg, flush=True))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {out.parent / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
