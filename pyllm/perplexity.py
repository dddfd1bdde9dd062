"""Perplexity the way llama.cpp's llama-perplexity computes it (so the numbers are comparable).

The text is tokenized once (BOS added where the model adds one), cut into non-overlapping chunks of n_ctx
tokens; each chunk is evaluated in a fresh context with its first token replaced by BOS (when the model uses
one), and only the second half of each chunk is scored, so every scored token has at least n_ctx/2 of context.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .errors import ContextError, NumericError
from .kv_cache import ensure_fits


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) for each row.  logits: [n, n_vocab] float32; targets: [n]."""
    lg = logits.astype(np.float64)
    mx = lg.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(lg - mx).sum(axis=1))
    return lg[np.arange(len(targets)), targets] - lse


def perplexity(model, text: str, n_ctx: int = 512, n_chunks: int | None = None,
               progress: Callable[[int, int, float], None] | None = None) -> tuple[float, int]:
    """Returns (perplexity, tokens scored).  progress(done_chunks, total_chunks, running_ppl)."""
    tok = model.tokenizer
    tokens = model.tokenize(text, add_special=True, parse_special=False)
    total = len(tokens) // n_ctx
    if n_chunks is not None and n_chunks > 0:
        total = min(total, n_chunks)
    if total == 0:
        raise ContextError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
    # every position's logits are kept ([n_ctx, n_vocab] float32): sized before the first chunk allocates them
    ensure_fits(n_ctx * model.config.n_vocab * 4, f"the logits of a {n_ctx}-token chunk", model.memory_left(), " (lower --ctx-size)")
    add_bos = tok.add_bos and tok.bos_id is not None
    first = n_ctx // 2
    nll, count = 0.0, 0
    for i in range(total):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        batch = list(chunk)
        if add_bos:
            batch[0] = tok.bos_id
        cache = model.new_cache(n_ctx)
        logits = model.eval(cache, batch, all_logits=True)  # [n_ctx, n_vocab]
        targets = np.asarray(chunk[first + 1:], dtype=np.int64)  # tokens first+1 .. n_ctx-1
        lp = log_softmax_at(logits[first:n_ctx - 1], targets)
        nll -= float(lp.sum())
        count += len(targets)
        if progress:
            progress(i + 1, total, math.exp(nll / count))
    if not math.isfinite(nll):  # Model refuses non-finite logits; this catches what the log-softmax could add
        raise NumericError(f"perplexity is not finite (the negative log-likelihood of {count} tokens is {nll})")
    return math.exp(nll / count), count
