"""The prefill/decode loop (yields token ids, prints nothing) and the text stream with stop strings."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .errors import ContextError
from .kv_cache import KVCache
from .sampling import Sampler
from .tokenizer.stream import StreamDecoder


@dataclass
class Stats:
    """What one generation cost: tokens reused from the cache, prefilled, generated, and the times."""

    n_reused: int = 0
    n_prefill: int = 0
    n_generated: int = 0
    prefill_s: float = 0.0
    generate_s: float = 0.0
    finish_reason: str = ""

    def prefill_tps(self) -> float:
        return self.n_prefill / self.prefill_s if self.prefill_s > 0 else 0.0

    def generate_tps(self) -> float:
        # the first token comes from the prefill's logits, so decode time covers n_generated - 1 steps
        steps = max(self.n_generated - 1, 0)
        return steps / self.generate_s if self.generate_s > 0 else 0.0


def generate(model, cache: KVCache, prompt: list[int], sampler: Sampler, *, max_tokens: int = 256,
             slot: int = 0, stats: Stats | None = None, stop_at_eog: bool = True) -> Iterator[int]:
    """Prefill what the cache slot does not hold yet, then sample up to max_tokens ids.

    The slot's longest common prefix with `prompt` is reused; at least the last prompt token is always
    evaluated, because its logits pick the first new token.
    """
    stats = stats if stats is not None else Stats()
    if not prompt:
        raise ContextError("the prompt is empty")
    if len(prompt) >= cache.n_ctx:
        raise ContextError(f"the prompt has {len(prompt)} tokens but the context holds {cache.n_ctx} "
                           f"(raise --ctx-size, up to the model's {model.config.ctx_train})")
    reuse = min(cache.common_prefix(prompt, slot), len(prompt) - 1)
    cache.trim(reuse, slot)
    stats.n_reused, stats.n_prefill = reuse, len(prompt) - reuse
    for t in prompt[-64:]:
        sampler.accept(t)
    t0 = time.perf_counter()
    logits = model.eval(cache, prompt[reuse:], slot=slot)
    stats.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats.finish_reason = "length"
    for i in range(max_tokens):
        token = sampler(logits)
        sampler.accept(token)
        if stop_at_eog and model.tokenizer.is_eog(token):
            stats.finish_reason = "stop"
            break
        stats.n_generated += 1
        yield token
        if i + 1 == max_tokens:
            break
        if len(cache.tokens[slot]) >= cache.n_ctx:
            stats.finish_reason = "context"
            break
        logits = model.eval(cache, [token], slot=slot)
        stats.generate_s = time.perf_counter() - t0


def stream_text(tokenizer, tokens: Iterable[int], stop: list[str] = ()) -> Iterator[str]:
    """Turn token ids into text pieces of whole UTF-8 characters; end at the first stop string (not printed).

    Text that could still become the start of a stop string is held back until it cannot.
    """
    decoder = StreamDecoder(tokenizer)
    stop = [s for s in stop if s]
    hold = max((len(s) for s in stop), default=1) - 1
    pending = ""
    it = iter(tokens)
    for tok in it:
        pending += decoder.feed(tok)
        if stop:
            hits = [i for i in (pending.find(s) for s in stop) if i >= 0]
            if hits:
                yield pending[:min(hits)]
                close = getattr(it, "close", None)
                if close:
                    close()
                return
            if len(pending) > hold:
                yield pending[:len(pending) - hold]
                pending = pending[len(pending) - hold:]
        elif pending:
            yield pending
            pending = ""
    pending += decoder.flush()
    if pending:
        cut = min([i for i in (pending.find(s) for s in stop) if i >= 0], default=len(pending))
        yield pending[:cut]
