"""Quantized matrix products: the hot path of the whole tool.

matmul(w, x, path=...) = x @ W.T with W still in its GGUF encoding, two ways, picked by the caller's role so
that a row's result never depends on how many rows share the call:
- "int8" (decode steps): x is quantized to int8 blocks of 32 (256 for K-quants: llama.cpp's Q8_0 and Q8_K),
  and every 64 weights are unpacked once to unsigned bytes and dotted with up to 8 activation rows by
  integer SIMD (vpdpbusd on AVX-512 VNNI and AVX-VNNI, vpmaddubsw + vpmaddwd on AVX2: _pair_dots and
  _scaled_dots, the primitives that differ per instruction set).  Every type, legacy or K-quant, goes
  through that one loop (_row_dots); a T=8 step costs ~2.5-4x a T=1 step, which is what makes batched
  decoding pay.
- "float": each thread dequantizes 16 rows to a small float32 tile and multiplies it with all T activations
  in a register-blocked float loop (4 rows x 2 tokens). Compute-bound; measured faster than numpy/OpenBLAS on
  this 2-core machine, whose OpenBLAS threads stall under load.
- "prefill" (prompt processing): int8 for Q4_K and Q5_K, float tiles for the other types: the faster of
  the two for long prompts where llama.cpp's logits stay as close (AVX2: int8 is 1.3x faster for K-quants,
  float tiles 3-7% for legacy types; Q6_K on int8 too took Gemma 3's largest teacher-forced |dlogit| against
  llama.cpp from 1.15 to 1.82, Q4_K alone to 1.22).
- "auto": int8 below PREFILL_MIN_T rows, float from there.

numba does not vectorize the per-block integer dot products on its own (it widens small ints to int64 and,
after unrolling the 16-32 wide inner loop, vectorizes across blocks with byte gathers), so the block dots are
written as LLVM vector IR through numba intrinsics: generic IR that LLVM lowers to the host's best
instructions, plus the x86 byte-dot instructions themselves for the CPU numba compiles for (ISAS). Each kernel is
compiled per quant type (_for_type), so a model compiles and loads only the types it has.
Speed per type and shape: bench/bench_qmatmul.py.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, typeof, types
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
_TILE_SPAN = 1024  # values of a row per pass: 4 tile rows and 2 activation rows of it fill 24 KB of L1
_DOT_ROWS = 8  # rows per task of the int8 kernel
# The int8 kernel asks for the weight bytes this far ahead of those it reads (its own row, then the next ones of
# its task): the hardware prefetcher alone left a single-sequence decode step waiting on memory (SmolLM2
# 10.5-12 -> 7.5-8 ms per token; 2048-8192 measured alike)
_PREFETCH_BYTES = 4096


# ---------------------------------------------------------------------------------------------------------
# SIMD building blocks: LLVM vector IR emitted through numba intrinsics. `w`/`x` are 1-D uint8/int8 arrays,
# offsets are byte (= element) offsets into them.

_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _vec(t, n):
    return ir.VectorType(t, n)


def _load_ptr(builder, data, off, n):
    """Unaligned load of n bytes at data[off] (a byte pointer) as <n x i8>."""
    return builder.load(builder.bitcast(builder.gep(data, [off]), _vec(_i8, n).as_pointer()), align=1)


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


def _f16_value(builder, data, off):
    """float32 from the fp16 at byte data[off] (a byte pointer)."""
    ptr = builder.bitcast(builder.gep(data, [off]), ir.HalfType().as_pointer())
    return builder.fpext(builder.load(ptr, align=1), ir.FloatType())


@intrinsic
def _f16(typingctx, a, off):
    """float32 from the little-endian fp16 at a[off] (F16C vcvtph2ps; numba has no float16)."""

    def codegen(context, builder, sig, args):
        return _f16_value(builder, context.make_array(sig.args[0])(context, builder, args[0]).data, args[1])

    return types.float32(a, off), codegen


# ---------------------------------------------------------------------------------------------------------
# The int8 path: one weight row against up to 8 quantized activation rows at a time, 64 values per step.
#
# Every type is read as "units" of whole blocks: a pair of legacy 32-value blocks, or one K-quant super-block
# of 256.  A legacy unit yields, for each 64 values, the unsigned bytes q (<64 x i8>, the vpdpbusd operand)
# and the weight scale of every 4 of them (<16 x float>: the lanes of vpdpbusd's sums), plus, for types with a
# min (Q4_1, Q5_1), the mins that multiply activation sums, one per 32 values.  Types stored as q - offset
# (_OFFSETS; Q8_0's signed bytes are read as q = w + 128 by flipping the top bit) need no such term: the
# integer dot starts from -offset * the activations' lane sums, so it is sum((q - offset) * x) exactly.
# K-quants meet activations quantized per 256 values (llama.cpp's Q8_K), so their sub-block scales stay
# integers through the whole super-block (_KUnit).  Offsets of each field inside a block follow ggml-common.h.

# Legacy 32-value blocks: (block bytes, offset of the 32-bit high-bit word or -1, offset of the quants,
# offset of the fp16 min or -1, constant offset of the unsigned values: value = d * (q - offset) [+ m]).
_BLOCK32 = {Q8_0: (34, -1, 2, -1, 128), Q4_0: (18, -1, 2, -1, 8), Q4_1: (20, -1, 4, 2, 0),
            Q5_0: (22, 2, 6, -1, 16), Q5_1: (24, 4, 8, 2, 0)}
_KQUANT_BYTES = {Q2_K: 84, Q3_K: 110, Q4_K: 144, Q5_K: 176, Q6_K: 210}  # per 256 values
# the types whose values are scale * (q - offset), q unsigned as unpacked
_OFFSETS = {**{t: v[4] for t, v in _BLOCK32.items() if v[4]}, Q6_K: 32, Q3_K: 4}

# Activation rows that share one unpacked unit, largest first: T=13 runs as 8 + 4 + 1.
_GROUPS = (8, 4, 2, 1)
_BLOCK_ROWS = _GROUPS[0]  # activation rows quantized into one contiguous block (_act_buffers)

_f32t = ir.FloatType()


def _cat(builder, a, b):
    """The concatenation of two vectors of one type."""
    n = a.type.count
    return builder.shuffle_vector(a, b, ir.Constant(_vec(_i32, 2 * n), list(range(2 * n))))


def _pick(builder, v, lanes):
    """<len(lanes) x T> with v[lanes[i]] in lane i."""
    return builder.shuffle_vector(v, v, ir.Constant(_vec(_i32, len(lanes)), lanes))


def _bits(builder, v, shift, mask):
    """(v >> shift) & mask, lane by lane (shift an int or a list, one per lane)."""
    n = v.type.count
    sh = ir.Constant(v.type, shift if isinstance(shift, list) else [shift] * n)
    return builder.and_(builder.lshr(v, sh), ir.Constant(v.type, [mask] * n))


def _shl(builder, v, k):
    return builder.shl(v, ir.Constant(v.type, [k] * v.type.count))


def _times(builder, v, scale):
    """Float vector v times the float scalar `scale`."""
    return builder.fmul(v, _pick(builder, builder.insert_element(ir.Constant(v.type, None), scale, ir.Constant(_i32, 0)),
                                 [0] * v.type.count))


def _unit_bytes(kind):
    """Bytes of one unit of a quantized type: a pair of legacy 32-value blocks, or a K-quant super-block."""
    return 2 * _BLOCK32[kind][0] if kind in _BLOCK32 else _KQUANT_BYTES[kind]


class _Row:
    """Reads one weight row (a uint8 array) in IR at byte offsets: o, an IR i64, plus a constant."""

    def __init__(self, context, builder, aryty, ary):
        self.builder = builder
        ary = context.make_array(aryty)(context, builder, ary)
        self.data, self.n_bytes = ary.data, cgutils.unpack_tuple(builder, ary.shape)[0]

    def each_unit(self, kind, body):
        """body(u, o, tail) for unit u of the row at byte o; a legacy row with an odd block count ends on a
        half pair (tail: only its first block exists)."""
        b, size = self.builder, _unit_bytes(kind)
        legacy = kind in _BLOCK32
        n_blocks = b.udiv(self.n_bytes, ir.Constant(_i64, size // 2 if legacy else size))
        n_units = b.udiv(n_blocks, ir.Constant(_i64, 2)) if legacy else n_blocks
        with cgutils.for_range(b, n_units) as loop:
            body(loop.index, b.mul(loop.index, ir.Constant(_i64, size)), False)
        if legacy:
            with b.if_then(b.icmp_unsigned("!=", b.urem(n_blocks, ir.Constant(_i64, 2)), ir.Constant(_i64, 0)),
                           likely=False):
                body(n_units, b.mul(n_units, ir.Constant(_i64, size)), True)

    def at(self, o, k):
        return self.builder.add(o, ir.Constant(_i64, k)) if k else o

    def bytes(self, o, k, n):
        return _load_ptr(self.builder, self.data, self.at(o, k), n)

    def f16(self, o, k):
        return _f16_value(self.builder, self.data, self.at(o, k))


def _unit_block32(r, o, qtype, tail, signed=False):
    """Two legacy blocks at byte o (tail: only the first exists; the second reads as zeros) -> (q <64 x i8>,
    the weight scale of every 4 values <16 x float>, the two blocks' mins <2 x float> or None); Q8_0's bytes
    as they are with `signed` (_signed_weights), else flipped to unsigned."""
    b = r.builder
    bs, qh_off, qs_off, m_off, _ = _BLOCK32[qtype]  # the offset is in the activations' sums (_OFFSETS)
    blocks = [o] if tail else [o, r.at(o, bs)]
    if qtype == Q8_0:
        parts = [r.bytes(ob, qs_off, 32) for ob in blocks] + [ir.Constant(_vec(_i8, 32), None)] * tail
        q = _cat(b, *parts)
        if not signed:
            q = b.xor(q, ir.Constant(_vec(_i8, 64), [0x80] * 64))
    else:  # 16 bytes of nibbles per block: low nibbles are values 0-15, high nibbles 16-31
        parts = [r.bytes(ob, qs_off, 16) for ob in blocks] + [ir.Constant(_vec(_i8, 16), None)] * tail
        nib = _cat(b, *parts)
        lo, hi = _bits(b, nib, 0, 15), _bits(b, nib, 4, 15)
        q = b.shuffle_vector(lo, hi, ir.Constant(_vec(_i32, 64), list(range(16)) + list(range(32, 48))
                                                 + list(range(16, 32)) + list(range(48, 64))))
        if qh_off >= 0:  # bit j of a block's 32-bit word is bit 4 of its value j
            words = [b.bitcast(r.bytes(ob, qh_off, 4), _i32) for ob in blocks] + [ir.Constant(_i32, 0)] * tail
            qh = b.or_(b.zext(words[0], _i64), b.shl(b.zext(words[1], _i64), ir.Constant(_i64, 32)))
            q = b.or_(q, _shl(b, b.zext(b.bitcast(qh, _vec(ir.IntType(1), 64)), _vec(_i8, 64)), 4))
    # the fp16 scale (and min, which follows it) of both blocks converted in one vector: [d0, (m0,) d1, (m1)]
    k = 2 if m_off == 2 else 1
    words = [b.bitcast(r.bytes(ob, 0, 2 * k), ir.IntType(16 * k)) for ob in blocks] + [ir.Constant(ir.IntType(16 * k), 0)] * tail
    both = b.insert_element(b.insert_element(ir.Constant(_vec(ir.IntType(16 * k), 2), None), words[0], ir.Constant(_i32, 0)),
                            words[1], ir.Constant(_i32, 1))
    dm = b.fpext(b.bitcast(both, _vec(ir.HalfType(), 2 * k)), _vec(_f32t, 2 * k))
    dvec = _pick(b, dm, [0] * 8 + [k] * 8)
    return q, dvec, (_pick(b, dm, [1, 3]) if m_off >= 0 else None)


class _KUnit:
    """What a K-quant super-block gives _row_dots: pairs, for each 64 values, the unsigned bytes q and the
    integer scale of every 4 of them (<16 x i16>, the lanes of _scaled_dots); the integer scale of each 16
    values (<16 x i16>, for the offset of _OFFSETS types) or the integer min of each 16 (types with mins), and
    the float factors d (of the scales) and dmin (of the mins): value = d * scale * (q - offset) - dmin * min."""

    def __init__(self, pairs, d, group_scales=None, mins=None, dmin=None):
        self.pairs, self.d, self.group_scales, self.mins, self.dmin = pairs, d, group_scales, mins, dmin


def _widen16(builder, v, signed=False):
    t = _vec(_i16, v.type.count)
    return builder.sext(v, t) if signed else builder.zext(v, t)


def _lane_scales(builder, scales16, first):
    """<16 x i16> scale of each 4 of 64 values from per-16 scales scales16[first..first+3]."""
    return _pick(builder, scales16, [first + i // 4 for i in range(16)])


def _unit_q4_k(r, o, qtype):
    """Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins; nibbles of sub-blocks 2p and 2p+1 share 32
    bytes (low, high); Q5_K's bit 4 of sub-block j is bit j of the 32 bytes at 16."""
    b = r.builder
    s = r.bytes(o, 4, 12)  # get_scale_min_k4, all 8 at once
    lo4, mid4, hi4 = (_pick(b, s, list(range(k, k + 4))) for k in (0, 4, 8))
    sc = _widen16(b, _cat(b, _bits(b, lo4, 0, 63), b.or_(_bits(b, hi4, 0, 15), _shl(b, _bits(b, lo4, 6, 3), 4))))
    mn = _widen16(b, _cat(b, _bits(b, mid4, 0, 63), b.or_(_bits(b, hi4, 4, 15), _shl(b, _bits(b, mid4, 6, 3), 4))))
    qs_off = 48 if qtype == Q5_K else 16
    qh = r.bytes(o, 16, 32) if qtype == Q5_K else None
    pairs = []
    for p in range(4):
        v = r.bytes(o, qs_off + 32 * p, 32)
        lo, hi = _bits(b, v, 0, 15), _bits(b, v, 4, 15)
        if qh is not None:
            lo = b.or_(lo, _shl(b, _bits(b, qh, 2 * p, 1), 4))
            hi = b.or_(hi, _shl(b, _bits(b, qh, 2 * p + 1, 1), 4))
        pairs.append((_cat(b, lo, hi), _pick(b, sc, [2 * p] * 8 + [2 * p + 1] * 8)))
    return _KUnit(pairs, r.f16(o, 0), mins=_pick(b, mn, [j // 2 for j in range(16)]), dmin=r.f16(o, 2))


def _unit_q6_k(r, o, qtype):
    """Q6_K: value = 4 low bits (128 bytes at 0) | 2 high bits (64 bytes at 128) << 4, minus 32; a signed
    8-bit scale per 16 values (at 192), fp16 d at 208."""
    b = r.builder
    scales = _widen16(b, r.bytes(o, 192, 16), signed=True)
    pairs = []
    for n in range(2):
        ql, qh = r.bytes(o, 64 * n, 64), r.bytes(o, 128 + 32 * n, 32)
        for jj in range(2):
            hi = _cat(b, _bits(b, qh, 4 * jj, 3), _bits(b, qh, 4 * jj + 2, 3))
            pairs.append((b.or_(_bits(b, ql, 4 * jj, 15), _shl(b, hi, 4)), _lane_scales(b, scales, 8 * n + 4 * jj)))
    return _KUnit(pairs, r.f16(o, 208), group_scales=scales)


def _unit_q3_k(r, o, qtype):
    """Q3_K: value = 2 low bits (64 bytes at 32) | a high bit (32 bytes at 0) << 2, minus 4; signed 6-bit
    scales per 16 values packed in 12 bytes at 96, fp16 d at 108."""
    b = r.builder
    s = r.bytes(o, 96, 12)
    lo8 = _pick(b, s, list(range(8)))
    sc = b.or_(_cat(b, _bits(b, lo8, 0, 15), _bits(b, lo8, 4, 15)),
               _shl(b, _bits(b, _pick(b, s, [8, 9, 10, 11] * 4), [0] * 4 + [2] * 4 + [4] * 4 + [6] * 4, 3), 4))
    scales = _widen16(b, b.sub(sc, ir.Constant(_vec(_i8, 16), [32] * 16)), signed=True)
    hm = r.bytes(o, 0, 32)
    pairs = []
    for p in range(4):
        n, j = p // 2, 2 * (p % 2)
        qs = r.bytes(o, 32 + 32 * n, 32)
        lo = _cat(b, _bits(b, qs, 2 * j, 3), _bits(b, qs, 2 * j + 2, 3))
        hb = _cat(b, _bits(b, hm, 4 * n + j, 1), _bits(b, hm, 4 * n + j + 1, 1))
        pairs.append((b.or_(lo, _shl(b, hb, 2)), _lane_scales(b, scales, 4 * p)))
    return _KUnit(pairs, r.f16(o, 108), group_scales=scales)


def _unit_q2_k(r, o, qtype):
    """Q2_K: 2-bit values (64 bytes at 16); per 16 values a byte at 0 of 4-bit scale and 4-bit min; fp16 d and
    dmin at 80, 82."""
    b = r.builder
    s = r.bytes(o, 0, 16)
    scales, mins = _widen16(b, _bits(b, s, 0, 15)), _widen16(b, _bits(b, s, 4, 15))
    pairs = []
    for p in range(4):
        qs = r.bytes(o, 16 + 32 * (p // 2), 32)
        q = _cat(b, _bits(b, qs, 2 * ((2 * p) % 4), 3), _bits(b, qs, 2 * ((2 * p + 1) % 4), 3))
        pairs.append((q, _lane_scales(b, scales, 4 * p)))
    return _KUnit(pairs, r.f16(o, 80), mins=mins, dmin=r.f16(o, 82))


_KQUANT_UNITS = {Q2_K: _unit_q2_k, Q3_K: _unit_q3_k, Q4_K: _unit_q4_k, Q5_K: _unit_q4_k, Q6_K: _unit_q6_k}


def _lane_values(i, isa):
    """The 4 of 64 values whose products lane i of _pair_dots sums (one 16 and one 32-value block either way):
    4i..4i+3 on every x86 path (vpdpbusd's lanes; vpmaddubsw + vpmaddwd sum the same four)."""
    return [4 * i + k for k in range(4)] if isa != "portable" else [16 * (i // 4) + 4 * k + i % 4 for k in range(4)]


def _signed_weights(kind, isa):
    """Whether the unit hands _pair_dots Q8_0's signed bytes as they are, rather than flipped to q = w + 128:
    vpmaddubsw adds two u8 x s8 products in int16, which 2 * 255 * 127 overflows, so AVX2 takes llama.cpp's
    sign trick instead (|w| times x with w's sign: 2 * 128 * 127 fits)."""
    return kind == Q8_0 and isa == "avx2"


def _offset(kind, isa):
    """The constant the unit's unsigned values carry (value = scale * (q - offset)), 0 if none."""
    return 0 if _signed_weights(kind, isa) else _OFFSETS.get(kind, 0)


def _half(builder, v, h, n=32):
    """Half h (0 or 1) of a vector of 2n lanes: what one 256-bit instruction takes."""
    return _pick(builder, v, list(range(n * h, n * h + n)))


def _x86(builder, name, ret, *args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, list(args))


def _pair_dots(builder, q, xv, isa, start, signed=False):
    """<16 x i32> start + partial sums of 64 unsigned x signed byte products (q signed too with `signed`), lane
    i summing the values _lane_values(i).  The one primitive that differs per instruction set."""
    b = builder
    v16i, v8i, v16s, v32b = _vec(_i32, 16), _vec(_i32, 8), _vec(_i16, 16), _vec(_i8, 32)
    if isa == "avx512vnni":
        return _x86(b, "llvm.x86.avx512.vpdpbusd.512", v16i, start, b.bitcast(q, v16i), b.bitcast(xv, v16i))
    if isa in ("avxvnni", "avx2"):  # two 256-bit halves
        halves = []
        for h in range(2):
            qh, xh, sh = _half(b, q, h), _half(b, xv, h), _half(b, start, h, 8)
            if isa == "avxvnni":
                halves.append(_x86(b, "llvm.x86.avx512.vpdpbusd.256", v8i, sh, b.bitcast(qh, v8i), b.bitcast(xh, v8i)))
                continue
            if signed:
                xh = _x86(b, "llvm.x86.avx2.psign.b", v32b, xh, qh)
                qh = _x86(b, "llvm.abs.v32i8", v32b, qh, ir.Constant(ir.IntType(1), 0))
            pairs = _x86(b, "llvm.x86.avx2.pmadd.ub.sw", v16s, qh, xh)  # no overflow: q <= 128 or q*x small
            halves.append(b.add(_x86(b, "llvm.x86.avx2.pmadd.wd", v8i, pairs, ir.Constant(v16s, [1] * 16)), sh))
        return _cat(b, *halves)
    v64i = _vec(_i32, 64)  # portable: LLVM picks the instructions
    prod = b.mul(b.sext(q, v64i) if signed else b.zext(q, v64i), b.sext(xv, v64i), flags=["nsw"])
    parts = [_pick(b, prod, [_lane_values(i, isa)[k] for i in range(16)]) for k in range(4)]
    return b.add(b.add(b.add(parts[0], parts[1]), b.add(parts[2], parts[3])), start)


def _scaled_dots(builder, q, xv, lane_scales, isa):
    """<8 x i32>: lane i = the sum, over the values 4i..4i+3 and 32+4i..32+4i+3 of 64, of scale * q * x, with q
    unsigned bytes below 64 (so that vpmaddubsw's int16 pairs cannot overflow), x signed bytes and
    lane_scales <16 x i16> the integer scale of each 4 values.  Exact in int32 for a whole K-quant super-block."""
    b = builder
    v8i, v16s = _vec(_i32, 8), _vec(_i16, 16)
    if isa == "portable":
        v64i = _vec(_i32, 64)
        prod = b.mul(b.mul(b.zext(q, v64i), b.sext(xv, v64i)), b.sext(_pick(b, lane_scales, [i // 4 for i in range(64)]), v64i))
        parts = [_pick(b, prod, [32 * h + 4 * i + k for i in range(8)]) for h in range(2) for k in range(4)]
        while len(parts) > 1:
            parts = [b.add(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
        return parts[0]
    # every x86 path has AVX2: vpmaddubsw (u8 x s8 pairs -> i16), vpmaddwd (i16 pairs x scales -> i32)
    halves = []
    for h in range(2):
        pairs = _x86(b, "llvm.x86.avx2.pmadd.ub.sw", v16s, _half(b, q, h), _half(b, xv, h))
        halves.append(_x86(b, "llvm.x86.avx2.pmadd.wd", v8i, pairs, _pick(b, lane_scales, [8 * h + k // 2 for k in range(16)])))
    return b.add(halves[0], halves[1])


def _scaled_sums(builder, a, c, isa):
    """<8 x i32>: lane i = a[2i] * c[2i] + a[2i+1] * c[2i+1] for a, c <16 x i16> (vpmaddwd)."""
    b = builder
    if isa == "portable":
        v16i = _vec(_i32, 16)
        prod = b.mul(b.sext(a, v16i), b.sext(c, v16i))
        return b.add(_pick(b, prod, list(range(0, 16, 2))), _pick(b, prod, list(range(1, 16, 2))))
    return _x86(b, "llvm.x86.avx2.pmadd.wd", _vec(_i32, 8), a, c)


def _row_sums(builder, vecs):
    """<len(vecs) x float>: the lane sum of each vector, every one by the same halving tree (lane j + lane
    j + 8, then + 4, + 2, + 1: a fixed order, 4 steps instead of 16 for an ordered sum), whatever their number.
    Vectors are merged as they halve, so 8 rows cost 24 instructions, not 64."""
    lanes = vecs[0].type.count  # lanes per row in each vector
    while len(vecs) > 1 or lanes > 1:
        half = lanes // 2
        rows = vecs[0].type.count // lanes
        if len(vecs) > 1:  # two vectors of r rows -> one of 2r rows (b's lanes follow a's in the shuffle)
            lo = ir.Constant(_vec(_i32, rows * lanes), [r * lanes + j for r in range(2 * rows) for j in range(half)])
            hi = ir.Constant(_vec(_i32, rows * lanes), [r * lanes + j + half for r in range(2 * rows) for j in range(half)])
            vecs = [builder.fadd(builder.shuffle_vector(a, b, lo), builder.shuffle_vector(a, b, hi))
                    for a, b in zip(vecs[0::2], vecs[1::2])]
        else:  # one vector: halve each row's lanes in place
            lo = [r * lanes + j for r in range(rows) for j in range(half)]
            vecs = [builder.fadd(_pick(builder, vecs[0], lo), _pick(builder, vecs[0], [i + half for i in lo]))]
        lanes = half
    return vecs[0]


# The integer-dot paths, best first.  The CPU numba compiles for (and keys its cache on, not necessarily this
# machine: NUMBA_CPU_NAME / NUMBA_CPU_FEATURES) picks one; only _pair_dots, _scaled_dots, _scaled_sums and
# _lane_values differ between them.
ISAS = ("avx512vnni", "avxvnni", "avx2", "portable")
_FORCE_ISA = None  # tests set a later one of ISAS to compile that path on this CPU


def _isa(context):
    return isa_for(context.codegen()._get_host_cpu_features())


def isa_for(features: str) -> str:
    """The integer-dot path for an LLVM feature string ("+avx2,-avx512f,...")."""
    has = set(features.split(","))
    if {"+avx512vnni", "+avx512f"} <= has:
        best = "avx512vnni"
    elif "+avxvnni" in has:
        best = "avxvnni"
    elif "+avx2" in has:
        best = "avx2"
    else:
        best = "portable"
    return _FORCE_ISA if _FORCE_ISA and ISAS.index(_FORCE_ISA) > ISAS.index(best) else best


def host_isa() -> str:
    """The integer-dot path the kernels compile to here."""
    from numba.core.registry import cpu_target

    return isa_for(cpu_target.target_context.codegen()._get_host_cpu_features())


@intrinsic(prefer_literal=True)
def _row_dots(typingctx, qtype, w, xq, xdv, xs, xm, res):
    """res[t] = dot of one weight row of a quantized type with activation row t.

    w u8 [row_bytes]; xq i8 [pairs, T, 64] (pairs = ceil(n / 64), zero past n); res f32 [T]; and per family
    (act_block: _act_buffers makes them, _quantize_act fills them):
    - legacy types (blocks of 32): xdv f32 [pairs, T, 16] (each 32 values' scale 8 times); xs i32 [pairs, T,
      16] (-offset * the sum of the values of each lane, for the type's _OFFSETS); xm f32 [4 * pairs, T]
      (types with mins: scale * the sum of each 32 values; zero past them).
    - K-quants (activations in blocks of 256, llama.cpp's Q8_K): for super-block u, xdv[4u, t, :8] its scale
      8 times and xs[4u, t, :8] the sums of each 16 values as <16 x i16>.

    Per 64 values the weights are unpacked once for a group of up to 8 activation rows.  A legacy row costs
    one integer dot (_pair_dots, starting from xs: the offsets), a convert, a multiply and an FMA into its own
    vector of 16 float partial sums: no horizontal sum per block (llama.cpp's layout); a weight min meets the
    activation sums of its values in the group's rows at once (a vector of G lanes, one per row, from xm's
    row-minor layout), added after the horizontal sums.  A K-quant row costs one scaled integer dot
    (_scaled_dots: the sub-block scales are integers) into an int32 sum per super-block, which then meets the
    float scales once, with its offsets or mins (integer dots of the scales or mins with the activation sums
    of each 16).  Every row gets the same instructions in whichever group it falls, and no fast-math flags:
    res[t] does not depend on T.
    """
    if not isinstance(qtype, types.IntegerLiteral) or qtype.literal_value not in (*_BLOCK32, *_KQUANT_BYTES):
        return None

    def codegen(context, builder, sig, args):
        _, w, xq, xdv, xs, xm, res = args
        kind = sig.args[0].literal_value
        legacy, has_mins = kind in _BLOCK32, kind not in _OFFSETS
        isa = _isa(context)
        offset, signed = _offset(kind, isa), _signed_weights(kind, isa)
        b = builder
        c64 = lambda v: ir.Constant(_i64, v)  # noqa: E731
        v16f, v8f, v8i, v16s = _vec(_f32t, 16), _vec(_f32t, 8), _vec(_i32, 8), _vec(_i16, 16)
        fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(v16f, [v16f] * 3), "llvm.fma.v16f32")
        fma8 = cgutils.get_or_insert_function(b.module, ir.FunctionType(v8f, [v8f] * 3), "llvm.fma.v8f32")
        row = _Row(context, b, sig.args[1], w)
        xq_ary = context.make_array(sig.args[2])(context, b, xq)
        T = cgutils.unpack_tuple(b, xq_ary.shape)[1]  # the activations' row stride
        n_rows = cgutils.unpack_tuple(b, context.make_array(sig.args[6])(context, b, res).shape)[0]
        xdv_ary = context.make_array(sig.args[3])(context, b, xdv)
        xs_data = context.make_array(sig.args[4])(context, b, xs).data
        xm_data = context.make_array(sig.args[5])(context, b, xm).data
        res_data = context.make_array(sig.args[6])(context, b, res).data
        v16i = _vec(_i32, 16)

        def vec_at(data, index, ty):
            return b.bitcast(b.gep(data, [index]), ty.as_pointer())

        prefetch = cgutils.get_or_insert_function(b.module, ir.FunctionType(ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32]),
                                                  "llvm.prefetch.p0i8")

        def prefetch_unit(o):
            for k in range(0, _unit_bytes(kind), 64):  # (read, keep in all caches, data); past the end is harmless
                b.call(prefetch, [b.gep(row.data, [b.add(o, c64(_PREFETCH_BYTES + k))]), ir.Constant(_i32, 0),
                                  ir.Constant(_i32, 3), ir.Constant(_i32, 1)])

        def unit(u, o, tail, rows, acc, macc):
            prefetch_unit(o)
            q, dv, mins = _unit_block32(row, o, kind, tail, signed)  # pair u of the activations
            if has_mins:  # each min times the activation sum of its 32 values, in the G rows at once
                vgf = _vec(_f32t, len(rows))
                fma_g = cgutils.get_or_insert_function(b.module, ir.FunctionType(vgf, [vgf] * 3),
                                                       f"llvm.fma.v{len(rows)}f32")
                for j in range(mins.type.count):
                    m = _pick(b, mins, [j] * len(rows))
                    i = b.add(b.mul(u, c64(mins.type.count)), c64(j))  # row i of xm: these values
                    xmv = b.load(vec_at(xm_data, b.add(b.mul(i, T), rows[0]), m.type), align=4)
                    b.store(b.call(fma_g, [m, xmv, b.load(macc[j % 2])]), macc[j % 2])
            for g, tg in enumerate(rows):
                k = b.add(b.mul(u, T), tg)  # [pair, row] of xq, xdv and xs
                xv = _load_ptr(b, xq_ary.data, b.mul(k, c64(64)), 64)
                sv = b.load(vec_at(xdv_ary.data, b.mul(k, c64(16)), v16f), align=4)
                start = (b.load(vec_at(xs_data, b.mul(k, c64(16)), v16i), align=4) if offset
                         else ir.Constant(v16i, None))
                dots = b.sitofp(_pair_dots(b, q, xv, isa, start, signed), v16f)
                b.store(b.call(fma, [dots, b.fmul(dv, sv), b.load(acc[g])]), acc[g])

        def kunit(u, o, tail, rows, acc, macc):
            prefetch_unit(o)
            ku = _KQUANT_UNITS[kind](row, o, kind)
            isums = [ir.Constant(v8i, None)] * len(rows)
            for i, (q, lane_scales) in enumerate(ku.pairs):
                p = b.add(b.mul(u, c64(4)), c64(i))  # these 64 values: pair p of the activations
                for g, tg in enumerate(rows):
                    xv = _load_ptr(b, xq_ary.data, b.mul(b.add(b.mul(p, T), tg), c64(64)), 64)
                    isums[g] = b.add(isums[g], _scaled_dots(b, q, xv, lane_scales, isa))
            for g, tg in enumerate(rows):
                k = b.mul(b.add(b.mul(b.mul(u, c64(4)), T), tg), c64(16))  # [4u, row] of xdv and xs
                sums16 = b.load(b.bitcast(b.gep(xs_data, [k]), v16s.as_pointer()), align=4)  # of each 16 values
                isum = isums[g]
                if offset:
                    isum = b.add(isum, b.mul(_scaled_sums(b, ku.group_scales, sums16, isa), ir.Constant(v8i, [-offset] * 8)))
                dx = b.load(vec_at(xdv_ary.data, k, v8f), align=4)  # the activations' scale, 8 times
                b.store(b.call(fma8, [b.sitofp(isum, v8f), _times(b, dx, ku.d), b.load(acc[g])]), acc[g])
                if ku.mins is not None:
                    msum = b.sitofp(_scaled_sums(b, ku.mins, sums16, isa), v8f)
                    b.store(b.call(fma8, [msum, _times(b, dx, b.fneg(ku.dmin)), b.load(macc[g])]), macc[g])

        t = cgutils.alloca_once_value(b, c64(0))  # first row of the next group
        for G in _GROUPS:
            with cgutils.for_range(b, b.udiv(b.sub(n_rows, b.load(t)), c64(G))):
                t0 = b.load(t)
                rows = [b.add(t0, c64(g)) for g in range(G)]
                # per row, float partial sums (mem2reg: registers); the mins' terms: legacy, of the G rows in
                # two FMA chains; K-quants, a vector per row
                acc = [cgutils.alloca_once_value(b, ir.Constant(v16f if legacy else v8f, None)) for _ in rows]
                macc = [cgutils.alloca_once_value(b, ir.Constant(_vec(_f32t, G) if legacy else v8f, None))
                        for _ in (range(2) if legacy else rows)]
                row.each_unit(kind, lambda u, o, tail: (unit if legacy else kunit)(u, o, tail, rows, acc, macc))
                if legacy:
                    sums = _row_sums(b, [b.load(a) for a in acc])  # <G x float>
                    if has_mins:
                        sums = b.fadd(sums, b.fadd(b.load(macc[0]), b.load(macc[1])))
                else:
                    sums = _row_sums(b, [b.fadd(b.load(a), b.load(m)) if has_mins else b.load(a)
                                         for a, m in zip(acc, macc)])
                b.store(sums, vec_at(res_data, t0, sums.type), align=4)
                b.store(b.add(t0, c64(G)), t)
        return context.get_dummy_value()

    return types.none(qtype, w, xq, xdv, xs, xm, res), codegen


@intrinsic(prefer_literal=True)
def _quantize_block(typingctx, qtype, x, xo, xq, qo, xm, blk, t, xdv, do, xs):
    """One block of 32 activations x.flat[xo:xo+32] (block blk of row t) -> int8 xq.flat[qo:qo+32] with scale
    d = max|x| / 127, xdv.flat[do:do+8] = d, what the (legacy) quant type's dots need of their sums:
    xs.flat[do:do+8] = -offset * the sum of each lane's values (_lane_values, as _row_dots's integer dots see
    them) for _OFFSETS, xm[blk, t] = d * their sum for types with mins.  |x| is compared as integers (the
    order of floats, NaN the largest: a NaN comes out)."""
    if not isinstance(qtype, types.IntegerLiteral):
        return None

    def codegen(context, builder, sig, args):
        b = builder
        kind = sig.args[0].literal_value
        px, pq, pm, pd, ps = (context.make_array(sig.args[i])(context, b, args[i]).data for i in (1, 3, 5, 8, 10))
        xo, qo, blk, t, do = args[2], args[4], args[6], args[7], args[9]
        xm_T = cgutils.unpack_tuple(b, context.make_array(sig.args[5])(context, b, args[5]).shape)[1]
        q, d = _round_int8(b, px, xo, 32)
        b.store(b.trunc(q, _vec(_i8, 32)), b.bitcast(b.gep(pq, [qo]), _vec(_i8, 32).as_pointer()), align=1)
        dv = _pick(b, b.insert_element(ir.Constant(_vec(_f32t, 1), None), d, ir.Constant(_i32, 0)), [0] * 8)
        b.store(dv, b.bitcast(b.gep(pd, [do]), dv.type.as_pointer()), align=4)
        isa = _isa(context)
        if kind in _OFFSETS:
            if _offset(kind, isa):  # the lanes of a block are 8 of a pair's 16, the values 32 on in the second
                parts = [_pick(b, q, [_lane_values(j, isa)[k] for j in range(8)]) for k in range(4)]
                lanes = b.add(b.add(parts[0], parts[1]), b.add(parts[2], parts[3]))  # <8 x i32>
                b.store(b.mul(lanes, ir.Constant(lanes.type, [-_offset(kind, isa)] * 8)),
                        b.bitcast(b.gep(ps, [do]), lanes.type.as_pointer()), align=4)
        else:
            add = cgutils.get_or_insert_function(b.module, ir.FunctionType(_i32, [_vec(_i32, 32)]),
                                                 "llvm.vector.reduce.add.v32i32")
            b.store(b.fmul(d, b.sitofp(b.call(add, [q]), _f32t)), b.gep(pm, [b.add(b.mul(blk, xm_T), t)]))
        return context.get_dummy_value()

    return types.none(qtype, x, xo, xq, qo, xm, blk, t, xdv, do, xs), codegen


def _round_int8(b, px, xo, n):
    """(<n x i32> q, d): the n floats at px[xo] as round(x / d), d = max|x| / 127 (q = 0 where all are 0)."""
    vf, vi = _vec(_f32t, n), _vec(_i32, n)
    v = b.load(b.bitcast(b.gep(px, [xo]), vf.as_pointer()), align=4)
    umax = cgutils.get_or_insert_function(b.module, ir.FunctionType(_i32, [vi]), f"llvm.vector.reduce.umax.v{n}i32")
    amax = b.bitcast(b.call(umax, [b.and_(b.bitcast(v, vi), ir.Constant(vi, [0x7FFFFFFF] * n))]), _f32t)
    d = b.fdiv(amax, ir.Constant(_f32t, 127.0))
    inv = b.select(b.fcmp_ordered(">", amax, ir.Constant(_f32t, 0.0)), b.fdiv(ir.Constant(_f32t, 127.0), amax),
                   ir.Constant(_f32t, 0.0))
    rint = cgutils.get_or_insert_function(b.module, ir.FunctionType(vf, [vf]), f"llvm.rint.v{n}f32")
    return b.fptosi(b.call(rint, [_times(b, v, inv)]), vi), d  # round half to even


@intrinsic
def _quantize_superblock(typingctx, x, xo, xq, xdv, xs, u, t):
    """256 activations x.flat[xo:xo+256] (super-block u of row t), for K-quant weights as llama.cpp's Q8_K:
    int8 with one scale d = max|x| / 127 -> xq[4u..4u+3, t, :]; xdv[4u, t, :8] = d; xs[4u, t, :8] = the sums
    of each 16 values as <16 x i16> (|sum| <= 16 * 127)."""

    def codegen(context, builder, sig, args):
        b = builder
        px, pq, pd, ps = (context.make_array(sig.args[i])(context, b, args[i]).data for i in (0, 2, 3, 4))
        xo, u, t = args[1], args[5], args[6]
        T = cgutils.unpack_tuple(b, context.make_array(sig.args[2])(context, b, args[2]).shape)[1]
        q, d = _round_int8(b, px, xo, 256)
        q8 = b.trunc(q, _vec(_i8, 256))
        c64 = lambda v: ir.Constant(_i64, v)  # noqa: E731
        first = b.add(b.mul(b.mul(u, c64(4)), T), t)  # [4u, t]
        for p in range(4):
            at = b.mul(b.add(first, b.mul(c64(p), T)), c64(64))
            b.store(_pick(b, q8, list(range(64 * p, 64 * p + 64))), b.bitcast(b.gep(pq, [at]), _vec(_i8, 64).as_pointer()), align=1)
        dv = _pick(b, b.insert_element(ir.Constant(_vec(_f32t, 1), None), d, ir.Constant(_i32, 0)), [0] * 8)
        b.store(dv, b.bitcast(b.gep(pd, [b.mul(first, c64(16))]), dv.type.as_pointer()), align=4)
        parts = [_pick(b, q, [16 * j + k for j in range(16)]) for k in range(16)]  # parts[k][j] = q[16 j + k]
        while len(parts) > 1:
            parts = [b.add(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
        sums = b.trunc(parts[0], _vec(_i16, 16))
        b.store(sums, b.bitcast(b.gep(ps, [b.mul(first, c64(16))]), sums.type.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(x, xo, xq, xdv, xs, u, t), codegen


@njit(cache=True)
def _quantize_act(qtype, x, xq, xm, xdv, xs):
    # x f32 [T, n] -> int8 blocks of act_block(qtype) values (qtype a literal) with one scale d each,
    # pair-major (the 8 rows a weight pair meets lie together, at constant offsets): xq i8 [pairs, T, 64]
    # and, for blocks of 32, xdv f32 [pairs, T, 16] = each block's d 8 times and the sums the weights of
    # qtype need: xs i32 [pairs, T, 16], -offset * each lane's sum of xq; or xm f32 [4 * pairs, T], d * the
    # sum of each 32 values.  Blocks of 256: _quantize_superblock.  Padding is left untouched.
    T, n = x.shape
    S = xq.shape[1]  # row stride: at least T
    if qtype >= Q2_K and qtype <= Q6_K:  # K-quants (a literal: the other branch folds away)
        for t in range(T):
            for u in range(n // 256):
                _quantize_superblock(x, t * n + 256 * u, xq, xdv, xs, u, t)
        return
    for t in range(T):
        for b in range(n // 32):
            p, h = b // 2, b % 2
            _quantize_block(qtype, x, t * n + 32 * b, xq, (p * S + t) * 64 + 32 * h, xm, b, t, xdv,
                            (p * S + t) * 16 + 8 * h, xs)


@njit(cache=True)
def _act_buffers(T, n):
    # zeroed xq, xm, xdv, xs for T activation rows of n values, in blocks of up to _BLOCK_ROWS rows: block k
    # holds rows _BLOCK_ROWS * k.. as _quantize_act and _row_dots take them (see there; and for the padding)
    G, nb, pairs = min(T, _BLOCK_ROWS), (T + _BLOCK_ROWS - 1) // _BLOCK_ROWS, (n + 63) // 64
    return (np.zeros((nb, pairs, G, 64), np.int8), np.zeros((nb, 4 * pairs, G), np.float32),
            np.zeros((nb, pairs, G, 16), np.float32), np.zeros((nb, pairs, G, 16), np.int32))


# no fastmath here nor in the callers: numba puts a function's flags on all the IR inlined into it, _row_dots's
# too, and LLVM could then fuse or reorder a row's float sums differently per group size (measured: Q4_0 and
# Q5_0 rows changed with T; later Q4_1 rows, through the fastmath of _matmul_q8)
@njit(cache=True)
def _dot_rows(qtype, w, r0, r1, xq, xm, xdv, xs, out):
    # out[:, r0:r1] for rows r0..r1 of w; qtype is a literal (see _for_type), so the row dots inline with
    # their type fixed.  Blocks of activation rows outside, weight rows inside: a block (8 rows, ~40 KB at
    # most) stays in cache while the task's weight rows meet it
    T = out.shape[0]
    res = np.empty(_BLOCK_ROWS, np.float32)  # one weight row against the rows of a block
    for k in range(xq.shape[0]):
        t0 = k * _BLOCK_ROWS
        rows = res[:min(_BLOCK_ROWS, T - t0)]
        for r in range(r0, r1):
            _row_dots(qtype, w[r], xq[k], xdv[k], xs[k], xm[k], rows)
            out[t0:t0 + rows.shape[0], r] = rows


@njit(parallel=True, cache=True)
def _matmul_q8(qtype, w, x, out):
    # w u8 [n_out, row_bytes]; x f32 [T, n_in]; out f32 [T, n_out]
    xq, xm, xdv, xs = _act_buffers(x.shape[0], x.shape[1])
    # called functions, not array expressions: under parallel=True each of those is one more parallel region
    if xq.shape[0] == 1:  # a decoding step
        _quantize_act(qtype, x, xq[0], xm[0], xdv[0], xs[0])
    else:
        for k in prange(xq.shape[0]):
            _quantize_act(qtype, x[k * _BLOCK_ROWS:(k + 1) * _BLOCK_ROWS], xq[k], xm[k], xdv[k], xs[k])
    R = w.shape[0]
    for c in prange((R + _DOT_ROWS - 1) // _DOT_ROWS):
        _dot_rows(qtype, w, c * _DOT_ROWS, min(c * _DOT_ROWS + _DOT_ROWS, R), xq, xm, xdv, xs, out)


# ---------------------------------------------------------------------------------------------------------
# Dequantization of one row into float32: for get_rows, dequantize and the prefill tiles.


@intrinsic(prefer_literal=True)
def _dequant_units(typingctx, qtype, w, y):
    """y f32 [n] = the weight row w u8 [row_bytes] of a quantized type, 64 values at a time from the units of
    the int8 path, with the float operations of gguf-py's dequantization, so bit for bit equal to it:
    d * (q - offset) [+ m] for legacy blocks, (d * scale) * (q - offset) [- dmin * min] for K-quants.  Float
    types compile to nothing (numba types the branches of _dequant_row that their literal type never takes)."""
    if not isinstance(qtype, types.IntegerLiteral):
        return None

    def codegen(context, builder, sig, args):
        b = builder
        kind = sig.args[0].literal_value
        if kind not in _BLOCK32 and kind not in _KQUANT_BYTES:
            return context.get_dummy_value()
        c64 = lambda v: ir.Constant(_i64, v)  # noqa: E731
        row = _Row(context, b, sig.args[1], args[1])
        y_data = context.make_array(sig.args[2])(context, b, args[2]).data
        v64f = _vec(_f32t, 64)

        def lanes(v, index):
            return _pick(b, v, [index(k) for k in range(64)])

        def store(vals, at, n=64):
            vals = _pick(b, vals, list(range(n))) if n < 64 else vals
            b.store(vals, b.bitcast(b.gep(y_data, [at]), vals.type.as_pointer()), align=4)

        def unit(u, o, tail):
            if kind in _BLOCK32:  # Q8_0's bytes as they are: value = d * w
                q, dv, mins = _unit_block32(row, o, kind, tail, signed=True)
                qf = b.sitofp(q, v64f) if kind == Q8_0 else b.uitofp(q, v64f)
                if _OFFSETS.get(kind) and kind != Q8_0:
                    qf = b.fsub(qf, ir.Constant(v64f, [float(_OFFSETS[kind])] * 64))
                vals = b.fmul(lanes(dv, lambda k: k // 4), qf)
                if mins is not None:
                    vals = b.fadd(vals, lanes(mins, lambda k: k // 32))
                store(vals, b.mul(u, c64(64)), 32 if tail else 64)
                return
            ku = _KQUANT_UNITS[kind](row, o, kind)
            for i, (q, lane_scales) in enumerate(ku.pairs):
                dl = _times(b, b.sitofp(lanes(lane_scales, lambda k: k // 4), v64f), ku.d)
                qf = b.uitofp(q, v64f)
                if kind in _OFFSETS:
                    qf = b.fsub(qf, ir.Constant(v64f, [float(_OFFSETS[kind])] * 64))
                vals = b.fmul(dl, qf)
                if ku.mins is not None:
                    vals = b.fsub(vals, _times(b, b.sitofp(lanes(ku.mins, lambda k: (64 * i + k) // 16), v64f), ku.dmin))
                store(vals, b.add(b.mul(u, c64(256)), c64(64 * i)))

        row.each_unit(kind, unit)
        return context.get_dummy_value()

    return types.none(qtype, w, y), codegen


# no fastmath: a contracted d * q + m would no longer equal gguf-py's rounding
@njit(cache=True)
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
    else:
        _dequant_units(qtype, w, y)


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
            for j0 in range(0, n, _TILE_SPAN):  # 4 tile rows and 2 x rows of this span stay in L1
                j1 = min(j0 + _TILE_SPAN, n)
                for i in range(0, nr, 4):
                    w0, w1, w2, w3 = tile[i], tile[i + 1], tile[i + 2], tile[i + 3]
                    for t in range(t0, min(t0 + _TILE_TOKENS, T), 2):
                        # 4 rows x 2 tokens: 6 loads feed 8 FMAs, whose 8 accumulators (vectors of 8 or 16
                        # once LLVM vectorizes along j) fit AVX2's 16 registers with the loads (4 x 4 spilled
                        # 6 of 16 there); a tail token repeats the last one, unwritten
                        xa, xb = x[t], x[min(t + 1, T - 1)]
                        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
                        for j in range(j0, j1):
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
                        acc = ((a0, a1, a2, a3), (b0, b1, b2, b3))  # [token][row]
                        for k in range(min(2, T - t)):
                            for m in range(min(4, nr - i)):
                                # spans summed in order: a row's bits never depend on T
                                if j0 == 0:
                                    out[t + k, r0 + i + m] = acc[k][m]
                                else:
                                    out[t + k, r0 + i + m] += acc[k][m]


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


_ENTRIES: dict = {}  # (kernel, qtype) -> its compiled entry point


def _for_type(kernel, qtype: int, *args):
    """kernel compiled for one quant type (a literal argument: the branches of the other types fold away), so
    a model compiles and loads from numba's cache only the types it has.  Called directly, not through the
    dispatcher: args must have the types of the first call (C-contiguous arrays, weights read-only)."""
    entry = _ENTRIES.get((kernel, qtype))
    if entry is None:
        entry = kernel.compile((types.IntegerLiteral(qtype), *(typeof(a) for a in args)))
        _ENTRIES[kernel, qtype] = entry
    return entry(qtype, *args)


_PATHS = ("auto", "int8", "float", "prefill")
_PREFILL_INT8 = (Q4_K, Q5_K)  # the types "prefill" multiplies on the int8 path (see the module docstring)


def matmul(w: QTensor, x: np.ndarray, out: np.ndarray | None = None, *, path: str = "auto") -> np.ndarray:
    """x @ W.T: x float32 [T, n_in] -> float32 [T, n_out] (written into `out` when given).

    path picks how quantized weights are multiplied, so that a row's result depends on its role, never on T:
    "int8" (decode steps) quantizes the activations and computes every row bit-identical to a lone row;
    "float" uses float tiles, every row identical whatever T (also T=1); "prefill" (prompt processing) is
    one or the other by quant type;
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
    elif out.shape != (x.shape[0], n_out) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"matmul with '{w.name}': out must be a C-contiguous float32 [{x.shape[0]}, {n_out}]")
    _for_type(_matmul_q8 if uses_int8(w.qtype, x.shape[0], path) else _matmul_f32, w.qtype, data, x, out)
    return out


def act_block(qtype: int) -> int:
    """How many activations share one int8 scale on the int8 path for weights of qtype: 256 for K-quants
    (llama.cpp's Q8_K), else 32."""
    return 256 if qtype in _KQUANT_BYTES else 32


def uses_int8(qtype: int, T: int, path: str) -> bool:
    """Whether matmul(path=path) rounds T activation rows to int8 blocks (the CUDA backend mirrors it)."""
    if path not in _PATHS:
        raise ValueError(f"matmul path must be one of {_PATHS}, not {path!r}")
    if qtype in _FLOAT_TYPES:
        return False
    return (path == "int8" or (path == "auto" and T < PREFILL_MIN_T)
            or (path == "prefill" and qtype in _PREFILL_INT8))


def get_rows(w: QTensor, ids: np.ndarray) -> np.ndarray:
    """Dequantized rows W[ids]: float32 [len(ids), n_in] (token embedding lookup)."""
    data = _check(w)
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise IndexError(f"row id out of range for '{w.name}' with {w.shape[0]} rows")
    out = np.empty((ids.shape[0], w.shape[1]), np.float32)
    _for_type(_dequant_rows, w.qtype, data, ids, out)
    return out


def dequantize(w: QTensor) -> np.ndarray:
    """The whole matrix as float32 [n_out, n_in] (tests and tiny weights only)."""
    return get_rows(w, np.arange(w.shape[0]))
