"""The CPU backend: numba kernels, plus the quantized matrix products of qmatmul.py.

kernels/cuda.py offers the same names.  Array helpers at the end (add, scale, empty, ...) are trivial here
and exist so the forward pass never touches numpy directly and runs unchanged on a device.

Few entry points on purpose: each jitted function costs ~0.1 s to load from numba's cache at its first call.
KV caches hold float32 or float16; numba has no float16 type on the CPU, so float16 is stored as its
uint16 bit pattern and converted by `kv_load` / `kv_store`, specialised at compile time on the dtype.
"""
import math

import numpy as np
from numba import njit, prange, types
from llvmlite import ir
from numba.extending import intrinsic, overload

from .qmatmul import get_rows, matmul  # noqa: F401  (part of the backend interface)

# fastmath without nnan/ninf: attention uses large negative sentinels and max() over scores (DESIGN: known traps)
FASTMATH = {"contract", "reassoc", "arcp", "afn", "nsz"}


def kv_load(x):
    """float32 value of one KV cache element (numba-only: see the overload below)."""
    raise NotImplementedError


def kv_encode(cache, value):
    """The element to store in `cache` for a float32 value (numba-only: see the overload below)."""
    raise NotImplementedError


@intrinsic
def _half_to_float(typingctx, h):
    """IEEE binary16 bit pattern (uint16) -> float32: one vcvtph2ps, exact for every value."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _float_to_half(typingctx, f):
    """float32 -> binary16 bit pattern, rounded to nearest even (as numpy's astype(float16))."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@overload(kv_load)
def _kv_load(x):
    if x == types.uint16:
        return lambda x: _half_to_float(x)
    return lambda x: np.float32(x)


@overload(kv_encode)
def _kv_encode(cache, value):
    if cache.dtype == types.uint16:
        return lambda cache, value: _float_to_half(np.float32(value))
    return lambda cache, value: np.float32(value)


@njit(cache=True, fastmath=FASTMATH)
def rmsnorm(x, weight, eps, out):
    """out[t] = x[t] / rms(x[t]) * weight.  x, out: [T, n]; weight: [n] (rows of any width n*k normalise per n)."""
    n = weight.shape[0]
    rows = x.size // n
    xf = x.reshape(rows, n)
    of = out.reshape(rows, n)
    for r in range(rows):
        ss = np.float32(0.0)
        for i in range(n):
            ss += xf[r, i] * xf[r, i]
        scale = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
        for i in range(n):
            of[r, i] = xf[r, i] * scale * weight[i]


@njit(cache=True, fastmath=FASTMATH)
def rope(x, pos, n_heads, head_dim, rope_dim, base, pos_scale, freq_factors, neox):
    """Rotate x in place. x: [T, n_heads * head_dim]; pos: [T] positions (times pos_scale: linear scaling);
    freq_factors: [rope_dim/2] divisors of each frequency (Llama 3's rope_freqs; ones otherwise).

    neox=False rotates adjacent pairs (x[2i], x[2i+1]) as llama.cpp's NORM mode (llama GGUFs have Q/K permuted
    for it); neox=True rotates (x[i], x[i + rope_dim/2]) as GPT-NeoX, Qwen2 and Gemma do.
    """
    T = x.shape[0]
    half = rope_dim // 2
    inv = np.empty(half, dtype=np.float64)
    for i in range(half):
        inv[i] = base ** (-2.0 * i / rope_dim) / freq_factors[i]
    for t in range(T):
        for i in range(half):
            theta = pos[t] * pos_scale * inv[i]
            c = np.float32(math.cos(theta))
            s = np.float32(math.sin(theta))
            for h in range(n_heads):
                o = h * head_dim
                if neox:
                    a, b = o + i, o + i + half
                else:
                    a, b = o + 2 * i, o + 2 * i + 1
                x0 = x[t, a]
                x1 = x[t, b]
                x[t, a] = x0 * c - x1 * s
                x[t, b] = x0 * s + x1 * c


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def silu_mul(gate, up):
    """gate <- silu(gate) * up (SwiGLU).  gate, up: [T, n_ff]."""
    for t in prange(gate.shape[0]):
        for i in range(gate.shape[1]):
            v = gate[t, i]
            gate[t, i] = v / (np.float32(1.0) + np.exp(-v)) * up[t, i]


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def gelu_mul(gate, up):
    """gate <- gelu_tanh(gate) * up (GeGLU, Gemma).  gate, up: [T, n_ff]."""
    c = np.float32(math.sqrt(2.0 / math.pi))
    for t in prange(gate.shape[0]):
        for i in range(gate.shape[1]):
            v = gate[t, i]
            inner = c * (v + np.float32(0.044715) * v * v * v)
            gate[t, i] = np.float32(0.5) * v * (np.float32(1.0) + np.tanh(inner)) * up[t, i]


@njit(cache=True, fastmath=FASTMATH)
def kv_write(k_cache, v_cache, slot, pos, k, v):
    """Store new keys/values.  k_cache, v_cache: [n_slots, n_kv_heads, n_ctx, head_dim] (float32 or f16 bits);
    slot, pos: [T]; k, v: [T, n_kv_heads * head_dim]."""
    T = k.shape[0]
    n_kv, hd = k_cache.shape[1], k_cache.shape[3]
    for t in range(T):
        for h in range(n_kv):
            for d in range(hd):
                k_cache[slot[t], h, pos[t], d] = kv_encode(k_cache, k[t, h * hd + d])
                v_cache[slot[t], h, pos[t], d] = kv_encode(v_cache, v[t, h * hd + d])


Q_BLOCK = 16  # queries of one slot per attention job: each key/value row is converted once and used by all


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def attention(q, k_cache, v_cache, slot, pos, window, scale, out):
    """Causal attention over the KV cache with grouped-query heads.

    q: [T, n_heads * head_dim]; k_cache, v_cache: [n_slots, n_kv_heads, n_ctx, head_dim]; slot, pos: [T];
    out: [T, n_heads * head_dim].  Query t sees positions max(0, pos[t] - window + 1) .. pos[t] of its slot
    (window <= 0: no window).  The cache must already hold the keys/values of every position <= pos[t].
    A job is one key/value head for a run of up to Q_BLOCK consecutive queries of one slot (prefill: a block
    of the prompt; batched decode: one sequence's query): every query head of its group shares each key/value
    row read.  Every query's arithmetic is the same whatever run it lands in.
    """
    T = q.shape[0]
    n_kv, hd = k_cache.shape[1], k_cache.shape[3]
    group = q.shape[1] // hd // n_kv
    starts = np.empty(T + 1, dtype=np.int64)  # runs: queries starts[i] .. starts[i+1]-1
    n_runs = 0
    for t in range(T):
        if t == 0 or slot[t] != slot[t - 1] or t - starts[n_runs - 1] == Q_BLOCK:
            starts[n_runs] = t
            n_runs += 1
    starts[n_runs] = T
    for job in prange(n_runs * n_kv):
        h = job % n_kv
        # pair late (long causal rows) with early runs: prange hands each thread a contiguous range of jobs
        b = job // n_kv
        i = b // 2 if b % 2 == 0 else n_runs - 1 - b // 2
        t0, t1 = starts[i], starts[i + 1]
        _attend_run(q, k_cache[slot[t0], h], v_cache[slot[t0], h], pos, t0, t1, h * group, group, window, scale,
                    out)


@njit(fastmath=FASTMATH)
def _attend_run(q, keys, values, pos, t0, t1, h0, group, window, scale, out):
    """Queries t0..t1-1 (one slot) of query heads h0..h0+group-1 against keys, values: [n_ctx, head_dim]."""
    hd = keys.shape[1]
    n = (t1 - t0) * group  # query rows: r = query * group + head
    lo = np.empty(n, dtype=np.int64)
    hi = np.empty(n, dtype=np.int64)
    qr = np.empty((n, hd), dtype=np.float32)  # [query rows, head_dim], contiguous for the dots below
    for r in range(n):
        t, qo = t0 + r // group, (h0 + r % group) * hd
        hi[r] = pos[t] + 1
        lo[r] = 0 if window <= 0 else max(0, hi[r] - window)
        for d in range(hd):
            qr[r, d] = q[t, qo + d]
    j0, j1 = lo.min(), hi.max()
    scores = np.empty((n, j1 - j0), dtype=np.float32)  # [query rows, key positions j0..j1-1]
    row = np.empty(hd, dtype=np.float32)  # one key (then value) row in float32
    for j in range(j0, j1):
        for d in range(hd):
            row[d] = kv_load(keys[j, d])
        for r in range(n):
            if lo[r] <= j < hi[r]:
                acc = np.float32(0.0)
                for d in range(hd):
                    acc += qr[r, d] * row[d]
                scores[r, j - j0] = acc * scale
    inv = np.empty(n, dtype=np.float32)
    for r in range(n):  # softmax over each query's own positions
        m = np.float32(-3.0e38)
        for j in range(lo[r], hi[r]):
            m = max(m, scores[r, j - j0])
        total = np.float32(0.0)
        for j in range(lo[r], hi[r]):
            e = np.exp(scores[r, j - j0] - m)
            scores[r, j - j0] = e
            total += e
        inv[r] = np.float32(1.0) / total
    acc_v = np.zeros((n, hd), dtype=np.float32)  # [query rows, head_dim]
    for j in range(j0, j1):
        for d in range(hd):
            row[d] = kv_load(values[j, d])
        for r in range(n):
            if lo[r] <= j < hi[r]:
                w = scores[r, j - j0] * inv[r]
                for d in range(hd):
                    acc_v[r, d] += w * row[d]
    for r in range(n):
        t, qo = t0 + r // group, (h0 + r % group) * hd
        for d in range(hd):
            out[t, qo + d] = acc_v[r, d]


# --- array helpers of the backend interface: host numpy arrays on the CPU -------------------------------
def upload_matrix(w):
    return w


def upload_vector(v):
    return v


def upload_ints(a):
    return np.ascontiguousarray(a, dtype=np.int64)


def empty(shape):
    return np.empty(shape, dtype=np.float32)


def zeros(shape, dtype):
    return np.zeros(shape, dtype=dtype)


def add(x, y):
    """x += y (y broadcast over rows)."""
    x += y


def scale(x, s):
    x *= np.float32(s)


def take_rows(x, rows):
    return np.ascontiguousarray(x[rows])


def to_numpy(x):
    return x
