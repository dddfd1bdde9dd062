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
