"""Samplers: small pure filters over a logits vector, chained in llama.cpp's order by Sampler.

penalties -> top-k -> top-p -> min-p -> temperature -> draw.  temperature <= 0 is greedy (argmax).
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np

from .errors import PyllmError, SamplingError


def apply_penalties(logits: np.ndarray, recent, repeat: float, presence: float,
                    frequency: float) -> np.ndarray:
    """llama.cpp's penalties over the recent tokens: repeat divides positive logits (multiplies negative
    ones); presence subtracts once per distinct token, frequency once per occurrence."""
    if not recent or (repeat == 1.0 and presence == 0.0 and frequency == 0.0):
        return logits
    ids, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
    out = logits.copy()
    vals = out[ids]
    if repeat != 1.0:
        with np.errstate(divide="ignore", over="ignore"):  # an extreme penalty overflows: Sampler says so
            vals = np.where(vals > 0, vals / repeat, vals * repeat)
    out[ids] = vals - counts * frequency - presence
    return out


def top_k(ids: np.ndarray | None, logits: np.ndarray, k: int):
    """Keep the k largest (ids, logits), sorted descending.  ids None: the logits' own indices (no arange of
    the whole vocabulary per token)."""
    if 0 < k < len(logits):
        keep = np.argpartition(logits, len(logits) - k)[len(logits) - k:]
        ids, logits = (keep if ids is None else ids[keep]), logits[keep]
    elif ids is None:
        ids = np.arange(len(logits))
    order = np.argsort(-logits, kind="stable")
    return ids[order], logits[order]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def top_p(ids, logits, p: float):
    """Keep the smallest prefix (of a descending list) whose probability mass reaches p."""
    if p >= 1.0:
        return ids, logits
    cum = np.cumsum(softmax(logits))
    n = int(np.searchsorted(cum, p)) + 1
    return ids[:n], logits[:n]


def min_p(ids, logits, p: float):
    """Keep tokens whose probability is at least p times the most likely one's (list sorted descending)."""
    if p <= 0.0:
        return ids, logits
    keep = logits >= logits[0] + np.log(p)
    return ids[keep], logits[keep]


class Sampler:
    """Picks the next token from logits; `accept(token)` records it for the penalties."""

    def __init__(self, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 repeat_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 penalty_last_n: int = 64, seed: int | None = None):
        for name, value, ok, rule in (
                ("temperature", temperature, temperature >= 0, "at least 0"), ("top_k", top_k, top_k >= 0, "at least 0"),
                ("top_p", top_p, 0 < top_p <= 1, "above 0 and at most 1"), ("min_p", min_p, 0 <= min_p <= 1,
                                                                            "between 0 and 1"),
                ("repeat_penalty", repeat_penalty, repeat_penalty > 0, "above 0"),
                ("presence_penalty", presence_penalty, True, "a finite number"),
                ("frequency_penalty", frequency_penalty, True, "a finite number"),
                ("seed", seed, seed is None or seed >= 0, "0 or more (leave it out for a random seed)")):
            if not ok or (isinstance(value, float) and not math.isfinite(value)):  # nan and inf pass comparisons
                raise PyllmError(f"{name} must be {rule}, not {value}")
        self.temperature, self.k, self.p, self.min_p = temperature, top_k, top_p, min_p
        self.repeat, self.presence, self.frequency = repeat_penalty, presence_penalty, frequency_penalty
        self.recent: deque[int] = deque(maxlen=max(penalty_last_n, 0) or None)
        self.rng = np.random.default_rng(seed)

    def accept(self, token: int) -> None:
        self.recent.append(int(token))

    def accept_prompt(self, tokens: list[int]) -> None:
        """The prompt's tokens count for the penalties too (as far back as the window reaches)."""
        self.recent.extend(int(t) for t in tokens[-(self.recent.maxlen or len(tokens)):])

    def __call__(self, logits: np.ndarray) -> int:
        logits = apply_penalties(logits, self.recent, self.repeat, self.presence, self.frequency)
        top = logits.max()  # the model's logits are finite (Model checks them); what the filters did is checked here
        if not top > -np.inf:
            raise SamplingError("no token left to sample: every logit is -inf after the penalties and constraints"
                                if top == -np.inf else "a penalty made the logits NaN (check --repeat-penalty, "
                                "--presence-penalty and --frequency-penalty)")
        if top == np.inf:
            raise SamplingError(f"a penalty pushed a logit to infinity (--repeat-penalty {self.repeat:g}, "
                                f"--presence-penalty {self.presence:g}, --frequency-penalty {self.frequency:g})")
        if self.temperature <= 0.0:
            return int(np.argmax(logits))
        ids, vals = top_k(None, logits, self.k)
        vals = vals.astype(np.float64)  # only the kept candidates: probabilities summed in double
        ids, vals = top_p(ids, vals, self.p)
        ids, vals = min_p(ids, vals, self.min_p)
        with np.errstate(over="ignore"):
            scaled = vals / self.temperature
        if not np.isfinite(scaled[0]):  # a temperature so close to 0 (5e-324) that it overflows: greedy
            return int(ids[0])
        probs = softmax(scaled)
        return int(ids[self.rng.choice(len(ids), p=probs)])
