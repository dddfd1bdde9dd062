"""Broken numbers and impossible sizes: NaN weights and block scales, contexts above the training size or the
machine's memory.  Each is named at the first place it can be seen, in one line, before memory is touched."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q, quants

import pyllm
from pyllm.errors import GGUFError, MemoryLimitError, NumericError
from pyllm.gguf import GGUFFile
from pyllm.kv_cache import KVCache
from pyllm.quants import BLOCK_FLOATS, block_size, count_non_finite, type_size
from tiny import write_tiny_model

PYLLM = [sys.executable, "-m", "pyllm"]
F16_NAN = np.array([np.nan], dtype=np.float16).view(np.uint8)


def pyllm_cli(*args, input="", timeout=300):
    return subprocess.run(PYLLM + [str(a) for a in args], input=input, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(r, status: int, *texts):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == status, r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert lines and lines[-1].startswith("pyllm: error: "), r.stderr
    assert all(line.startswith("pyllm: warning: ") for line in lines[:-1]), r.stderr
    for text in texts:
        assert text in lines[-1], r.stderr
    return lines[-1]


def poisoned(src, dst, tensor: str, offset: int, value: bytes):
    """A copy of a GGUF with `value` written at byte `offset` of a tensor's data (the rest stays valid)."""
    shutil.copy(src, dst)
    info = GGUFFile(dst).tensors[tensor]
    assert offset + len(value) <= info.nbytes
    with open(dst, "r+b") as f:
        f.seek(info.offset + offset)
        f.write(value)
    return dst


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("faults") / "clean.gguf")


@pytest.fixture(scope="module")
def nan_norm(clean, tmp_path_factory):
    """One F32 norm vector overwritten with NaN (the issue's file)."""
    return poisoned(clean, tmp_path_factory.mktemp("faults") / "nan-norm.gguf", "blk.0.attn_norm.weight", 0,
                    np.full(64, np.nan, dtype=np.float32).tobytes())


@pytest.fixture(scope="module")
def nan_scale(clean, tmp_path_factory):
    """The fp16 scale of one Q8_0 block of layer 1's down projection set to NaN: only the running model sees it."""
    return poisoned(clean, tmp_path_factory.mktemp("faults") / "nan-scale.gguf", "blk.1.ffn_down.weight", 0,
                    F16_NAN.tobytes())


# --- weights ------------------------------------------------------------------------------------------------
def test_nan_norm_vector_is_refused_at_load_naming_the_tensor(nan_norm):
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_norm\.weight.*64 NaN"):
        pyllm.load(nan_norm)
    for temp in ("0.8", "0"):
        r = pyllm_cli("run", nan_norm, "-p", "hi", "-n", "5", "--raw", "--temp", temp)
        one_error_line(r, 2, "blk.0.attn_norm.weight", "NaN")
        assert r.stdout == ""


def test_nan_block_scale_stops_generation_naming_the_position(nan_scale):
    m = pyllm.load(nan_scale)
    ids = m.tokenize("hi there", add_special=False)
    with pytest.raises(NumericError, match=f"NaN at token position {len(ids) - 1}:"):
        list(m.generate(ids, max_tokens=5))
    for temp in ("0.8", "0"):  # greedy used to print nothing and exit 0
        r = pyllm_cli("run", nan_scale, "-p", "hi there", "-n", "5", "--raw", "--temp", temp)
        line = one_error_line(r, 1, f"NaN at token position {len(ids) - 1}", "pyllm info --check")
        assert r.stdout == "" and "blk." not in line


def test_verbose_names_the_first_layer_that_went_non_finite(nan_scale):
    r = pyllm_cli("run", nan_scale, "-p", "hi there", "-n", "5", "--raw", "--temp", "0", "--verbose")
    assert r.returncode == 1
    assert "first non-finite output: blk.1 feed-forward" in r.stderr.strip().splitlines()[-1], r.stderr


def test_nan_in_one_embedding_row_fails_at_the_decode_step_that_reads_it(tmp_path):
    """The prompt is fine; the first generated token's embedding row is NaN, so the step after it fails, at the
    position that token took."""
    clean = write_tiny_model(tmp_path / "untied.gguf", tied=False)
    m = pyllm.load(clean)
    ids = m.tokenize("the cat", add_special=False)
    first = next(m.generate(ids, max_tokens=1))
    assert first not in ids
    row = type_size(Q.Q8_0) * (64 // 32)  # bytes per token_embd row (d_model 64, Q8_0)
    bad = poisoned(clean, tmp_path / "bad-row.gguf", "token_embd.weight", first * row, F16_NAN.tobytes())
    m = pyllm.load(bad)
    m.diagnose = True
    out = m.generate(ids, max_tokens=5)
    assert next(out) == first
    with pytest.raises(NumericError, match=f"NaN at token position {len(ids)}: .*first non-finite output: "
                                           r"token_embd"):
        next(out)


def test_perplexity_refuses_to_print_nan(nan_scale, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 40)
    r = pyllm_cli("perplexity", nan_scale, "-f", text, "-c", "64")
    one_error_line(r, 1, "NaN")
    assert "nan" not in r.stdout.lower()


def test_batch_reports_non_finite_per_prompt(nan_scale):
    r = pyllm_cli("batch", nan_scale, "--raw", "-n", "3", "--temp", "0", input="hi\nthere\n")
    assert r.returncode == 1 and "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    records = [line for line in r.stdout.splitlines() if line]
    assert len(records) == 2 and all('"finish_reason": "error"' in x and "NaN" in x for x in records)


def test_info_check_names_the_tensors(clean, nan_norm, nan_scale):
    r = pyllm_cli("info", "--check", clean)
    assert r.returncode == 0 and "ok   finite weights: no NaN or inf" in r.stdout, r.stdout + r.stderr
    r = pyllm_cli("info", "--check", nan_norm)
    assert r.returncode == 2 and "FAIL finite weights: NaN or inf in 1 tensor: blk.0.attn_norm.weight (64)" in r.stdout
    one_error_line(r, 2)
    r = pyllm_cli("info", "--check", nan_scale)
    assert r.returncode == 2 and "blk.1.ffn_down.weight (1)" in r.stdout, r.stdout


@pytest.mark.parametrize("qtype", sorted(BLOCK_FLOATS), ids=lambda t: Q(t).name)
def test_block_floats_are_where_the_scales_are(qtype):
    """Each offset BLOCK_FLOATS lists is a float that gguf-py's dequantization multiplies in (NaN there makes the
    block NaN), and count_non_finite finds exactly the poisoned ones."""
    rng = np.random.default_rng(0)
    size = type_size(qtype)
    raw = rng.integers(0, 256, (4, 512 // block_size(qtype) * size), dtype=np.uint8)  # every quant bit pattern
    for offset in BLOCK_FLOATS[qtype]:  # and sane scales
        raw.reshape(-1, size)[:, offset:offset + 2] = (rng.random((raw.size // size, 1)) * 0.02 + 0.001).astype(
            np.float16).view(np.uint8)
    assert count_non_finite(qtype, raw) == 0 and not np.isnan(quants.dequantize(raw, Q(qtype))).any()
    for k, offset in enumerate(BLOCK_FLOATS[qtype]):
        bad = raw.copy().reshape(-1, size)
        bad[3, offset:offset + 2] = F16_NAN
        values = quants.dequantize(bad.reshape(raw.shape), Q(qtype)).reshape(-1)
        per_block = values.size // bad.shape[0]
        assert np.isnan(values[3 * per_block:4 * per_block]).any(), "not a float the block uses"
        assert not np.isnan(np.delete(values, np.s_[3 * per_block:4 * per_block])).any()
        assert count_non_finite(qtype, bad) == 1


@pytest.mark.parametrize("qtype, dtype", [(Q.F32, np.float32), (Q.F16, np.float16)])
def test_float_tensors_are_scanned_whole(qtype, dtype):
    values = np.ones(1000, dtype=dtype)
    values[[5, 700]] = [np.inf, np.nan]
    assert count_non_finite(qtype, values.view(np.uint8)) == 2


def test_bf16_nan_and_inf_are_counted():
    words = np.array([0x3F80, 0x7F80, 0xFFC1, 0x0001], dtype=np.uint16)  # 1.0, inf, NaN, a denormal
    assert count_non_finite(Q.BF16, words.view(np.uint8)) == 2


# --- sizes ----------------------------------------------------------------------------------------------------
def test_ctx_above_training_is_capped_with_one_warning(clean):
    warnings = []
    m = pyllm.load(clean)
    m.warn = warnings.append
    assert m.context_size(100_000) == 256 and m.context_size(100_000) == 256
    assert len(warnings) == 1 and "above the 256 tokens" in warnings[0] and "--force-ctx" in warnings[0]
    assert m.context_size(100_000, force=True) == 100_000
    r = pyllm_cli("run", clean, "-p", "hi", "--raw", "-n", "2", "--ctx-size", "2000000")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("pyllm: warning: --ctx-size 2000000 is above the 256 tokens") == 1, r.stderr


def test_kv_cache_is_refused_before_allocation(clean):
    m = pyllm.load(clean)
    need = KVCache.nbytes(m.config, 10**12)
    assert need == 2 * 2 * 2 * 10**12 * 16 * 2  # k and v, 2 layers, 2 KV heads, 16 per head, f16
    with pytest.raises(MemoryLimitError, match=r"needs 232.8 TiB, but .* of memory is available"):
        m.new_cache(10**12)
    m.max_memory = m.weights_bytes + (1 << 20)
    with pytest.raises(MemoryLimitError, match="more than the 1.0 MiB --max-memory leaves for it"):
        m.new_cache(100_000, n_slots=2)
    m.new_cache(1000)  # 0.25 MiB fits


def test_huge_ctx_on_the_cli(clean):
    r = pyllm_cli("run", clean, "-p", "hi", "--raw", "-n", "2", "--ctx-size", "100000000000", "--force-ctx")
    one_error_line(r, 1, "the KV cache (100000000000 tokens, f16) needs 23.3 TiB", "available", "--ctx-size")
    r = pyllm_cli("batch", clean, "--raw", "--parallel", "100000", "--ctx-size", "100000", "--force-ctx",
                  input="hi\n")
    one_error_line(r, 1, "the KV cache (100000 x 100000 tokens, f16)", "--parallel")
    r = pyllm_cli("run", clean, "-p", "hi", "--max-memory", "2M", "--raw", "--ctx-size", "100000", "--force-ctx")
    one_error_line(r, 1, "--max-memory")


def test_real_model_ctx_sizes(smollm2):
    """The issue's commands: a context far above SmolLM2's 8192 is capped with one warning and runs; forced,
    it is refused with the bytes it would need, not a MemoryError."""
    r = pyllm_cli("run", smollm2, "-p", "hi", "-n", "1", "--ctx-size", "100000000")
    assert r.returncode == 0 and r.stderr.count("pyllm: warning:") == 1 and "using 8192" in r.stderr, r.stderr
    r = pyllm_cli("run", smollm2, "-p", "hi", "-n", "1", "--ctx-size", "100000000", "--force-ctx")
    one_error_line(r, 1, "the KV cache (100000000 tokens, f16) needs 2.1 TiB")


def test_prompt_cache_entry_larger_than_the_limit_is_not_written(clean, tmp_path):
    cache_dir = tmp_path / "pc"
    r = pyllm_cli("run", clean, "-p", "hello there " * 10, "--raw", "-n", "1", "--prompt-cache-dir", cache_dir,
                  "--prompt-cache-max-size", "1K")
    assert r.returncode == 0, r.stderr
    assert "more than the cache's limit of 1024" in r.stderr and "not saved" in r.stderr
    assert not list(cache_dir.glob("*.pkv"))
