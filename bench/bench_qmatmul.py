"""Micro-benchmark of the quantized matrix kernels on the shapes of the real models.

    /work/venv/bin/python bench/bench_qmatmul.py [--threads 2] [--types Q4_1,Q8_0] [--quick]

Decode (T=1, and T=8 on the int8 path: a batched decode step) cycles through enough copies of each matrix to overflow the 32 MB L3, so GB/s is DRAM streaming as
in a real forward pass ("hot" repeats one copy: the compute ceiling). A plain byte-summing pass over the same
memory, in 2 MB calls, gives the machine's read bandwidth right now. The machine is shared and noisy: every
call is timed on its own; "med" is the median, the other columns the best call (what the kernel can do when
no other process steals a core mid-call). Compare figures within one run. "T=8/T=1" is the time of a batched
decode step relative to a lone one (median, best). Prefill prints GFLOP/s
(2*T*n_out*n_in per call).
"""

from __future__ import annotations

import argparse
import time

import gguf
import numba
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from pyllm.kernels import qmatmul
from pyllm.quants import QTensor

# (model, tensor, qtype, n_out, n_in)
SHAPES = [
    ("SmolLM2", "ffn_up/gate", Q.Q4_1, 1536, 576),
    ("SmolLM2", "ffn_down", Q.Q4_1, 576, 1536),
    ("SmolLM2", "attn_q/out", Q.Q4_1, 576, 576),
    ("SmolLM2", "output (tied)", Q.Q8_0, 49152, 576),
    ("qwen2.5", "ffn_up/gate", Q.Q5_0, 4864, 896),
    ("qwen2.5", "attn_q/out", Q.Q5_0, 896, 896),
    ("qwen2.5", "ffn_down", Q.Q6_K, 896, 4864),
    ("qwen2.5", "ffn_down", Q.Q4_K, 896, 4864),
    ("qwen2.5", "output", Q.Q8_0, 151936, 896),
    ("gemma3", "attn_out", Q.Q4_K, 640, 1024),
    ("synthetic", "", Q.Q4_0, 1536, 576),
    ("synthetic", "", Q.Q5_1, 1536, 576),
    ("synthetic", "", Q.Q2_K, 1536, 1024),
    ("synthetic", "", Q.Q3_K, 1536, 1024),
    ("synthetic", "", Q.Q5_K, 1536, 1024),
    ("synthetic", "", Q.F16, 1536, 576),
    ("synthetic", "", Q.F32, 1536, 576),
]

STREAM_BYTES = 128 << 20  # 4x the L3, so decode reads come from DRAM


@numba.njit(parallel=True, cache=True)
def _read_all(a, out):
    # a u8 [rows, cols]: a pure streaming read, the bandwidth yardstick
    for r in numba.prange(a.shape[0]):
        s = 0
        for j in range(a.shape[1]):
            s += a[r, j]
        out[r] = s


def random_weight(qtype: int, n_out: int, n_in: int, rng) -> QTensor:
    """Random weight in the qtype's encoding; the kernels' speed does not depend on the values."""
    bs, ts = GGML_QUANT_SIZES[Q(qtype)]
    data = rng.integers(0, 256, (n_out, n_in // bs * ts), dtype=np.uint8)
    # fp16 scale fields: finite values, so no float slow paths
    scale_pos = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q2_K: [80, 82],
                 Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
    if qtype == Q.F32:
        data = rng.standard_normal((n_out, n_in), dtype=np.float32).view(np.uint8)
    elif qtype == Q.F16:
        data = rng.standard_normal((n_out, n_in)).astype(np.float16).view(np.uint8)
    else:
        blk = data.reshape(n_out, -1, ts)
        for p in scale_pos[Q(qtype)]:
            blk[:, :, p:p + 2] = np.array([0.01], np.float16).view(np.uint8)
    return QTensor("bench", int(qtype), (n_out, n_in), data)


def call_times(fns, reps: int) -> tuple[float, float]:
    """(median, best) seconds per call over reps passes through fns (after one warm-up pass)."""
    for f in fns:
        f()
    ts = []
    for _ in range(reps):
        for f in fns:
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    return float(np.median(ts)), min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="", help="comma-separated type names to run, e.g. Q4_1,Q8_0")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, skip T=512")
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    reps = 2 if args.quick else 4
    wanted = {s.strip().upper() for s in args.types.split(",") if s.strip()}

    big = rng.integers(0, 256, (STREAM_BYTES // 4096, 4096), dtype=np.uint8)
    sums = np.empty(512, np.int64)
    chunks = [big[i:i + 512] for i in range(0, big.shape[0], 512)]  # 2 MB each
    med, best = call_times([lambda c=c: _read_all(c, sums) for c in chunks], reps)
    print(f"read bandwidth (plain streaming sum, {args.threads} threads): median {chunks[0].nbytes / med / 1e9:.1f}"
          f" GB/s, best {chunks[0].nbytes / best / 1e9:.1f} GB/s")
    del big, chunks

    print(f"{'model':10s} {'tensor':14s} {'type':5s} {'n_out x n_in':>13s} | {'T=1 GB/s med':>12s} {'best':>5s}"
          f" {'hot':>5s} {'us':>7s} | {'T=8/T=1 med':>11s} {'best':>4s} | {'T=128 GF/s':>10s} {'T=512 GF/s':>10s}")
    for model, tensor, qtype, n_out, n_in in SHAPES:
        if wanted and qtype.name not in wanted:
            continue
        w = random_weight(qtype, n_out, n_in, rng)
        copies = [w] + [QTensor(w.name, w.qtype, w.shape, w.data.copy())
                        for _ in range(max(0, STREAM_BYTES // w.nbytes - 1))]
        x1 = rng.standard_normal((1, n_in), dtype=np.float32)
        out1 = np.empty((1, n_out), np.float32)

        def calls(x, out, path="auto"):
            return [lambda c=c: qmatmul.matmul(c, x, out, path=path) for c in copies]

        t1, b1 = call_times(calls(x1, out1), reps)
        _, hot = call_times([lambda: qmatmul.matmul(w, x1, out1)] * 20, reps)
        x8 = rng.standard_normal((8, n_in), dtype=np.float32)
        out8 = np.empty((8, n_out), np.float32)
        t8, b8 = call_times(calls(x8, out8, "int8"), reps)
        del copies
        line = (f"{model:10s} {tensor:14s} {qtype.name:5s} {n_out:6d}x{n_in:<6d} | {w.nbytes / t1 / 1e9:12.1f}"
                f" {w.nbytes / b1 / 1e9:5.1f} {w.nbytes / hot / 1e9:5.1f} {b1 * 1e6:7.1f} | {t8 / t1:11.2f} {b8 / b1:4.2f} |")
        for T in (128, 512):
            if (T == 512 and args.quick) or n_out * n_in > 50_000_000:
                line += f" {'-':>10s}"
                continue
            x = rng.standard_normal((T, n_in), dtype=np.float32)
            out = np.empty((T, n_out), np.float32)
            _, t = call_times([lambda: qmatmul.matmul(w, x, out)], reps)
            line += f" {2 * T * n_out * n_in / t / 1e9:10.1f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
