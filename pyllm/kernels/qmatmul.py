"""Quantized matrix products: the hot path of the whole tool.

matmul(w, x, path=...) = x @ W.T with W still in its GGUF encoding, two ways, picked by the caller's role so
that a row's result never depends on how many rows share the call:
- "int8" (decode steps): x is quantized to int8 blocks of 32 (one float scale each, plus int sums per 16) and
  every weight block is dotted with integer SIMD (vpdpbusd on AVX-512 VNNI), as llama.cpp does. Memory-bound:
  each weight byte is read once. Legacy 32-blocks unpack each weight block once for a group of up to 8
  activation rows and keep their partial sums in float vectors across the row (one horizontal sum per row,
  not per block); K-quants still unpack per activation row.
- "float" (prompt processing): each thread dequantizes 16 rows to a small float32 tile and multiplies it with
  all T activations in a register-blocked float loop (4 rows x 4 tokens). Compute-bound; measured faster than
  numpy/OpenBLAS on this 2-core machine, whose OpenBLAS threads stall under load.
- "auto": int8 below PREFILL_MIN_T rows, float from there.

numba does not vectorize the per-block integer dot products on its own (it widens small ints to int64 and,
after unrolling the 16-32 wide inner loop, vectorizes across blocks with byte gathers), so the block dots are
written as LLVM vector IR through numba intrinsics: generic IR that LLVM lowers to the host's best
instructions, plus the VNNI instruction itself where numba compiles for a CPU that has it. Three jitted entry
points serve every type, dispatching on qtype inside numba, so a model pays the cache load once, not per type.
Speed per type and shape: bench/bench_qmatmul.py.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import UnsupportedError
from ..quants import SUPPORTED, QTensor, type_name

# qtype ids (gguf.GGMLQuantizationType), as plain ints for numba
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 10, 11, 12, 13, 14, 30
_FLOAT_TYPES = (F32, F16, BF16)

# Below this many activation rows the int8 kernel wins; at and above it, float tiles. The float path pays a
# dequantization of the whole matrix per call; measured crossovers (1 thread): T=7 Q5_0 and Q4_K, 9 Q6_K,
# 14-16 Q4_1 and Q8_0.
PREFILL_MIN_T = 8

# fastmath without nnan/ninf: a NaN or inf in the activations must come out, not be optimized away.
_FM = {"contract", "reassoc", "arcp", "afn", "nsz"}

_TILE_ROWS = 16  # rows dequantized per float tile (a multiple of 4, the register block)
_TILE_TOKENS = 64  # activation rows per pass over a tile
_DOT_ROWS = 8  # rows per task of the int8 kernel


# ---------------------------------------------------------------------------------------------------------
# SIMD building blocks: LLVM vector IR emitted through numba intrinsics. `w`/`x` are 1-D uint8/int8 arrays,
# offsets are byte (= element) offsets into them.

_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _vec(t, n):
    return ir.VectorType(t, n)


def _load(context, builder, aryty, ary, off, n):
    """Unaligned load of n bytes at ary[off] as <n x i8>."""
    return _load_ptr(builder, context.make_array(aryty)(context, builder, ary).data, off, n)


def _load_ptr(builder, data, off, n):
    """Unaligned load of n bytes at data[off] (a byte pointer) as <n x i8>."""
    return builder.load(builder.bitcast(builder.gep(data, [off]), _vec(_i8, n).as_pointer()), align=1)


def _splat(v, n):
    return ir.Constant(_vec(v.type if isinstance(v, ir.Constant) else _i8, n), [v] * n)


def _reduce_add(builder, v):
    fnty = ir.FunctionType(v.type.element, [v.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.add.v{v.type.count}i32")
    return builder.call(fn, [v])


def _udot(builder, q, xv):
    """<n x i32> products of unsigned bytes q and signed bytes xv (the vpdpbusd pattern)."""
    v = _vec(_i32, q.type.count)
    return builder.mul(builder.zext(q, v), builder.sext(xv, v), flags=["nsw"])


def _bcast_i8(builder, val, n):
    """Splat a runtime integer (any width) into <n x i8>."""
    b = builder.trunc(val, _i8)
    v = builder.insert_element(ir.Constant(_vec(_i8, n), None), b, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_vec(_i32, n), [0] * n))


def _halves(builder, v):
    n = v.type.count // 2
    lo = builder.shuffle_vector(v, v, ir.Constant(_vec(_i32, n), list(range(n))))
    hi = builder.shuffle_vector(v, v, ir.Constant(_vec(_i32, n), list(range(n, 2 * n))))
    return lo, hi


@intrinsic
def _bf16(typingctx, a, off):
    """float32 from the bfloat16 at a[off]: its bits are the top half of a float32."""

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), _i16.as_pointer())
        bits = builder.shl(builder.zext(builder.load(ptr, align=1), _i32), ir.Constant(_i32, 16))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(a, off), codegen


@intrinsic
def _f32(typingctx, a, off):
    """float32 stored at a[off] (unaligned)."""

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.FloatType().as_pointer())
        return builder.load(ptr, align=1)

    return types.float32(a, off), codegen


def _f16_value(context, builder, aryty, ary, off):
    data = context.make_array(aryty)(context, builder, ary).data
    ptr = builder.bitcast(builder.gep(data, [off]), ir.HalfType().as_pointer())
    return builder.fpext(builder.load(ptr, align=1), ir.FloatType())


@intrinsic
def _f16(typingctx, a, off):
    """float32 from the little-endian fp16 at a[off] (F16C vcvtph2ps; numba has no float16)."""

    def codegen(context, builder, sig, args):
        return _f16_value(context, builder, sig.args[0], *args)

    return types.float32(a, off), codegen


# Legacy 32-value blocks: (block bytes, offset of the 32-bit high-bit word or -1, offset of the quants,
# offset of the fp16 min or -1, constant offset of the unsigned values: value = d * (q - offset) [+ m]).
# Q8_0's signed bytes are read as q = w + 128 (flipping the top bit), so every type's q is unsigned: the
# vpdpbusd operand form, with no per-row sign handling.
_BLOCK32 = {Q8_0: (34, -1, 2, -1, 128), Q4_0: (18, -1, 2, -1, 8), Q4_1: (20, -1, 4, 2, 0),
            Q5_0: (22, 2, 6, -1, 16), Q5_1: (24, 4, 8, 2, 0)}

# Activation rows that share one unpacked weight block pair, largest first: T=13 runs as 8 + 4 + 1.
_GROUPS = (8, 4, 2, 1)

_f32t = ir.FloatType()
_v16f = _vec(_f32t, 16)


def _fvec(builder, values):
    """<16 x float>: values[i] in lanes 8i..8i+7 (one scale per 32-value block, as vpdpbusd lays out sums)."""
    v = ir.Constant(_v16f, None)
    for i, s in enumerate(values):
        v = builder.insert_element(v, s, ir.Constant(_i32, 8 * i))
    return builder.shuffle_vector(v, v, ir.Constant(_vec(_i32, 16), [0] * 8 + [8] * 8))


def _block_pair(context, builder, wty, w, o, qtype, tail):
    """Blocks at byte o and o + bs: their 64 values as unsigned <64 x i8>, their scales d as <16 x float>
    (see _fvec), and the two float terms per block that need sum(x): m, or -offset * d.  tail: only the first
    block exists (the second's values and scales are zero)."""
    bs, qh_off, qs_off, m_off, offset = _BLOCK32[qtype]
    o2 = builder.add(o, ir.Constant(o.type, bs))
    zero32 = ir.Constant(_vec(_i8, 32), None)
    if qtype == Q8_0:
        lo = _load(context, builder, wty, w, builder.add(o, ir.Constant(o.type, qs_off)), 32)
        hi = zero32 if tail else _load(context, builder, wty, w, builder.add(o2, ir.Constant(o.type, qs_off)), 32)
        q = builder.shuffle_vector(lo, hi, ir.Constant(_vec(_i32, 64), list(range(64))))
        q = builder.xor(q, _splat(ir.Constant(_i8, 0x80), 64))
        if tail:  # the missing block flipped to 0x80 too: back to zeros
            q = builder.and_(q, ir.Constant(_vec(_i8, 64), [255] * 32 + [0] * 32))
    else:
        # 16 bytes of nibbles per block: low nibbles are values 0-15, high nibbles 16-31
        zero16 = ir.Constant(_vec(_i8, 16), None)
        b0 = _load(context, builder, wty, w, builder.add(o, ir.Constant(o.type, qs_off)), 16)
        b1 = zero16 if tail else _load(context, builder, wty, w, builder.add(o2, ir.Constant(o.type, qs_off)), 16)
        b = builder.shuffle_vector(b0, b1, ir.Constant(_vec(_i32, 32), list(range(32))))
        lo = builder.and_(b, _splat(ir.Constant(_i8, 15), 32))
        hi = builder.lshr(b, _splat(ir.Constant(_i8, 4), 32))
        order = list(range(16)) + list(range(32, 48)) + list(range(16, 32)) + list(range(48, 64))
        q = builder.shuffle_vector(lo, hi, ir.Constant(_vec(_i32, 64), order))
        if qh_off >= 0:  # bit j of a block's 32-bit word is bit 4 of its value j
            qh0 = builder.zext(builder.bitcast(_load(context, builder, wty, w, builder.add(o, ir.Constant(o.type, qh_off)), 4), _i32), _i64)
            qh = qh0
            if not tail:
                qh1 = builder.bitcast(_load(context, builder, wty, w, builder.add(o2, ir.Constant(o.type, qh_off)), 4), _i32)
                qh = builder.or_(qh0, builder.shl(builder.zext(qh1, _i64), ir.Constant(_i64, 32)))
            bits = builder.zext(builder.bitcast(qh, _vec(ir.IntType(1), 64)), _vec(_i8, 64))
            q = builder.or_(q, builder.shl(bits, _splat(ir.Constant(_i8, 4), 64)))
    d = [_f16_value(context, builder, wty, w, o)] + ([] if tail else [_f16_value(context, builder, wty, w, o2)])
    if m_off >= 0:
        m = [_f16_value(context, builder, wty, w, builder.add(x, ir.Constant(o.type, m_off))) for x in (o, o2)[:len(d)]]
    else:
        m = [builder.fmul(ir.Constant(_f32t, -float(offset)), di) for di in d]
    zero = ir.Constant(_f32t, 0.0)
    return q, _fvec(builder, d + [zero] * (2 - len(d))), m + [zero] * (2 - len(m))


def _pair_dots(builder, q, xv, vnni):
    """<16 x i32> partial sums of 64 unsigned x signed byte products: lanes 0-7 sum the first 32-value block,
    lanes 8-15 the second (the vpdpbusd layout)."""
    v16i = _vec(_i32, 16)
    if vnni:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i, [v16i] * 3), "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [ir.Constant(v16i, None), builder.bitcast(q, v16i), builder.bitcast(xv, v16i)])
    prod = _udot(builder, q, xv)  # portable: LLVM picks the instructions
    parts = [builder.shuffle_vector(prod, prod, ir.Constant(v16i, [8 * k + i for i in range(8)] + [32 + 8 * k + i for i in range(8)]))
             for k in range(4)]
    return builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))


def _tree_sum(builder, v):
    """Sum of a float vector's lanes, halving it: a fixed order, and 4 steps instead of 16 for an ordered sum."""
    while v.type.count > 1:
        lo, hi = _halves(builder, v)
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_i32, 0))


_PORTABLE_IR = False  # tests set it to compile the portable IR on a VNNI machine


def _use_vnni(context):
    # the CPU numba compiles for (and keys its cache on), not necessarily this machine
    features = context.codegen()._get_host_cpu_features()
    return not _PORTABLE_IR and "+avx512vnni" in features and "+avx512f" in features


def _ptr(builder, base, index, ty):
    """Pointer to element `index` of a typed array data pointer, as a pointer to `ty` (a vector)."""
    return builder.bitcast(builder.gep(base, [index]), ty.as_pointer())


@intrinsic(prefer_literal=True)
def _row_dots32(typingctx, qtype, w, xq, xdv, xm, mrow, res):
    """res[t] = dot of one row of a legacy 32-block type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) with activation row t.

    w u8 [row_bytes]; xq i8 [T, >= 64 * ceil(nb/2)]; xdv f32 [T, >= 16 * ceil(nb/2)] (each block's scale 8
    times); xm f32 [T, nm] (scale * sum of each block, zero past nb, nm a multiple of 16 and > nb when nb is
    odd); mrow f32 [nm] zeroed scratch; res f32 [T].

    Blocks go in pairs, 64 values in one AVX-512 vector: per pair the weights are unpacked once for a group of
    up to 8 activation rows, and each row costs one integer dot, a convert, a multiply and an FMA into its own
    float vector of 16 partial sums (no horizontal sum per block, llama.cpp's layout).  The terms that need a
    block's activation sum (Q4_1's min, the offset of the others) are collected in mrow and dotted with xm
    once per row, 16 blocks per FMA.  Every row gets the same instructions in whichever group it falls, with
    no fast-math flags: res[t] does not depend on T.
    """
    if not isinstance(qtype, types.IntegerLiteral) or qtype.literal_value not in _BLOCK32:
        return None

    def codegen(context, builder, sig, args):
        _, w, xq, xdv, xm, mrow, res = args
        kind = sig.args[0].literal_value
        bs = _BLOCK32[kind][0]
        wty = sig.args[1]
        vnni = _use_vnni(context)
        c64 = lambda v: ir.Constant(_i64, v)  # noqa: E731
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_v16f, [_v16f] * 3), "llvm.fma.v16f32")
        nb = builder.udiv(cgutils.unpack_tuple(builder, context.make_array(wty)(context, builder, w).shape)[0], c64(bs))
        xq_ary = context.make_array(sig.args[2])(context, builder, xq)
        T, x_stride = cgutils.unpack_tuple(builder, xq_ary.shape)
        xdv_ary = context.make_array(sig.args[3])(context, builder, xdv)
        d_stride = cgutils.unpack_tuple(builder, xdv_ary.shape)[1]
        xm_ary = context.make_array(sig.args[4])(context, builder, xm)
        nm = cgutils.unpack_tuple(builder, xm_ary.shape)[1]
        m_data = context.make_array(sig.args[5])(context, builder, mrow).data
        res_data = context.make_array(sig.args[6])(context, builder, res).data

        def pair(p, rows, acc, tail):
            o = builder.mul(p, c64(2 * bs))
            q, dv, m = _block_pair(context, builder, wty, w, o, kind, tail)
            mp = builder.gep(m_data, [builder.add(p, p)])
            builder.store(m[0], mp)
            builder.store(m[1], builder.gep(mp, [c64(1)]))
            for g, tg in enumerate(rows):
                xv = _load_ptr(builder, xq_ary.data, builder.add(builder.mul(tg, x_stride), builder.mul(p, c64(64))), 64)
                sv = builder.load(_ptr(builder, xdv_ary.data, builder.add(builder.mul(tg, d_stride), builder.mul(p, c64(16))), _v16f), align=4)
                s = builder.fmul(dv, sv)
                builder.store(builder.call(fma, [builder.sitofp(_pair_dots(builder, q, xv, vnni), _v16f), s, builder.load(acc[g])]), acc[g])

        t = cgutils.alloca_once_value(builder, c64(0))  # first row of the next group
        n_pairs = builder.udiv(nb, c64(2))
        odd = builder.icmp_unsigned("!=", builder.urem(nb, c64(2)), c64(0))
        for G in _GROUPS:
            with cgutils.for_range(builder, builder.udiv(builder.sub(T, builder.load(t)), c64(G))):
                t0 = builder.load(t)
                rows = [builder.add(t0, c64(g)) for g in range(G)]
                acc = [cgutils.alloca_once_value(builder, ir.Constant(_v16f, None)) for _ in rows]  # mem2reg: registers
                with cgutils.for_range(builder, n_pairs) as loop:
                    pair(loop.index, rows, acc, tail=False)
                with builder.if_then(odd, likely=False):
                    pair(n_pairs, rows, acc, tail=True)
                for g, tg in enumerate(rows):
                    accm = cgutils.alloca_once_value(builder, builder.load(acc[g]))
                    with cgutils.for_range(builder, builder.udiv(nm, c64(16))) as loop:
                        i = builder.mul(loop.index, c64(16))
                        mv = builder.load(_ptr(builder, m_data, i, _v16f), align=4)
                        xmv = builder.load(_ptr(builder, xm_ary.data, builder.add(builder.mul(tg, nm), i), _v16f), align=4)
                        builder.store(builder.call(fma, [mv, xmv, builder.load(accm)]), accm)
                    builder.store(_tree_sum(builder, builder.load(accm)), builder.gep(res_data, [tg]))
                builder.store(builder.add(t0, c64(G)), t)
        return context.get_dummy_value()

    return types.none(qtype, w, xq, xdv, xm, mrow, res), codegen


def _kvalues(context, builder, sig, args):
    """<32 x i8> value j = ((w[off+j] >> shift) & mask) | (((w[hoff+j] >> hshift) & hmask) << hpos)."""
    w, off, shift, mask, hoff, hshift, hmask, hpos = args[:8]
    wty = sig.args[0]
    q = builder.and_(
        builder.lshr(_load(context, builder, wty, w, off, 32), _bcast_i8(builder, shift, 32)),
        _bcast_i8(builder, mask, 32),
    )
    h = builder.and_(
        builder.lshr(_load(context, builder, wty, w, hoff, 32), _bcast_i8(builder, hshift, 32)),
        _bcast_i8(builder, hmask, 32),
    )  # hmask = 0 (no high bits): LLVM drops this load
    return builder.or_(q, builder.shl(h, _bcast_i8(builder, hpos, 32)))


@intrinsic
def _dot_k(typingctx, w, off, shift, mask, hoff, hshift, hmask, hpos, x, xoff):
    """K-quant chunk of 32 unsigned values (see _kvalues) dotted with x[xoff:]: the dots of values 0-15 and
    16-31, for the formats that scale per 16."""

    def codegen(context, builder, sig, args):
        q = _kvalues(context, builder, sig, args)
        xv = _load(context, builder, sig.args[8], args[8], args[9], 32)
        # split the bytes, not the products: each half then matches vpdpbusd on its own
        (qlo, qhi), (xlo, xhi) = _halves(builder, q), _halves(builder, xv)
        sums = [_reduce_add(builder, _udot(builder, qlo, xlo)), _reduce_add(builder, _udot(builder, qhi, xhi))]
        return context.make_tuple(builder, types.UniTuple(types.int32, 2), sums)

    return types.UniTuple(types.int32, 2)(w, off, shift, mask, hoff, hshift, hmask, hpos, x, xoff), codegen


@intrinsic
def _dot_k32(typingctx, w, off, shift, mask, hoff, hshift, hmask, hpos, x, xoff):
    """As _dot_k, one sum over all 32 values (formats that scale per 32: one reduction instead of two)."""

    def codegen(context, builder, sig, args):
        q = _kvalues(context, builder, sig, args)
        xv = _load(context, builder, sig.args[8], args[8], args[9], 32)
        return _reduce_add(builder, _udot(builder, q, xv))

    return types.int32(w, off, shift, mask, hoff, hshift, hmask, hpos, x, xoff), codegen


# ---------------------------------------------------------------------------------------------------------
# Activation quantization: x row -> int8 blocks of 32 with a float scale, plus int sums per 16 values and
# scaled float sums per 32 (for the offsets and minimums of the weight formats).


@njit(fastmath=_FM, cache=True)
def _quantize_act(x, xq, xd, xs, xm, xdv):
    # x f32 [T, n]; xq i8 [T, >= n]; xd f32 [T, n/32]; xs i32 [T, n/16]; xm f32 [T, >= n/32] = xd * block sum;
    # xdv f32 [T, >= n/4]: xd of each block 8 times (the lanes of its sums in _row_dots32).  Padding untouched.
    T, n = x.shape
    xi = x.view(np.int32)  # |x| compared as integers: the order of floats (a vectorized max), NaN the largest
    mi = np.empty(1, np.int32)
    mf = mi.view(np.float32)
    for t in range(T):
        for b in range(n // 32):
            o = b * 32
            m = np.int32(0)
            for j in range(o, o + 32):
                m = max(m, xi[t, j] & np.int32(0x7FFFFFFF))
            mi[0] = m
            amax = mf[0]
            d = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            s0 = np.int32(0)
            for j in range(o, o + 16):
                q = np.int32(np.rint(x[t, j] * inv))
                xq[t, j] = q
                s0 += q
            s1 = np.int32(0)
            for j in range(o + 16, o + 32):
                q = np.int32(np.rint(x[t, j] * inv))
                xq[t, j] = q
                s1 += q
            xd[t, b] = d
            xs[t, 2 * b] = s0
            xs[t, 2 * b + 1] = s1
            xm[t, b] = d * np.float32(s0 + s1)
            for i in range(8):
                xdv[t, 8 * b + i] = d


# ---------------------------------------------------------------------------------------------------------
# Row dot products: one weight row (uint8 [row_bytes]) against one quantized activation row.
# Offsets of each field inside a block follow ggml-common.h.


@njit(cache=True)
def _scale_min_k4(w, o, j):
    """6-bit scale and min of sub-block j (0-7) of a Q4_K/Q5_K block whose 12 scale bytes start at w[o]."""
    if j < 4:
        return np.int32(w[o + j] & 63), np.int32(w[o + j + 4] & 63)
    sc = (w[o + j + 4] & 15) | ((w[o + j - 4] >> 6) << 4)
    m = (w[o + j + 4] >> 4) | ((w[o + j] >> 6) << 4)
    return np.int32(sc), np.int32(m)


@njit(cache=True)
def _scale_q3_k(w, o, i):
    """Signed 6-bit scale i (0-15) of a Q3_K block whose 12 scale bytes start at w[o]."""
    lo = (w[o + i % 8] >> (4 * (i // 8))) & 15
    hi = (w[o + 8 + i % 4] >> (2 * (i // 4))) & 3
    return np.int32(lo | (hi << 4)) - 32


@njit(fastmath=_FM, cache=True)
def _vd_q2_k(w, xq, xd, xs, xm):
    acc = np.float32(0.0)
    accm = np.float32(0.0)
    for b in range(w.shape[0] // 84):
        o = b * 84
        d = _f16(w, o + 80)
        dmin = _f16(w, o + 82)
        for c in range(8):  # chunks of 32 values, two 16-value sub-blocks each
            k = b * 8 + c
            lo, hi = _dot_k(w, o + 16 + 32 * (c // 4), 2 * (c % 4), 3, o, 0, 0, 0, xq, k * 32)
            sa = np.int32(w[o + 2 * c])
            sb = np.int32(w[o + 2 * c + 1])
            acc += (d * xd[k]) * np.float32((sa & 15) * lo + (sb & 15) * hi)
            accm += (dmin * xd[k]) * np.float32((sa >> 4) * xs[2 * k] + (sb >> 4) * xs[2 * k + 1])
    return acc - accm


@njit(fastmath=_FM, cache=True)
def _vd_q3_k(w, xq, xd, xs, xm):
    acc = np.float32(0.0)
    for b in range(w.shape[0] // 110):
        o = b * 110
        d = _f16(w, o + 108)
        for c in range(8):
            k = b * 8 + c
            n, j = c // 4, c % 4
            # value = 2 low bits | high bit << 2, minus 4
            lo, hi = _dot_k(w, o + 32 + 32 * n, 2 * j, 3, o, 4 * n + j, 1, 2, xq, k * 32)
            isum = _scale_q3_k(w, o + 96, 2 * c) * (lo - 4 * xs[2 * k])
            isum += _scale_q3_k(w, o + 96, 2 * c + 1) * (hi - 4 * xs[2 * k + 1])
            acc += (d * xd[k]) * np.float32(isum)
    return acc


@njit(fastmath=_FM, cache=True)
def _vd_q4_k(w, xq, xd, xs, xm):
    return _vd_q45_k(w, xq, xd, xm, 144, 16, 0)


@njit(fastmath=_FM, cache=True)
def _vd_q5_k(w, xq, xd, xs, xm):
    return _vd_q45_k(w, xq, xd, xm, 176, 48, 1)


@njit(fastmath=_FM, cache=True)
def _vd_q45_k(w, xq, xd, xm, bs, qs, hmask):
    # Q4_K (bs 144, nibbles at 16) and Q5_K (bs 176, nibbles at 48, bit c of the 32 bytes at 16 is bit 4)
    acc = np.float32(0.0)
    accm = np.float32(0.0)
    for b in range(w.shape[0] // bs):
        o = b * bs
        d = _f16(w, o)
        dmin = _f16(w, o + 2)
        for c in range(4):  # chunks c and c + 4: their 6-bit scales and mins share bytes (get_scale_min_k4)
            s = o + 4
            k = b * 8 + c
            q = o + qs + 32 * (c // 2)
            sc_a = np.int32(w[s + c] & 63)
            m_a = np.float32(w[s + c + 4] & 63)
            sc_b = np.int32((w[s + c + 8] & 15) | ((w[s + c] >> 6) << 4))
            m_b = np.float32((w[s + c + 8] >> 4) | ((w[s + c + 4] >> 6) << 4))
            dot_a = _dot_k32(w, q, 4 * (c % 2), 15, o + 16, c, hmask, 4, xq, k * 32)
            dot_b = _dot_k32(w, q + 64, 4 * (c % 2), 15, o + 16, c + 4, hmask, 4, xq, k * 32 + 128)
            acc += (d * xd[k]) * np.float32(sc_a * dot_a) + (d * xd[k + 4]) * np.float32(sc_b * dot_b)
            accm += dmin * (m_a * xm[k] + m_b * xm[k + 4])
    return acc - accm


@njit(fastmath=_FM, cache=True)
def _q6_k_chunk(w, o, n, j, xq, xs, k):
    # value = 4 low bits | 2 high bits << 4, minus 32; two signed 8-bit scales per chunk
    lo, hi = _dot_k(w, o + 64 * n + 32 * (j % 2), 4 * (j // 2), 15, o + 128 + 32 * n, 2 * j, 3, 4, xq, k * 32)
    sa = np.int32(np.int8(w[o + 192 + 8 * n + 2 * j]))
    sb = np.int32(np.int8(w[o + 193 + 8 * n + 2 * j]))
    return sa * (lo - 32 * xs[2 * k]) + sb * (hi - 32 * xs[2 * k + 1])


@njit(fastmath=_FM, cache=True)
def _vd_q6_k(w, xq, xd, xs, xm):
    acc = np.float32(0.0)
    for b in range(w.shape[0] // 210):
        o = b * 210
        d = _f16(w, o + 208)
        for n in range(2):
            k = b * 8 + 4 * n
            # the four chunks of a half written out: their shifts become constants
            acc += (d * xd[k]) * np.float32(_q6_k_chunk(w, o, n, 0, xq, xs, k))
            acc += (d * xd[k + 1]) * np.float32(_q6_k_chunk(w, o, n, 1, xq, xs, k + 1))
            acc += (d * xd[k + 2]) * np.float32(_q6_k_chunk(w, o, n, 2, xq, xs, k + 2))
            acc += (d * xd[k + 3]) * np.float32(_q6_k_chunk(w, o, n, 3, xq, xs, k + 3))
    return acc


# no fastmath here: numba would put its flags on the inlined _row_dots32 IR too, and LLVM could then fuse or
# reorder a row's float sums differently per group size (measured: Q4_0 and Q5_0 rows changed with T)
@njit(cache=True)
def _dot_rows(qtype, w, r0, r1, xq, xd, xs, xm, xdv, out):
    # out[:, r0:r1] for rows r0..r1 of w. One branch per type around its loops, so the row dots inline with
    # their type fixed: a call per row to a dispatching function cost 23 ns a row (2x on SmolLM2 shapes)
    T = xq.shape[0]
    res = np.empty(T, np.float32)  # one weight row against every activation row (legacy 32-block types)
    mrow = np.zeros(xm.shape[1], np.float32)  # scratch of _row_dots32
    if qtype == Q4_1:
        for r in range(r0, r1):
            _row_dots32(Q4_1, w[r], xq, xdv, xm, mrow, res)
            out[:, r] = res
    elif qtype == Q8_0:
        for r in range(r0, r1):
            _row_dots32(Q8_0, w[r], xq, xdv, xm, mrow, res)
            out[:, r] = res
    elif qtype == Q5_0:
        for r in range(r0, r1):
            _row_dots32(Q5_0, w[r], xq, xdv, xm, mrow, res)
            out[:, r] = res
    elif qtype == Q4_0:
        for r in range(r0, r1):
            _row_dots32(Q4_0, w[r], xq, xdv, xm, mrow, res)
            out[:, r] = res
    elif qtype == Q5_1:
        for r in range(r0, r1):
            _row_dots32(Q5_1, w[r], xq, xdv, xm, mrow, res)
            out[:, r] = res
    elif qtype == Q4_K:
        for r in range(r0, r1):
            for t in range(T):
                out[t, r] = _vd_q4_k(w[r], xq[t], xd[t], xs[t], xm[t])
    elif qtype == Q6_K:
        for r in range(r0, r1):
            for t in range(T):
                out[t, r] = _vd_q6_k(w[r], xq[t], xd[t], xs[t], xm[t])
    elif qtype == Q5_K:
        for r in range(r0, r1):
            for t in range(T):
                out[t, r] = _vd_q5_k(w[r], xq[t], xd[t], xs[t], xm[t])
    elif qtype == Q3_K:
        for r in range(r0, r1):
            for t in range(T):
                out[t, r] = _vd_q3_k(w[r], xq[t], xd[t], xs[t], xm[t])
    else:
        for r in range(r0, r1):
            for t in range(T):
                out[t, r] = _vd_q2_k(w[r], xq[t], xd[t], xs[t], xm[t])


@njit(cache=True)
def _act_buffers(T, n):
    # zeroed buffers for T activation rows of n values on the int8 path: xq, xd, xs, xm, xdv (_quantize_act),
    # padded to whole block pairs and, for xm, to a multiple of 16 blocks above nb (the vector loops of _row_dots32)
    nb = n // 32
    pairs = (nb + 1) // 2
    nm = (nb + 16) // 16 * 16
    return (np.zeros((T, 64 * pairs), np.int8), np.zeros((T, nb), np.float32), np.zeros((T, n // 16), np.int32),
            np.zeros((T, nm), np.float32), np.zeros((T, 16 * pairs), np.float32))


@njit(parallel=True, fastmath=_FM, cache=True)
def _matmul_q8(qtype, w, x, out):
    # w u8 [n_out, row_bytes]; x f32 [T, n_in]; out f32 [T, n_out]
    xq, xd, xs, xm, xdv = _act_buffers(x.shape[0], x.shape[1])
    # a called function, not array expressions: under parallel=True each of those is one more parallel region
    _quantize_act(x, xq, xd, xs, xm, xdv)
    R = w.shape[0]
    for c in prange((R + _DOT_ROWS - 1) // _DOT_ROWS):
        _dot_rows(qtype, w, c * _DOT_ROWS, min(c * _DOT_ROWS + _DOT_ROWS, R), xq, xd, xs, xm, xdv, out)


# ---------------------------------------------------------------------------------------------------------
# Dequantization of one row into float32: for get_rows, dequantize and the prefill tiles.


@njit(fastmath=_FM, cache=True)
def _dequant_row(qtype, w, y):
    # w u8 [row_bytes]; y f32 [n_in]
    n = y.shape[0]
    if qtype == F32:
        for i in range(n):
            y[i] = _f32(w, 4 * i)
    elif qtype == F16:
        for i in range(n):
            y[i] = _f16(w, 2 * i)
    elif qtype == BF16:
        for i in range(n):
            y[i] = _bf16(w, 2 * i)
    elif qtype == Q8_0:
        for b in range(n // 32):
            d = _f16(w, b * 34)
            for j in range(32):
                y[b * 32 + j] = d * np.float32(np.int8(w[b * 34 + 2 + j]))
    elif qtype == Q4_0 or qtype == Q4_1:
        bs = 18 if qtype == Q4_0 else 20
        for b in range(n // 32):
            o = b * bs
            d = _f16(w, o)
            m = _f16(w, o + 2) if qtype == Q4_1 else np.float32(-8.0) * d
            for j in range(16):
                q = w[o + bs - 16 + j]
                y[b * 32 + j] = d * np.float32(q & 15) + m
                y[b * 32 + 16 + j] = d * np.float32(q >> 4) + m
    elif qtype == Q5_0 or qtype == Q5_1:
        bs = 22 if qtype == Q5_0 else 24
        for b in range(n // 32):
            o = b * bs
            d = _f16(w, o)
            m = _f16(w, o + 2) if qtype == Q5_1 else np.float32(-16.0) * d
            qh = np.uint32(0)
            for i in range(4):
                qh |= np.uint32(w[o + bs - 20 + i]) << (8 * i)
            for j in range(16):
                q = w[o + bs - 16 + j]
                lo = (q & 15) | (((qh >> j) & 1) << 4)
                hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
                y[b * 32 + j] = d * np.float32(lo) + m
                y[b * 32 + 16 + j] = d * np.float32(hi) + m
    else:
        _dequant_row_k(qtype, w, y)


@njit(fastmath=_FM, cache=True)
def _dequant_row_k(qtype, w, y):
    # K-quants: blocks of 256 as 8 chunks of 32 values in the chunk order of the _vd_* functions; scales are
    # worked out once per 16-value half-chunk, so the inner loops are plain byte arithmetic
    for b in range(y.shape[0] // 256):
        for c in range(8):
            n, j = c // 4, c % 4
            for h in range(2):
                i = b * 256 + c * 32 + h * 16  # first output of this half-chunk
                if qtype == Q2_K:
                    o = b * 84
                    sc = w[o + 2 * c + h]
                    dl = _f16(w, o + 80) * np.float32(sc & 15)
                    ml = _f16(w, o + 82) * np.float32(sc >> 4)
                    for l in range(h * 16, h * 16 + 16):
                        y[i + l - h * 16] = dl * np.float32((w[o + 16 + 32 * n + l] >> (2 * j)) & 3) - ml
                elif qtype == Q3_K:
                    o = b * 110
                    dl = _f16(w, o + 108) * np.float32(_scale_q3_k(w, o + 96, 2 * c + h))
                    for l in range(h * 16, h * 16 + 16):
                        q = np.int32((w[o + 32 + 32 * n + l] >> (2 * j)) & 3) | (((w[o + l] >> (4 * n + j)) & 1) << 2)
                        y[i + l - h * 16] = dl * np.float32(q - 4)
                elif qtype == Q4_K or qtype == Q5_K:
                    o = b * 144 if qtype == Q4_K else b * 176
                    sc, m = _scale_min_k4(w, o + 4, c)
                    dl = _f16(w, o) * np.float32(sc)
                    ml = _f16(w, o + 2) * np.float32(m)
                    qs = o + (16 if qtype == Q4_K else 48) + 32 * (c // 2)
                    for l in range(h * 16, h * 16 + 16):
                        q = np.int32(w[qs + l] >> (4 * (c % 2))) & 15
                        if qtype == Q5_K:
                            q |= ((w[o + 16 + l] >> c) & 1) << 4
                        y[i + l - h * 16] = dl * np.float32(q) - ml
                else:  # Q6_K
                    o = b * 210
                    dl = _f16(w, o + 208) * np.float32(np.int8(w[o + 192 + 8 * n + 2 * j + h]))
                    ql = o + 64 * n + 32 * (j % 2)
                    for l in range(h * 16, h * 16 + 16):
                        q = (np.int32(w[ql + l] >> (4 * (j // 2))) & 15) | ((np.int32(w[o + 128 + 32 * n + l] >> (2 * j)) & 3) << 4)
                        y[i + l - h * 16] = dl * np.float32(q - 32)


@njit(parallel=True, cache=True)
def _dequant_rows(qtype, w, ids, out):
    # w u8 [n_rows, row_bytes]; ids int [N]; out f32 [N, n_in]
    for i in prange(ids.shape[0]):
        _dequant_row(qtype, w[ids[i]], out[i])


@njit(parallel=True, fastmath=_FM, cache=True)
def _matmul_f32(qtype, w, x, out):
    # w u8 [n_out, row_bytes]; x f32 [T, n_in]; out f32 [T, n_out]
    T, n = x.shape
    R = w.shape[0]
    for g in prange((R + _TILE_ROWS - 1) // _TILE_ROWS):
        r0 = g * _TILE_ROWS
        nr = min(_TILE_ROWS, R - r0)
        tile = np.zeros((_TILE_ROWS, n), np.float32)  # rows past nr stay zero: no tail loop below
        for i in range(nr):
            _dequant_row(qtype, w[r0 + i], tile[i])
        for t0 in range(0, T, _TILE_TOKENS):  # keeps this slice of x in L2 while all 16 rows use it
            for i in range(0, nr, 4):
                w0, w1, w2, w3 = tile[i], tile[i + 1], tile[i + 2], tile[i + 3]
                for t in range(t0, min(t0 + _TILE_TOKENS, T), 4):
                    # 4 rows x 4 tokens: 8 loads feed 16 FMAs; tail tokens repeat the last one, unwritten
                    xa, xb, xc, xe = x[t], x[min(t + 1, T - 1)], x[min(t + 2, T - 1)], x[min(t + 3, T - 1)]
                    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
                    c0 = c1 = c2 = c3 = e0 = e1 = e2 = e3 = np.float32(0.0)
                    for j in range(n):
                        p, q, s, u = w0[j], w1[j], w2[j], w3[j]
                        v = xa[j]
                        a0 += v * p
                        a1 += v * q
                        a2 += v * s
                        a3 += v * u
                        v = xb[j]
                        b0 += v * p
                        b1 += v * q
                        b2 += v * s
                        b3 += v * u
                        v = xc[j]
                        c0 += v * p
                        c1 += v * q
                        c2 += v * s
                        c3 += v * u
                        v = xe[j]
                        e0 += v * p
                        e1 += v * q
                        e2 += v * s
                        e3 += v * u
                    acc = ((a0, a1, a2, a3), (b0, b1, b2, b3), (c0, c1, c2, c3), (e0, e1, e2, e3))  # [token][row]
                    for k in range(min(4, T - t)):
                        for m in range(min(4, nr - i)):
                            out[t + k, r0 + i + m] = acc[k][m]


# ---------------------------------------------------------------------------------------------------------
# Public API


def _check(w: QTensor) -> np.ndarray:
    if w.qtype not in SUPPORTED:
        raise UnsupportedError(f"tensor '{w.name}' has type {type_name(w.qtype)}, which pyllm cannot run")
    data = w.data
    if data.flags.writeable or not data.flags.c_contiguous:  # QTensor makes it read-only; keep one numba variant
        data = np.ascontiguousarray(data).view()
        data.flags.writeable = False
    return data


_PATHS = ("auto", "int8", "float")


def matmul(w: QTensor, x: np.ndarray, out: np.ndarray | None = None, *, path: str = "auto") -> np.ndarray:
    """x @ W.T: x float32 [T, n_in] -> float32 [T, n_out] (written into `out` when given).

    path picks how quantized weights are multiplied, so that a row's result depends on its role, never on T:
    "int8" (decode steps) quantizes the activations and computes every row bit-identical to a lone row;
    "float" (prompt processing) uses float tiles, every row identical whatever T (also T=1);
    "auto" takes int8 below PREFILL_MIN_T rows, float from there (the faster one). Float weights always
    take the float path.
    """
    data = _check(w)
    n_out, n_in = w.shape
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"matmul with '{w.name}' {w.shape}: x has shape {x.shape}, expected [T, {n_in}]")
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty((x.shape[0], n_out), np.float32)
    if uses_int8(w.qtype, x.shape[0], path):
        _matmul_q8(w.qtype, data, x, out)
    else:
        _matmul_f32(w.qtype, data, x, out)
    return out


def uses_int8(qtype: int, T: int, path: str) -> bool:
    """Whether matmul(path=path) rounds T activation rows to int8 blocks (the CUDA backend mirrors it)."""
    if path not in _PATHS:
        raise ValueError(f"matmul path must be one of {_PATHS}, not {path!r}")
    if qtype in _FLOAT_TYPES:
        return False
    return path == "int8" or (path == "auto" and T < PREFILL_MIN_T)


def get_rows(w: QTensor, ids: np.ndarray) -> np.ndarray:
    """Dequantized rows W[ids]: float32 [len(ids), n_in] (token embedding lookup)."""
    data = _check(w)
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise IndexError(f"row id out of range for '{w.name}' with {w.shape[0]} rows")
    out = np.empty((ids.shape[0], w.shape[1]), np.float32)
    _dequant_rows(w.qtype, data, ids, out)
    return out


def dequantize(w: QTensor) -> np.ndarray:
    """The whole matrix as float32 [n_out, n_in] (tests and tiny weights only)."""
    return get_rows(w, np.arange(w.shape[0]))
