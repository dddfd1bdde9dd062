"""The `pyllm` command: typer app; each command is options -> library call -> output."""
from __future__ import annotations

import os
import sys

import typer

from ..errors import PyllmError

INTERNAL_ERROR = 70  # EX_SOFTWARE: a bug in pyllm, not a problem with the input (README, "Exit status")

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
        code = app(args=argv, standalone_mode=False, prog_name="pyllm")
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
    except MemoryError as e:  # a buffer nobody sized up front: a bug, but the user needs the way out first
        if verbose:
            raise
        print(f"pyllm: error: out of memory ({e}); lower --ctx-size or --parallel", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # click's usage errors, and anything unexpected
        if callable(getattr(e, "show", None)) and hasattr(e, "exit_code"):  # a click exception: usage message
            _usage_error(e)
        if verbose:
            raise
        print(f"pyllm: internal error: {type(e).__name__}: {e} (run with --verbose for the traceback)",
              file=sys.stderr)
        sys.exit(INTERNAL_ERROR)
    if code:  # without standalone mode, typer returns the code of a typer.Exit (and 130 for Ctrl-C) instead of exiting
        sys.exit(code)


def _usage_error(e) -> None:
    """A command line click could not parse: one line naming the problem and where the help is (exit 2).
    Bare `pyllm` (or a group without its subcommand) still shows the help it asks for."""
    ctx = getattr(e, "ctx", None)
    message = e.format_message() if hasattr(e, "format_message") else str(e)
    if type(e).__name__ == "NoArgsIsHelpError" or "\n" in message.strip():
        e.show()
        sys.exit(e.exit_code)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    print(f"pyllm: error: {message.strip()}{where}", file=sys.stderr)
    sys.exit(e.exit_code)


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
