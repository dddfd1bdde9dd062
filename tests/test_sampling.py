"""Sampler filters against their definitions, on hand-made logits."""
import numpy as np
import pytest

from pyllm.errors import PyllmError, SamplingError
from pyllm.sampling import Sampler, apply_penalties, min_p, softmax, top_k, top_p


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, -1.0, 2.9], dtype=np.float32)
    assert Sampler(temperature=0.0)(logits) == 1


def test_top_k_keeps_the_k_largest_sorted():
    ids, vals = top_k(np.arange(6), np.array([0.0, 5.0, 1.0, 4.0, 3.0, 2.0]), 3)
    assert ids.tolist() == [1, 3, 4] and vals.tolist() == [5.0, 4.0, 3.0]


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    ids, _ = top_p(np.arange(4), logits, 0.79)
    assert ids.tolist() == [0, 1]
    ids, _ = top_p(np.arange(4), logits, 0.81)
    assert ids.tolist() == [0, 1, 2]


def test_min_p_relative_to_the_top_token():
    logits = np.log(np.array([0.6, 0.3, 0.06, 0.04]))
    ids, _ = min_p(np.arange(4), logits, 0.1)  # threshold 0.06
    assert ids.tolist() == [0, 1, 2]


def test_penalties_follow_llama_cpp():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    out = apply_penalties(logits, [0, 1, 0], repeat=2.0, presence=0.5, frequency=0.25)
    # token 0: 2/2 - 2*0.25 - 0.5; token 1: -2*2 - 0.25 - 0.5; others untouched
    np.testing.assert_allclose(out, [2 / 2 - 0.5 - 0.5, -4.0 - 0.25 - 0.5, 1.0, 0.5])
    assert logits[0] == 2.0  # input not modified


def test_same_seed_same_draws_and_distribution():
    logits = np.log(np.array([0.5, 0.25, 0.125, 0.125]))
    draws = lambda seed: [Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)(logits)
                          for _ in range(1)]
    assert draws(3) == draws(3)
    s = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    counts = np.bincount([s(logits) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, softmax(logits), atol=0.03)


def test_low_temperature_sharpens():
    logits = np.array([1.0, 0.0], dtype=np.float32)
    s = Sampler(temperature=0.05, top_k=0, top_p=1.0, min_p=0.0, seed=1)
    assert all(s(logits) == 0 for _ in range(200))


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_one_is_greedy(k):
    logits = np.array([0.3, 2.0, 1.9], dtype=np.float32)
    s = Sampler(temperature=5.0, top_k=k, top_p=1.0, min_p=0.0, seed=2)
    picks = {s(logits) for _ in range(200)}
    assert picks == ({1} if k == 1 else {1, 2})


@pytest.mark.parametrize("kwargs", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                    dict(top_p=float("nan")), dict(min_p=float("nan")),
                                    dict(repeat_penalty=float("inf")), dict(presence_penalty=float("nan")),
                                    dict(frequency_penalty=float("-inf")), dict(seed=-1)])
def test_non_finite_or_negative_settings_are_refused(kwargs):
    with pytest.raises(PyllmError, match=f"{next(iter(kwargs))} must be"):
        Sampler(**kwargs)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_no_token_left_is_a_clear_error(temperature):
    """A constraint (or penalty) that removes every token: SamplingError, not numpy's ValueError or token 0."""
    logits = np.full(8, -np.inf, dtype=np.float32)
    with pytest.raises(SamplingError, match="no token left to sample"):
        Sampler(temperature=temperature)(logits)


def test_penalty_overflowing_to_infinity_is_a_clear_error():
    s = Sampler(temperature=0.8, repeat_penalty=1e-300)  # divides positive logits by 0 in float32
    s.accept(1)
    with pytest.raises(SamplingError, match="infinity"):
        s(np.array([0.5, 2.0, 1.0], dtype=np.float32))


def test_a_temperature_near_zero_is_greedy_not_nan():
    """Found by the server's fuzz: temperature 5e-324 made logits / T overflow, and the draw failed on NaN."""
    logits = np.array([0.5, 3.0, -1.0, 2.9], dtype=np.float32)
    for t in (5e-324, 1e-300, 1e-30):
        assert Sampler(temperature=t, seed=0)(logits) == 1
