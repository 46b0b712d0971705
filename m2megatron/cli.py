"""Entry-point helpers: bad settings and bad files end in one line on stderr, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from m2megatron.config.base import ConfigError, InputError

UserError = InputError
"""Bad input from the user (a file, a checkpoint, a flag); printed as one line by `run_main`."""


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`, turning ConfigError/InputError (CheckpointError included) into 'error: …' and exit status 2."""
    try:
        code = main()
    except (ConfigError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
