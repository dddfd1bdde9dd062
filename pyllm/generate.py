"""The prefill/decode loop (yields token ids, prints nothing) and the text stream with stop strings."""
from __future__ import annotations

import time
from dataclasses import dataclass
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


def prefill(model, cache: KVCache, prompt: list[int], sampler: Sampler, *, slot: int = 0,
            stats: Stats | None = None):
    """Evaluate what the cache slot does not hold of `prompt` yet; return the logits after its last token.

    The slot's longest common prefix with `prompt` is reused; at least the last prompt token is always
    evaluated, because its logits pick the first new token.
    """
    stats = stats if stats is not None else Stats()
    todo = plan_prefill(model, cache, prompt, sampler, slot, stats)
    t0 = time.perf_counter()
    logits = model.eval(cache, todo, slot=slot)
    stats.prefill_s = time.perf_counter() - t0
    return logits


def plan_prefill(model, cache: KVCache, prompt: list[int], sampler: Sampler, slot: int, stats: Stats) -> list[int]:
    """Check that `prompt` can run in the slot, keep the slot's common prefix with it, and return the tokens
    left to evaluate (see prefill)."""
    if not prompt:
        raise ContextError("the prompt is empty")
    if len(prompt) >= cache.n_ctx:
        raise ContextError(f"the prompt has {len(prompt)} tokens but the context holds {cache.n_ctx} "
                           f"(raise --ctx-size, up to the model's {model.config.ctx_train})")
    reuse = min(cache.common_prefix(prompt, slot), len(prompt) - 1)
    cache.trim(reuse, slot)
    stats.n_reused, stats.n_prefill = reuse, len(prompt) - reuse
    sampler.accept_prompt(prompt)
    return prompt[reuse:]


def generate(model, cache: KVCache, prompt: list[int], sampler: Sampler, *, max_tokens: int = 256,
             slot: int = 0, stats: Stats | None = None, stop_at_eog: bool = True) -> Iterator[int]:
    """Prefill what the cache slot does not hold yet (see prefill), then sample up to max_tokens ids."""
    stats = stats if stats is not None else Stats()
    logits = prefill(model, cache, prompt, sampler, slot=slot, stats=stats)
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
        logits = model.decode(cache, [slot], [token])[0]
        stats.generate_s = time.perf_counter() - t0


class TextStream:
    """Token ids pushed one at a time -> text pieces of whole UTF-8 characters, ending at the first stop string
    (not included).  Text that could still become the start of a stop string is held back until it cannot."""

    def __init__(self, tokenizer, stop: Iterable[str] = ()):
        self.decoder = StreamDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""
        self.stopped = False  # a stop string appeared: feed no more tokens

    def feed(self, token: int) -> str:
        """The text that is now safe to show ("" while it may still turn into a stop string)."""
        self.pending += self.decoder.feed(token)
        if not self.stop:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def finish(self) -> str:
        """The held-back rest, once no more tokens come."""
        if self.stopped:
            return ""
        rest, self.pending = self.pending + self.decoder.flush(), ""
        cut = min([i for i in (rest.find(s) for s in self.stop) if i >= 0], default=len(rest))
        return rest[:cut]


def stream_text(tokenizer, tokens: Iterable[int], stop: list[str] = ()) -> Iterator[str]:
    """Turn token ids into text pieces of whole UTF-8 characters; end at the first stop string (not printed)."""
    text = TextStream(tokenizer, stop)
    it = iter(tokens)
    for tok in it:
        piece = text.feed(tok)
        if piece:
            yield piece
        if text.stopped:
            close = getattr(it, "close", None)
            if close:
                close()
            return
    rest = text.finish()
    if rest:
        yield rest
