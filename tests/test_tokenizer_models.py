"""Tokenizer tests on the real models in models/ (skipped when a GGUF file is absent).

Expected ids are llama.cpp's: llama_tokenize(prompt, add_special=True, parse_special=True), copied from
the project's llama.cpp reference run, plus cases tokenized with llama.cpp (llama-cpp-python 0.3.36)
listed in LLAMA_CPP_CASES.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest

from pyllm.gguf import read_metadata
from pyllm.tokenizer import StreamDecoder, Tokenizer

MODELS = Path(__file__).resolve().parent.parent / "models"
SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN = "qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf"
GEMMA = "gemma-3-270m-q4_k_m.gguf"
ALL = [SMOLLM, QWEN, GEMMA]


@functools.lru_cache(maxsize=None)
def model_tokenizer(name: str) -> Tokenizer:
    path = MODELS / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return Tokenizer.from_metadata(read_metadata(path))


# llama.cpp's llama_tokenize(prompt, add_special=True, parse_special=True) on the real models
# (copied from the project's llama.cpp reference outputs, not from pyllm).
REFERENCE_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three primary colors are red,",
    "Question: What is 17 multiplied by 3?\nAnswer:",
    "<|im_start|>user\nWrite a haiku about autumn leaves.<|im_end|>\n<|im_start|>assistant\n",
    "Machine learning is a field of study in artificial intelligence concerned with",
    "1, 2, 3, 4, 5,",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "大语言模型的推理过程分为两个阶段：",
]
REFERENCE_IDS = {
    'SmolLM2-135M-Instruct.Q4_1.gguf': [
        [504, 3575, 282, 4649, 314],
        [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 3426, 28, 665, 4161],
        [1604, 3987, 46477, 24, 94, 727, 472, 1620, 14362, 260, 304, 29, 373, 24681, 46477, 1230, 7996, 198],
        [504, 1296, 3003, 4683, 359, 2382, 28],
        [17872, 42, 1812, 314, 216, 33, 39, 25319, 411, 216, 35, 47, 198, 21350, 42],
        [1, 4093, 198, 19161, 253, 421, 30614, 563, 15339, 3711, 30, 2, 198, 1, 520, 9531, 198],
        [29968, 1380, 314, 253, 1955, 282, 1108, 281, 6416, 5290, 6193, 351],
        [33, 28, 216, 34, 28, 216, 35, 28, 216, 36, 28, 216, 37, 28],
        [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 378, 2365, 6354, 16438],
        [41479, 16313, 251, 48001, 218, 43828, 111, 46157, 11567, 33185, 118, 45201, 18276, 225, 178, 118, 229, 37349, 28660, 7906, 114, 26951, 180, 242, 131, 177, 123, 130, 24713],
    ],
    'qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf': [
        [785, 6722, 315, 9625, 374],
        [12522, 5193, 264, 882, 11, 304, 264, 2613, 14126, 553, 279, 9396, 11, 1052, 12163],
        [750, 75698, 1445, 982, 262, 4210, 5598, 279, 308, 7563, 79683, 1372, 14442],
        [785, 2326, 6028, 7987, 525, 2518, 11],
        [14582, 25, 3555, 374, 220, 16, 22, 54916, 553, 220, 18, 5267, 16141, 25],
        [151644, 872, 198, 7985, 264, 6386, 38242, 911, 41674, 10901, 13, 151645, 198, 151644, 77091, 198],
        [21605, 6832, 374, 264, 2070, 315, 3920, 304, 20443, 11229, 11658, 448],
        [16, 11, 220, 17, 11, 220, 18, 11, 220, 19, 11, 220, 20, 11],
        [785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13, 576, 3974, 13876, 38835],
        [26288, 102064, 104949, 9370, 113272, 100178, 102239, 100369, 100385, 5122],
    ],
    'gemma-3-270m-q4_k_m.gguf': [
        [2, 818, 5279, 529, 7001, 563],
        [2, 14946, 3324, 496, 990, 236764, 528, 496, 1944, 9744, 684, 506, 5442, 236764, 993, 11742],
        [2, 2063, 10779, 78113, 236769, 236749, 1473, 107, 140, 12234, 13293, 506, 538, 236772, 594, 123466, 1548, 29738, 107],
        [2, 818, 1806, 5905, 7913, 659, 2604, 236764],
        [2, 14977, 236787, 2900, 563, 236743, 236770, 236832, 37764, 684, 236743, 236800, 236881, 107, 7925, 236787],
        [2, 236820, 236909, 548, 236779, 3041, 111038, 2364, 107, 6974, 496, 678, 20517, 1003, 16273, 6895, 21603, 236909, 548, 236779, 643, 111038, 107, 236820, 236909, 548, 236779, 3041, 111038, 111457, 107],
        [2, 29472, 4735, 563, 496, 2135, 529, 2748, 528, 16477, 14020, 10099, 607],
        [2, 236770, 236764, 236743, 236778, 236764, 236743, 236800, 236764, 236743, 236812, 236764, 236743, 236810, 236764],
        [2, 818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761, 669, 3823, 8864, 37423],
        [2, 237110, 37557, 139919, 198749, 23967, 73608, 22213, 52582, 237184],
    ],
}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("i", range(len(REFERENCE_PROMPTS)))
def test_reference_prompt_ids(name, i):
    tok = model_tokenizer(name)
    got = tok.encode(REFERENCE_PROMPTS[i], add_special=True, parse_special=True)
    assert got == REFERENCE_IDS[name][i]


@pytest.mark.parametrize("name", ALL)
def test_reference_prompts_decode(name):
    tok = model_tokenizer(name)
    for prompt, ids in zip(REFERENCE_PROMPTS, REFERENCE_IDS[name]):
        text = tok.decode(ids)
        bos = tok.token_bytes(tok.bos_id).decode() if tok.add_bos else ""
        assert text == bos + prompt


@pytest.mark.parametrize("name,texts", [
    (SMOLLM, ["<|im_end|>", "<|endoftext|>"]),
    (QWEN, ["<|im_end|>", "<|endoftext|>"]),
    (GEMMA, ["<end_of_turn>", "<eos>"]),
])
def test_eog(name, texts):
    tok = model_tokenizer(name)
    for t in texts:
        i = tok.token_to_id(t)
        assert i is not None and tok.is_eog(i) and i in tok.eog_ids, t
    assert tok.is_eog(tok.eos_id)
    for t in ["<|im_start|>", "<start_of_turn>", "<bos>", "hello", "Hello"]:
        i = tok.token_to_id(t)
        if i is not None:
            assert not tok.is_eog(i), t


def test_gemma_user_defined_tokens_always_split():
    tok = model_tokenizer(GEMMA)
    nl, nl3, sp4 = tok.token_to_id("\n"), tok.token_to_id("\n\n\n"), tok.token_to_id("    ")
    assert None not in (nl, nl3, sp4)
    # user-defined tokens are cut out even without parse_special, longest text first
    ids = tok.encode("a\n\n\nb    c\nd", parse_special=False)
    assert nl3 in ids and sp4 in ids and nl in ids
    assert ids.index(nl3) < ids.index(sp4) < ids.index(nl)
    # control tokens only with parse_special
    sot = tok.token_to_id("<start_of_turn>")
    assert tok.encode("<start_of_turn>user", parse_special=True)[0] == sot
    assert sot not in tok.encode("<start_of_turn>user", parse_special=False)


@pytest.mark.parametrize("name", ALL)
def test_stream_matches_decode(name):
    tok = model_tokenizer(name)
    text = "Tokens: 日本語の文章、🦙🌍✨ — «quotes» and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 text.\n\tdef f(x):  return x**2\n"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    chunks = [dec.feed(i) for i in ids] + [dec.flush()]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == text == tok.decode(ids)


@pytest.mark.parametrize("name", ALL)
def test_speed(name):
    tok = model_tokenizer(name)
    meta = read_metadata(MODELS / name)
    # CPU time, not wall time: other jobs on a 2-core machine must not make this fail
    t0 = time.process_time()
    Tokenizer.from_metadata(meta)
    construct = time.process_time() - t0
    base = "\n".join(REFERENCE_PROMPTS[:5] + REFERENCE_PROMPTS[6:]) + "\n"
    text = "".join(f"Paragraph {k}: {base}" for k in range(100))  # ~ 10k tokens, repetitive
    tok.encode("warm up")
    t0 = time.process_time()
    ids = tok.encode(text)
    encode = time.process_time() - t0
    assert len(ids) > 5000
    # measured ~0.1-0.3 s construction and ~0.05 s encode on the dev machine
    assert construct < 2.0, construct
    assert encode < 2.0, encode
