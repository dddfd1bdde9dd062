"""The real models against llama.cpp's outputs (tests/data/reference: prompt ids, top-10 logits per greedy step).

Bars as in the team's check_reference.py: prompt tokens exact; teacher-forced top-1 equal wherever llama.cpp's
margin is >= 0.5; mean |dlogit| <= 0.25 and max <= 1.5 over llama.cpp's top-10.
"""
import json
from pathlib import Path

import numpy as np
import pytest

import pyllm

REF = Path(__file__).parent / "data" / "reference"


def check_against_llama_cpp(path, name):
    model = pyllm.load(path)
    rows = [json.loads(line) for line in (REF / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    diffs, agree, judged = [], 0, 0
    for r in rows:
        assert model.tokenize(r["prompt"], add_special=True, parse_special=True) == r["tokens"], r["prompt"]
        seq = r["tokens"] + r["greedy"][:-1]
        logits = model.logits(seq, all_positions=True)
        first = len(r["tokens"]) - 1
        for step, ref in enumerate(r["step_top10"]):
            row = logits[first + step]
            if ref[0][1] - ref[1][1] >= 0.5:
                judged += 1
                agree += int(row.argmax()) == ref[0][0]
            diffs += [abs(float(row[tid]) - val) for tid, val in ref]
    assert agree == judged, f"teacher-forced top-1 {agree}/{judged}"
    assert np.mean(diffs) <= 0.25 and np.max(diffs) <= 1.5, (np.mean(diffs), np.max(diffs))
    return model


def test_smollm2_matches_llama_cpp(smollm2):
    model = check_against_llama_cpp(smollm2, "smollm2-135m")
    ids = model.tokenize("The capital of France is", add_special=True, parse_special=False)
    text = model.detokenize(model.generate(ids, max_tokens=3, temperature=0.0))
    assert text.startswith(" Paris.")


def test_gemma3_matches_llama_cpp(gemma3):
    check_against_llama_cpp(gemma3, "gemma3-270m")


def test_qwen25_matches_llama_cpp(qwen25):
    check_against_llama_cpp(qwen25, "qwen2.5-coder-0.5b")
