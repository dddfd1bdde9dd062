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
    padded = (half + _LANES - 1) // _LANES * _LANES  # the tables' vectors run past half: angle 0 there
    inv = np.zeros(padded, dtype=np.float64)
    for i in range(half):
        inv[i] = base ** (-2.0 * i / rope_dim) / freq_factors[i]
    cos = np.empty(padded, dtype=np.float32)
    sin = np.empty(padded, dtype=np.float32)
    for t in range(T):  # each token on its own: its angles from its position alone
        _rope_table(pos[t] * pos_scale, inv, cos, sin)
        _rope_row(x, t, cos, sin, n_heads, head_dim, half, neox)


def silu_mul(gate, up):
    """gate <- silu(gate) * up (SwiGLU).  gate, up: [T, n_ff]."""
    _glu_mul(gate, up, False)


def gelu_mul(gate, up):
    """gate <- gelu_tanh(gate) * up (GeGLU, Gemma).  gate, up: [T, n_ff]."""
    _glu_mul(gate, up, True)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _glu_mul(gate, up, gelu):
    n = gate.shape[1]
    nb = 1 if gate.size < _GLU_SERIAL else _num_threads()  # column blocks: one per thread, as the matmuls split
    w = (n + nb * _LANES - 1) // (nb * _LANES) * _LANES
    if nb == 1:  # no parallel region at all (it would cost more than it saves)
        _glu_cols(gate, up, 0, n, gelu)
    else:
        for b in prange(nb):
            _glu_cols(gate, up, min(n, b * w), min(n, (b + 1) * w), gelu)


@njit(cache=True, fastmath=FASTMATH)
def _glu_cols(gate, up, c0, c1, gelu):
    if gelu:
        _gelu_cols(gate, up, c0, c1)
    else:
        _silu_cols(gate, up, c0, c1)


# --- rope, silu_mul, gelu_mul: their vector IR ---------------------------------------------------------
# Built from attention's vector IR helpers below (_load16, _store16, _fma, ...).  Each element or angle goes
# through the same lane-wise operations wherever it sits in a vector (a row's partial last vector is loaded with
# zeros past its end and stored lane by lane), so a row's or a token's bits depend on it alone.  Arrays other
# than 2-D C-contiguous float32 take the scalar formulas the vector code replaced.
# silu_mul / gelu_mul on fewer values stay on the calling thread.  Measured inside decoding steps (gate and up
# just written by a matmul split across the threads), a parallel region costs ~1.5 us more than it saves below
# ~8k values: T = 1 of every model here and T = 4 of SmolLM2 stay serial, T = 8 gains 25-35%.
_GLU_SERIAL = 8192
_f64t = ir.DoubleType()
_vd = ir.VectorType(_f64t, 8)  # the angles of rope: float64, 8 lanes
_GELU_A = 2.0 * math.sqrt(2.0 / math.pi)  # gelu_tanh(v) = v * sigmoid(v * (A + B v^2))
_GELU_B = _GELU_A * 0.044715
_PIO2 = (1.5707963267948966, 6.123233995736766e-17)  # pi/2 in two float64 parts (the rest: 1.5e-33)
_SIN = (-1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04,
        2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10)  # fdlibm, |r| <= pi/4
_COS = (4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05,
        -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11)
_EXACT = ("nsz",)  # flags that keep numba's fast-math pass (reassoc, arcp, ...) off an instruction


def _silu_cols(gate, up, c0, c1):
    """gate[:, c0:c1] <- silu(gate[:, c0:c1]) * up[:, c0:c1] (numba-only: see the overload below)."""
    raise NotImplementedError


def _gelu_cols(gate, up, c0, c1):
    """gate[:, c0:c1] <- gelu_tanh(gate[:, c0:c1]) * up[:, c0:c1] (numba-only: see the overload below)."""
    raise NotImplementedError


def _rope_row(x, t, cos, sin, n_heads, head_dim, half, neox):
    """Rotate the pairs of token t's heads by the angles whose cos/sin are in the tables (numba-only)."""
    raise NotImplementedError


def _vector_ok(*arrays):
    return all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" and a.dtype == types.float32
               for a in arrays)


@overload(_silu_cols)
def _silu_cols_impl(gate, up, c0, c1):
    if _vector_ok(gate, up):
        return lambda gate, up, c0, c1: _silu16(gate, up, c0, c1)

    def scalar(gate, up, c0, c1):
        for t in range(gate.shape[0]):
            for i in range(c0, c1):
                v = gate[t, i]
                gate[t, i] = v / (np.float32(1.0) + np.exp(-v)) * up[t, i]
    return scalar


@overload(_gelu_cols)
def _gelu_cols_impl(gate, up, c0, c1):
    if _vector_ok(gate, up):
        return lambda gate, up, c0, c1: _gelu16(gate, up, c0, c1)

    def scalar(gate, up, c0, c1):
        c = np.float32(math.sqrt(2.0 / math.pi))
        for t in range(gate.shape[0]):
            for i in range(c0, c1):
                v = gate[t, i]
                inner = c * (v + np.float32(0.044715) * v * v * v)
                gate[t, i] = np.float32(0.5) * v * (np.float32(1.0) + np.tanh(inner)) * up[t, i]
    return scalar


@overload(_rope_row)
def _rope_row_impl(x, t, cos, sin, n_heads, head_dim, half, neox):
    if _vector_ok(x):
        return lambda x, t, cos, sin, n_heads, head_dim, half, neox: _rope16(x, t, cos, sin, n_heads, head_dim,
                                                                            half, neox)

    def scalar(x, t, cos, sin, n_heads, head_dim, half, neox):
        for h in range(n_heads):
            o = h * head_dim
            for i in range(half):
                a, b = (o + i, o + i + half) if neox else (o + 2 * i, o + 2 * i + 1)
                x0, x1 = x[t, a], x[t, b]
                x[t, a] = x0 * cos[i] - x1 * sin[i]
                x[t, b] = x0 * sin[i] + x1 * cos[i]
    return scalar


def _k16(v):
    return ir.Constant(_vf, [v] * _LANES)


def _exp16_neg(builder, x):
    """exp of each lane of x <= 0 over the whole range: _exp16's polynomial (~1 ulp) down to -87.3, then
    denormals (2^n applied in two halves: one rounding) and 0 below -103.9.  Lanes below -104, and NaN lanes,
    compute exp(-104): no poison from a NaN's conversion to integer."""
    y, n = _exp_parts(builder, builder.select(builder.fcmp_ordered(">=", x, _k16(-104.0)), x, _k16(-104.0)))
    ni = builder.fptosi(n, ir.VectorType(_i32t, _LANES))  # -150 <= n <= 0
    n1 = builder.ashr(ni, _lanes_of(_i32t, [1] * _LANES))  # n = n1 + n2, both >= -75: normal powers of two
    return builder.fmul(builder.fmul(y, _pow2(builder, n1), flags=_EXACT), _pow2(builder, builder.sub(ni, n1)),
                        flags=_EXACT)


def _sigmoid16(builder, z):
    """1 / (1 + exp(-z)) of each lane from e = exp(-|z|) <= 1: 1 / (1 + e) for z >= 0, e / (1 + e) below.  No
    overflow anywhere; one correctly rounded division."""
    fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_vf, [_vf]), "llvm.fabs.v16f32")
    e = _exp16_neg(builder, builder.fneg(builder.call(fabs, [z])))
    num = builder.select(builder.fcmp_ordered(">=", z, _k16(0.0)), _k16(1.0), e)
    return builder.fdiv(num, builder.fadd(e, _k16(1.0), flags=_EXACT), flags=_EXACT)


def _store_lanes(builder, data, i, v, rem):
    """data[i + lane] = v[lane] for lane < rem (IR i64 < 16): a partial last vector."""
    for lane in range(_LANES):
        with builder.if_then(builder.icmp_signed("<", _i64(lane), rem)):
            builder.store(builder.extract_element(v, ir.Constant(_i32t, lane)),
                          builder.gep(data, [builder.add(i, _i64(lane))]))


def _glu_codegen(act):
    """gate[t, i] <- gate[t, i] * act(gate[t, i]) * up[t, i] for every row t and c0 <= i < c1 of 2-D C float32
    arrays, 16 values at a time."""
    def codegen(context, builder, sig, args):
        gate_, up_, c0, c1 = args
        pg, pu = _data(context, builder, sig.args[0], gate_), _data(context, builder, sig.args[1], up_)
        T, n = _shape(context, builder, sig.args[0], gate_)
        nu = _shape(context, builder, sig.args[1], up_)[1]
        n16, rem = builder.udiv(builder.sub(c1, c0), _i64(_LANES)), builder.urem(builder.sub(c1, c0), _i64(_LANES))
        with cgutils.for_range(builder, T) as t:
            og, ou = builder.add(builder.mul(t.index, n), c0), builder.add(builder.mul(t.index, nu), c0)

            def step(c, rem=None):
                o = builder.mul(c, _i64(_LANES))
                v = _load16(builder, pg, builder.add(og, o), False, rem)
                u = _load16(builder, pu, builder.add(ou, o), False, rem)
                return builder.add(og, o), builder.fmul(builder.fmul(v, act(builder, v), flags=_EXACT), u, flags=_EXACT)
            with cgutils.for_range(builder, n16) as c:
                _store16(builder, pg, *step(c.index))
            with builder.if_then(builder.icmp_unsigned("!=", rem, _i64(0)), likely=False):
                _store_lanes(builder, pg, *step(n16, rem), rem)
        return context.get_dummy_value()
    return codegen


@intrinsic
def _silu16(typingctx, gate, up, c0, c1):
    """gate[:, c0:c1] <- gate * sigmoid(gate) * up, c0 <= c1."""
    return types.none(gate, up, types.intp, types.intp), _glu_codegen(_sigmoid16)


@intrinsic
def _gelu16(typingctx, gate, up, c0, c1):
    """gate[:, c0:c1] <- gelu_tanh(gate) * up, as v * sigmoid(2u) = v * (1 + tanh u) / 2 with u = sqrt(2/pi) (v +
    0.044715 v^3): no cancelling 1 + tanh(u) for v < 0, and no overflow."""
    def act(builder, v):
        w = _fma(builder, builder.fmul(v, v, flags=_EXACT), _k16(_GELU_B), _k16(_GELU_A))
        return _sigmoid16(builder, builder.fmul(v, w, flags=_EXACT))
    return types.none(gate, up, types.intp, types.intp), _glu_codegen(act)


@intrinsic
def _rope_table(typingctx, p, inv, cos, sin):
    """cos[i], sin[i] <- float32 cos and sin of the float64 angle p * inv[i] (len(inv) a multiple of 8), 8 angles
    at a time: reduced by pi/2 (two-part constant, exact FMAs), fdlibm's polynomials on |r| <= pi/4 (~1e-16),
    then one rounding to float32: the bits of math.cos / math.sin but for a rare last-bit tie."""
    def codegen(context, builder, sig, args):
        p_, inv_, cos_, sin_ = args
        pi_, pc, ps = (_data(context, builder, sig.args[i], args[i]) for i in (1, 2, 3))
        n = _shape(context, builder, sig.args[1], inv_)[0]
        vi = ir.VectorType(_i64t, 8)

        def k(v):
            return ir.Constant(_vd, [v] * 8)

        def fma(a, b, c):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_vd, [_vd] * 3), "llvm.fma.v8f64")
            return builder.call(fn, [a, b, c])

        def poly(z, coefs):
            acc = k(coefs[-1])
            for c in coefs[-2::-1]:
                acc = fma(acc, z, k(c))
            return acc
        floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_vd, [_vd]), "llvm.floor.v8f64")
        pv = builder.insert_element(ir.Constant(_vd, None), p_, ir.Constant(_i32t, 0))
        pv = builder.shuffle_vector(pv, pv, _lanes_of(_i32t, [0] * 8))
        with cgutils.for_range(builder, builder.udiv(n, _i64(8))) as c:
            o = builder.mul(c.index, _i64(8))
            theta = builder.fmul(pv, builder.load(builder.bitcast(builder.gep(pi_, [o]), _vd.as_pointer()), align=8),
                                 flags=_EXACT)
            q = builder.call(floor, [fma(theta, k(2.0 / math.pi), k(0.5))])  # theta = q pi/2 + r
            r = fma(q, k(-_PIO2[1]), fma(q, k(-_PIO2[0]), theta))
            z = builder.fmul(r, r, flags=_EXACT)
            s = fma(builder.fmul(r, z, flags=_EXACT), poly(z, _SIN), r)
            co = fma(builder.fmul(z, z, flags=_EXACT), poly(z, _COS), fma(z, k(-0.5), k(1.0)))
            qi = builder.fptosi(q, vi)

            def bit(v, b):
                return builder.icmp_unsigned("!=", builder.and_(v, _lanes_of(_i64t, [b] * 8)), ir.Constant(vi, None))
            swap = bit(qi, 1)  # odd quarter turns: sin <-> cos
            sn, cs = builder.select(swap, co, s), builder.select(swap, s, co)
            sn = builder.select(bit(qi, 2), builder.fneg(sn), sn)  # quarters 2, 3
            cs = builder.select(bit(builder.add(qi, _lanes_of(_i64t, [1] * 8)), 2), builder.fneg(cs), cs)  # 1, 2
            for ptr, val in ((pc, cs), (ps, sn)):
                dst = builder.bitcast(builder.gep(ptr, [o]), ir.VectorType(_f32t, 8).as_pointer())
                builder.store(builder.fptrunc(val, ir.VectorType(_f32t, 8)), dst, align=4)
        return context.get_dummy_value()
    return types.none(types.float64, inv, cos, sin), codegen


@intrinsic
def _rope16(typingctx, x, t, cos, sin, n_heads, head_dim, half, neox):
    """Rotate each head of row t of x (2-D C float32): (x0, x1) <- (x0 c - x1 s, x1 c + x0 s) with c, s from the
    tables (padded to a multiple of 16), as fma(x0, c, x1 * -s) and fma(x1, c, x0 * s) in both layouts: NEOX 16
    pairs (i, i + half) at a time, NORM 8 adjacent pairs (one vector) at a time."""
    def codegen(context, builder, sig, args):
        x_, t_, cos_, sin_, nh, hd, half_, neox_ = args
        px, pc, ps = (_data(context, builder, sig.args[i], args[i]) for i in (0, 2, 3))
        row = builder.mul(t_, _shape(context, builder, sig.args[0], x_)[1])

        def rotate(x0, x1, c, s):
            return (_fma(builder, x0, c, builder.fmul(x1, builder.fneg(s), flags=_EXACT)),
                    _fma(builder, x1, c, builder.fmul(x0, s, flags=_EXACT)))
        with builder.if_else(neox_) as (then, otherwise):
            with then:
                n16, rem = builder.udiv(half_, _i64(_LANES)), builder.urem(half_, _i64(_LANES))
                with cgutils.for_range(builder, nh) as h:
                    a = builder.add(row, builder.mul(h.index, hd))
                    b = builder.add(a, half_)

                    def step(c, rem=None):
                        i = builder.mul(c, _i64(_LANES))
                        ai, bi = builder.add(a, i), builder.add(b, i)
                        ya, yb = rotate(_load16(builder, px, ai, False, rem), _load16(builder, px, bi, False, rem),
                                        _load16(builder, pc, i, False), _load16(builder, ps, i, False))
                        return ai, ya, bi, yb
                    with cgutils.for_range(builder, n16) as c:
                        ai, ya, bi, yb = step(c.index)
                        _store16(builder, px, ai, ya)
                        _store16(builder, px, bi, yb)
                    with builder.if_then(builder.icmp_unsigned("!=", rem, _i64(0)), likely=False):
                        ai, ya, bi, yb = step(n16, rem)
                        _store_lanes(builder, px, ai, ya, rem)
                        _store_lanes(builder, px, bi, yb, rem)
            with otherwise:
                pairs = _LANES // 2
                n8, rem = builder.udiv(half_, _i64(pairs)), builder.urem(half_, _i64(pairs))
                v8 = ir.VectorType(_f32t, pairs)
                twice = _lanes_of(_i32t, [i // 2 for i in range(_LANES)])  # c0 c0 c1 c1 ...
                signed = _lanes_of(_i32t, [i // 2 + (pairs if i % 2 else 0) for i in range(_LANES)])  # -s0 s0 ...
                swap = _lanes_of(_i32t, [i ^ 1 for i in range(_LANES)])
                with cgutils.for_range(builder, nh) as h:
                    o = builder.add(row, builder.mul(h.index, hd))

                    def step(c, rem=None):
                        i = builder.mul(c, _i64(pairs))
                        xi = builder.add(o, builder.mul(i, _i64(2)))
                        c8, s8 = (builder.load(builder.bitcast(builder.gep(p, [i]), v8.as_pointer()), align=4)
                                  for p in (pc, ps))
                        v = _load16(builder, px, xi, False, rem)
                        x1 = builder.shuffle_vector(v, v, swap)  # each lane's partner
                        y = _fma(builder, v, builder.shuffle_vector(c8, c8, twice),
                                 builder.fmul(x1, builder.shuffle_vector(builder.fneg(s8), s8, signed), flags=_EXACT))
                        return xi, y
                    with cgutils.for_range(builder, n8) as c:
                        _store16(builder, px, *step(c.index))
                    with builder.if_then(builder.icmp_unsigned("!=", rem, _i64(0)), likely=False):
                        rem2 = builder.mul(rem, _i64(2))
                        xi, y = step(n8, rem2)
                        _store_lanes(builder, px, xi, y, rem2)
        return context.get_dummy_value()
    return types.none(x, types.intp, cos, sin, types.intp, types.intp, types.intp, types.boolean), codegen


@njit(cache=True, fastmath=FASTMATH)
def kv_write(k_cache, v_cache, slot, pos, k, v):
    """Store new keys/values.  k_cache, v_cache: [n_slots, n_kv_heads, n_ctx, head_dim] (float32 or f16 bits);
    slot, pos: [T]; k, v: [T, n_kv_heads * head_dim]."""
    T = k.shape[0]
    n_kv, hd = k_cache.shape[1], k_cache.shape[3]
    for t in range(T):
        for h in range(n_kv):
            kd, vd = k_cache[slot[t], h, pos[t]], v_cache[slot[t], h, pos[t]]  # 1-D rows: vectorized conversion
            ks, vs = k[t, h * hd:(h + 1) * hd], v[t, h * hd:(h + 1) * hd]
            for d in range(hd):
                kd[d] = kv_encode(k_cache, ks[d])
            for d in range(hd):
                vd[d] = kv_encode(v_cache, vs[d])


# --- attention ---------------------------------------------------------------------------------------
# The inner loops are LLVM vector IR emitted by the intrinsics below (as in qmatmul.py): 16 float lanes and an
# explicit FMA per term, the same instructions for a query wherever it falls, so its arithmetic is fixed by its
# own positions and never by the rest of the call (numba's fast-math pass still flags these fadd/fmul; the
# tests check the bits stay put).  Per job (a run of queries of one slot x one key/value head x some of its query
# heads): each block of 16 keys is converted once to float32 (_keys16) and dotted with every query row 16 keys
# at a time (_qk, _qk2: one horizontal sum per 16 dots, by a transposing tree that adds each key's lanes in the
# same order wherever the key falls); _softmax exponentiates each row's own range; _pv accumulates
# probabilities x values with up to 4 rows x 64 values in registers.
from numba.core import cgutils  # noqa: E402

Q_BLOCK = 16  # queries of one slot per attention job: each block of keys is converted once and used by all
_LANES = 16  # float32 lanes per vector, and keys per block of scores
_MAX_ROWS = 4  # query rows per pass over the values (x _CHUNKS vectors of accumulators in registers)
_CHUNKS = 4
_f32t, _i32t, _i64t = ir.FloatType(), ir.IntType(32), ir.IntType(64)
_vf = ir.VectorType(_f32t, _LANES)


def _i64(v):
    return ir.Constant(_i64t, v)


def _lanes_of(k, values):
    return ir.Constant(ir.VectorType(k, len(values)), values)


def _data(context, builder, ty, ary):
    return context.make_array(ty)(context, builder, ary).data


def _shape(context, builder, ty, ary):
    return cgutils.unpack_tuple(builder, context.make_array(ty)(context, builder, ary).shape)


def _splat(builder, x):
    v = builder.insert_element(ir.Constant(_vf, None), x, ir.Constant(_i32t, 0))
    return builder.shuffle_vector(v, v, _lanes_of(_i32t, [0] * _LANES))


def _fma(builder, a, b, c):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_vf, [_vf] * 3), "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


def _load16(builder, data, i, half, rem=None):
    """<16 x float> of elements i.. of float32 or f16-bits data; with rem (IR i64 < 16) only that many, then 0."""
    if rem is None:
        p = builder.gep(data, [i])
        if half:
            h = builder.load(builder.bitcast(p, ir.VectorType(ir.HalfType(), _LANES).as_pointer()), align=2)
            return builder.fpext(h, _vf)
        return builder.load(builder.bitcast(p, _vf.as_pointer()), align=4)
    v = ir.Constant(_vf, None)
    for lane in range(_LANES):
        inside = builder.icmp_signed("<", _i64(lane), rem)
        p = builder.gep(data, [builder.add(i, builder.select(inside, _i64(lane), _i64(0)))])
        if half:
            x = builder.fpext(builder.load(builder.bitcast(p, ir.HalfType().as_pointer()), align=2), _f32t)
        else:
            x = builder.load(p, align=4)
        v = builder.insert_element(v, builder.select(inside, x, ir.Constant(_f32t, 0.0)), ir.Constant(_i32t, lane))
    return v


def _store16(builder, data, i, v):
    builder.store(v, builder.bitcast(builder.gep(data, [i]), v.type.as_pointer()), align=4)


def _halves(builder, v, op):
    """Fold a vector in halves (lane i with lane i + n/2) down to one value: a fixed order."""
    while v.type.count > 1:
        n = v.type.count // 2
        lo = builder.shuffle_vector(v, v, _lanes_of(_i32t, list(range(n))))
        hi = builder.shuffle_vector(v, v, _lanes_of(_i32t, list(range(n, 2 * n))))
        v = op(lo, hi)
    return builder.extract_element(v, ir.Constant(_i32t, 0))


def _transpose_sums(builder, parts):
    """16 vectors -> one vector of their 16 lane sums.  Each sum is the halving tree of _halves (lanes i + i+8,
    then + 4, + 2, + 1), the same additions in the same order in every lane."""
    for width in (8, 4, 2, 1):  # each source vector holds 16 / (2 * width) sums-to-be of 2 * width lanes
        first, second = [], []
        for src in range(2):
            for g in range(_LANES // (2 * width)):
                first += [src * _LANES + g * 2 * width + i for i in range(width)]
                second += [src * _LANES + g * 2 * width + width + i for i in range(width)]
        parts = [builder.fadd(builder.shuffle_vector(a, b, _lanes_of(_i32t, first)),
                              builder.shuffle_vector(a, b, _lanes_of(_i32t, second)))
                 for a, b in zip(parts[0::2], parts[1::2])]
    return parts[0]


@intrinsic
def _num_threads(typingctx):
    """numba.get_num_threads() minus its ctypes call, which would keep the caller out of numba's cache."""
    from numba.np.ufunc.parallel import _launch_threads
    _launch_threads()

    def codegen(context, builder, sig, args):
        return builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(_i64t, []),
                                                           "get_num_threads"), [])
    return types.int64(), codegen


@intrinsic
def _keys16(typingctx, keys, j, kb):
    """kb[k, :] = float32 of keys[min(j + k, n_ctx - 1)] for k < 16, zeros past head_dim.  keys: [n_ctx,
    head_dim] (float32 or f16 bits); kb: [16, head_dim rounded up to 16] float32."""
    def codegen(context, builder, sig, args):
        keys_, j_, kb_ = args
        half = sig.args[0].dtype == types.uint16
        pk, pb = _data(context, builder, sig.args[0], keys_), _data(context, builder, sig.args[2], kb_)
        n_ctx, hd = _shape(context, builder, sig.args[0], keys_)
        ldb = _shape(context, builder, sig.args[2], kb_)[1]
        n16, rem = builder.udiv(hd, _i64(_LANES)), builder.urem(hd, _i64(_LANES))
        whole = builder.and_(builder.icmp_unsigned("==", rem, _i64(0)),
                             builder.icmp_signed("<=", builder.add(j_, _i64(_LANES)), n_ctx))
        with builder.if_else(whole, likely=True) as (then, otherwise):
            with then:  # 16 whole rows, contiguous in both arrays: one flat loop
                src = builder.mul(j_, hd)
                with cgutils.for_range(builder, n16) as c:
                    for u in range(_LANES):
                        o = builder.add(builder.mul(c.index, _i64(_LANES * _LANES)), _i64(_LANES * u))
                        _store16(builder, pb, o, _load16(builder, pk, builder.add(src, o), half))
            with otherwise:  # the end of the cache (repeat its last row) or a head_dim not a multiple of 16
                last = builder.sub(n_ctx, _i64(1))
                with cgutils.for_range(builder, _i64(_LANES)) as kk:
                    jk = builder.add(j_, kk.index)
                    src = builder.mul(builder.select(builder.icmp_signed("<", jk, last), jk, last), hd)
                    dst = builder.mul(kk.index, ldb)
                    with cgutils.for_range(builder, n16) as c:
                        o = builder.mul(c.index, _i64(_LANES))
                        _store16(builder, pb, builder.add(dst, o), _load16(builder, pk, builder.add(src, o), half))
                    with builder.if_then(builder.icmp_unsigned("!=", rem, _i64(0)), likely=False):
                        o = builder.mul(n16, _i64(_LANES))
                        _store16(builder, pb, builder.add(dst, o), _load16(builder, pk, builder.add(src, o), half, rem))
        return context.get_dummy_value()
    return types.none(keys, j, kb), codegen


@intrinsic
def _qk(typingctx, q, qo, kb, scale, s, so):
    """s[so + k] = scale * dot(q[qo:qo + ld], kb[k]) for the 16 rows k of kb [16, ld] float32 (ld a multiple
    of 16; q zero-padded as kb).  A key's dot: 16 lanes of FMAs in order along the row, then its lanes' tree."""
    def codegen(context, builder, sig, args):
        q_, qo_, kb_, scale_, s_, so_ = args
        pq, pk, ps = (_data(context, builder, sig.args[i], args[i]) for i in (0, 2, 4))
        ld = _shape(context, builder, sig.args[2], kb_)[1]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_vf, None)) for _ in range(_LANES)]
        for a in accs:  # (re)zeroed here, where the call is: alloca_once puts the slots in the entry block
            builder.store(ir.Constant(_vf, None), a)
        with cgutils.for_range(builder, builder.udiv(ld, _i64(_LANES))) as c:
            o = builder.mul(c.index, _i64(_LANES))
            qv = _load16(builder, pq, builder.add(qo_, o), False)
            for k in range(_LANES):
                kv = _load16(builder, pk, builder.add(builder.mul(_i64(k), ld), o), False)
                builder.store(_fma(builder, qv, kv, builder.load(accs[k])), accs[k])
        sums = _transpose_sums(builder, [builder.load(a) for a in accs])
        _store16(builder, ps, so_, builder.fmul(sums, _splat(builder, scale_)))
        return context.get_dummy_value()
    return types.none(q, qo, kb, scale, s, so), codegen


@intrinsic
def _qk2(typingctx, q, qa, qb, kb, k0, scale, s, sa, sb):
    """_qk for two query rows (offsets qa, qb) and the 8 keys k0..k0+7 of kb: s[sa + k] and s[sb + k], k < 8.
    Each key vector loaded serves both rows; every score is _qk's, bit for bit."""
    def codegen(context, builder, sig, args):
        q_, qa_, qb_, kb_, k0_, scale_, s_, sa_, sb_ = args
        pq, pk, ps = (_data(context, builder, sig.args[i], args[i]) for i in (0, 3, 6))
        ld = _shape(context, builder, sig.args[3], kb_)[1]
        half = _LANES // 2
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_vf, None)) for _ in range(_LANES)]  # a, then b
        for a in accs:
            builder.store(ir.Constant(_vf, None), a)
        rows = [builder.mul(builder.add(k0_, _i64(k)), ld) for k in range(half)]
        with cgutils.for_range(builder, builder.udiv(ld, _i64(_LANES))) as c:
            o = builder.mul(c.index, _i64(_LANES))
            qva = _load16(builder, pq, builder.add(qa_, o), False)
            qvb = _load16(builder, pq, builder.add(qb_, o), False)
            for k in range(half):
                kv = _load16(builder, pk, builder.add(rows[k], o), False)
                builder.store(_fma(builder, qva, kv, builder.load(accs[k])), accs[k])
                builder.store(_fma(builder, qvb, kv, builder.load(accs[half + k])), accs[half + k])
        sums = builder.fmul(_transpose_sums(builder, [builder.load(a) for a in accs]), _splat(builder, scale_))
        for i, so in enumerate((sa_, sb_)):
            lanes = _lanes_of(_i32t, list(range(half * i, half * i + half)))
            _store16(builder, ps, so, builder.shuffle_vector(sums, sums, lanes))
        return context.get_dummy_value()
    return types.none(q, qa, qb, kb, k0, scale, s, sa, sb), codegen


def _exp_parts(builder, x):
    """Cephes expf of each lane of x (float32 vector): n = round(x / ln 2) and y = exp(x - n ln 2) in 0.70..1.42
    (range reduction by ln 2 in two parts, degree-5 polynomial; exp(x) = y * 2^n within ~1 ulp)."""
    floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_vf, [_vf]), "llvm.floor.v16f32")
    n = builder.call(floor, [_fma(builder, x, _k16(1.44269504088896341), _k16(0.5))])
    r = _fma(builder, n, _k16(2.12194440e-4), _fma(builder, n, _k16(-0.693359375), x))
    p = _k16(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = _fma(builder, p, r, _k16(c))
    return builder.fadd(_fma(builder, builder.fmul(p, r, flags=_EXACT), r, r), _k16(1.0), flags=_EXACT), n


def _pow2(builder, m):
    """2.0 ** m of each lane of an int32 vector, -126 <= m <= 127 (the exponent field written directly)."""
    m = builder.add(m, _lanes_of(_i32t, [127] * _LANES))
    return builder.bitcast(builder.shl(m, _lanes_of(_i32t, [23] * _LANES)), _vf)


def _exp16(builder, x):
    """exp of each lane of x <= 0 for softmax: below -87 it gives exp(-87) ~ 1.6e-38, never a denormal (slow on
    x86), the same operations in every lane."""
    y, n = _exp_parts(builder, builder.select(builder.fcmp_ordered("<", x, _k16(-87.0)), _k16(-87.0), x))
    return builder.fmul(y, _pow2(builder, builder.fptosi(n, ir.VectorType(_i32t, _LANES))))


@intrinsic
def _softmax(typingctx, s, so, n):
    """s[so:so+n] <- exp(s - max); returns their sum (16 lanes in order, then _halves).  The vector steps read and
    rewrite, unchanged, up to 15 floats past the end: s must extend that far."""
    def codegen(context, builder, sig, args):
        s_, so_, n_ = args
        ps = _data(context, builder, sig.args[0], s_)
        vi = ir.VectorType(_i64t, _LANES)
        n_vec = builder.udiv(builder.add(n_, _i64(_LANES - 1)), _i64(_LANES))

        def at(c):
            return builder.add(so_, builder.mul(c, _i64(_LANES)))

        def valid(c):  # lanes of vector c inside the row
            left = builder.insert_element(ir.Constant(vi, None), builder.sub(n_, builder.mul(c, _i64(_LANES))),
                                          ir.Constant(_i32t, 0))
            left = builder.shuffle_vector(left, left, _lanes_of(_i32t, [0] * _LANES))
            return builder.icmp_signed("<", _lanes_of(_i64t, list(range(_LANES))), left)

        neg = ir.Constant(_vf, [-3.0e38] * _LANES)  # finite: no -inf in sight (fastmath elsewhere assumes none)
        m = cgutils.alloca_once_value(builder, neg)
        with cgutils.for_range(builder, n_vec) as c:
            v = builder.select(valid(c.index), _load16(builder, ps, at(c.index), False), neg)
            old = builder.load(m)
            builder.store(builder.select(builder.fcmp_ordered(">", v, old), v, old), m)
        mx = _splat(builder, _halves(builder, builder.load(m),
                                     lambda a, b: builder.select(builder.fcmp_ordered(">", a, b), a, b)))
        total = cgutils.alloca_once_value(builder, ir.Constant(_vf, None))
        with cgutils.for_range(builder, n_vec) as c:
            ok = valid(c.index)
            old = _load16(builder, ps, at(c.index), False)
            e = _exp16(builder, builder.fsub(builder.select(ok, old, mx), mx))
            e = builder.select(ok, e, ir.Constant(_vf, None))
            builder.store(builder.fadd(builder.load(total), e), total)
            _store16(builder, ps, at(c.index), builder.select(ok, e, old))
        return _halves(builder, builder.load(total), builder.fadd)
    return types.float32(s, so, n), codegen


@intrinsic
def _pv(typingctx, acc, ao, lda, nr, w, wo, ldw, values, j, nk):
    """acc[ao + r*lda + d] += sum over k < nk, in order, of w[wo + r*ldw + k] * values[j + k, d] for rows
    r < nr <= 4 and every d (acc rows padded to a multiple of 16).  One FMA per term and element; a row's sums do
    not depend on nr."""
    def codegen(context, builder, sig, args):
        acc_, ao_, lda_, nr_, w_, wo_, ldw_, values_, j_, nk_ = args
        half = sig.args[7].dtype == types.uint16
        pa, pw, pv = (_data(context, builder, sig.args[i], args[i]) for i in (0, 4, 7))
        hd = _shape(context, builder, sig.args[7], values_)[1]
        n16, rem = builder.udiv(hd, _i64(_LANES)), builder.urem(hd, _i64(_LANES))
        regs = [[cgutils.alloca_once(builder, _vf) for _ in range(_CHUNKS)] for _ in range(_MAX_ROWS)]
        end = builder.append_basic_block("pv.end")
        switch = builder.switch(nr_, end)
        for R in range(1, _MAX_ROWS + 1):  # one code path per row count: accumulators in registers
            bb = builder.append_basic_block(f"pv.rows{R}")
            switch.add_case(_i64(R), bb)
            builder.position_at_end(bb)
            wrow = [builder.add(wo_, builder.mul(_i64(i), ldw_)) for i in range(R)]

            def chunks(o, n_chunks, rem=None):  # values o .. o + 16 * n_chunks of each row, over all nk keys
                offs = [builder.add(o, _i64(_LANES * c)) for c in range(n_chunks)]
                at = [[builder.add(builder.add(ao_, builder.mul(_i64(i), lda_)), oc) for oc in offs] for i in range(R)]
                for i in range(R):
                    for c in range(n_chunks):
                        builder.store(_load16(builder, pa, at[i][c], False), regs[i][c])
                with cgutils.for_range(builder, nk_) as kk:
                    row = builder.mul(builder.add(j_, kk.index), hd)
                    vv = [_load16(builder, pv, builder.add(row, oc), half, rem) for oc in offs]
                    for i in range(R):
                        wv = _splat(builder, builder.load(builder.gep(pw, [builder.add(wrow[i], kk.index)])))
                        for c in range(n_chunks):
                            builder.store(_fma(builder, wv, vv[c], builder.load(regs[i][c])), regs[i][c])
                for i in range(R):
                    for c in range(n_chunks):
                        _store16(builder, pa, at[i][c], builder.load(regs[i][c]))

            n_groups = builder.udiv(n16, _i64(_CHUNKS))
            with cgutils.for_range(builder, n_groups) as g:
                chunks(builder.mul(g.index, _i64(_LANES * _CHUNKS)), _CHUNKS)
            with cgutils.for_range_slice(builder, builder.mul(n_groups, _i64(_CHUNKS)), n16, _i64(1)) as (c, _):
                chunks(builder.mul(c, _i64(_LANES)), 1)
            with builder.if_then(builder.icmp_unsigned("!=", rem, _i64(0)), likely=False):
                chunks(builder.mul(n16, _i64(_LANES)), 1, rem)
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()
    return types.none(acc, ao, lda, nr, w, wo, ldw, values, j, nk), codegen


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def attention(q, k_cache, v_cache, slot, pos, window, scale, out):
    """Causal attention over the KV cache with grouped-query heads.

    q: [T, n_heads * head_dim]; k_cache, v_cache: [n_slots, n_kv_heads, n_ctx, head_dim]; slot, pos: [T];
    out: [T, n_heads * head_dim].  Query t sees positions max(0, pos[t] - window + 1) .. pos[t] of its slot
    (window <= 0: no window).  The cache must already hold the keys/values of every position <= pos[t].
    A job is one key/value head for a run of up to Q_BLOCK consecutive queries of one slot (prefill: a block
    of the prompt; batched decode: one sequence's query) and its group of query heads, or half of them when
    there are too few jobs for the threads (a single sequence's decode step).  Jobs go longest first to the
    least loaded thread.  Every query's arithmetic is the same whatever job it lands in.
    """
    T = q.shape[0]
    if T == 0:
        return
    n_kv, hd = k_cache.shape[1], k_cache.shape[3]
    group = q.shape[1] // hd // n_kv
    hdp = (hd + _LANES - 1) // _LANES * _LANES
    starts = np.empty(T + 1, dtype=np.int64)  # runs: queries starts[i] .. starts[i+1]-1
    n_runs = 0
    for t in range(T):
        if t == 0 or slot[t] != slot[t - 1] or t - starts[n_runs - 1] == Q_BLOCK:
            starts[n_runs] = t
            n_runs += 1
    starts[n_runs] = T
    n_threads = max(1, _num_threads())
    parts = 1  # pieces of each kv head's group of query heads
    if group > 1 and n_threads > 1 and n_runs * n_kv < 2 * n_threads:
        parts = min(group, max(2, (n_threads + n_runs * n_kv - 1) // (n_runs * n_kv)))
    per = (group + parts - 1) // parts
    parts = (group + per - 1) // per
    n_jobs = n_runs * n_kv * parts
    # plain loops from here to the prange: an array expression would be a parallel region of its own
    cost = np.empty(n_jobs, dtype=np.float64)  # ~ key rows read + row-key products
    ld_max, nq_max = 0, 0
    for i in range(n_runs):
        lo_min, hi_max, work = pos[starts[i]] + 1, 0, 0
        for t in range(starts[i], starts[i + 1]):
            lo = 0 if window <= 0 else max(0, pos[t] + 1 - window)
            lo_min, hi_max, work = min(lo_min, lo), max(hi_max, pos[t] + 1), work + pos[t] + 1 - lo
        ld_max = max(ld_max, (hi_max - lo_min // _LANES * _LANES + _LANES - 1) // _LANES * _LANES)
        nq_max = max(nq_max, starts[i + 1] - starts[i])
        for h in range(n_kv):
            for p in range(parts):
                rows = min(group, (p + 1) * per) - p * per
                cost[(i * n_kv + h) * parts + p] = hi_max - lo_min + work * rows + 64.0
    order = np.empty(n_jobs, dtype=np.int64)  # costliest first: Shell sort (np.argsort: +1.4 s of compile)
    for k in range(n_jobs):
        order[k] = k
    gap = 1
    while gap < n_jobs // 3:
        gap = 3 * gap + 1
    while gap > 0:
        for k in range(gap, n_jobs):
            x, u = order[k], k
            while u >= gap and cost[order[u - gap]] < cost[x]:
                order[u] = order[u - gap]
                u -= gap
            order[u] = x
        gap //= 3
    n_w = min(n_threads, n_jobs)
    load = np.empty(n_w, dtype=np.float64)
    for w in range(n_w):
        load[w] = 0.0
    owner = np.empty(n_jobs, dtype=np.int64)  # each job to the least loaded worker (one per thread)
    for k in range(n_jobs):
        w = 0
        for u in range(1, n_w):
            if load[u] < load[w]:
                w = u
        owner[order[k]] = w
        load[w] += cost[order[k]]
    rows_max = nq_max * per
    for w in prange(n_w):
        qr = np.empty((rows_max, hdp), dtype=np.float32)  # per-thread workspace, reused by its jobs
        acc = np.empty((rows_max, hdp), dtype=np.float32)
        kb = np.empty((_LANES, hdp), dtype=np.float32)
        scores = np.empty(rows_max * ld_max + _LANES, dtype=np.float32)
        inv = np.empty(rows_max, dtype=np.float32)
        lo = np.empty(Q_BLOCK, dtype=np.int64)
        hi = np.empty(Q_BLOCK, dtype=np.int64)
        for k in range(n_jobs):
            job = order[k]
            if owner[job] != w:
                continue
            g0 = job % parts * per
            h = job // parts % n_kv
            i = job // parts // n_kv
            t0 = starts[i]
            _attend_run(q, k_cache[slot[t0], h], v_cache[slot[t0], h], pos, t0, starts[i + 1], h * group + g0,
                        min(group, g0 + per) - g0, window, scale, out, qr, acc, kb, scores, inv, lo, hi)


@njit(cache=True, fastmath=FASTMATH)
def _attend_run(q, keys, values, pos, t0, t1, h0, nh, window, scale, out, qr, acc, kb, scores, inv, lo, hi):
    """Queries t0..t1-1 (one slot) of query heads h0..h0+nh-1 against keys, values: [n_ctx, head_dim].
    The rest is workspace: qr, acc [>= rows, hdp]; kb [16, hdp]; scores [>= rows * ld + 16]; inv [>= rows];
    lo, hi [>= t1 - t0] (hdp: head_dim rounded up to 16; rows = (t1 - t0) * nh, query-major)."""
    hd = keys.shape[1]
    hdp = qr.shape[1]
    nq = t1 - t0
    for i in range(nq):
        hi[i] = pos[t0 + i] + 1
        lo[i] = 0 if window <= 0 else max(0, hi[i] - window)
    base, top = lo[0], hi[0]
    for i in range(1, nq):
        base, top = min(base, lo[i]), max(top, hi[i])
    base = base // _LANES * _LANES  # scores[r * ld + j - base]: key j of row r, in blocks of 16 aligned
    ld = (top - base + _LANES - 1) // _LANES * _LANES
    for r in range(nq * nh):
        t, qo = t0 + r // nh, (h0 + r % nh) * hd
        src, dst, a = q[t, qo:qo + hd], qr[r], acc[r]
        for d in range(hd):
            dst[d] = src[d]
        for d in range(hd, hdp):
            dst[d] = 0.0
        for d in range(hdp):
            a[d] = 0.0
    for jb in range(base, top, _LANES):
        _keys16(keys, jb, kb)
        for i in range(nq):
            if lo[i] < jb + _LANES and jb < hi[i]:
                r = i * nh
                for g in range(0, nh - 1, 2):  # pairs of heads, then the odd one
                    for k0 in range(0, _LANES, _LANES // 2):
                        o = jb - base + k0
                        _qk2(qr, (r + g) * hdp, (r + g + 1) * hdp, kb, k0, scale, scores, (r + g) * ld + o,
                             (r + g + 1) * ld + o)
                if nh % 2 == 1:
                    _qk(qr, (r + nh - 1) * hdp, kb, scale, scores, (r + nh - 1) * ld + jb - base)
    for r in range(nq * nh):
        i = r // nh
        inv[r] = np.float32(1.0) / _softmax(scores, r * ld + lo[i] - base, hi[i] - lo[i])
    for i in range(nq):
        for g in range(0, nh, _MAX_ROWS):
            r = i * nh + g
            _pv(acc, r * hdp, hdp, min(_MAX_ROWS, nh - g), scores, r * ld + lo[i] - base, ld, values, lo[i],
                hi[i] - lo[i])
    for r in range(nq * nh):
        t, qo = t0 + r // nh, (h0 + r % nh) * hd
        dst, src, w = out[t, qo:qo + hd], acc[r], inv[r]
        for d in range(hd):
            dst[d] = src[d] * w


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
