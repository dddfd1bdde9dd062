"""The KV cache: preallocated key/value arrays for every layer and sequence slot, plus the token ids they hold."""
from __future__ import annotations

import numpy as np

from .errors import PyllmError
from .models.config import ModelConfig

KV_TYPES = {"f16": np.uint16, "f32": np.float32}  # f16 is stored as its bit pattern: numba has no float16


def kv_dtype(kv_type: str):
    """The array dtype of a --kv-type name."""
    if kv_type not in KV_TYPES:
        raise PyllmError(f"--kv-type must be one of {', '.join(KV_TYPES)}, not {kv_type!r}")
    return KV_TYPES[kv_type]


class KVCache:
    """k, v: [n_layers, n_slots, n_kv_heads, n_ctx, head_dim].  Slot s holds the sequence `tokens[s]` at
    positions 0..len(tokens[s])-1.  Pages are allocated by the OS on first write, so a large n_ctx costs
    memory only as it fills."""

    def __init__(self, config: ModelConfig, n_ctx: int, n_slots: int = 1, kv_type: str = "f16", backend=None):
        dtype = kv_dtype(kv_type)
        self.n_ctx, self.n_slots, self.kv_type = n_ctx, n_slots, kv_type
        shape = (config.n_layers, n_slots, config.n_kv_heads, n_ctx, config.head_dim)
        zeros = backend.zeros if backend is not None else np.zeros
        self.k = zeros(shape, dtype)  # [n_layers, n_slots, n_kv_heads, n_ctx, head_dim]
        self.v = zeros(shape, dtype)  # [n_layers, n_slots, n_kv_heads, n_ctx, head_dim]
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]

    def trim(self, n: int, slot: int = 0) -> None:
        """Forget everything after the first n tokens of a slot (the arrays past n are simply overwritten later)."""
        del self.tokens[slot][n:]

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Slot dst takes the first n tokens of slot src: a token's keys and values depend on the tokens before
        it, not on the slot."""
        for a in (self.k, self.v):
            a[:, dst, :, :n] = a[:, src, :, :n]
        self.tokens[dst] = self.tokens[src][:n]

    def common_prefix(self, tokens, slot: int = 0) -> int:
        """How many leading tokens of `tokens` the slot already holds."""
        held = self.tokens[slot]
        n = 0
        for a, b in zip(held, tokens):
            if a != b:
                break
            n += 1
        return n
