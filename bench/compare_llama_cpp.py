"""pyllm against llama.cpp on the same GGUF files, side by side in one run (a benchmark, never a test).

llama.cpp comes from the llama-cpp-python package, installed only for benchmarking; on CPUs that list AMX
but cannot run it, build it with the CMAKE_ARGS in the README's benchmark section.  Runs of the two engines
alternate, so a noisy neighbour slows both alike, and the table reports ratios.

    python bench/compare_llama_cpp.py smollm2-135m gemma3-270m qwen2.5-coder-0.5b -p 512 -n 64 -r 3 -t 2
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import numpy as np



def read_bandwidth() -> float:
    """Bytes/s this machine streams from memory with the benchmark's threads (best of 5 passes over 1 GB):
    generation reads every weight once per token, so this bounds its tokens/s."""
    from numba import njit, prange

    @njit(parallel=True)
    def checksum(a):
        total = 0
        for i in prange(a.size):
            total += a[i]
        return total

    data = np.ones(1 << 27, dtype=np.int64)  # 1 GiB, far larger than any cache
    checksum(data)
    best = min(_timed(checksum, data) for _ in range(5))
    return data.nbytes / best


def _timed(f, *args) -> float:
    t0 = time.perf_counter()
    f(*args)
    return time.perf_counter() - t0


def weight_bytes_per_token(model) -> int:
    """Bytes a decode step reads: every matrix once (the output matrix too), the embedding only one row."""
    tr = model.transformer
    total = tr.output.data.nbytes
    for layer in tr.layers:
        total += sum(w.data.nbytes for w in layer.values() if hasattr(w, "qtype"))
    return total


def time_pyllm(model, kind: str, tokens: list[int]) -> float:
    cache = model.new_cache(len(tokens) + 8)
    t0 = time.perf_counter()
    if kind == "pp":
        model.eval(cache, tokens)
    else:
        for t in tokens:
            model.decode(cache, [0], [t])
    return len(tokens) / (time.perf_counter() - t0)


def time_llama_cpp(llm, kind: str, tokens: list[int]) -> float:
    llm.reset()
    t0 = time.perf_counter()
    if kind == "pp":
        llm.eval(tokens)
    else:
        for t in tokens:
            llm.eval([t])
    return len(tokens) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()

    import numba
    from llama_cpp import Llama

    import pyllm
    from pyllm import registry

    numba.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s with {args.threads} threads", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for name in args.models:
        path = str(registry.resolve(name))
        model = pyllm.load(path, device="cpu")
        llm = Llama(model_path=path, n_ctx=args.n_prompt + 16, n_batch=args.n_prompt, n_threads=args.threads,
                    n_threads_batch=args.threads, verbose=False)
        limit = bandwidth / weight_bytes_per_token(model)
        for kind, n in (("pp", args.n_prompt), ("tg", args.n_gen)):
            tokens = rng.integers(100, model.config.n_vocab - 100, size=n).tolist()
            time_pyllm(model, kind, tokens[:16])  # warm-up: kernels loaded, pages touched
            time_llama_cpp(llm, kind, tokens[:16])
            ours, theirs = [], []
            for _ in range(args.reps):
                theirs.append(time_llama_cpp(llm, kind, tokens))
                ours.append(time_pyllm(model, kind, tokens))
            o, t = statistics.median(ours), statistics.median(theirs)
            rows.append((name, f"{kind}{n}", o, t, o / t, o / limit if kind == "tg" else None))
            print(f"{name} {kind}{n}: pyllm {o:.1f} tok/s, llama.cpp {t:.1f} tok/s, ratio {o / t:.2f}", flush=True)
        del llm

    print(f"\n{date.today()}, {platform.machine()}, {args.threads} threads, median of {args.reps}, memory read "
          f"{bandwidth / 1e9:.1f} GB/s\n")
    print("| model | test | pyllm tok/s | llama.cpp tok/s | ratio | of bandwidth limit |")
    print("|---|---|---|---|---|---|")
    for name, test, o, t, ratio, frac in rows:
        print(f"| {name} | {test} | {o:.1f} | {t:.1f} | {ratio:.2f}x | {'' if frac is None else f'{frac:.0%}'} |")


if __name__ == "__main__":
    main()
