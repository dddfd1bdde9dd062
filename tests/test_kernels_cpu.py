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
