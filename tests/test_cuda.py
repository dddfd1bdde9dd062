"""The CUDA backend against its CPU twin, in numba's CUDA simulator (no GPU needed), and device selection.

numba reads NUMBA_ENABLE_CUDASIM when it is imported, so the simulator tests (marked `sim`) run in a
subprocess that sets it: `test_simulator` below.  In a plain run they are skipped; in that subprocess they run.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from test_qmatmul import make_weight
from tiny import write_tiny_model

pytest.importorskip("numba_cuda", reason="the CUDA backend is optional: pip install pyllm[cuda]")

IN_SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
sim = pytest.mark.skipif(not IN_SIMULATOR, reason="runs inside test_simulator's NUMBA_ENABLE_CUDASIM subprocess")

# every type the three reference models use, plus the variants the kernels share code with
QTYPES = [Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.skipif(IN_SIMULATOR, reason="this is the launcher")
def test_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=900,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout.splitlines()[-1], r.stdout[-2000:]


def _cpu_and_cuda():
    from pyllm.kernels import cpu, cuda

    return cpu, cuda


def _close(got, want, tol):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


@sim
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_matmul_and_get_rows(qtype):
    cpu, cuda = _cpu_and_cuda()
    rng = np.random.default_rng(int(qtype))
    n_in = 256 if qtype in (Q.F32, Q.F16) else 512  # K-quants: two blocks of 256
    w = make_weight(qtype, 3, n_in, rng)
    dw = cuda.upload_matrix(w)
    for T in (1, 9):  # decode path (int8-rounded activations) and prefill path, more than one pass of tokens
        x = rng.standard_normal((T, n_in)).astype(np.float32)
        _close(cuda.to_numpy(cuda.matmul(dw, cuda.upload_vector(x))), cpu.matmul(w, x), 1e-5)
    ids = np.array([2, 0, 2])
    _close(cuda.to_numpy(cuda.get_rows(dw, cuda.upload_ints(ids))), cpu.get_rows(w, ids), 1e-6)
    with pytest.raises(IndexError):
        cuda.get_rows(dw, np.array([3]))


@sim
def test_unsupported_type_names_the_tensor():
    from pyllm.errors import UnsupportedError
    from pyllm.quants import QTensor

    _, cuda = _cpu_and_cuda()
    w = QTensor("blk.0.odd", int(Q.Q2_K), (1, 256), np.zeros((1, 84), np.uint8))
    with pytest.raises(UnsupportedError, match="blk.0.odd.*Q2_K"):
        cuda.upload_matrix(w)


@sim
def test_norm_rope_activations_and_helpers():
    cpu, cuda = _cpu_and_cuda()
    rng = np.random.default_rng(5)
    T, n_heads, hd = 3, 4, 16
    x = rng.standard_normal((T, n_heads * hd)).astype(np.float32)
    for width in (n_heads * hd, hd):  # whole rows, and per head (Gemma 3's Q/K norms)
        w = rng.standard_normal(width).astype(np.float32)
        want = np.empty_like(x)
        cpu.rmsnorm(x, w, np.float32(1e-6), want)
        got = cuda.upload_vector(x)
        cuda.rmsnorm(got, cuda.upload_vector(w), np.float32(1e-6), got)  # in place, as the transformer does
        _close(cuda.to_numpy(got), want, 1e-5)
    pos = np.array([0, 7, 300])
    factors = (1 + rng.random(6)).astype(np.float32)
    for neox in (False, True):
        want = x.copy()
        cpu.rope(want, pos, n_heads, hd, 12, 10000.0, 0.5, factors, neox)  # partial rotation, scaled positions
        got = cuda.upload_vector(x)
        cuda.rope(got, cuda.upload_ints(pos), n_heads, hd, 12, 10000.0, 0.5, factors, neox)
        _close(cuda.to_numpy(got), want, 1e-5)
    gate, up = (rng.standard_normal((T, 40)).astype(np.float32) * 3 for _ in range(2))
    for name in ("silu_mul", "gelu_mul"):
        want = gate.copy()
        getattr(cpu, name)(want, up)
        got = cuda.upload_vector(gate)
        getattr(cuda, name)(got, cuda.upload_vector(up))
        _close(cuda.to_numpy(got), want, 1e-5)
    bias = rng.standard_normal(40).astype(np.float32)
    got = cuda.upload_vector(gate)
    cuda.add(got, cuda.upload_vector(bias))
    cuda.add(got, cuda.upload_vector(up))
    cuda.scale(got, 0.25)
    _close(cuda.to_numpy(got), (gate + bias + up) * np.float32(0.25), 1e-6)
    np.testing.assert_array_equal(cuda.to_numpy(cuda.take_rows(got, np.array([2, 0]))), cuda.to_numpy(got)[[2, 0]])
    assert cuda.to_numpy(cuda.take_rows(got, np.array([], dtype=np.int64))).shape == (0, 40)


@sim
@pytest.mark.parametrize("kv_dtype", [np.uint16, np.float32], ids=["f16", "f32"])
def test_kv_write_and_attention(kv_dtype):
    cpu, cuda = _cpu_and_cuda()
    rng = np.random.default_rng(6)
    n_slots, n_kv, n_ctx, hd, n_heads = 2, 2, 12, 8, 4  # grouped-query: two heads per KV head
    shape = (n_slots, n_kv, n_ctx, hd)
    kc, vc = cpu.zeros(shape, kv_dtype), cpu.zeros(shape, kv_dtype)
    dk, dv = cuda.zeros(shape, kv_dtype), cuda.zeros(shape, kv_dtype)
    # slot 0 gets 7 positions, slot 1 gets 3; then one step where both slots attend
    slot = np.array([0] * 7 + [1] * 3)
    pos = np.array(list(range(7)) + list(range(3)))
    steps = [(slot, pos), (np.array([1, 0]), np.array([3, 7]))]
    for window in (0, 3):
        for s, p in steps:
            k, v, q = (rng.standard_normal((len(s), n * hd)).astype(np.float32) for n in (n_kv, n_kv, n_heads))
            cpu.kv_write(kc, vc, s, p, k, v)
            ds, dp = cuda.upload_ints(s), cuda.upload_ints(p)
            cuda.kv_write(dk, dv, ds, dp, cuda.upload_vector(k), cuda.upload_vector(v))
            np.testing.assert_array_equal(cuda.to_numpy(dk), kc)  # same f16 rounding, same bits
            np.testing.assert_array_equal(cuda.to_numpy(dv), vc)
            want = np.empty_like(q)
            cpu.attention(q, kc, vc, s, p, window, np.float32(0.35), want)
            got = cuda.empty(q.shape)
            cuda.attention(cuda.upload_vector(q), dk, dv, ds, dp, window, np.float32(0.35), got)
            _close(cuda.to_numpy(got), want, 1e-5)


@sim
@pytest.mark.parametrize("arch, qtype", [("llama", Q.Q8_0), ("qwen2", Q.Q4_1), ("gemma3", Q.Q5_0),
                                         ("llama", Q.F16), ("qwen2", Q.F16), ("gemma3", Q.F32)],
                         ids=lambda v: getattr(v, "name", v))
def test_tiny_model_logits_match_cpu(tmp_path, arch, qtype):
    """Quantized weights: a prefill of 8 tokens (logits at every position, sliding window included).  Float
    weights: decode steps too — with quantized weights the CPU rounds decode activations to int8, where a
    1e-7 difference upstream can flip one rounding, so those are compared kernel by kernel above instead."""
    import pyllm

    path = write_tiny_model(tmp_path / f"{arch}.gguf", arch=arch, qtype=qtype, sliding_window=3)
    on_cpu, on_gpu = pyllm.load(path, device="cpu"), pyllm.load(path, device="cuda")
    assert on_gpu.transformer.backend.__name__ == "pyllm.kernels.cuda"
    caches = on_cpu.new_cache(16), on_gpu.new_cache(16)
    prompt = [40, 41, 260, 7, 99, 3, 120, 45]
    quantized = qtype not in (Q.F32, Q.F16)
    steps = [prompt] if quantized else [prompt[:1], prompt[1:2]]
    for tokens in steps:
        want = on_cpu.eval(caches[0], tokens, all_logits=True)
        got = on_gpu.eval(caches[1], tokens, all_logits=True)
        assert got.shape == want.shape == (len(tokens), on_cpu.config.n_vocab)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


# --- device selection, outside the simulator ------------------------------------------------------------
def _cuda_usable():
    from pyllm.kernels import _cuda_unusable

    return _cuda_unusable() is None


@pytest.mark.skipif(IN_SIMULATOR, reason="about real devices")
def test_device_cuda_without_gpu_is_one_clear_line(tmp_path):
    if _cuda_usable():
        pytest.skip("this machine has a usable GPU")
    path = write_tiny_model(tmp_path / "tiny.gguf")
    cmd = [sys.executable, "-m", "pyllm", "run", path, "-p", "hi", "--raw", "-n", "2"]
    r = subprocess.run(cmd + ["--device", "cuda"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.startswith("pyllm: error: no CUDA device found: ") and r.stderr.count("\n") == 1, r.stderr
    auto = subprocess.run(cmd + ["--device", "auto", "--temp", "0"], capture_output=True, text=True, timeout=300)
    on_cpu = subprocess.run(cmd + ["--device", "cpu", "--temp", "0"], capture_output=True, text=True, timeout=300)
    assert auto.returncode == 0, auto.stderr
    assert auto.stdout == on_cpu.stdout and "CUDA" not in auto.stderr


@pytest.mark.skipif(IN_SIMULATOR, reason="about real devices")
def test_auto_picks_cpu_quietly_and_never_the_simulator():
    from pyllm.kernels import cpu, get_backend

    if _cuda_usable():
        pytest.skip("this machine has a usable GPU")
    assert get_backend("auto") is cpu


@sim
def test_kv_cache_copies_a_prefix_between_slots_on_the_device():
    """pyllm batch copies a shared prompt start from one slot to another (KVCache.copy_prefix) on any backend."""
    from types import SimpleNamespace

    from numba import cuda as numba_cuda

    from pyllm.kv_cache import KVCache

    _, cuda = _cpu_and_cuda()
    kv = KVCache(SimpleNamespace(n_layers=2, n_kv_heads=1, head_dim=4), 16, n_slots=2, backend=cuda)
    rng = np.random.default_rng(9)
    k, v = (rng.standard_normal((2, 2, 1, 16, 4)).astype(np.float16) for _ in range(2))  # [L, slots, H, ctx, D]
    kv.k, kv.v = numba_cuda.to_device(k), numba_cuda.to_device(v)
    kv.tokens = [[1, 2, 3, 4, 5], []]
    kv.copy_prefix(0, 1, 3)
    got_k, got_v = cuda.to_numpy(kv.k).view(np.float16), cuda.to_numpy(kv.v).view(np.float16)
    np.testing.assert_array_equal(got_k[:, 1, :, :3], k[:, 0, :, :3])
    np.testing.assert_array_equal(got_v[:, 1, :, :3], v[:, 0, :, :3])
    np.testing.assert_array_equal(got_k[:, 1, :, 3:], k[:, 1, :, 3:])  # past the prefix: untouched
    np.testing.assert_array_equal(got_k[:, 0], k[:, 0])
    assert kv.tokens == [[1, 2, 3, 4, 5], [1, 2, 3]]
