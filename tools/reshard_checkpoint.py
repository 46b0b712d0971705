#!/usr/bin/env python
"""Reshard a checkpoint offline: the same tool as `python -m m2megatron.checkpoint.reshard` (its --help).

  python tools/reshard_checkpoint.py runs/a/checkpoints runs/b/checkpoints --world-size 4 --tp 2 --pp 2
"""

import sys


def main(argv=None) -> int:
    from m2megatron.checkpoint.reshard.__main__ import main as reshard_main

    return reshard_main(argv)


if __name__ == "__main__":
    from m2megatron.cli import run_main

    run_main(lambda: main(sys.argv[1:]))
