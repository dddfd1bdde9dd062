"""Crafted GGUF files, one per way a file from a stranger can lie: pyllm refuses each with one clear error
naming the file and what is wrong (a PyllmError, exit status 2 from the CLI), never a crash, and never
allocates what a count merely claims. Files are written here, from a tiny model (tests/tiny.py) taken apart
and put back together by fuzz/gguf_bytes.py."""
import copy
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from tiny import write_tiny_model

import pyllm
from pyllm.errors import GGUFError, TemplateError, UnsupportedError
from pyllm.gguf import GGUFFile
from pyllm.validate import chat_template_for, check_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
import fuzz_gguf  # noqa: E402
import gguf_bytes as gb  # noqa: E402

PYLLM = [sys.executable, "-m", "pyllm"]


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    """A well-formed tiny llama, parsed into KV pairs and tensors."""
    path = write_tiny_model(tmp_path_factory.mktemp("seed") / "tiny.gguf")
    return gb.parse(Path(path).read_bytes())


@pytest.fixture
def g(seed):
    return copy.deepcopy(seed)


def write(tmp_path, g, name="bad.gguf", **build) -> Path:
    p = tmp_path / name
    p.write_bytes(gb.build(g, **build))
    return p


def refused(path, match, load=GGUFFile, error=GGUFError) -> str:
    """The error `load(path)` raises: of class `error`, naming the file, matching `match`."""
    with pytest.raises(error, match=match) as e:
        load(path)
    assert str(e.value).startswith(f"{path}: "), str(e.value)
    return str(e.value)


def test_seed_is_valid(tmp_path, g):
    p = write(tmp_path, g)
    assert all(ok for _, ok, _ in check_model(p)), check_model(p)
    pyllm.load(p, device="cpu")


# --- header ---------------------------------------------------------------------------------------------
def test_magic(tmp_path, g):
    refused(write(tmp_path, g, magic=b"GGML"), "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    refused(empty, "not a GGUF file .0 bytes")


@pytest.mark.parametrize("version", [0, 1, 4, 2**32 - 1])
def test_version(tmp_path, g, version):
    g.version = version
    refused(write(tmp_path, g), f"unsupported GGUF version {version}")


@pytest.mark.parametrize("which", ["n_tensors", "n_kv"])
def test_counts_bounded_by_file_size(tmp_path, g, which):
    p = write(tmp_path, g, **{which: 2**62})
    tracemalloc.start()
    refused(p, "count is 4611686018427387904, more than the file could hold")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * p.stat().st_size, peak  # the header prefix, not anything the count claims


@pytest.mark.parametrize("vtype,etype", [(gb.ARRAY, gb.UINT32), (gb.ARRAY, gb.STRING), (gb.ARRAY, gb.ARRAY),
                                         (gb.STRING, None)])
def test_array_and_string_lengths_bounded(tmp_path, g, vtype, etype):
    g.set("general.lie", vtype, [] if vtype == gb.ARRAY else "", etype, count=2**60)
    p = write(tmp_path, g)
    tracemalloc.start()
    refused(p, "general.lie .*(more than the file could hold|runs past the end of the file)")
    assert tracemalloc.get_traced_memory()[1] < 4 * p.stat().st_size
    tracemalloc.stop()


def test_key_length_bounded(tmp_path, g):
    data = bytearray(gb.build(g))
    key_length = next(f for f in g.fields if f.kind == "length")  # the first key's length field
    data[key_length.pos:key_length.pos + 8] = (2**63).to_bytes(8, "little")
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(data))
    refused(p, "metadata key runs past the end of the file")


def test_deep_nesting_is_refused_not_recursed(tmp_path, g):
    depth = 5000  # gguf.GGUFReader recurses once per level
    g.set("general.deep", gb.ARRAY, struct.pack("<IQ", gb.ARRAY, 1) * depth + struct.pack("<IQB", gb.UINT8, 1, 7))
    refused(write(tmp_path, g), "general.deep: arrays nested deeper than 8")


def test_shallow_nesting_is_fine(tmp_path, g):
    g.set("general.pairs", gb.ARRAY, [(gb.UINT8, [1, 2]), (gb.UINT8, [3])], gb.ARRAY)
    pairs = GGUFFile(write(tmp_path, g)).metadata["general.pairs"]
    assert [list(p) for p in pairs] == [[1, 2], [3]]


@pytest.mark.parametrize("vtype", [13, 99, 2**32 - 1])
def test_unknown_value_type(tmp_path, g, vtype):
    g.set("general.odd", vtype, b"\0" * 8)
    refused(write(tmp_path, g), f"general.odd: unknown value type {vtype}")


def test_unknown_array_element_type(tmp_path, g):
    g.set("general.odd", gb.ARRAY, struct.pack("<IQ", 77, 1))
    refused(write(tmp_path, g), "general.odd: unknown array element type 77")


def test_duplicate_key(tmp_path, g):
    g.kvs.append(copy.deepcopy(g.kv("llama.block_count")))
    refused(write(tmp_path, g), "llama.block_count' is stored twice")


@pytest.mark.parametrize("key,vtype,value,etype,kind", [
    ("general.architecture", gb.UINT32, 7, None, "int"),
    ("general.architecture", gb.ARRAY, ["llama"], gb.STRING, r"array\[str\]"),
    ("tokenizer.ggml.tokens", gb.UINT32, 264, None, "int"),
    ("tokenizer.ggml.tokens", gb.ARRAY, list(range(264)), gb.INT32, r"array\[int\]"),
    ("tokenizer.ggml.merges", gb.ARRAY, [(gb.STRING, ["a b"])], gb.ARRAY, r"array\[array\]"),
    ("tokenizer.ggml.bos_token_id", gb.STRING, "1", None, "str"),
    ("tokenizer.chat_template", gb.ARRAY, [1], gb.UINT8, r"array\[int\]"),
    ("llama.embedding_length", gb.STRING, "64", None, "str"),
    ("llama.attention.head_count", gb.ARRAY, [4, 4], gb.UINT32, r"array\[int\]"),
    ("llama.rope.freq_base", gb.STRING, "1e4", None, "str"),
    ("general.alignment", gb.BOOL, True, None, "bool"),
])
def test_known_key_of_wrong_type(tmp_path, g, key, vtype, value, etype, kind):
    g.set(key, vtype, value, etype)
    refused(write(tmp_path, g), f"metadata {key} is of type {kind}, expected")


@pytest.mark.parametrize("alignment", [0, 3, 48, 2**20])
def test_alignment_power_of_two(tmp_path, g, alignment):
    g.set("general.alignment", gb.UINT32, alignment)
    refused(write(tmp_path, g, alignment=32), f"general.alignment is {alignment}, expected a power of two")


# --- tensor directory -------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [4, 5, 99, 2**31])  # 4, 5: Q4_2/Q4_3, removed from GGML long ago
def test_unknown_tensor_type(tmp_path, g, qtype):
    g.tensor("output_norm.weight").qtype = qtype
    refused(write(tmp_path, g), f"tensor 'output_norm.weight' has unknown type {qtype}")


def test_zero_dimension(tmp_path, g):
    g.tensor("blk.0.attn_q.weight").dims = [64, 0]
    refused(write(tmp_path, g), r"tensor 'blk.0.attn_q.weight' has a non-positive dimension \[64, 0\]")


@pytest.mark.parametrize("dims", [[], [1, 1, 1, 1, 64]])
def test_dimension_count(tmp_path, g, dims):
    g.tensor("output_norm.weight").dims = dims
    refused(write(tmp_path, g), f"has {len(dims)} dimensions .1 to 4 allowed")


def test_row_not_whole_blocks(tmp_path, g):
    g.tensor("blk.0.attn_q.weight").dims = [48, 64]  # Q8_0 blocks hold 32 weights
    refused(write(tmp_path, g), "row length 48 is not a multiple of the Q8_0 block size 32")


def test_size_that_lies(tmp_path, g):
    """CVE-2026-7482 ("Bleeding Llama"): a tensor whose dims claim more data than the file holds."""
    t = g.tensor("token_embd.weight")
    t.dims = [t.dims[0], t.dims[1] * 1000]
    refused(write(tmp_path, g), r"tensor 'token_embd.weight': data ends at byte \d+ but the file has \d+ bytes")


def test_offset_past_the_end(tmp_path, g):
    g.tensor("output_norm.weight").offset = 2**40
    refused(write(tmp_path, g), "tensor 'output_norm.weight': data ends at byte")


def test_misaligned_offset(tmp_path, g):
    g.tensor("output_norm.weight").offset = 33
    refused(write(tmp_path, g), "tensor 'output_norm.weight': data offset 33 is not aligned to 32")


def test_overlapping_tensors(tmp_path, g):
    g.tensor("blk.1.attn_norm.weight").offset = 0  # on top of the first tensor's data
    refused(write(tmp_path, g), "tensors '.*' and '.*' overlap")


def test_duplicate_tensor_name(tmp_path, g):
    g.tensor("blk.1.attn_norm.weight").name = "blk.0.attn_norm.weight"
    refused(write(tmp_path, g), "tensor 'blk.0.attn_norm.weight' is listed twice")


# --- metadata the architecture needs --------------------------------------------------------------------
def load(path):
    return pyllm.load(path, device="cpu")


def test_missing_hyper_parameter(tmp_path, g):
    g.drop("llama.block_count")
    refused(write(tmp_path, g), "metadata llama.block_count is missing", load)


@pytest.mark.parametrize("key,value,match", [
    ("llama.attention.head_count", 6, "embedding size 64 is not a multiple of the head count 6"),
    ("llama.attention.head_count_kv", 3, "4 attention heads do not divide into 3 key/value heads"),
    ("llama.attention.head_count", 0, "head_count is 0, expected a positive size"),
    ("llama.block_count", 0, "block_count is 0, expected a positive size"),
    ("llama.context_length", 0, "context_length is 0, expected > 0"),
    ("llama.attention.key_length", 0, "attention head size 0"),
    ("llama.rope.dimension_count", -2, "RoPE dimension -2 does not fit head size 16"),
    ("llama.vocab_size", 300, "the vocabulary has 264 tokens but the model expects 300"),
    ("llama.attention.sliding_window", -1, "sliding_window -1 .* is out of range"),
])
def test_insane_hyper_parameter(tmp_path, g, key, value, match):
    g.set(key, gb.INT32, value)
    refused(write(tmp_path, g), match, load)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_insane_float(tmp_path, g, value):
    g.set("llama.rope.freq_base", gb.FLOAT32, value)
    refused(write(tmp_path, g), "rope.freq_base", load)


def test_embedding_rows_differ_from_vocab(tmp_path, g):
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        del g.kv(key).value[-1:]
    g.set("tokenizer.ggml.eos_token_id", gb.UINT32, 1)
    refused(write(tmp_path, g), r"tensor 'token_embd.weight' has shape \[264, 64\], the model's metadata "
                                r"implies \[263, 64\]", load)


def test_missing_tensor(tmp_path, g):
    g.tensors = [t for t in g.tensors if t.name != "blk.1.ffn_down.weight"]
    refused(write(tmp_path, g), "tensor 'blk.1.ffn_down.weight' is missing", load)


@pytest.mark.parametrize("arch,vtype", [("mamba", gb.STRING), (["llama"], gb.ARRAY)])
def test_architecture(tmp_path, g, arch, vtype):
    g.set("general.architecture", vtype, arch, gb.STRING if vtype == gb.ARRAY else None)
    error = UnsupportedError if vtype == gb.STRING else GGUFError
    refused(write(tmp_path, g), "architecture", load, error)


# --- tokenizer data -----------------------------------------------------------------------------------------
both_loaders = pytest.mark.parametrize("loader", [load, pyllm.load_tokenizer], ids=["load", "load_tokenizer"])


@both_loaders
def test_merge_with_unknown_token(tmp_path, g, loader):
    g.kv("tokenizer.ggml.merges").value[2] = "Ġt hé"
    refused(write(tmp_path, g), r"tokenizer.ggml.merges\[2\] = 'Ġt hé' names unknown token 'hé'", loader)


@both_loaders
@pytest.mark.parametrize("key", ["bos", "eos"])
def test_special_token_out_of_range(tmp_path, g, loader, key):
    g.set(f"tokenizer.ggml.{key}_token_id", gb.UINT32, 264)
    refused(write(tmp_path, g), rf"tokenizer.ggml.{key}_token_id = 264 is outside the vocabulary \(0..263\)", loader)


@both_loaders
@pytest.mark.parametrize("edit,match", [
    (lambda g: g.kv("tokenizer.ggml.token_type").value.pop(), "token_type has 263 entries but tokenizer.ggml.tokens has 264"),
    (lambda g: g.kv("tokenizer.ggml.tokens").value.__setitem__(5, "a"), "duplicate token in vocabulary: 'a'"),
    (lambda g: g.set("tokenizer.ggml.tokens", gb.ARRAY, [], gb.STRING), "tokenizer.ggml.tokens is missing or empty"),
    (lambda g: g.drop("tokenizer.ggml.model"), "no tokenizer.ggml.model"),
    (lambda g: g.drop("tokenizer.ggml.merges"), "BPE vocabulary without tokenizer.ggml.merges"),
])
def test_inconsistent_vocabulary(tmp_path, g, loader, edit, match):
    edit(g)
    refused(write(tmp_path, g), match, loader)


def test_invalid_utf8_token_text(tmp_path, g):
    """Token texts that are not UTF-8 load (llama.cpp keeps their bytes too) and round-trip as bytes;
    --check names the first one."""
    tokens = g.kv("tokenizer.ggml.tokens").value
    tokens[261] = b"<|\xff\xfe|>".decode("utf-8", "surrogateescape")  # a control token: its text is its bytes
    p = write(tmp_path, g)
    tok = pyllm.load_tokenizer(p)
    assert tok.token_bytes(261) == b"<|\xff\xfe|>"
    assert tok.decode(tok.encode("the cat", parse_special=True)) == "the cat"
    checks = {name: (ok, detail) for name, ok, detail in check_model(p)}
    assert checks["token text"] == (False, r"token 261 (b'<|\xff\xfe|>') is not valid UTF-8 (1 such tokens)")


def test_chat_template_emits_unknown_special_token(tmp_path, g):
    g.set("tokenizer.chat_template", gb.STRING, "{% for m in messages %}<|start|>{{ m['content'] }}<|im_end|>"
                                                "{% endfor %}")
    p = write(tmp_path, g)
    model = load(p)
    with pytest.raises(TemplateError, match=r"emits <\|start\|>, which the vocabulary lacks"):
        chat_template_for(model.metadata, model.tokenizer)
    checks = {name: ok for name, ok, _ in check_model(p)}
    assert not checks["chat template"] and checks["tokenizer"]


def test_broken_chat_template_is_a_failed_check(tmp_path, g):
    g.set("tokenizer.chat_template", gb.STRING, "{% for %}")
    checks = {name: (ok, detail) for name, ok, detail in check_model(write(tmp_path, g))}
    assert checks["chat template"][0] is False and "unsafe or broken chat template" in checks["chat template"][1]


def spm_vocab(g, byte_token_text="<0x41>"):
    """The tiny model with a SentencePiece vocabulary (the fuzzer's seed), byte token 0x41 spelled as given."""
    g = fuzz_gguf.spm_variant(g)
    g.kv("tokenizer.ggml.tokens").value[3 + 0x41] = byte_token_text
    return g


def test_spm_vocabulary_loads(tmp_path, g):
    tok = pyllm.load_tokenizer(write(tmp_path, spm_vocab(g)))
    assert tok.decode(tok.encode("the A")) == "the A"


@both_loaders
@pytest.mark.parametrize("text", ["<0xZZ>", "<0x4", "A", "\udcff"])
def test_spm_byte_token_with_bad_text(tmp_path, g, loader, text):
    """Refused when the tokenizer is made (sentencepiece would refuse it at the first encode, and the
    decoder reads the byte from the text), and check_model says so."""
    p = write(tmp_path, spm_vocab(g, text))
    refused(p, r"tokenizer\.ggml\.tokens\[68\] = .* has token_type BYTE but is not of the form <0xNN>", loader)
    checks = {name: ok for name, ok, _ in check_model(p)}
    assert checks["tokenizer"] is False


# --- the command line ----------------------------------------------------------------------------------------
def pyllm_cli(*args):
    return subprocess.run(PYLLM + list(map(str, args)), capture_output=True, text=True, timeout=120)


def test_run_on_a_bad_file_prints_one_line_and_exits_2(tmp_path, g):
    g.tensor("token_embd.weight").dims = [64, 264000]
    p = write(tmp_path, g)
    r = pyllm_cli("run", p, "-p", "hi", "-n", "1")
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith(f"pyllm: error: {p}: tensor 'token_embd.weight': data ends at byte ")
    assert line.endswith(f"but the file has {p.stat().st_size} bytes (truncated file?)")
    assert r.stdout == ""


def test_info_check_passes_a_good_file(tmp_path, g):
    r = pyllm_cli("info", "--check", write(tmp_path, g, "good.gguf"))
    assert r.returncode == 0, r.stderr
    names = [line.split(":")[0].split(None, 1)[1] for line in r.stdout.splitlines()]
    assert names == [name for name, _, _ in check_model(tmp_path / "good.gguf")]
    assert all(line.startswith("ok") for line in r.stdout.splitlines())


def test_info_check_fails_a_bad_file(tmp_path, g):
    g.kv("tokenizer.ggml.merges").value[0] = "Ġ qq"
    p = write(tmp_path, g)
    r = pyllm_cli("info", "--check", p)
    assert r.returncode == 2
    assert "FAIL tokenizer: " in r.stdout and "ok   GGUF structure" in r.stdout
    [line] = r.stderr.splitlines()
    assert line.startswith(f"pyllm: error: {p}: tokenizer.ggml.merges[0] = 'Ġ qq' names unknown token 'qq'")
    verbose = pyllm_cli("info", "--check", p, "--verbose")
    assert "Traceback" in verbose.stderr and verbose.returncode != 0


# --- real models ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["smollm2", "gemma3", "qwen25"])
def test_real_models_pass_every_check(request, fixture):
    checks = check_model(request.getfixturevalue(fixture))
    assert [c for c in checks if not c[1]] == []
    assert len(checks) >= 10


def test_check_model_never_raises_on_garbage(tmp_path):
    p = tmp_path / "noise.gguf"
    p.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(5000))
    checks = check_model(p)
    assert checks[0][:2] == ("GGUF structure", False) and len(checks) == 1
