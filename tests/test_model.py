"""Whole-model tests on tiny random GGUFs of every architecture (written by tests/tiny.py)."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import pyllm
from pyllm.errors import ContextError, UnsupportedError
from tiny import write_tiny_model

CASES = [("llama", Q.Q8_0), ("llama", Q.Q4_1), ("qwen2", Q.Q5_0), ("gemma3", Q.Q8_0), ("gemma3", Q.F16)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{q.name}" for a, q in CASES])
def tiny(request, tmp_path_factory):
    arch, qtype = request.param
    path = write_tiny_model(tmp_path_factory.mktemp("m") / f"{arch}.gguf", arch=arch, qtype=qtype, n_layers=3)
    return pyllm.load(path)


def test_prefill_equals_token_by_token(tiny):
    """All positions at once == one token at a time through the KV cache: the same kernel path computes each
    row the same way whatever T is; decoding steps (int8 activations) stay close to it."""
    ids = list(np.random.default_rng(1).integers(0, tiny.config.n_vocab, size=20))
    full = tiny.logits(ids, all_positions=True)  # [20, n_vocab]
    cache = tiny.new_cache(32)
    steps = np.stack([tiny.eval(cache, [t]) for t in ids])  # [20, n_vocab]
    assert full.shape == steps.shape == (20, tiny.config.n_vocab)
    np.testing.assert_allclose(full, steps, rtol=1e-5, atol=1e-5)
    cache = tiny.new_cache(32)
    decoded = np.stack([tiny.decode(cache, [0], [t])[0] for t in ids])  # [20, n_vocab]
    np.testing.assert_allclose(full, decoded, atol=0.03 * np.abs(full).max())
    assert (full.argmax(1) == decoded.argmax(1)).mean() >= 0.9


def test_chunked_prefill_equals_single_chunk(tiny):
    ids = list(np.random.default_rng(2).integers(0, tiny.config.n_vocab, size=24))
    one = tiny.eval(tiny.new_cache(32), ids, all_logits=True)
    chunked = tiny.eval(tiny.new_cache(32), ids, all_logits=True, n_batch=8)  # chunks of 8: same kernel path
    np.testing.assert_allclose(one, chunked, rtol=1e-4, atol=1e-4)


def test_prompts_of_several_slots_prefilled_together_equal_each_alone(tiny):
    """eval_many runs the tokens of several slots through one forward pass (chunks cross from one sequence to
    the next); each sequence's logits are bit-identical to its prefill alone, and the slots hold what it did."""
    rng = np.random.default_rng(3)
    held = [9, 4, 2]  # slot 1 already holds these; its new token follows them
    seqs = [(2, list(rng.integers(0, tiny.config.n_vocab, size=7))),
            (0, list(rng.integers(0, tiny.config.n_vocab, size=12))), (1, [5])]
    for n_batch in (256, 8):
        cache = tiny.new_cache(32, n_slots=3)
        tiny.eval(cache, held, slot=1)
        together = tiny.eval_many(cache, seqs, n_batch=n_batch)
        for (slot, ids), logits in zip(seqs, together):
            alone = tiny.new_cache(32, n_slots=3)
            if slot == 1:
                tiny.eval(alone, held, slot=1)
            assert np.array_equal(logits, tiny.eval(alone, ids, slot=slot)), f"slot {slot}, n_batch {n_batch}"
            assert cache.tokens[slot] == alone.tokens[slot]
    with pytest.raises(ValueError, match="once"):
        tiny.eval_many(tiny.new_cache(32, n_slots=2), [(0, [1]), (0, [2])])


def test_f16_kv_close_to_f32(tiny):
    ids = list(range(5, 17))
    a = tiny.eval(tiny.new_cache(16, kv_type="f32"), ids)
    b = tiny.eval(tiny.new_cache(16, kv_type="f16"), ids)
    np.testing.assert_allclose(a, b, atol=0.01 * np.abs(a).max())


def test_batched_decode_equals_separate(tiny):
    """A decoding step over several slots gives each sequence exactly the logits it would get alone."""
    rng = np.random.default_rng(3)  # 9 sequences: more than the 8 rows where the kernel once switched paths
    seqs = [list(rng.integers(0, tiny.config.n_vocab, size=n)) for n in (3, 2, 4, 5, 2, 3, 6, 2, 4)]
    alone = []
    for s in seqs:
        c = tiny.new_cache(8)
        tiny.eval(c, s[:-1])
        alone.append(tiny.decode(c, [0], s[-1:])[0])
    cache = tiny.new_cache(8, n_slots=len(seqs))
    for slot, s in enumerate(seqs):
        tiny.eval(cache, s[:-1], slot=slot)
    batched = tiny.decode(cache, list(range(len(seqs))), [s[-1] for s in seqs])
    np.testing.assert_array_equal(batched, np.stack(alone))


def test_generate_greedy_is_deterministic_and_respects_max_tokens(tiny):
    ids = [1, 2, 3, 4]
    a = list(tiny.generate(ids, max_tokens=6, temperature=0.0))
    b = list(tiny.generate(ids, max_tokens=6, temperature=0.0))
    assert a == b and len(a) <= 6
    logits = tiny.logits(ids)
    assert a[0] == int(np.argmax(logits))


def test_sliding_window_limits_what_a_position_sees(tmp_path):
    """Gemma 3 local layers: with 2 all-local layers of window 4, position p sees tokens >= p - 6 only."""
    path = write_tiny_model(tmp_path / "g.gguf", arch="gemma3", qtype=Q.F32, n_layers=2, sliding_window=4)
    m = pyllm.load(path)
    assert m.config.layer_window == (4, 4)
    ids = list(range(20, 32))
    changed = [99] + ids[1:]
    a, b = m.logits(ids, all_positions=True), m.logits(changed, all_positions=True)
    assert not np.allclose(a[3], b[3])  # inside the receptive field
    np.testing.assert_array_equal(a[7:], b[7:])  # beyond it: bit-identical


def test_context_overflow_is_a_clear_error(tmp_path):
    m = pyllm.load(write_tiny_model(tmp_path / "l.gguf"))
    with pytest.raises(ContextError, match="do not fit"):
        m.eval(m.new_cache(8), list(range(10)))


def test_unknown_architecture(tmp_path):
    path = write_tiny_model(tmp_path / "x.gguf")
    data = bytearray(open(path, "rb").read())
    i = data.find(b"llama", data.find(b"general.architecture"))
    data[i:i + 5] = b"mamba"
    bad = tmp_path / "mamba.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(UnsupportedError, match="architecture 'mamba' is not supported"):
        pyllm.load(bad)
