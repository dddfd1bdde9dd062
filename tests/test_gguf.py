"""The bulk GGUF parser against gguf.GGUFReader (the reference) on files written by gguf.GGUFWriter."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from pyllm.errors import GGUFError
from pyllm.gguf import GGUFFile


def write_sample(path):
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("general.name", "tiny ✓")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "ü", ""])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.0, -3.0])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((5,)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_matches_reference_reader(tmp_path):
    p = tmp_path / "s.gguf"
    write_sample(p)
    g, r = GGUFFile(p), GGUFReader(str(p))
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        want, got = field.contents(), g.metadata[key]
        if isinstance(got, np.ndarray):
            np.testing.assert_array_equal(got, np.asarray(want))
        else:
            assert got == pytest.approx(want) if isinstance(want, float) else got == want
    for t in r.tensors:
        info = g.tensors[t.name]
        assert info.shape == tuple(reversed(t.shape.tolist()))
        assert info.qtype == t.tensor_type and info.nbytes == t.n_bytes and info.offset == t.data_offset
        np.testing.assert_array_equal(g.tensor_data(t.name), t.data.reshape(-1).view(np.uint8))
    assert g.tensors["b.weight"].qtype == GGMLQuantizationType.F16


def test_not_gguf_and_missing(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 zip, not gguf")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(p)
    with pytest.raises(GGUFError, match="no such file"):
        GGUFFile(tmp_path / "missing.gguf")


@pytest.mark.parametrize("keep", [3, 10, 40, 200, -30])
def test_truncated(tmp_path, keep):
    p = tmp_path / "s.gguf"
    write_sample(p)
    data = p.read_bytes()
    p.write_bytes(data[:keep])
    with pytest.raises(GGUFError, match="truncated|not a GGUF"):
        GGUFFile(p)


def test_fingerprint_changes_with_metadata(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_sample(a)
    write_sample(b)
    assert GGUFFile(a).fingerprint() == GGUFFile(b).fingerprint()
    data = bytearray(b.read_bytes())
    i = data.find(b"tiny")
    data[i] = ord("T")
    b.write_bytes(bytes(data))
    assert GGUFFile(a).fingerprint() != GGUFFile(b).fingerprint()
