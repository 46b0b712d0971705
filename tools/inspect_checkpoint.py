#!/usr/bin/env python
"""Show a checkpoint's step, layout, config, tensor keys and shapes, and files (reads no tensor data).

  python tools/inspect_checkpoint.py runs/a/checkpoints [--all-keys] [--verify] [--json]
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory, or a root with a 'latest' pointer")
    p.add_argument("--all-keys", action="store_true", help="list every tensor, optimizer state and object")
    p.add_argument("--verify", action="store_true", help="check every file's size and CRC-32 (reads all data)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    args = p.parse_args(argv)
    from m2megatron.checkpoint import CheckpointError
    from m2megatron.checkpoint.inspect import describe, format_report

    try:
        desc = describe(args.checkpoint, verify=args.verify)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(desc, indent=1) if args.json else format_report(desc, all_keys=args.all_keys))
    return 1 if desc.get("problems") else 0


if __name__ == "__main__":
    sys.exit(main())
