"""Model: a loaded GGUF (weights still quantized), its tokenizer, and evaluation over a KV cache."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import ContextError, GGUFError, MemoryLimitError, NumericError, PyllmError, UnsupportedError
from .gguf import GGUFFile
from .kernels import get_backend
from .kv_cache import KVCache, fmt_bytes
from .models import ARCHS
from .models.transformer import Transformer
from .tokenizer import Tokenizer

DEFAULT_BATCH = 256  # prefill chunk: tokens per forward call


class Model:
    """warn(message): where the model's warnings go (default: Python's warnings).  diagnose: on non-finite
    logits, run the step again checking each layer, to name where the NaN or inf first appeared.  max_memory:
    bytes the weights and KV caches may take together (None: whatever memory is available)."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", *, warn=None, diagnose: bool = False,
                 max_memory: int | None = None):
        self.path = str(path)
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
        self.diagnose, self.max_memory = diagnose, max_memory
        self.gguf = GGUFFile(path)
        self.weights_bytes = sum(t.nbytes for t in self.gguf.tensors.values())
        if max_memory is not None and self.weights_bytes >= max_memory:
            raise MemoryLimitError(f"{self.path}: the weights take {fmt_bytes(self.weights_bytes)}, more than "
                                   f"--max-memory {fmt_bytes(max_memory)}")
        meta = self.gguf.metadata
        arch = self.gguf.architecture
        if arch not in ARCHS:
            known = ", ".join(sorted(ARCHS))
            raise UnsupportedError(f"{self.path}: architecture {arch!r} is not supported (pyllm runs {known})")
        module = ARCHS[arch]
        self.config = module.config(meta, self.path)
        self.tokenizer = _tokenizer(meta, self.path)
        if self.tokenizer.n_vocab != self.config.n_vocab:
            raise GGUFError(f"{self.path}: the vocabulary has {self.tokenizer.n_vocab} tokens but the model "
                            f"expects {self.config.n_vocab}")
        self.transformer = Transformer(self.gguf, self.config, module.REQUIRED, get_backend(device))
        self.fingerprint = self.gguf.fingerprint()
        self._warned_ctx: set[int] = set()
        self._templates: dict = {}  # override -> checked ChatTemplate (or None): rendering a probe costs ms

    @property
    def metadata(self) -> dict:
        return self.gguf.metadata

    # --- text <-> tokens -------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def chat_template(self, override: str | None = None):
        """The chat template (override text or built-in name > the GGUF's > a built-in that fits), checked
        against the vocabulary; None when the model has none (a base model: prompts go in as plain text)."""
        from .validate import chat_template_for

        if override not in self._templates:
            self._templates[override] = chat_template_for(self.metadata, self.tokenizer, override)
        return self._templates[override]

    # --- evaluation ------------------------------------------------------------------------------------
    def context_size(self, requested: int | None = None, force: bool = False) -> int:
        """A --ctx-size value, or the default: the model's training context, at most 4096.  Above the training
        context, positions are ones RoPE never saw in training (output degrades, as llama.cpp warns): capped
        to it with a warning, unless forced (--force-ctx)."""
        train = self.config.ctx_train
        if requested is None:
            return min(train, 4096)
        if requested < 1:
            raise PyllmError(f"--ctx-size must be at least 1, not {requested}")
        if requested > train and not force:
            if requested not in self._warned_ctx:  # warn once, however many times the size is asked for
                self._warned_ctx.add(requested)
                self.warn(f"--ctx-size {requested} is above the {train} tokens {Path(self.path).name} was trained "
                          f"on: using {train} (--force-ctx to use {requested} anyway)")
            return train
        return requested

    def new_cache(self, n_ctx: int | None = None, n_slots: int = 1, kv_type: str = "f16") -> KVCache:
        """A KV cache of exactly n_ctx tokens per slot (default: context_size()), refused before allocation
        when it cannot fit in memory (or in what --max-memory leaves beside the weights)."""
        n_ctx = self.context_size() if n_ctx is None else n_ctx
        if n_ctx < 1:
            raise PyllmError(f"--ctx-size must be at least 1, not {n_ctx}")
        return KVCache(self.config, n_ctx, n_slots, kv_type, self.transformer.backend, self.memory_left())

    def memory_left(self) -> int | None:
        """Bytes --max-memory leaves beside the weights for buffers (None: no limit but the machine's)."""
        return None if self.max_memory is None else self.max_memory - self.weights_bytes

    def eval(self, cache: KVCache, tokens: list[int], slot: int = 0, all_logits: bool = False,
             n_batch: int = DEFAULT_BATCH) -> np.ndarray:
        """Prompt processing: append `tokens` to a cache slot, in chunks of n_batch.  Returns the logits after
        the last token ([n_vocab]) or after every token ([len(tokens), n_vocab])."""
        return self.eval_many(cache, [(slot, tokens)], all_logits, n_batch)[0]

    def eval_many(self, cache: KVCache, seqs: list[tuple[int, list[int]]], all_logits: bool = False,
                  n_batch: int = DEFAULT_BATCH) -> list[np.ndarray]:
        """Prompt processing for several slots at once: (slot, tokens) appends tokens to that slot.  Their
        tokens go through the forward pass together, n_batch at a time, so prompts that start together share
        each weight read; the prefill path computes a token the same way whatever else is in its chunk.
        Returns, per sequence, the logits after its last token ([n_vocab]) or after each ([len, n_vocab])."""
        if len({s for s, _ in seqs}) != len(seqs):
            raise ValueError("eval_many takes each slot once")
        for slot, tokens in seqs:
            start = len(cache.tokens[slot])
            if start + len(tokens) > cache.n_ctx:
                raise ContextError(f"{start + len(tokens)} tokens do not fit in the context of {cache.n_ctx} "
                                   f"(raise --ctx-size, up to the model's {self.config.ctx_train})")
            if not tokens:
                raise ValueError("eval needs at least one token")
        tok = np.concatenate([np.asarray(t, dtype=np.int64) for _, t in seqs])  # [N] every sequence's tokens
        slot_of = np.concatenate([np.full(len(t), s, dtype=np.int64) for s, t in seqs])  # [N]
        pos = np.concatenate([np.arange(len(t), dtype=np.int64) + len(cache.tokens[s]) for s, t in seqs])  # [N]
        ends = np.cumsum([len(t) for _, t in seqs])  # [n_seqs] one past each sequence's last token
        wanted = np.ones(len(tok), bool) if all_logits else np.isin(np.arange(len(tok)), ends - 1)  # [N]
        pieces = []
        for i in range(0, len(tok), n_batch):
            chunk = slice(i, i + n_batch)
            rows = np.flatnonzero(wanted[chunk])  # indices into the chunk whose logits are kept
            logits = self._forward(tok[chunk], pos[chunk], slot_of[chunk], cache, rows)
            for s, t in zip(slot_of[chunk], tok[chunk]):
                cache.tokens[s].append(int(t))
            if len(rows):
                pieces.append(logits)
        logits = np.concatenate(pieces)  # [wanted rows, n_vocab], in sequence order
        if all_logits:
            return np.split(logits, ends[:-1])
        return list(logits)

    def decode(self, cache: KVCache, slots: list[int], tokens: list[int]) -> np.ndarray:
        """One decoding step for one or several sequences: token i is appended to slot slots[i].
        Returns logits [len(tokens), n_vocab].  Each weight read serves every sequence, and each sequence gets
        exactly the logits it would get alone."""
        for s in slots:
            if len(cache.tokens[s]) >= cache.n_ctx:
                raise ContextError(f"sequence in slot {s} reached the context size {cache.n_ctx}")
        tok = np.asarray(tokens, dtype=np.int64)
        pos = np.array([len(cache.tokens[s]) for s in slots], dtype=np.int64)
        sl = np.asarray(slots, dtype=np.int64)
        try:
            logits = self._forward(tok, pos, sl, cache, np.arange(len(tok)), decode=True)
        except NumericError:  # every row's keys and values were written: the sequences with finite logits go on
            for s, t in zip(slots, tokens):
                cache.tokens[s].append(int(t))
            raise
        for s, t in zip(slots, tokens):
            cache.tokens[s].append(int(t))
        return logits

    def _forward(self, tok, pos, slot, cache, rows, decode: bool = False) -> np.ndarray:
        """transformer.forward, then the one place logits are checked: a NaN or inf would otherwise come out
        as a silent argmax of token 0, or as a numpy error deep in a sampler.  One pass over [rows, n_vocab]."""
        logits = self.transformer.forward(tok, pos, slot, cache, rows, decode=decode)
        finite = np.isfinite(logits).all(axis=1)  # [rows]
        if finite.all():
            return logits
        bad = int(np.flatnonzero(~finite)[0])
        row = int(rows[bad])  # index into tok/pos/slot
        kind = "NaN" if np.isnan(logits[bad]).any() else "infinity"
        where = f"token position {int(pos[row])}" + (f" of slot {int(slot[row])}" if cache.n_slots > 1 else "")
        layer = self._first_non_finite(tok, pos, slot, cache, decode) if self.diagnose else None
        raise NumericError(f"the model computed {kind} at {where}: its weights hold NaN/inf or a value overflowed "
                           + (f"(first non-finite output: {layer})" if layer else
                              f"(`pyllm info --check` scans the weights; --verbose names the layer)"),
                           rows=np.flatnonzero(~finite), logits=logits)

    def _first_non_finite(self, tok, pos, slot, cache, decode: bool) -> str | None:
        """Run the same step again, checking every layer's output: the name of the first that is not finite.
        Rewriting the step's keys and values at the same positions changes nothing."""
        class Found(Exception):
            pass

        def probe(name, x):
            if not np.isfinite(self.transformer.backend.to_numpy(x)).all():
                raise Found(name)

        try:
            logits = self.transformer.forward(tok, pos, slot, cache, np.arange(len(tok)), decode=decode, probe=probe)
        except Found as e:
            return str(e)
        return None if np.isfinite(logits).all() else "the output matrix (output.weight, or token_embd.weight tied)"

    def logits(self, tokens: list[int], all_positions: bool = False) -> np.ndarray:
        """Logits in a fresh context: after the last token ([n_vocab]) or after every token ([T, n_vocab])."""
        cache = self.new_cache(max(len(tokens), 1))
        return self.eval(cache, list(tokens), all_logits=all_positions)

    def generate(self, tokens: list[int], max_tokens: int = 256, temperature: float = 0.0, *,
                 cache: KVCache | None = None, **sampling) -> Iterator[int]:
        """Yield sampled token ids after the prompt `tokens`, stopping at an end-of-generation token."""
        from .generate import generate
        from .sampling import Sampler

        if cache is None:
            cache = self.new_cache(min(self.config.ctx_train, len(tokens) + max_tokens))
        sampler = Sampler(temperature=temperature, **sampling)
        yield from generate(self, cache, list(tokens), sampler, max_tokens=max_tokens)


def load(path: str | os.PathLike, device: str = "auto") -> Model:
    return Model(path, device)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    from .gguf import read_metadata

    return _tokenizer(read_metadata(path), str(path))


def _tokenizer(meta: dict, path: str) -> Tokenizer:
    """The tokenizer's errors name a metadata key; the user also needs to know which file."""
    try:
        return Tokenizer.from_metadata(meta)
    except PyllmError as e:
        raise type(e)(f"{path}: {e}") from None
