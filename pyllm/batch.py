"""Continuous batching: many prompts decoded together over one KV cache with a slot per sequence.

As llama.cpp's parallel slots: every step is one forward pass over the next token of each running sequence,
so each weight read serves all of them; a sequence that finishes frees its slot at once and the next waiting
prompt is prefilled into it between two decode steps.  Prompts that join at the same time are prefilled in one
forward pass (the prefill path computes a token the same way whatever shares its chunk), and apart from the
decode steps, so a prompt's prefill is the same computation as when it runs by itself.  Each sequence has its
own sampler (and seed), stop strings and token budget, so its output depends on its request only, not on what
else is in the batch.

A slot keeps the prompt it last ran: a new prompt that begins the same way (the same system prompt) goes to the
free slot sharing most of it and prefills only the rest; when another slot, running or not, shares more, the
keys and values of that part are copied from it.  Only prompt tokens are shared: their keys and values came
from the prefill path, as they would for the new prompt alone (generated tokens came from decode steps).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .errors import NumericError, PyllmError, SamplingError
from .generate import Stats, TextStream, plan_prefill
from .kv_cache import KVCache, available_memory
from .sampling import Sampler

# Decoding steps compute every row exactly as for a lone sequence, whatever the batch size.  The int8 kernel
# unpacks each 64 weights once for up to 8 activation rows, so 8 is where a step is cheapest per token (16 runs
# as two groups of 8: no cheaper per token).  smollm2-135m, 64 prompts x 64 tokens (bench/bench_batch.py):
# 8 sequences 3.3-3.5x the aggregate decode speed of 1, outputs identical (2.8x where the whole model sits in
# a quiet L3, so that one sequence's step is compute-bound too).
MAX_DEFAULT_PARALLEL = 8


@dataclass
class Request:
    prompt: list[int]  # token ids, chat template already applied
    max_tokens: int = 256
    sampler: Sampler = field(default_factory=lambda: Sampler(temperature=0.0))
    stop: list[str] = field(default_factory=list)  # end the text before the first of these
    id: Any = None  # echoed in the result
    logprobs: int | None = None  # record each token's log-probability and the top `logprobs` alternatives
    # For front ends that stream (the server).  Both are called on the thread that drives the batch and must not
    # block it.  on_token(token, text, logprob): the text is what is now safe to show ("" while it may still
    # become a stop string or half a character; the rest comes in Result.text); logprob as in Result.logprobs.
    on_token: Callable[[int, str, Any], None] | None = None
    on_done: Callable[["Result"], None] | None = None
    # Set from any thread: the sequence ends (finish_reason "cancelled") before the next decoding step, or
    # without being prefilled when it has not started.
    cancelled: bool = False


@dataclass
class Result:
    id: Any
    text: str = ""
    tokens: list[int] = field(default_factory=list)  # generated ids, without the end-of-generation token
    stats: Stats = field(default_factory=Stats)  # finish_reason: "stop", "length", "context" or "error"
    error: str = ""  # why the request could not run
    # with Request.logprobs: per generated token, (its log-probability, [(id, log-probability)] of the most
    # likely tokens, best first), from the model's distribution before any penalty or sampling filter
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)


def token_logprobs(logits, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log softmax(logits)[token] and the `top` most likely (id, log-probability), best first."""
    logits = logits.astype(np.float64)  # [n_vocab]
    logz = logits.max() + np.log(np.exp(logits - logits.max()).sum())
    best = np.argpartition(-logits, top - 1)[:top] if 0 < top < len(logits) else np.arange(len(logits))[:top]
    best = best[np.argsort(-logits[best], kind="stable")]
    return float(logits[token] - logz), [(int(i), float(logits[i] - logz)) for i in best]


class _Sequence:
    """A request being decoded in a slot: samples from its logits and turns its tokens into text."""

    def __init__(self, model, cache, request: Request, slot: int):
        self.model, self.cache, self.request, self.slot = model, cache, request, slot
        self.result = Result(request.id)
        self.text = TextStream(model.tokenizer, request.stop)
        self.pieces: list[str] = []
        self.last = -1  # the sampled token the next step evaluates
        self.t0 = 0.0

    def take(self, logits) -> bool:
        """Sample the next token from logits [n_vocab]; True when the sequence is over (a sampler that has no
        token left ends it with an error, not the batch)."""
        stats, request = self.result.stats, self.request
        try:
            token = request.sampler(logits)
        except SamplingError as e:
            return self.fail(str(e))
        request.sampler.accept(token)
        if self.model.tokenizer.is_eog(token):
            return self._end("stop")
        stats.n_generated += 1
        self.result.tokens.append(token)
        self.pieces.append(self.text.feed(token))
        logprob = None
        if request.logprobs is not None:
            logprob = token_logprobs(logits, token, request.logprobs)
            self.result.logprobs.append(logprob)
        if request.on_token is not None:
            request.on_token(token, self.pieces[-1], logprob)
        if self.text.stopped:
            return self._end("stop")
        if stats.n_generated >= request.max_tokens:
            return self._end("length")
        if len(self.cache.tokens[self.slot]) >= self.cache.n_ctx:
            return self._end("context")
        self.last = token
        return False

    def _end(self, reason: str) -> bool:
        self.result.stats.finish_reason = reason
        self.result.stats.generate_s = time.perf_counter() - self.t0 if self.t0 else 0.0
        self.result.text = "".join(self.pieces) + self.text.finish()
        return True

    def fail(self, message: str) -> bool:
        self.result.error = message
        return self._end("error")

    def over(self) -> Result:
        """The finished sequence's Result, after telling its request's on_done."""
        return _tell_done(self.request, self.result)


def _tell_done(request: Request, result: Result) -> Result:
    """Call the request's on_done with its result, once: it is cleared."""
    done, request.on_done = request.on_done, None
    if done is not None:
        done(result)
    return result


class ContinuousBatch:
    """n_parallel slots over one KV cache.  `run` drives it from a source of requests; `add` and `step` are
    the two moves it is made of."""

    def __init__(self, model, n_parallel: int, n_ctx: int | None = None, kv_type: str = "f16"):
        if n_parallel < 1:
            raise PyllmError(f"--parallel must be at least 1, not {n_parallel}")
        self.model = model
        self.cache = model.new_cache(n_ctx, n_slots=n_parallel, kv_type=kv_type)
        self.running: dict[int, _Sequence] = {}  # slot -> its sequence
        self.n_prompt = [0] * n_parallel  # leading tokens of each slot that a prefill computed
        # totals over the run, for aggregate speeds: decode steps produce every token but each sequence's first
        self.n_prefill = self.n_decoded = 0
        self.prefill_s = self.decode_s = 0.0

    @property
    def n_free(self) -> int:
        return self.cache.n_slots - len(self.running)

    def _place(self, prompt: list[int], free: list[int]) -> int:
        """Pick the free slot sharing most of `prompt` and leave in it the longest prefix of the prompt that it
        or any other slot holds from a prefill (copied from that slot); returns the slot."""
        shared = [min(self.cache.common_prefix(prompt, s), self.n_prompt[s]) for s in range(self.cache.n_slots)]
        slot = max(free, key=lambda s: shared[s])
        donor = max(range(self.cache.n_slots), key=lambda s: (shared[s], s == slot))  # itself on a tie: no copy
        if donor == slot:
            self.cache.trim(shared[slot], slot)
        else:
            self.cache.copy_prefix(donor, slot, shared[donor])
        self.n_prompt[slot] = shared[donor]
        return slot

    def add(self, requests: list[Request]) -> list[Result]:
        """Prefill requests (at most n_free) together, each into the free slot that shares most of its prompt
        (and with the longest prefix any slot holds).  Returns the Results of those over already (they cannot
        run, were cancelled, or end on their first token); the others run in the next steps."""
        free = [s for s in range(self.cache.n_slots) if s not in self.running]
        over, joining, todo = [], [], []
        for request in requests:
            if request.cancelled:  # gone while it waited: never prefilled
                seq = _Sequence(self.model, self.cache, request, -1)
                seq._end("cancelled")
                over.append(seq.over())
                continue
            slot = self._place(request.prompt, free)
            seq = _Sequence(self.model, self.cache, request, slot)
            try:
                todo.append((slot, plan_prefill(self.model, self.cache, request.prompt, request.sampler, slot,
                                                seq.result.stats)))
            except PyllmError as e:  # an empty or over-long prompt: that request fails, the others go on
                seq.fail(str(e))
                over.append(seq.over())
                continue
            free.remove(slot)
            joining.append(seq)
        if not joining:
            return over
        t0 = time.perf_counter()
        try:
            logits = self.model.eval_many(self.cache, todo)  # [n_vocab] per joining sequence
        except NumericError as e:  # a joint prefill cannot tell whose prompt broke it: all of them fail
            for seq in joining:
                self.cache.trim(0, seq.slot)
                self.n_prompt[seq.slot] = 0
                seq.fail(str(e))
            return over + [seq.over() for seq in joining]
        spent = time.perf_counter() - t0
        n_prefill = sum(len(tokens) for _, tokens in todo)
        self.n_prefill += n_prefill
        self.prefill_s += spent
        for seq, row in zip(joining, logits):
            self.n_prompt[seq.slot] = len(seq.request.prompt)
            stats = seq.result.stats
            stats.prefill_s = spent * stats.n_prefill / n_prefill  # its share of the joint prefill
            seq.t0 = time.perf_counter()
            if seq.request.cancelled:
                seq._end("cancelled")
            elif seq.request.max_tokens <= 0:
                seq._end("length")
            elif not seq.take(row):
                self.running[seq.slot] = seq
                continue
            over.append(seq.over())
        return over

    def clear(self) -> None:
        """Forget every running sequence and what every slot holds (their requests are the caller's to end)."""
        self.running.clear()
        for slot in range(self.cache.n_slots):
            self.cache.trim(0, slot)
        self.n_prompt = [0] * self.cache.n_slots

    def step(self) -> list[Result]:
        """One forward pass over every running sequence's last token; returns the sequences that ended (those
        cancelled since the last step end before it, without a token more)."""
        done = []
        for s in [s for s, seq in self.running.items() if seq.request.cancelled]:
            seq = self.running.pop(s)
            seq._end("cancelled")
            done.append(seq.over())
        slots = list(self.running)
        if not slots:
            return done
        t0 = time.perf_counter()
        try:
            logits = self.model.decode(self.cache, slots, [self.running[s].last for s in slots])  # [N, n_vocab]
        except NumericError as e:  # only the sequences whose logits are not finite fail; the others go on
            logits = e.logits
            for i in e.rows:
                seq = self.running.pop(slots[i])
                seq.fail(str(e))
                done.append(seq.over())
        for i, s in enumerate(slots):
            if s in self.running and self.running[s].take(logits[i]):
                done.append(self.running.pop(s).over())
        self.decode_s += time.perf_counter() - t0
        self.n_decoded += len(slots)
        return done

    def run(self, take: Callable[[bool], Request | None]) -> Iterator[Result]:
        """Results as their sequences end, until take() has no more requests and every slot is done.

        take(block) works as queue.Queue.get: the next Request, or None at the end of the input; with
        block=False it may raise queue.Empty.  It is asked to wait only while nothing runs, so a slow producer
        (`tail -f`) never holds up the sequences already decoding.
        """
        more = True
        while more or self.running:
            while more and self.n_free:  # fill the free slots (a prompt that ends on its prefill frees its own)
                joining = []
                while more and len(joining) < self.n_free:
                    try:
                        request = take(not self.running and not joining)
                    except queue.Empty:
                        break
                    if request is None:
                        more = False
                    else:
                        joining.append(request)
                if not joining:
                    break
                yield from self.add(joining)
            if self.running:
                yield from self.step()


class QueueFull(PyllmError):
    """The queue in front of the batch is full: the request was not taken."""


class BatchThread:
    """A ContinuousBatch driven by a thread of its own, for front ends that take requests while it decodes (the
    server).  submit() from any thread; a request joins the batch between two decoding steps, and hears of its
    tokens and its end through its on_token / on_done callbacks, called on this thread (on_done exactly once).

    Requests beyond the free slots wait in a queue of at most max_queue; one cancelled while it waits leaves the
    queue at the next step.  An unexpected error in a step ends the requests it touched with an error Result
    (the next ones still run), so no request waits forever.
    """

    def __init__(self, batch: ContinuousBatch, max_queue: int):
        self.batch, self.max_queue = batch, max_queue
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()  # guards _waiting and _stopping
        self._stopping = False
        self._joining: list[Request] = []  # taken from the queue, being prefilled
        self.ready = threading.Event()  # set once the first forward passes have run (kernels compiled)
        self.failure: BaseException | None = None  # why the thread stopped, if not asked to
        self.thread = threading.Thread(target=self._main, name="pyllm-batch", daemon=True)

    def start(self) -> "BatchThread":
        self.thread.start()
        return self

    @property
    def n_queued(self) -> int:
        return sum(not r.cancelled for r in list(self._waiting))

    @property
    def n_busy(self) -> int:
        """Slots prefilling or decoding a request."""
        return len(self.batch.running) + len(self._joining)

    def submit(self, requests: list[Request]) -> None:
        """Queue requests, all or none: QueueFull when they do not all fit."""
        with self._wake:
            waiting = self.n_queued
            if waiting + len(requests) > self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting already (the queue holds {self.max_queue})")
            self._waiting.extend(requests)
            self._wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """End the thread after the current step; requests still queued or running end as "cancelled"."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self.thread.join(timeout)

    def _main(self) -> None:
        try:
            self._warm_up()
            self.ready.set()
            while self._turn():
                pass
        except BaseException as e:  # a failure outside any step: nothing more can run
            self.failure = e
        self._end_all("cancelled", "")

    def _warm_up(self) -> None:
        """A prefill and a decoding step, so that the first request does not wait for the kernels to compile."""
        batch = self.batch
        batch.add([Request([0] * min(64, batch.cache.n_ctx - 1), max_tokens=2)])
        batch.step()
        batch.clear()
        batch.n_prefill = batch.n_decoded = 0
        batch.prefill_s = batch.decode_s = 0.0

    def _turn(self) -> bool:
        """Take what fits in the free slots, prefill it, run one decoding step; False once asked to stop."""
        batch = self.batch
        with self._wake:
            while not self._stopping and not self._waiting and not batch.running:  # idle: sleep until a request
                self._wake.wait()
            if self._stopping:
                return False
            gone = [r for r in self._waiting if r.cancelled]
            if gone:  # they join and leave at once (add ends them unprefilled), not waiting for a free slot
                self._waiting = deque(r for r in self._waiting if not r.cancelled)
            while self._waiting and len(self._joining) < batch.n_free:
                self._joining.append(self._waiting.popleft())
        try:
            if gone:
                batch.add(gone)
            if self._joining:
                batch.add(self._joining)
            self._joining = []
            if batch.running:
                batch.step()
        except Exception as e:  # a bug or a broken model: these requests end, the next ones may still run
            self._end_all("error", f"internal error: {type(e).__name__}: {e}", queued=False)
        return True

    def _end_all(self, reason: str, message: str, queued: bool = True) -> None:
        """End every request joining, running and (if queued) waiting, with this finish_reason and message."""
        requests = self._joining + [seq.request for seq in self.batch.running.values()]
        if queued:
            with self._wake:
                requests += self._waiting
                self._waiting = deque()
        self._joining = []
        self.batch.clear()  # a step cut short may have left any slot half-written
        for request in requests:
            result = Result(request.id, error=message)
            result.stats.finish_reason = reason
            _tell_done(request, result)


def default_parallel(model, n_ctx: int, kv_type: str = "f16") -> int:
    """MAX_DEFAULT_PARALLEL, or fewer when full-length KV slots would take over a quarter of the free memory."""
    per_slot = KVCache.nbytes(model.config, n_ctx, 1, kv_type)
    free = model.memory_left() or available_memory()
    if free is None:  # not Linux: trust the cap
        return MAX_DEFAULT_PARALLEL
    return max(1, min(MAX_DEFAULT_PARALLEL, free // 4 // per_slot))


def generate_batch(model, requests: Iterable[Request], n_parallel: int | None = None, n_ctx: int | None = None,
                   kv_type: str = "f16") -> Iterator[Result]:
    """Run requests with continuous batching; yields each Result as its sequence ends (not in input order)."""
    n_ctx = model.context_size(n_ctx)
    batch = ContinuousBatch(model, n_parallel or default_parallel(model, n_ctx, kv_type), n_ctx, kv_type)
    it = iter(requests)
    yield from batch.run(lambda block: next(it, None))
