"""Entry-point glue of the eval commands: a ValueError (a bad file, flag or setting; ConfigError is one)
ends in one line on stderr and exit status 2, through m2megatron.cli.run_main. The eval library raises
plain ValueError; only this entry-point module knows the CLI's UserError."""

from __future__ import annotations

from collections.abc import Callable


def run(main: Callable[[], int | None]) -> None:
    from m2megatron.cli import UserError, run_main

    def one_line_errors() -> int | None:
        try:
            return main()
        except UserError:
            raise
        except ValueError as exc:
            raise UserError(str(exc)) from None

    run_main(one_line_errors)
