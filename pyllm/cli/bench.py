"""`pyllm bench` (prompt processing and generation speed, like llama-bench) and `pyllm perplexity`."""
from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from ..errors import ContextError, PyllmError
from ..kv_cache import kv_dtype
from . import app
from .common import (CtxSize, Device, ForceCtx, KvType, MaxMemory, ModelArg, Threads, Verbose, err, load_model,
                     set_threads)


def _sizes(text: str, option: str) -> list[int]:
    """Comma-separated token counts; 0 skips that kind of test (as llama-bench)."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise PyllmError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if any(n < 0 for n in sizes):
        raise PyllmError(f"{option}: token counts must be 0 (skip) or more, got {text!r}")
    return [n for n in sizes if n > 0]


def read_bandwidth() -> float:
    """Bytes/s this machine streams from memory with numba's threads (best of 5 passes over 1 GiB, far more
    than any cache): generation reads every weight once per token, so this bounds its tokens/s."""
    from numba import njit, prange

    @njit(parallel=True)
    def checksum(a):
        total = 0
        for i in prange(a.size):
            total += a[i]
        return total

    data = np.ones(1 << 27, dtype=np.int64)
    checksum(data)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        checksum(data)
        best = min(best, time.perf_counter() - t0)
    return data.nbytes / best


def weight_bytes_per_token(m) -> int:
    """Bytes of weights a decoding step reads: every matrix once (the output matrix too), one embedding row."""
    tr = m.transformer
    total = tr.output.data.nbytes
    for layer in tr.layers:
        total += sum(w.data.nbytes for w in layer.values() if hasattr(w, "qtype"))
    return total


def bench_model(m, pp: list[int], tg: list[int], reps: int, kv_type: str) -> list[dict]:
    """Median and spread of tokens/s for each test, llama-bench style: ppN evaluates N prompt tokens in a fresh
    context; tgN generates N tokens one at a time from an empty context."""
    rng = np.random.default_rng(0)
    results = []
    tests = [("pp", n) for n in pp] + [("tg", n) for n in tg]
    for kind, n in tests:
        speeds = []
        for rep in range(reps + 1):  # the first repetition warms up (kernels loaded, pages touched)
            cache = m.new_cache(max(n + 1, 16), kv_type=kv_type)
            ids = rng.integers(0, m.config.n_vocab, size=n).tolist()
            if kind == "pp":
                t0 = time.perf_counter()
                m.eval(cache, ids)
            else:
                t0 = time.perf_counter()
                for t in ids:
                    m.decode(cache, [0], [t])
            dt = time.perf_counter() - t0
            if rep:
                speeds.append(n / dt)
        results.append({"test": f"{kind}{n}", "tokens_per_s": statistics.median(speeds),
                        "stdev": statistics.stdev(speeds) if len(speeds) > 1 else 0.0, "reps": reps})
    return results


@app.command()
def bench(
    model: ModelArg = None,
    n_prompt: Annotated[str, typer.Option("--n-prompt", "-p", help="prompt sizes, comma-separated")] = "512",
    n_gen: Annotated[str, typer.Option("--n-gen", "-n", help="generation lengths, comma-separated")] = "64",
    reps: Annotated[int, typer.Option("--repetitions", "-r", help="repetitions of each test")] = 3,
    output: Annotated[str, typer.Option("--output", "-o", help="md or json")] = "md",
    kv_type: KvType = "f16",
    threads: Threads = None,
    device: Device = "auto",
):
    """Measure prompt processing (pp) and generation (tg) tokens/s, load time, time to first token, peak RSS."""
    import numba

    set_threads(threads)
    pp, tg = _sizes(n_prompt, "--n-prompt"), _sizes(n_gen, "--n-gen")
    if not pp and not tg:
        raise PyllmError("nothing to measure: --n-prompt and --n-gen are both 0")
    if reps < 1:
        raise PyllmError(f"--repetitions must be at least 1, not {reps}")
    if output not in ("md", "json"):
        raise PyllmError(f"--output must be md or json, not {output!r}")
    kv_dtype(kv_type)
    t0 = time.perf_counter()
    m = load_model(model, False, device)
    longest = max(pp + tg) + 1
    if longest > m.config.ctx_train:  # tests run in one context: more tokens than the model was trained on
        raise ContextError(f"a test of {longest - 1} tokens does not fit in the model's context of "
                           f"{m.config.ctx_train} tokens")
    load_s = time.perf_counter() - t0
    # time to first token for a short prompt, kernels cold in this process (warm numba cache on disk)
    t0 = time.perf_counter()
    cache = m.new_cache(64, kv_type=kv_type)
    m.eval(cache, m.tokenize("Hello, my name is", add_special=True))
    ttft = time.perf_counter() - t0
    results = bench_model(m, pp, tg, reps, kv_type)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bandwidth = read_bandwidth() if any(r["test"].startswith("tg") for r in results) else None
    per_token = weight_bytes_per_token(m)
    for r in results:
        if r["test"].startswith("tg"):  # how close generation comes to streaming the weights at memory speed
            r["weights_gb_s"] = round(r["tokens_per_s"] * per_token / 1e9, 2)
    info = {"model": Path(m.path).name, "arch": m.config.arch, "size_mb": round(m.gguf.file_size / 2**20, 1),
            "threads": numba.get_num_threads(), "kv_type": kv_type, "load_s": round(load_s, 3),
            "first_token_s": round(ttft, 3), "peak_rss_mb": round(rss_mb, 1),
            "weight_bytes_per_token": per_token,
            "read_bandwidth_gb_s": None if bandwidth is None else round(bandwidth / 1e9, 2), "results": results}
    if output == "json":
        print(json.dumps(info, indent=2))
        return
    print("| model | size | threads | test | t/s | weights GB/s |\n|---|---|---|---|---|---|")
    for r in results:
        gbs = f"{r['weights_gb_s']:.1f}" if "weights_gb_s" in r else ""
        print(f"| {info['model']} | {info['size_mb']} MiB | {info['threads']} | {r['test']} | "
              f"{r['tokens_per_s']:.2f} ± {r['stdev']:.2f} | {gbs} |")
    if bandwidth is not None:
        print(f"\nweights read per generated token {per_token / 1e6:.0f} MB; this machine streams "
              f"{bandwidth / 1e9:.1f} GB/s from memory with {info['threads']} threads")
    print(f"\nload {load_s:.2f} s, first token {ttft:.2f} s (short prompt, kernels loaded from cache), "
          f"peak RSS {rss_mb:.0f} MB")


@app.command()
def perplexity(
    model: ModelArg = None,
    file: Annotated[Path, typer.Option("--file", "-f", help="text file to score")] = ...,
    ctx_size: CtxSize = 512,
    chunks: Annotated[Optional[int], typer.Option("--chunks", help="score at most this many chunks")] = None,
    force_ctx: ForceCtx = False,
    max_memory: MaxMemory = None,
    threads: Threads = None,
    device: Device = "auto",
    verbose: Verbose = False,
):
    """Perplexity of a text, computed as llama.cpp's llama-perplexity does (second half of each chunk)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from ..perplexity import perplexity as compute

    set_threads(threads)
    if ctx_size is None or ctx_size < 4:  # half of each chunk is scored: fewer than 4 tokens leaves one or none
        raise PyllmError(f"--ctx-size must be at least 4 for perplexity, not {ctx_size}")
    if chunks is not None and chunks < 1:
        raise PyllmError(f"--chunks must be at least 1 (leave it out to score every chunk), not {chunks}")
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise PyllmError(f"{file}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise PyllmError(f"{file}: not UTF-8 text") from None
    m = load_model(model, verbose, device, max_memory)
    ctx_size = m.context_size(ctx_size, force_ctx)
    with Progress(TextColumn("perplexity"), BarColumn(), TextColumn("{task.completed}/{task.total} chunks"),
                  TextColumn("{task.fields[ppl]}"), TimeRemainingColumn(), console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        task = bar.add_task("ppl", total=None, ppl="")

        def progress(done, total, ppl):
            bar.update(task, completed=done, total=total, ppl=f"ppl {ppl:.4f}")

        ppl, n = compute(m, text, ctx_size, chunks, progress)
    print(f"perplexity: {ppl:.4f} ({n} tokens scored, ctx {ctx_size})")
