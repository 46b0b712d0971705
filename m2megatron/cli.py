"""Entry-point helpers: bad settings and bad files end in one line on stderr, not a traceback, under any launcher.

- A ConfigError/InputError is printed as `error: …` and the process exits with status 2. Under torchrun or
  srun every rank runs the same checks before its process group starts, so only rank 0 prints the error
  found there; one found later is printed by the rank that found it.
- A rank that stops because a peer died (its collective lost the connection) prints nothing: the peer's
  line is the news. It exits with status 1.
- Under torchrun the printing rank also writes the line into its TORCHELASTIC_ERROR_FILE, so that torchrun's
  closing summary names it as the root cause instead of a pointer to the elastic docs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

from m2megatron.config.base import ConfigError, InputError

UserError = InputError
"""Bad input from the user (a file, a checkpoint, a flag); printed as one line by `run_main`."""

_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
"""What gloo says in a rank whose peer process died."""
_HEAD_START_S = 5


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`, turning ConfigError/InputError (CheckpointError included) into 'error: …' and exit status 2."""
    try:
        code = main()
    except (ConfigError, InputError) as exc:
        _stop(f"error: {exc}", status=2)
    except Exception as exc:  # noqa: BLE001 - a rank whose peer died: the peer tells why
        if not _joined() or not any(s in str(exc) for s in _PEER_LOST):
            raise
        _stop(f"rank {_rank()}: stopped: another rank failed ({type(exc).__name__})", status=1, quiet=True)
    sys.exit(code or 0)


def _rank() -> int:
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def _joined() -> bool:
    """Whether this process started a process group (the entry point may have shut it down already)."""
    bootstrap = sys.modules.get("m2megatron.parallel.bootstrap")
    return bool(bootstrap is not None and bootstrap.joined())


def _stop(line: str, *, status: int, quiet: bool = False) -> None:
    """Print `line` once, record it for torchrun, exit. After the process group started, the rank that found
    the error prints it; before, every rank found it, and rank 0 prints it."""
    running = _joined()
    if quiet:
        _record_for_torchrun(line, delay_s=1)  # after the root cause in torchrun's summary
    elif running or _rank() == 0:
        print(line, file=sys.stderr, flush=True)
        _record_for_torchrun(line, delay_s=0)
    else:
        # Rank 0 reports the same error: let it fail first, so that torchrun names it as the root cause (the
        # launcher stops this rank as soon as rank 0 exits).
        time.sleep(_HEAD_START_S)
    if running and ("RANK" in os.environ or "SLURM_PROCID" in os.environ):
        # A launched rank: peers may block in a collective, and threads (gloo, loaders) in interpreter
        # shutdown; leave now. (Not in a plain process, e.g. a test calling an entry point in-process.)
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)


def _record_for_torchrun(line: str, *, delay_s: int) -> None:
    """torchrun's summary shows the error file's `py_callstack` as the failure's traceback, and picks the
    earliest timestamp as the root cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    stamp = str(int(time.time()) + delay_s)
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": stamp}}}, f)
    except OSError:
        pass
