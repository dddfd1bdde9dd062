"""The CUDA backend: kernels/cpu.py's interface as numba.cuda kernels (`pip install pyllm[cuda]`).

Weights go to the device once at load, still quantized; activations and the KV cache stay there, and only the
logits the caller asks for come back.  Semantics follow the CPU twins exactly, including the int8 rounding of
activations that the CPU's int8 path (qmatmul.uses_int8) applies before quantized dot products.

Layout: a quantized matrix is stored block-major, u8 [n_blocks, n_out, block_bytes], so the threads of a warp
(one output row each) read adjacent bytes.  Float weights are "blocks" of one value (4 or 2 bytes).
Every kernel walks its jobs in a grid-stride loop, so any launch size is correct; the simulator
(NUMBA_ENABLE_CUDASIM=1, used by the tests) runs each thread as a Python thread, slow to start, so
launches there are capped at two threads.  KV caches in f16 are float16 device arrays (the CPU's uint16 bits).
"""
import math
import warnings

import numpy as np
from gguf.constants import GGMLQuantizationType as Q

from ..errors import UnsupportedError
from ..quants import block_size, type_name, type_size
from .qmatmul import act_block, uses_int8

with warnings.catch_warnings():  # importing must stay silent on machines without CUDA
    warnings.simplefilter("ignore")
    from numba import cuda

SIMULATOR = bool(cuda.config.ENABLE_CUDASIM)
# small grids are intended here (a decode step has few rows of work): no occupancy warnings on stderr
cuda.config.CUDA_LOW_OCCUPANCY_WARNINGS = 0

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = (int(t) for t in (Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0))
Q4_K, Q5_K, Q6_K = int(Q.Q4_K), int(Q.Q5_K), int(Q.Q6_K)
SUPPORTED = frozenset((F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K))

TOKENS_PER_PASS = 8  # activation rows one matmul thread meets per read of its weights (a local accumulator each)
MAX_HEAD_DIM = 256  # attention keeps one output row per thread in local memory
# per launch; grid-stride loops cover the rest.  The simulator starts a Python thread per GPU thread (slow):
# there, two blocks of one thread still exercise the striding.
_THREADS_PER_BLOCK = 1 if SIMULATOR else 128
_MAX_THREADS = 2 if SIMULATOR else 1 << 20
_MATMUL_THREADS = 32 if SIMULATOR else 1 << 15  # enough to fill a GPU: rows x token passes x splits of n_in


def unusable_reason() -> str | None:
    """None when a CUDA GPU can run our kernels, else why not (one line).  The simulator counts as usable only
    when it was asked for explicitly, which is the only way it is ever on."""
    if SIMULATOR:
        return None
    try:
        if len(cuda.gpus) == 0:
            return "the driver lists no GPU"
        from numba.cuda.cudadrv.nvvm import NVVM

        NVVM()  # kernels are compiled on first use: the toolkit's compiler must be there
    except Exception as e:  # CudaSupportError, NvvmSupportError, driver errors: all mean "not usable"
        return " ".join(str(e).split()).rstrip(" :") or type(e).__name__
    return None


# The simulator wraps device functions in a per-call context switch that costs more than their bodies; the
# bodies are plain Python there anyway, so they are called directly.
_device = (lambda f: f) if SIMULATOR else cuda.jit(device=True)


def _launch(kernel, n_jobs, *args):
    """Run a grid-stride kernel over n_jobs jobs (nothing to do for none)."""
    if n_jobs <= 0:
        return
    threads = min(n_jobs, _MAX_THREADS)
    per_block = min(_THREADS_PER_BLOCK, threads)
    kernel[(threads + per_block - 1) // per_block, per_block](*args)


# --- device functions: reading GGUF encodings -----------------------------------------------------------
@_device
def _byte(w, b, r, k):
    """Byte k of block b of row r as an int (w: u8 [n_blocks, n_out, block_bytes])."""
    return int(w[b, r, k])


@_device
def _f16(w, b, r, k):
    """float32 from the little-endian IEEE half at bytes k, k+1 of a block (no float16 loads from bytes)."""
    h = _byte(w, b, r, k) | (_byte(w, b, r, k + 1) << 8)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = np.float32(math.ldexp(np.float32(m), -24))
    elif e == 31:
        v = np.float32(math.inf) if m == 0 else np.float32(math.nan)
    else:
        v = np.float32(math.ldexp(np.float32(m | 1024), e - 25))
    return -v if h & 0x8000 else v


@_device
def _f32(w, b, r):
    """float32 from the 4 little-endian bytes of a one-value block."""
    bits = 0
    for k in range(4):
        bits |= _byte(w, b, r, k) << (8 * k)
    e = (bits >> 23) & 255
    m = bits & 0x7FFFFF
    if e == 0:
        v = np.float32(math.ldexp(np.float32(m), -149))
    elif e == 255:
        v = np.float32(math.inf) if m == 0 else np.float32(math.nan)
    else:
        v = np.float32(math.ldexp(np.float32(m | 0x800000), e - 150))
    return -v if bits >> 31 else v


@_device
def _scale_min_k4(w, b, r, c):
    """6-bit scale and min of sub-block c (0-7) of a Q4_K/Q5_K block (12 scale bytes at offset 4)."""
    if c < 4:
        return _byte(w, b, r, 4 + c) & 63, _byte(w, b, r, 8 + c) & 63
    sc = (_byte(w, b, r, 8 + c) & 15) | ((_byte(w, b, r, c) >> 6) << 4)
    m = (_byte(w, b, r, 8 + c) >> 4) | ((_byte(w, b, r, 4 + c) >> 6) << 4)
    return sc, m


@_device
def _value(qtype, w, b, r, j):
    """Value j of block b of row r, as float32; field offsets follow ggml-common.h (see qmatmul.py)."""
    if qtype == F32:
        return _f32(w, b, r)
    if qtype == F16:
        return _f16(w, b, r, 0)
    if qtype == Q8_0:
        q = _byte(w, b, r, 2 + j)
        return _f16(w, b, r, 0) * np.float32(q - 256 if q > 127 else q)
    if qtype == Q4_0 or qtype == Q4_1 or qtype == Q5_0 or qtype == Q5_1:
        # 16 bytes of nibbles at the block's end: low nibbles are values 0-15, high ones 16-31
        bs = 18 if qtype == Q4_0 else 20 if qtype == Q4_1 else 22 if qtype == Q5_0 else 24
        q = (_byte(w, b, r, bs - 16 + j % 16) >> (4 * (j // 16))) & 15
        if qtype == Q5_0 or qtype == Q5_1:  # bit j of the 32-bit word before the nibbles is bit 4 of value j
            q |= ((_byte(w, b, r, bs - 20 + j // 8) >> (j % 8)) & 1) << 4
        d = _f16(w, b, r, 0)
        if qtype == Q4_1 or qtype == Q5_1:
            return d * np.float32(q) + _f16(w, b, r, 2)
        return d * np.float32(q - (8 if qtype == Q4_0 else 16))
    # K-quants: blocks of 256 as 8 chunks c of 32 values l
    c, l = j // 32, j % 32
    if qtype == Q4_K or qtype == Q5_K:
        sc, m = _scale_min_k4(w, b, r, c)
        if qtype == Q4_K:
            q = (_byte(w, b, r, 16 + 32 * (c // 2) + l) >> (4 * (c % 2))) & 15
        else:
            q = ((_byte(w, b, r, 48 + 32 * (c // 2) + l) >> (4 * (c % 2))) & 15) | (((_byte(w, b, r, 16 + l) >> c) & 1) << 4)
        return _f16(w, b, r, 0) * np.float32(sc * q) - _f16(w, b, r, 2) * np.float32(m)
    # Q6_K: 4 low bits | 2 high bits << 4, minus 32, signed 8-bit scale per 16 values
    n, i = c // 4, c % 4
    ql = (_byte(w, b, r, 64 * n + 32 * (i % 2) + l) >> (4 * (i // 2))) & 15
    qh = (_byte(w, b, r, 128 + 32 * n + l) >> (2 * i)) & 3
    sc = _byte(w, b, r, 192 + 8 * n + 2 * i + l // 16)
    sc = sc - 256 if sc > 127 else sc
    return _f16(w, b, r, 208) * np.float32(sc * ((ql | (qh << 4)) - 32))


@_device
def _rint(v):
    """Round half to even, as numpy's rint (the CPU's activation quantization)."""
    f = math.floor(v)
    d = v - f
    if d > 0.5 or (d == 0.5 and f % 2 != 0):
        f += 1
    return np.float32(f)


# --- kernels -----------------------------------------------------------------------------------------------
@cuda.jit
def _matmul(qtype, block_len, w, x, out, n_split):
    """out += x @ W.T.  w: u8 [n_blocks, n_out, block_bytes]; x: [T, n_in]; out: [T, n_out], zeroed.
    Job = (split s of the blocks, pass over TOKENS_PER_PASS tokens, row r); splits add atomically."""
    n_blocks, n_out = w.shape[0], w.shape[1]
    T = x.shape[0]
    n_pass = (T + TOKENS_PER_PASS - 1) // TOKENS_PER_PASS
    acc = cuda.local.array(TOKENS_PER_PASS, np.float32)
    for job in range(cuda.grid(1), n_out * n_pass * n_split, cuda.gridsize(1)):
        r = job % n_out
        t0 = (job // n_out) % n_pass * TOKENS_PER_PASS
        s = job // (n_out * n_pass)
        nt = min(TOKENS_PER_PASS, T - t0)
        for i in range(TOKENS_PER_PASS):
            acc[i] = 0
        for b in range(s, n_blocks, n_split):
            for j in range(block_len):
                v = _value(qtype, w, b, r, j)
                col = b * block_len + j
                for i in range(nt):
                    acc[i] += v * x[t0 + i, col]
        for i in range(nt):
            cuda.atomic.add(out, (t0 + i, r), acc[i])


@cuda.jit
def _round_act(x, out, block):
    """out = x rounded as the CPU's int8 activation blocks: per `block` values (qmatmul.act_block), scale
    amax/127.  x, out: [T, n]."""
    n_groups = x.shape[1] // block
    for job in range(cuda.grid(1), x.shape[0] * n_groups, cuda.gridsize(1)):
        t, o = job // n_groups, job % n_groups * block
        amax = np.float32(0)
        for j in range(block):
            amax = max(amax, abs(x[t, o + j]))
        d = amax / np.float32(127)
        inv = np.float32(127) / amax if amax > 0 else np.float32(0)
        for j in range(block):
            out[t, o + j] = d * _rint(x[t, o + j] * inv)


@cuda.jit
def _get_rows(qtype, block_len, w, ids, out):
    """out[i] = row ids[i] of W, dequantized.  out: [N, n_in]."""
    n_in = out.shape[1]
    for job in range(cuda.grid(1), out.shape[0] * n_in, cuda.gridsize(1)):
        i, col = job // n_in, job % n_in
        out[i, col] = _value(qtype, w, col // block_len, ids[i], col % block_len)


@cuda.jit
def _rmsnorm(x, weight, eps, out):
    """out = x / rms * weight per n = len(weight) values; x, out: [T, k * n]."""
    n = weight.shape[0]
    per = x.shape[1] // n
    for row in range(cuda.grid(1), x.shape[0] * per, cuda.gridsize(1)):
        t, o = row // per, row % per * n
        ss = np.float32(0)
        for i in range(n):
            ss += x[t, o + i] * x[t, o + i]
        scale = np.float32(1) / math.sqrt(ss / np.float32(n) + eps)
        for i in range(n):
            out[t, o + i] = x[t, o + i] * scale * weight[i]


@cuda.jit
def _rope(x, pos, n_heads, head_dim, rope_dim, base, pos_scale, freq_factors, neox):
    """Rotate one pair per job, in place; the CPU's rope() docstring has the two pair conventions."""
    half = rope_dim // 2
    for job in range(cuda.grid(1), x.shape[0] * n_heads * half, cuda.gridsize(1)):
        i = job % half
        h = job // half % n_heads
        t = job // (half * n_heads)
        theta = pos[t] * pos_scale * (base ** (-2.0 * i / rope_dim) / freq_factors[i])  # float64 as on the CPU
        c = np.float32(math.cos(theta))
        s = np.float32(math.sin(theta))
        o = h * head_dim
        a = o + i if neox else o + 2 * i
        b = a + half if neox else a + 1
        x0 = x[t, a]
        x1 = x[t, b]
        x[t, a] = x0 * c - x1 * s
        x[t, b] = x0 * s + x1 * c


@cuda.jit
def _silu_mul(gate, up):
    n = gate.shape[1]
    for job in range(cuda.grid(1), gate.shape[0] * n, cuda.gridsize(1)):
        t, i = job // n, job % n
        v = gate[t, i]
        gate[t, i] = v / (np.float32(1) + math.exp(-v)) * up[t, i]


@cuda.jit
def _gelu_mul(gate, up):
    n = gate.shape[1]
    c = np.float32(math.sqrt(2.0 / math.pi))
    for job in range(cuda.grid(1), gate.shape[0] * n, cuda.gridsize(1)):
        t, i = job // n, job % n
        v = gate[t, i]
        gate[t, i] = np.float32(0.5) * v * (np.float32(1) + math.tanh(c * (v + np.float32(0.044715) * v * v * v))) * up[t, i]


@cuda.jit
def _kv_write(k_cache, v_cache, slot, pos, k, v):
    n_kv, hd = k_cache.shape[1], k_cache.shape[3]
    for job in range(cuda.grid(1), k.shape[0] * n_kv * hd, cuda.gridsize(1)):
        t, h, d = job // (n_kv * hd), job // hd % n_kv, job % hd
        k_cache[slot[t], h, pos[t], d] = k[t, h * hd + d]
        v_cache[slot[t], h, pos[t], d] = v[t, h * hd + d]


@cuda.jit
def _attention(q, k_cache, v_cache, slot, pos, window, scale, out):
    """One (token, head) per job, one pass over the keys with a running max (online softmax)."""
    n_kv, hd = k_cache.shape[1], k_cache.shape[3]
    n_heads = q.shape[1] // hd
    group = n_heads // n_kv
    acc = cuda.local.array(MAX_HEAD_DIM, np.float32)
    for job in range(cuda.grid(1), q.shape[0] * n_heads, cuda.gridsize(1)):
        t, h = job // n_heads, job % n_heads
        kvh, s, qo = h // group, slot[t], h * hd
        hi = pos[t] + 1
        lo = 0 if window <= 0 else max(0, hi - window)
        for d in range(hd):
            acc[d] = 0
        m = np.float32(-3.0e38)  # finite: see DESIGN's fastmath trap
        total = np.float32(0)
        for p in range(lo, hi):
            score = np.float32(0)
            for d in range(hd):
                score += q[t, qo + d] * np.float32(k_cache[s, kvh, p, d])
            score *= scale
            if score > m:  # rescale what was summed under the old maximum
                f = math.exp(m - score)
                total *= f
                for d in range(hd):
                    acc[d] *= f
                m = score
            e = math.exp(score - m)
            total += e
            for d in range(hd):
                acc[d] += e * np.float32(v_cache[s, kvh, p, d])
        inv = np.float32(1) / total
        for d in range(hd):
            out[t, qo + d] = acc[d] * inv


@cuda.jit
def _add(x, y):
    """x += y; x: [T, n]; y: [T, n] or [1, n] (one row for all)."""
    n = x.shape[1]
    for job in range(cuda.grid(1), x.shape[0] * n, cuda.gridsize(1)):
        t, i = job // n, job % n
        x[t, i] += y[t if y.shape[0] > 1 else 0, i]


@cuda.jit
def _scale(x, s):
    n = x.shape[1]
    for job in range(cuda.grid(1), x.shape[0] * n, cuda.gridsize(1)):
        x[job // n, job % n] *= s


@cuda.jit
def _fill_zero(x):
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        x[i] = 0


@cuda.jit
def _take_rows(x, rows, out):
    n = x.shape[1]
    for job in range(cuda.grid(1), out.shape[0] * n, cuda.gridsize(1)):
        out[job // n, job % n] = x[rows[job // n], job % n]


# --- the backend interface ---------------------------------------------------------------------------------
class DeviceMatrix:
    """A QTensor on the GPU: data u8 [n_blocks, n_out, block_bytes] (block-major, see the module docstring)."""

    __slots__ = ("name", "qtype", "shape", "block_len", "data")

    def __init__(self, name, qtype, shape, block_len, data):
        self.name, self.qtype, self.shape, self.block_len, self.data = name, qtype, shape, block_len, data

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def __repr__(self) -> str:
        return f"DeviceMatrix({self.name!r}, {type_name(self.qtype)}, {self.shape})"


def upload_matrix(w):
    """QTensor -> DeviceMatrix, copied once (weights stay quantized on the device)."""
    if w.qtype not in SUPPORTED:
        raise UnsupportedError(f"tensor '{w.name}' has type {type_name(w.qtype)}, which the CUDA backend cannot "
                               "run (use --device cpu)")
    n_out, n_in = w.shape
    block_len, block_bytes = block_size(w.qtype), type_size(w.qtype)
    blocks = np.ascontiguousarray(w.data).reshape(n_out, n_in // block_len, block_bytes)
    return DeviceMatrix(w.name, w.qtype, w.shape, block_len, cuda.to_device(np.ascontiguousarray(blocks.transpose(1, 0, 2))))


def upload_vector(v):
    return cuda.to_device(np.ascontiguousarray(v, dtype=np.float32))


def upload_ints(a):
    return cuda.to_device(np.ascontiguousarray(a, dtype=np.int64))


def empty(shape):
    return cuda.device_array(shape, dtype=np.float32)


def zeros(shape, dtype):
    """A zeroed device array; np.uint16 (the CPU's f16 bits) becomes float16, which the GPU converts natively."""
    x = cuda.device_array(shape, dtype=np.float16 if dtype == np.uint16 else dtype)
    _launch(_fill_zero, x.size, x.reshape(-1))
    return x


def to_numpy(x):
    host = x.copy_to_host()
    return host.view(np.uint16) if host.dtype == np.float16 else host


def add(x, y):
    """x += y (y broadcast over rows)."""
    _launch(_add, x.size, x, y.reshape(1, -1) if y.ndim == 1 else y)


def scale(x, s):
    _launch(_scale, x.size, x, np.float32(s))


def take_rows(x, rows):
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out = empty((len(rows), x.shape[1]))
    _launch(_take_rows, out.size, x, upload_ints(rows), out)
    return out


def matmul(w, x, *, path="auto"):
    """x @ W.T: x [T, n_in] -> new [T, n_out]; path as in qmatmul.matmul (which rows get int8-rounded)."""
    n_out, n_in = w.shape
    T = x.shape[0]
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"matmul with '{w.name}' {w.shape}: x has shape {x.shape}, expected [T, {n_in}]")
    if uses_int8(w.qtype, T, path):
        rounded = empty(x.shape)
        block = act_block(w.qtype)
        _launch(_round_act, T * n_in // block, x, rounded, block)
        x = rounded
    out = zeros((T, n_out), np.float32)
    n_blocks = w.data.shape[0]
    n_pass = (T + TOKENS_PER_PASS - 1) // TOKENS_PER_PASS
    n_split = max(1, min(n_blocks, _MATMUL_THREADS // max(1, n_out * n_pass)))
    _launch(_matmul, n_out * n_pass * n_split, w.qtype, w.block_len, w.data, x, out, n_split)
    return out


def get_rows(w, ids):
    """Dequantized rows W[ids]: [len(ids), n_in] (token embedding lookup)."""
    if isinstance(ids, np.ndarray):
        ids = upload_ints(ids)
    host = ids.copy_to_host()  # a few ints: checked here, as the CPU does, rather than read out of bounds
    if host.size and (host.min() < 0 or host.max() >= w.shape[0]):
        raise IndexError(f"row id out of range for '{w.name}' with {w.shape[0]} rows")
    out = empty((len(host), w.shape[1]))
    _launch(_get_rows, out.size, w.qtype, w.block_len, w.data, ids, out)
    return out


def rmsnorm(x, w, eps, out):
    _launch(_rmsnorm, x.size // w.shape[0], x, w, np.float32(eps), out)


def rope(x, pos, n_heads, head_dim, rope_dim, base, pos_scale, freq_factors, neox):
    if isinstance(freq_factors, np.ndarray):
        freq_factors = upload_vector(freq_factors)
    _launch(_rope, x.shape[0] * n_heads * (rope_dim // 2), x, pos, n_heads, head_dim, rope_dim, float(base),
            float(pos_scale), freq_factors, bool(neox))


def silu_mul(gate, up):
    _launch(_silu_mul, gate.size, gate, up)


def gelu_mul(gate, up):
    _launch(_gelu_mul, gate.size, gate, up)


def kv_write(k_cache, v_cache, slot, pos, k, v):
    _launch(_kv_write, k.size, k_cache, v_cache, slot, pos, k, v)


def attention(q, k_cache, v_cache, slot, pos, window, scale, out):
    if k_cache.shape[3] > MAX_HEAD_DIM:
        raise UnsupportedError(f"head size {k_cache.shape[3]} is larger than the CUDA backend's {MAX_HEAD_DIM}")
    _launch(_attention, q.shape[0] * (q.shape[1] // k_cache.shape[3]), q, k_cache, v_cache, slot, pos,
            int(window), np.float32(scale), out)
