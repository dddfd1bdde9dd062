"""What every command shares: consoles, option types, model loading with feedback, prompt input."""
from __future__ import annotations

import os
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
        state["bar"].update(state["task"], completed=done, description=what)
        if done >= total:
            state["bar"].stop()

    return report


def load_model(model: str | None, verbose: bool = False, device: str = "auto"):
    """Resolve (pulling a known model if needed), load, and say so on stderr when useful."""
    from .. import registry
    from ..model import Model

    path = registry.resolve(model, progress=pull_progress())
    t0 = time.perf_counter()
    m = Model(path, device=device)
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
