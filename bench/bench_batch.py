"""Continuous batching: aggregate generation speed with --parallel N against --parallel 1, in one run.

    python bench/bench_batch.py smollm2-135m --prompts 64 -n 64 --parallel 1,8 -r 2 -t 2

Prompts are ~30 tokens of distinct raw text, greedy, 64 new tokens each (issue 7's measurement). The settings
alternate (1, 8, 1, 8, ...) so a noisy neighbour slows both alike; each prints the aggregate decode speed as
the `pyllm batch` summary does (tokens from decode steps / time in decode steps), the time in prefills (prompts
that join together share one pass), the wall time, and whether every greedy output equals the --parallel 1
output.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

SUBJECTS = ["The history of the Roman Empire", "A recipe for chocolate cake", "How a steam engine works",
            "The life cycle of a butterfly", "Why the ocean is salty", "The rules of chess",
            "A journey across the Sahara", "The invention of the printing press"]
VERBS = ["can be explained in simple terms as follows", "is a topic that many students find interesting because",
         "has fascinated scientists and writers for centuries, and", "was described in an old book that said"]


def prompt_texts(n: int) -> list[str]:
    return [f"Story {i}: {SUBJECTS[i % 8]} {VERBS[(i // 8) % 4]} it begins on a quiet morning in the small town "
            f"where everyone knew each other" for i in range(n)]


def run(model, prompts: list[list[int]], n_parallel: int, max_tokens: int):
    from pyllm.batch import ContinuousBatch, Request
    from pyllm.sampling import Sampler

    engine = ContinuousBatch(model, n_parallel, n_ctx=256)
    it = iter(Request(p, max_tokens, Sampler(temperature=0.0), id=i) for i, p in enumerate(prompts))
    t0 = time.perf_counter()
    results = {r.id: r.tokens for r in engine.run(lambda block: next(it, None))}
    wall = time.perf_counter() - t0
    return engine.n_decoded / engine.decode_s, engine.prefill_s, wall, [results[i] for i in range(len(prompts))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("-n", "--max-tokens", type=int, default=64)
    ap.add_argument("--parallel", default="1,8", help="comma-separated settings; the first is the baseline")
    ap.add_argument("-r", "--repeats", type=int, default=1)
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args()

    import pyllm
    from pyllm.cli.common import set_threads
    from pyllm.registry import resolve

    set_threads(args.threads)
    model = pyllm.load(resolve(args.model))
    prompts = [model.tokenize(t) for t in prompt_texts(args.prompts)]
    settings = [int(p) for p in args.parallel.split(",")]
    print(f"{args.model}: {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.max_tokens} new tokens each, greedy", file=sys.stderr)
    run(model, prompts[:2], max(settings), 4)  # kernels loaded, caches warm
    speeds: dict[int, list[float]] = {p: [] for p in settings}
    walls: dict[int, list[float]] = {p: [] for p in settings}
    prefills: dict[int, list[float]] = {p: [] for p in settings}
    outputs: dict[int, list] = {}
    for rep in range(args.repeats):
        for p in settings:
            tps, prefill_s, wall, out = run(model, prompts, p, args.max_tokens)
            speeds[p].append(tps)
            walls[p].append(wall)
            prefills[p].append(prefill_s)
            outputs.setdefault(p, out)
            same = "identical" if out == outputs[settings[0]] else "DIFFERENT"
            print(f"  run {rep + 1} --parallel {p}: decode {tps:.1f} tok/s aggregate, prefill {prefill_s:.1f} s, "
                  f"wall {wall:.1f} s, "
                  f"outputs {same} to --parallel {settings[0]}", file=sys.stderr)
    base = statistics.median(speeds[settings[0]])
    print("| --parallel | decode tok/s (median) | vs --parallel %d | prefill s | wall s | greedy outputs |"
          % settings[0])
    print("|---|---|---|---|---|---|")
    for p in settings:
        tps = statistics.median(speeds[p])
        same = sum(a == b for a, b in zip(outputs[p], outputs[settings[0]]))
        print(f"| {p} | {tps:.1f} | {tps / base:.2f}x | {statistics.median(prefills[p]):.1f} | "
              f"{statistics.median(walls[p]):.1f} | "
              f"{same}/{len(prompts)} identical |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
