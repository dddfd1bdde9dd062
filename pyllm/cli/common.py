"""What every command shares: consoles, option types, model loading with feedback, prompt input."""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..errors import PyllmError

# Diagnostics to stderr, the answer to stdout: pipelines stay clean.  soft_wrap: a diagnostic stays one line
# in a log or a pipe (rich would break it at 80 columns when stderr is not a terminal).
err = Console(stderr=True, highlight=False, soft_wrap=True)

ModelArg = Annotated[Optional[str], typer.Argument(help="GGUF file or known model name (default: smollm2-135m)",
                                                   show_default=False)]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads (default: all cores)")]
CtxSize = Annotated[Optional[int], typer.Option("--ctx-size", "-c", help="context size in tokens "
                                                "(default: min(model's, 4096))")]
KvType = Annotated[str, typer.Option("--kv-type", help="KV cache element type: f16 or f32")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="timings, and tracebacks on errors")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda or auto (CUDA when a GPU is usable)")]
ForceCtx = Annotated[bool, typer.Option("--force-ctx", help="use a --ctx-size above the model's training context "
                                        "(otherwise capped to it, with a warning)")]
MaxMemory = Annotated[Optional[str], typer.Option(
    "--max-memory", show_default=False, help="memory the weights and KV cache may take, e.g. 8G (default: what "
    "the machine has available); a request that needs more is refused before anything is allocated")]

# Sampling (run and chat; defaults as llama.cpp's, written at each command's parameter)
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="tokens to generate (-1: until the "
                                        "model stops or the context is full)")]
Temp = Annotated[float, typer.Option("--temp", help="temperature (0: greedy)")]
TopK = Annotated[int, typer.Option("--top-k", help="keep the k most likely tokens (0: all)")]
TopP = Annotated[float, typer.Option("--top-p", help="nucleus sampling mass")]
MinP = Annotated[float, typer.Option("--min-p", help="drop tokens below min-p x the top probability")]
RepeatPenalty = Annotated[float, typer.Option("--repeat-penalty", help="penalise the last 64 tokens (1.0: off)")]
PresencePenalty = Annotated[float, typer.Option("--presence-penalty")]
FrequencyPenalty = Annotated[float, typer.Option("--frequency-penalty")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="random seed: same seed, same text")]


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, option: str) -> int:
    """'2G', '500MB', '1.5g', '4096' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise PyllmError(f"{option}: {text!r} is not a size (e.g. 500M, 2G)")
    return int(float(match[1]) * _UNITS[match[2]])


def warn(message: str) -> None:
    err.print(f"pyllm: warning: {message}", markup=False)


def check_max_tokens(n: int) -> None:
    if n < -1:
        raise PyllmError(f"--max-tokens must be -1 (until the model stops or the context is full) or 0 or more, "
                         f"not {n}")


def set_threads(n: int | None) -> None:
    import numba

    if n is not None:
        if n < 1:
            raise PyllmError(f"--threads must be at least 1, not {n}")
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def kernels_cached() -> bool:
    """Whether numba's on-disk cache already holds compiled kernels (else the first call compiles them)."""
    from .. import kernels

    cache_dir = os.environ.get("NUMBA_CACHE_DIR")
    pkg = Path(kernels.__file__).parent
    places = [Path(cache_dir)] if cache_dir else [pkg / "__pycache__"]
    return any(any(p.rglob("qmatmul*.nbi")) for p in places if p.exists())


def pull_progress():
    """A progress callback for registry.pull drawing a bar on stderr (plain lines when not a TTY)."""
    from rich.progress import BarColumn, Progress, TextColumn

    state = {}

    def report(done, total, what):
        if not err.is_terminal:
            err.print(f"pyllm: {what}", markup=False)
            return
        if "bar" not in state:
            state["bar"] = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                                    "{task.total}"), console=err, transient=True)
            state["bar"].start()
            state["task"] = state["bar"].add_task(what, total=total)
        state["bar"].update(state["task"], completed=done, total=total, description=what)
        if done >= total:
            state["bar"].stop()

    return report


def load_model(model: str | None, verbose: bool = False, device: str = "auto", max_memory: str | None = None):
    """Resolve (pulling a known model if needed), load, and say so on stderr when useful.  --verbose also makes
    a non-finite result name the first layer it appeared in (the step is run again, checked layer by layer)."""
    from .. import registry
    from ..model import Model

    limit = None if max_memory is None else parse_size(max_memory, "--max-memory")
    if limit is not None and limit < 1 << 20:
        raise PyllmError(f"--max-memory {max_memory} is less than 1 MiB: no model fits in it")
    path = registry.resolve(model, progress=pull_progress())
    t0 = time.perf_counter()
    m = Model(path, device=device, warn=warn, diagnose=verbose, max_memory=limit)
    if verbose:
        err.print(f"[dim]loaded {path.name} ({m.config.arch}, {m.config.n_layers} layers) in "
                  f"{time.perf_counter() - t0:.2f} s[/dim]")
    if not kernels_cached():
        err.print("[dim]compiling kernels (first run only)...[/dim]")
    return m


def read_prompt(prompt: str | None, file: Path | None) -> str:
    """-p TEXT, -p - (stdin), -f FILE, or piped stdin."""
    if file is not None:
        try:
            return file.read_text(encoding="utf-8")
        except OSError as e:
            raise PyllmError(f"{file}: cannot read prompt file: {e.strerror}") from None
        except UnicodeDecodeError:
            raise PyllmError(f"{file}: prompt file is not UTF-8 text") from None
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if prompt is None:
        raise PyllmError("no prompt: use -p TEXT, -f FILE, or pipe text on stdin")
    return prompt


def sampler_from_options(temp, top_k, top_p, min_p, repeat_penalty, presence_penalty, frequency_penalty, seed):
    from ..sampling import Sampler

    return Sampler(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                   presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed)
