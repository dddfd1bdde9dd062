"""CPU kernels other than the quantized products, against numpy written the obvious way."""
import numpy as np
import pytest

from pyllm.kernels import cpu


def attention_reference(q, k_cache, v_cache, slot, pos, window, scale):
    """float64 causal grouped-query attention, one query and head at a time."""
    n_kv, hd = k_cache.shape[1], k_cache.shape[3]
    n_heads = q.shape[1] // hd
    keys = k_cache.view(np.float16) if k_cache.dtype == np.uint16 else k_cache
    values = v_cache.view(np.float16) if v_cache.dtype == np.uint16 else v_cache
    out = np.zeros(q.shape)
    for t in range(q.shape[0]):
        lo = 0 if window <= 0 else max(0, pos[t] + 1 - window)
        for h in range(n_heads):
            kv = h // (n_heads // n_kv)
            K = keys[slot[t], kv, lo:pos[t] + 1].astype(np.float64)  # [positions, hd]
            V = values[slot[t], kv, lo:pos[t] + 1].astype(np.float64)
            s = K @ q[t, h * hd:(h + 1) * hd] * scale
            p = np.exp(s - s.max())
            out[t, h * hd:(h + 1) * hd] = p @ V / p.sum()
    return out


@pytest.mark.parametrize("kv_dtype", [np.uint16, np.float32], ids=["f16", "f32"])
@pytest.mark.parametrize("window", [0, 5])
def test_attention_mixed_batch(kv_dtype, window):
    """Prompt runs longer than a job's block of queries next to lone decode queries of other slots."""
    rng = np.random.default_rng(0)
    n_slots, n_kv, n_ctx, hd, n_heads = 4, 2, 64, 16, 6  # three query heads per key/value head
    kc = rng.standard_normal((n_slots, n_kv, n_ctx, hd)).astype(np.float16)
    vc = rng.standard_normal((n_slots, n_kv, n_ctx, hd)).astype(np.float16)
    if kv_dtype == np.uint16:
        kc, vc = kc.view(np.uint16), vc.view(np.uint16)
    else:
        kc, vc = kc.astype(np.float32), vc.astype(np.float32)
    # slot 2: a 37-query prompt chunk (3 runs of at most Q_BLOCK); slots 0, 3, 1: one decode query each
    slot = np.array([0] + [2] * 37 + [3, 1])
    pos = np.array([50] + list(range(10, 47)) + [0, 63])
    q = rng.standard_normal((len(slot), n_heads * hd)).astype(np.float32)
    out = np.full_like(q, np.nan)
    cpu.attention(q, kc, vc, slot, pos, window, np.float32(0.25), out)
    np.testing.assert_allclose(out, attention_reference(q, kc, vc, slot, pos, window, 0.25), rtol=0, atol=2e-5)
    # a query's result does not depend on what else is in the call
    for t in (0, 5, 38):
        alone = np.empty_like(q[t:t + 1])
        cpu.attention(q[t:t + 1], kc, vc, slot[t:t + 1], pos[t:t + 1], window, np.float32(0.25), alone)
        np.testing.assert_array_equal(alone, out[t:t + 1])


@pytest.mark.parametrize("kv_dtype", [np.uint16, np.float32], ids=["f16", "f32"])
@pytest.mark.parametrize("hd, n_heads, n_kv", [(20, 3, 1), (64, 9, 3), (80, 7, 1)],
                         ids=["hd20-g3", "hd64-g3", "hd80-g7"])
def test_attention_same_bits_whatever_the_call(kv_dtype, hd, n_heads, n_kv):
    """Head sizes that are not a multiple of 16, odd groups (query heads in pairs and a lone one), groups of more
    than 4 (two passes over the values), keys up to the end of the cache, with 1 and 2 threads (a lone query's
    heads are split across threads): a query's result is the same bits alone or in any batch."""
    import numba

    rng = np.random.default_rng(1)
    n_slots, n_ctx = 3, 80
    kc = rng.standard_normal((n_slots, n_kv, n_ctx, hd)).astype(np.float16)
    vc = rng.standard_normal((n_slots, n_kv, n_ctx, hd)).astype(np.float16)
    kc, vc = (kc.view(np.uint16), vc.view(np.uint16)) if kv_dtype == np.uint16 else (kc.astype(np.float32),
                                                                                     vc.astype(np.float32))
    slot = np.array([1] * 20 + [0, 2])  # a 20-query prompt chunk (runs of 16 + 4), then two decode queries
    pos = np.array(list(range(40, 60)) + [n_ctx - 1, 3])
    q = rng.standard_normal((len(slot), n_heads * hd)).astype(np.float32)
    threads = numba.get_num_threads()
    try:
        for window in (0, 23):
            results = []
            for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
                numba.set_num_threads(n)
                out = np.full_like(q, np.nan)
                cpu.attention(q, kc, vc, slot, pos, window, np.float32(0.3), out)
                results.append(out)
                for t in (0, 7, 16, 19, 20, 21):
                    alone = np.empty_like(q[t:t + 1])
                    cpu.attention(q[t:t + 1], kc, vc, slot[t:t + 1], pos[t:t + 1], window, np.float32(0.3), alone)
                    np.testing.assert_array_equal(alone, out[t:t + 1])
                part = np.empty_like(q[5:18])  # the same prompt cut elsewhere: other runs of 16
                cpu.attention(q[5:18], kc, vc, slot[5:18], pos[5:18], window, np.float32(0.3), part)
                np.testing.assert_array_equal(part, out[5:18])
            for out in results[1:]:
                np.testing.assert_array_equal(out, results[0])
            np.testing.assert_allclose(results[0], attention_reference(q, kc, vc, slot, pos, window, 0.3),
                                       rtol=0, atol=2e-5)
    finally:
        numba.set_num_threads(threads)


@pytest.mark.parametrize("kv_dtype", [np.uint16, np.float32], ids=["f16", "f32"])
def test_kv_write(kv_dtype):
    rng = np.random.default_rng(2)
    n_kv, hd = 2, 20
    slot, pos = np.array([2, 0, 2]), np.array([5, 0, 6])
    k, v = rng.standard_normal((2, 3, n_kv * hd)).astype(np.float32)
    kc, vc = np.zeros((3, n_kv, 16, hd), kv_dtype), np.zeros((3, n_kv, 16, hd), kv_dtype)
    cpu.kv_write(kc, vc, slot, pos, k, v)
    for cache, x in ((kc, k), (vc, v)):
        want = np.zeros_like(cache)
        for t in range(3):
            row = x[t].reshape(n_kv, hd)
            want[slot[t], :, pos[t]] = row.astype(np.float16).view(np.uint16) if kv_dtype == np.uint16 else row
        np.testing.assert_array_equal(cache, want)


# --- silu_mul, gelu_mul, rope ------------------------------------------------------------------------------
EPS32 = 2.0 ** -23  # float32 ulp at 1


def _glu_reference(name, gate, up):
    """float64 silu / gelu_tanh times up, and the argument of each value's sigmoid: gelu_tanh(v) = v (1 + tanh u) / 2
    = v sigmoid(2u), the form that does not cancel in float64 either for v << 0."""
    v = gate.astype(np.float64)
    z = v if name == "silu_mul" else 2 * np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)
    with np.errstate(over="ignore"):
        return v / (1 + np.exp(-z)) * up, z


def _with_threads(n, fn):
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        return fn()
    finally:
        numba.set_num_threads(threads)


@pytest.mark.parametrize("name", ["silu_mul", "gelu_mul"])
@pytest.mark.parametrize("T, n", [(1, 40), (3, 1536), (8, 1000), (20, 2048)])  # serial and split across threads
def test_glu_against_float64(name, T, n):
    rng = np.random.default_rng(3)
    gate = (rng.standard_normal((T, n)) * 3).astype(np.float32)
    gate.flat[::7] = rng.uniform(-30, 30, gate.flat[::7].size)  # the tails of the sigmoid
    up = rng.standard_normal((T, n)).astype(np.float32)
    want, z = _glu_reference(name, gate, up)
    for threads in (1, 2):
        got = gate.copy()
        _with_threads(threads, lambda: getattr(cpu, name)(got, up))
        # ~3 roundings of float32; gelu's argument carries float32 error into exp: relative ~|z| ulp
        tol = 3 * EPS32 * (1 + (np.abs(z) if name == "gelu_mul" else 0)) * np.abs(want) + 1e-37
        assert np.all(np.abs(got - want) <= tol), np.max(np.abs(got - want) / tol)


@pytest.mark.parametrize("name", ["silu_mul", "gelu_mul"])
def test_glu_extreme_inputs(name):
    """No exp overflow into inf / inf: large negative inputs give (minus) zero or a denormal, large positive ones
    themselves; NaN stays NaN."""
    neg = [-3e38, -1e4, -1000, -104, -100]
    pos = [20, 87, 88.5, 100, 1000, 1e4, 3e38]
    tiny = [-1e-30, -0.0, 0.0, 1e-30]
    v = np.array(neg + [-88.5, -87, -20] + tiny + pos + [np.inf, np.nan], np.float32)
    gate, up = v[None, :].copy(), np.ones((1, v.size), np.float32)
    getattr(cpu, name)(gate, up)
    got = gate[0]
    assert np.isnan(got[-1]) and got[-2] == np.inf
    assert np.all(np.isfinite(got[:len(neg)])) and np.all(np.abs(got[:len(neg)]) < 1e-30)
    big = got[len(neg) + 3 + len(tiny):-2]
    np.testing.assert_allclose(big, v[len(neg) + 3 + len(tiny):-2], rtol=1e-6)
    assert np.all(big[2:] == v[len(neg) + 5 + len(tiny):-2])  # from 100 up: exactly the input
    np.testing.assert_array_equal(got[len(neg) + 3:len(neg) + 7], np.float32([-1e-30, 0, 0, 1e-30]) / 2)  # v / 2
    want, _ = _glu_reference(name, v[None, :-2], up[:, :-2])  # every finite value against float64
    np.testing.assert_allclose(got[:-2], want[0], rtol=1e-5, atol=1e-37)


@pytest.mark.parametrize("name", ["silu_mul", "gelu_mul"])
def test_glu_rows_independent_of_the_call(name):
    """A row's bits are the same alone, in any batch, with 1 or 2 threads (the column split across threads) and
    wherever a value falls in a vector (the partial last vector of a row included)."""
    rng = np.random.default_rng(4)
    gate = (rng.standard_normal((37, 1000)) * 4).astype(np.float32)
    up = rng.standard_normal((37, 1000)).astype(np.float32)

    def run(g, u, threads):
        out = np.ascontiguousarray(g)
        _with_threads(threads, lambda: getattr(cpu, name)(out, np.ascontiguousarray(u)))
        return out
    full = run(gate.copy(), up, 1)
    np.testing.assert_array_equal(run(gate.copy(), up, 2), full)
    for t in (0, 17, 36):
        for threads in (1, 2):
            np.testing.assert_array_equal(run(gate[t:t + 1].copy(), up[t:t + 1], threads), full[t:t + 1])
    np.testing.assert_array_equal(run(gate[5:13].copy(), up[5:13], 2), full[5:13])
    np.testing.assert_array_equal(run(gate[:, :990].copy(), up[:, :990], 1), full[:, :990])  # other tails
    np.testing.assert_array_equal(run(gate[:, 9:].copy(), up[:, 9:], 2), full[:, 9:])  # other lanes


@pytest.mark.parametrize("name", ["silu_mul", "gelu_mul"])
def test_glu_other_arrays(name):
    """Views that are not C-contiguous, and float64, take the scalar code: the same values to a few ulp."""
    rng = np.random.default_rng(5)
    base = (rng.standard_normal((4, 50)) * 3).astype(np.float32)
    up = rng.standard_normal((4, 50)).astype(np.float32)
    want, _ = _glu_reference(name, base[:, ::2], up[:, ::2])
    view = base.copy()[:, ::2]
    getattr(cpu, name)(view, up[:, ::2])
    np.testing.assert_allclose(view, want, rtol=2e-5, atol=1e-6)  # the old tanh form cancels a little for v < 0
    g64 = base.astype(np.float64)
    getattr(cpu, name)(g64, up.astype(np.float64))
    np.testing.assert_allclose(g64, _glu_reference(name, base, up)[0], rtol=1e-5, atol=1e-6)


def rope_reference(x, pos, n_heads, head_dim, rope_dim, base, pos_scale, freq_factors, neox):
    """float64 rotation of the pairs of each head (the rope docstring's two conventions)."""
    out = x.astype(np.float64)
    half = rope_dim // 2
    i = np.arange(half)
    inv = base ** (-2.0 * i / rope_dim) / freq_factors.astype(np.float64)
    for t in range(x.shape[0]):
        theta = pos[t] * pos_scale * inv
        c, s = np.cos(theta), np.sin(theta)
        for h in range(n_heads):
            a = h * head_dim + (i if neox else 2 * i)
            b = a + half if neox else a + 1
            x0, x1 = out[t, a].copy(), out[t, b].copy()
            out[t, a], out[t, b] = x0 * c - x1 * s, x0 * s + x1 * c
    return out


ROPE_CASES = [  # n_heads, head_dim, rope_dim, base, pos_scale, freq_factors
    (9, 64, 64, 10000.0, 1.0, "ones"),  # SmolLM2
    (4, 256, 256, 1e6, 1.0, "ones"),  # Gemma 3 (global layers)
    (3, 64, 64, 500000.0, 0.25, "llama3"),  # linear scaling, Llama 3's frequency divisors
    (4, 16, 12, 10000.0, 0.5, "llama3"),  # partial rotation, half = 6: one partial vector
    (2, 40, 40, 10000.0, 1.0, "ones"),  # half = 20: a whole vector and a partial one
]


def _factors(kind, half, rng):
    return np.ones(half, np.float32) if kind == "ones" else (1 + 7 * rng.random(half)).astype(np.float32)


@pytest.mark.parametrize("neox", [False, True], ids=["norm", "neox"])
@pytest.mark.parametrize("n_heads, head_dim, rope_dim, base, pos_scale, factors", ROPE_CASES)
def test_rope_against_float64(neox, n_heads, head_dim, rope_dim, base, pos_scale, factors):
    rng = np.random.default_rng(6)
    pos = np.array([0, 1, 2, 7, 63, 300, 4095, 32767, 131071], dtype=np.int64)
    ff = _factors(factors, rope_dim // 2, rng)
    x = rng.standard_normal((len(pos), n_heads * head_dim)).astype(np.float32)
    got = x.copy()
    cpu.rope(got, pos, n_heads, head_dim, rope_dim, base, pos_scale, ff, neox)
    want = rope_reference(x, pos, n_heads, head_dim, rope_dim, base, pos_scale, ff, neox)
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * EPS32 * np.abs(x).max())
    if rope_dim < head_dim:  # the rest of each head is left alone
        rest = np.concatenate([np.arange(h * head_dim + rope_dim, (h + 1) * head_dim) for h in range(n_heads)])
        np.testing.assert_array_equal(got[:, rest], x[:, rest])


@pytest.mark.parametrize("neox", [False, True], ids=["norm", "neox"])
def test_rope_angles_round_as_libm(neox):
    """Unit pairs (1, 0) come out as (cos, sin) of each angle: those are float32 of float64 math.cos / math.sin
    of pos * pos_scale * inv_freq, as rope computed them before (a last-bit tie at most)."""
    import math

    rng = np.random.default_rng(7)
    n_heads, hd = 2, 64
    pos = np.concatenate([np.arange(50), rng.integers(0, 1 << 20, 50)]).astype(np.int64)
    ff = (1 + rng.random(hd // 2)).astype(np.float32)
    x = np.zeros((len(pos), n_heads * hd), np.float32)
    i = np.arange(hd // 2)
    a = i if neox else 2 * i
    b = a + hd // 2 if neox else a + 1
    x[:, a] = 1
    cpu.rope(x, pos, n_heads, hd, hd, 10000.0, 0.75, ff, neox)
    inv = [10000.0 ** (-2.0 * k / hd) / float(ff[k]) for k in range(hd // 2)]
    theta = [[float(p) * 0.75 * inv[k] for k in range(hd // 2)] for p in pos]
    c = np.array([[math.cos(t) for t in row] for row in theta], np.float32)
    s = np.array([[math.sin(t) for t in row] for row in theta], np.float32)
    for got, want in ((x[:, a], c), (x[:, b], s)):
        ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64))
        assert ulps.max() <= 1 and np.mean(ulps == 0) > 0.999


@pytest.mark.parametrize("neox", [False, True], ids=["norm", "neox"])
def test_rope_tokens_independent_of_the_call(neox):
    rng = np.random.default_rng(8)
    n_heads, hd = 3, 40
    pos = rng.integers(0, 5000, 11).astype(np.int64)
    ff = (1 + rng.random(hd // 2)).astype(np.float32)
    x = rng.standard_normal((len(pos), n_heads * hd)).astype(np.float32)
    full = x.copy()
    cpu.rope(full, pos, n_heads, hd, hd, 10000.0, 1.0, ff, neox)
    for t in (0, 4, 10):
        alone = x[t:t + 1].copy()
        cpu.rope(alone, pos[t:t + 1], n_heads, hd, hd, 10000.0, 1.0, ff, neox)
        np.testing.assert_array_equal(alone, full[t:t + 1])
    order = rng.permutation(len(pos))
    shuffled = x[order].copy()
    cpu.rope(shuffled, pos[order], n_heads, hd, hd, 10000.0, 1.0, ff, neox)
    np.testing.assert_array_equal(shuffled, full[order])


def test_rope_other_arrays():
    """A view that is not C-contiguous takes the scalar rotation: the same values to an ulp or so."""
    rng = np.random.default_rng(9)
    pos = np.array([3, 900], dtype=np.int64)
    ff = np.ones(8, np.float32)
    big = rng.standard_normal((2, 80)).astype(np.float32)
    for neox in (False, True):
        view = big.copy()[:, :64]
        cpu.rope(view, pos, 4, 16, 16, 10000.0, 1.0, ff, neox)
        want = rope_reference(big[:, :64], pos, 4, 16, 16, 10000.0, 1.0, ff, neox)
        np.testing.assert_allclose(view, want, rtol=0, atol=4 * EPS32 * np.abs(big).max())
