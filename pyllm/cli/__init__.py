"""The `pyllm` command: typer app; each command is options -> library call -> output."""
from __future__ import annotations

import os
import sys

import typer

from ..errors import PyllmError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run GGUF language models locally: run, chat, batch, bench, perplexity, info, pull.")


def _register():
    from . import bench, info, run  # noqa: F401  (each module adds its commands to `app`)

    for optional in ("chat", "batch", "cache"):
        try:
            __import__(f"{__name__}.{optional}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{optional}":
                raise


def main(argv: list[str] | None = None) -> None:
    """Entry point: PyllmError -> one line on stderr and its exit code; a closed stdout ends quietly."""
    verbose = any(a in ("-v", "--verbose") for a in (argv if argv is not None else sys.argv[1:]))
    _register()
    try:
        code = app(args=argv, standalone_mode=False)
    except PyllmError as e:
        if verbose:
            raise
        print(f"pyllm: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except BrokenPipeError:
        # the reader went away (`| head`): not an error; silence the flush at exit too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # click's usage errors, and anything unexpected
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if verbose:
            raise
        print(f"pyllm: internal error: {type(e).__name__}: {e} (run with --verbose for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    if code:  # without standalone mode, typer returns the code of a typer.Exit (and 130 for Ctrl-C) instead of exiting
        sys.exit(code)
