"""pyllm against llama.cpp on the same GGUF files, side by side in one run (a benchmark, never a test).

llama.cpp comes from the llama-cpp-python package, installed only for benchmarking; on CPUs that list AMX
but cannot run it, build it with the CMAKE_ARGS in the README's benchmark section.  Runs of the two engines
alternate, so a noisy neighbour slows both alike, and the table reports ratios.

    python bench/compare_llama_cpp.py smollm2-135m gemma3-270m qwen2.5-coder-0.5b -p 512 -n 64 -r 3 -t 2

--batch 8 adds a batched-decoding row per model ("tg64x8"): 8 sequences of a 32-token prompt each decoded
together, one step = one token of each (pyllm: Model.decode over 8 cache slots; llama.cpp: one llama_batch
with 8 sequence ids), aggregate tokens/s; the "batch gain" column is that over the same engine's tg64.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import numpy as np



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


class LlamaCppBatch:
    """llama.cpp's low-level API: n sequences in one context, one llama_batch per step (llama.cpp's parallel
    slots, as `llama-batched` runs them)."""

    def __init__(self, path: str, n_seq: int, n_ctx_seq: int, threads: int):
        import llama_cpp as lc

        self.lc, self.n_seq = lc, n_seq
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_seq_max = n_seq * n_ctx_seq, n_seq * n_ctx_seq, n_seq
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, params)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(n_seq * n_ctx_seq, 0, n_seq)

    def _decode(self, entries):
        """entries: (token, pos, seq, wants logits) -> greedy next token of each entry that wants logits."""
        b, lc = self.batch, self.lc
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, pos, 1, seq, logits
        b.n_tokens = len(entries)
        if lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(np.argmax(np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, i), (self.n_vocab,))))
                for i, e in enumerate(entries) if e[3]]

    def run(self, prompts: list[list[int]], n_gen: int) -> float:
        """Prefill every prompt, then n_gen greedy steps of all sequences; aggregate decode tokens/s."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        nxt = self._decode([(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)])
        t0 = time.perf_counter()
        for step in range(n_gen):
            nxt = self._decode([(t, len(p) + step, s, True) for s, (p, t) in enumerate(zip(prompts, nxt))])
        return len(prompts) * n_gen / (time.perf_counter() - t0)


def time_pyllm_batch(model, prompts: list[list[int]], n_gen: int) -> float:
    cache = model.new_cache(max(map(len, prompts)) + n_gen + 1, n_slots=len(prompts))
    nxt = [int(np.argmax(model.eval(cache, p, slot=s))) for s, p in enumerate(prompts)]
    slots = list(range(len(prompts)))
    t0 = time.perf_counter()
    for _ in range(n_gen):
        nxt = [int(t) for t in np.argmax(model.decode(cache, slots, nxt), axis=1)]
    return len(prompts) * n_gen / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0, help="also decode this many sequences together")
    args = ap.parse_args()

    import numba
    from llama_cpp import Llama

    import pyllm
    from pyllm import registry
    from pyllm.cli.bench import read_bandwidth, weight_bytes_per_token

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
        if args.batch:
            tg_ours, tg_theirs = rows[-1][2], rows[-1][3]
            prompts = [rng.integers(100, model.config.n_vocab - 100, size=32).tolist() for _ in range(args.batch)]
            llb = LlamaCppBatch(path, args.batch, 32 + args.n_gen + 1, args.threads)
            llb.run(prompts, 4)
            time_pyllm_batch(model, prompts, 4)
            ours, theirs = [], []
            for _ in range(args.reps):
                theirs.append(llb.run(prompts, args.n_gen))
                ours.append(time_pyllm_batch(model, prompts, args.n_gen))
            o, t = statistics.median(ours), statistics.median(theirs)
            rows.append((name, f"tg{args.n_gen}x{args.batch}", o, t, o / t, None, o / tg_ours, t / tg_theirs))
            print(f"{name} tg{args.n_gen}x{args.batch}: pyllm {o:.1f} tok/s ({o / tg_ours:.2f}x its tg), llama.cpp "
                  f"{t:.1f} tok/s ({t / tg_theirs:.2f}x its tg)", flush=True)

    print(f"\n{date.today()}, {platform.machine()}, {args.threads} threads, median of {args.reps}, memory read "
          f"{bandwidth / 1e9:.1f} GB/s\n")
    print("| model | test | pyllm tok/s | llama.cpp tok/s | ratio | of bandwidth limit | batch gain pyllm / llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    for name, test, o, t, ratio, frac, *gain in rows:
        gains = f"{gain[0]:.2f}x / {gain[1]:.2f}x" if gain else ""
        print(f"| {name} | {test} | {o:.1f} | {t:.1f} | {ratio:.2f}x | {'' if frac is None else f'{frac:.0%}'} | {gains} |")


if __name__ == "__main__":
    main()
