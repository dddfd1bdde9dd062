"""The `pyllm` command: typer app; each command is options -> library call -> output."""
from __future__ import annotations

import os
import sys

import typer

from ..errors import PyllmError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run GGUF language models locally: run, chat, batch, serve, bench, perplexity, info, pull.")


def _register():
    from . import bench, info, run  # noqa: F401  (each module adds its commands to `app`)

    for optional in ("chat", "batch", "cache", "serve"):
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
        _quiet_exit_on_closed_stdout()
    except SystemExit as e:
        if e.code == 1 and _stdout_closed():  # click turns a broken pipe into exit status 1 before we see it
            _quiet_exit_on_closed_stdout()
        raise
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # click's usage errors, and anything unexpected
        if callable(getattr(e, "show", None)) and hasattr(e, "exit_code"):  # a click exception: usage message
            e.show()
            sys.exit(e.exit_code)
        if verbose:
            raise
        print(f"pyllm: internal error: {type(e).__name__}: {e} (run with --verbose for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    if code:  # without standalone mode, typer returns the code of a typer.Exit (and 130 for Ctrl-C) instead of exiting
        sys.exit(code)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (`| head`), or was already pointed at /dev/null after one
    (rich does that on a broken pipe, then exits 1)."""
    import select

    try:
        here, devnull = os.fstat(sys.stdout.fileno()), os.stat(os.devnull)
        if (here.st_dev, here.st_ino) == (devnull.st_dev, devnull.st_ino):
            return True
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLERR)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):
        return False


def _quiet_exit_on_closed_stdout():
    """The reader went away: not an error.  devnull silences the flush of what is still buffered at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
