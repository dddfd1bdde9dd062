"""Quantized kernels against gguf-py's reference dequantization, for every supported type."""

import os
import re
import subprocess
import sys

import gguf
import numba
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from pyllm.errors import UnsupportedError
from pyllm.kernels import qmatmul
from pyllm.quants import BLOCK_FLOATS, SUPPORTED, QTensor, block_size, row_bytes, type_name, type_size

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# byte offsets of the fp16 scale fields inside a block: random bytes there could be inf/NaN
SCALE_POS = {Q(t): list(offsets) for t, offsets in BLOCK_FLOATS.items()}
N_IN = 512  # two K-quant blocks, 16 blocks of 32


def random_bytes(qtype, n_out, n_in, rng):
    """Every bit pattern of the quant fields, with fp16 scales in a sane range."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (n_out, n_in // bs * ts), dtype=np.uint8)
    blk = data.reshape(n_out, -1, ts)
    for p in SCALE_POS[qtype]:
        scales = (rng.random(blk.shape[:2]) * 0.02 + 0.001) * rng.choice([-1, 1], blk.shape[:2])
        blk[:, :, p:p + 2] = scales.astype(np.float16)[..., None].view(np.uint8)
    return data


def make_weight(qtype, n_out, n_in, rng, raw=False):
    """A QTensor holding a random matrix: gguf-py's quantizer where it has one (realistic values), else raw bytes."""
    wf = rng.standard_normal((n_out, n_in)).astype(np.float32)
    if qtype == Q.F32:
        data = wf.view(np.uint8)
    elif qtype == Q.F16:
        data = wf.astype(np.float16).view(np.uint8)
    elif raw:
        data = random_bytes(qtype, n_out, n_in, rng)
    else:
        try:
            data = gguf.quants.quantize(wf, qtype)
        except NotImplementedError:
            data = random_bytes(qtype, n_out, n_in, rng)
    return QTensor(f"blk.0.test.{qtype.name}", int(qtype), (n_out, n_in), data)


def reference(w):
    return gguf.quants.dequantize(w.data, Q(w.qtype)).reshape(w.shape).astype(np.float32)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_exactly(qtype):
    rng = np.random.default_rng(1)
    w = make_weight(qtype, 7, N_IN, rng, raw=qtype not in (Q.F32, Q.F16, Q.BF16))
    assert np.array_equal(qmatmul.dequantize(w), reference(w))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_get_rows(qtype):
    rng = np.random.default_rng(2)
    w = make_weight(qtype, 11, N_IN, rng)
    ids = np.array([10, 0, 3, 3, 7])
    assert np.array_equal(qmatmul.get_rows(w, ids), reference(w)[ids])
    with pytest.raises(IndexError):
        qmatmul.get_rows(w, np.array([11]))


def int8_blocks(x, qtype):
    """x rounded as the int8 kernel rounds it for weights of qtype: blocks of 32 (256 for K-quants), step
    amax/127. Returns (rounded x, half step) [T, n_in]."""
    n = qmatmul.act_block(qtype)
    amax = np.abs(x).reshape(x.shape[0], -1, n).max(axis=2, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.rint(x.reshape(amax.shape[0], -1, n) * inv) * (amax.astype(np.float64) / 127)
    return xq.reshape(x.shape), np.repeat(amax[..., 0].astype(np.float64) / 254, n, axis=1)


@pytest.mark.parametrize("path", ["int8", "float"])
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("n_out", [1, 37])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul(qtype, n_out, T, path):
    rng = np.random.default_rng(3)
    w = make_weight(qtype, n_out, N_IN, rng)
    x = rng.standard_normal((T, N_IN)).astype(np.float32)
    x[0, :32] *= 50  # one block with a much larger scale than the rest
    wref = reference(w).astype(np.float64)
    y = qmatmul.matmul(w, x, path=path)
    assert y.shape == (T, n_out) and y.dtype == np.float32
    exact = x.astype(np.float64) @ wref.T
    roundoff = 1e-5 * (np.abs(x.astype(np.float64)) @ np.abs(wref).T)
    if path == "float" or qtype in (Q.F32, Q.F16, Q.BF16):
        assert np.all(np.abs(y - exact) <= roundoff)
        return
    xq, half_step = int8_blocks(x, qtype)
    # within what int8 activations can cost at worst ...
    assert np.all(np.abs(y - exact) <= half_step @ np.abs(wref).T + roundoff)
    # ... and exactly what they cost: a wrong offset or bit in one block shows here
    assert np.all(np.abs(y - xq @ wref.T) <= roundoff)


@pytest.mark.parametrize("path", ["int8", "float"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_rows_do_not_depend_on_T(qtype, path):
    """A batch's rows are bit-identical to the same rows computed alone: a sequence's greedy output must not
    depend on how many others share its decode step, nor on how a prompt was split into chunks."""
    rng = np.random.default_rng(6)
    w = make_weight(qtype, 37, N_IN, rng)
    x = rng.standard_normal((13, N_IN)).astype(np.float32)
    x[:, 64:96] *= 50  # blocks whose scales differ from row to row
    alone = np.concatenate([qmatmul.matmul(w, x[t:t + 1], path=path) for t in range(13)])  # [13, 37]
    for T in (2, 8, 13):
        assert np.array_equal(qmatmul.matmul(w, x[:T], path=path), alone[:T]), f"T={T}"


@pytest.mark.parametrize("n_in", [32, 96, 544, 608])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda t: t.name)
def test_int8_block_pairs_with_an_odd_block_count(qtype, n_in):
    """The int8 kernel takes 32-blocks two at a time; an odd count ends on a half pair (and 608 = 19 blocks
    crosses the 16-block vector of the offset terms)."""
    rng = np.random.default_rng(8)
    w = make_weight(qtype, 21, n_in, rng)
    x = rng.standard_normal((9, n_in)).astype(np.float32)
    x[:, -32:] *= 30  # the last (unpaired) block matters
    y = qmatmul.matmul(w, x, path="int8")
    wref = reference(w).astype(np.float64)
    roundoff = 1e-5 * (np.abs(x.astype(np.float64)) @ np.abs(wref).T)
    assert np.all(np.abs(y - int8_blocks(x, qtype)[0] @ wref.T) <= roundoff)
    alone = np.concatenate([qmatmul.matmul(w, x[t:t + 1], path="int8") for t in range(9)])
    assert np.array_equal(y, alone)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16], ids=lambda t: t.name)
def test_prefill_path_is_int8_for_q4_k_and_q5_k_only(qtype):
    rng = np.random.default_rng(9)
    w = make_weight(qtype, 9, N_IN, rng)
    x = rng.standard_normal((20, N_IN)).astype(np.float32)
    expected = "int8" if qtype in (Q.Q4_K, Q.Q5_K) else "float"
    assert qmatmul.uses_int8(qtype, 20, "prefill") == (expected == "int8")
    assert np.array_equal(qmatmul.matmul(w, x, path="prefill"), qmatmul.matmul(w, x, path=expected))


def test_auto_path_switches_at_prefill_min_t():
    rng = np.random.default_rng(7)
    w = make_weight(Q.Q4_1, 9, N_IN, rng)
    T = qmatmul.PREFILL_MIN_T
    x = rng.standard_normal((T, N_IN)).astype(np.float32)
    assert np.array_equal(qmatmul.matmul(w, x), qmatmul.matmul(w, x, path="float"))
    assert np.array_equal(qmatmul.matmul(w, x[:T - 1]), qmatmul.matmul(w, x[:T - 1], path="int8"))
    assert not np.array_equal(qmatmul.matmul(w, x, path="int8"), qmatmul.matmul(w, x, path="float"))
    with pytest.raises(ValueError, match="path"):
        qmatmul.matmul(w, x, path="fast")


# every integer-dot path this CPU can run: the host's own, and each one after it down to the portable IR
RUNNABLE_ISAS = qmatmul.ISAS[qmatmul.ISAS.index(qmatmul.host_isa()):]
ISA_MARKS = {"avx512vnni": r"vpdpbusd\t.*%zmm", "avxvnni": r"\{vex\}\tvpdpbusd", "avx2": "vpmaddubsw", "portable": None}


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("qtype", [t for t in TYPES if t not in (Q.F32, Q.F16, Q.BF16)], ids=lambda t: t.name)
def test_block_dots_on_every_path(qtype, isa, monkeypatch):
    """The IR of each instruction set this CPU runs (the kernels above use the host's best): int8 dots within
    float rounding of float64, and every row the same alone or in a group (T = 1..9 through 8 + 1)."""
    monkeypatch.setattr(qmatmul, "_FORCE_ISA", isa)
    code = int(qtype)  # a closure constant: numba sees it as a literal, as _row_dots requires
    row_dots = numba.njit(lambda w, xq, xdv, xs, xm, res: qmatmul._row_dots(code, w, xq, xdv, xs, xm, res))  # uncached
    quantize_act = numba.njit(qmatmul._quantize_act.py_func)  # uncached: numba's cache does not key on the path
    quantize = numba.njit(lambda x, xq, xm, xdv, xs: quantize_act(code, x, xq, xm, xdv, xs))
    rng = np.random.default_rng(5)
    n_in = N_IN + 32 if GGML_QUANT_SIZES[qtype][0] == 32 else N_IN  # legacy: an odd block count, a half pair
    w = make_weight(qtype, 3, n_in, rng, raw=True)  # every byte: Q8_0's -128 meets +-127 (int16 pairs hold)
    x = rng.standard_normal((9, n_in)).astype(np.float32)
    x[3] *= 1e3  # rows of very different scales

    def dots(x):  # [T, 3], a block of up to 8 activation rows at a time, as _matmul_q8 takes them
        xq, xm, xdv, xs = qmatmul._act_buffers(len(x), n_in)
        y = []
        for k in range(len(xq)):
            block = x[8 * k:8 * k + 8]
            quantize(block, xq[k], xm[k], xdv[k], xs[k])  # the path's lanes of the offsets too
            res = np.empty(len(block), np.float32)
            y.append(np.array([row_dots(w.data[r], xq[k], xdv[k], xs[k], xm[k], res) or res.copy()
                               for r in range(3)]).T)
        return np.concatenate(y)

    y = dots(x)
    asm = row_dots.inspect_asm(row_dots.signatures[0])
    for other, mark in ISA_MARKS.items():
        if mark:
            assert bool(re.search(mark, asm)) == (other == isa), (other, isa)
    wref = reference(w).astype(np.float64)
    assert np.all(np.abs(y - int8_blocks(x, qtype)[0] @ wref.T) <= 1e-5 * (np.abs(x) @ np.abs(wref).T))
    assert np.array_equal(y, np.concatenate([dots(x[t:t + 1]) for t in range(9)]))


COMPILE_FOR = """
import numba, re, sys
from numba import types as t
from pyllm.kernels import qmatmul
print(qmatmul.host_isa())
a = lambda dt, nd: t.Array(dt, nd, "C")
sig = (a(t.uint8, 1), a(t.int8, 3), a(t.float32, 3), a(t.int32, 3), a(t.float32, 2), a(t.float32, 1))
for code in (2, 8, 12, 14):  # Q4_0, Q8_0, Q4_K, Q6_K
    f = numba.njit(lambda w, xq, xdv, xs, xm, res: qmatmul._row_dots(code, w, xq, xdv, xs, xm, res))
    f.compile(sig)
    asm = f.inspect_asm(sig)
    print(len(re.findall(r"\\{vex\\}\\tvpdpbusd", asm)), len(re.findall(r"vpdpbusd\\t.*%zmm", asm)),
          asm.count("vpmaddubsw"))
"""
AVX2 = "+64bit,+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi,+bmi2"


@pytest.mark.parametrize("cpu, features, isa", [
    ("alderlake", AVX2 + ",+avxvnni,-avx512f,-avx512vl,-avx512vnni", "avxvnni"),
    ("sapphirerapids", AVX2 + ",+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vnni", "avx512vnni"),
])
def test_vnni_paths_compile(tmp_path, cpu, features, isa):
    """The paths of CPUs this one cannot stand in for, compiled for such a CPU here without running them (as
    NUMBA_CPU_NAME / NUMBA_CPU_FEATURES would be set to measure one): legacy types dot bytes with vpdpbusd
    (VEX-encoded 256-bit on AVX-VNNI, 512-bit on AVX-512 VNNI), K-quants with vpmaddubsw (_scaled_dots)."""
    env = {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert lines[0] == isa
    counts = [tuple(map(int, line.split())) for line in lines[1:5]]  # (vex dots, zmm dots, vpmaddubsw) per type
    for vex, zmm, maddubs in counts[:2]:  # legacy
        assert (vex > 0, zmm > 0, maddubs) == (isa == "avxvnni", isa == "avx512vnni", 0)
    for vex, zmm, maddubs in counts[2:]:  # K-quants
        assert (vex, zmm) == (0, 0) and maddubs > 0


def test_matmul_writes_out_and_checks_shape():
    rng = np.random.default_rng(4)
    w = make_weight(Q.Q4_1, 5, 64, rng)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    out = np.full((2, 5), np.nan, np.float32)
    assert qmatmul.matmul(w, x, out) is out
    assert np.allclose(out, x @ reference(w).T, rtol=0, atol=0.05 * np.abs(out).max())
    with pytest.raises(ValueError, match="expected"):
        qmatmul.matmul(w, x[:, :32])


def test_unsupported_type_raises():
    w = QTensor("blk.0.ffn_up.weight", int(Q.IQ2_XXS), (4, 256), np.zeros((4, 66), np.uint8))
    msg = "tensor 'blk.0.ffn_up.weight' has type IQ2_XXS, which pyllm cannot run"
    for call in (lambda: qmatmul.matmul(w, np.zeros((1, 256), np.float32)),
                 lambda: qmatmul.get_rows(w, np.array([0])),
                 lambda: qmatmul.dequantize(w)):
        with pytest.raises(UnsupportedError, match=msg):
            call()


def test_geometry_helpers():
    assert {Q(t) for t in SUPPORTED} == set(TYPES)
    for t in TYPES:
        assert (block_size(t), type_size(t)) == GGML_QUANT_SIZES[t]
        assert type_name(t) == t.name
    assert row_bytes(Q.Q4_K, 512) == 288 and row_bytes(Q.F16, 3) == 6
    with pytest.raises(ValueError):
        row_bytes(Q.Q4_0, 48)
    # a GGUF [576, 49152] token_embd is 49152 rows of 576; 1-D raw bytes are reshaped to rows
    w = QTensor("token_embd.weight", int(Q.Q8_0), (3, 64), np.zeros(3 * 68, np.uint8))
    assert w.data.shape == (3, 68)
    with pytest.raises(ValueError):
        QTensor("bad", int(Q.Q8_0), (3, 64), np.zeros((3, 67), np.uint8))
