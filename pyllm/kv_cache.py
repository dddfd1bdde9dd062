"""The KV cache: preallocated key/value arrays for every layer and sequence slot, plus the token ids they hold."""
from __future__ import annotations

import os

import numpy as np

from .errors import MemoryLimitError, PyllmError
from .models.config import ModelConfig

KV_TYPES = {"f16": np.uint16, "f32": np.float32}  # f16 is stored as its bit pattern: numba has no float16


def kv_dtype(kv_type: str):
    """The array dtype of a --kv-type name."""
    if kv_type not in KV_TYPES:
        raise PyllmError(f"--kv-type must be one of {', '.join(KV_TYPES)}, not {kv_type!r}")
    return KV_TYPES[kv_type]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def available_memory() -> int | None:
    """Bytes this process can still get: MemAvailable, or less under a cgroup (container) limit; None unknown."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            if limit != "max":
                found.append(max(int(limit) - int(f.read()), 0))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def ensure_fits(nbytes: int, what: str, limit: int | None = None, hint: str = "") -> None:
    """Refuse a buffer before allocating it when it exceeds `limit` (bytes, from --max-memory) or, without one,
    the memory available now.  Large buffers are zero pages until written, so they would otherwise fail (or
    get the process killed) only once they fill."""
    if limit is not None:
        if nbytes > limit:
            raise MemoryLimitError(f"{what} needs {fmt_bytes(nbytes)}, more than the {fmt_bytes(limit)} --max-memory "
                                   f"leaves for it{hint}")
        return
    free = available_memory()
    if free is not None and nbytes > free:
        raise MemoryLimitError(f"{what} needs {fmt_bytes(nbytes)}, but {fmt_bytes(free)} of memory is available"
                               f"{hint}")


class KVCache:
    """k, v: [n_layers, n_slots, n_kv_heads, n_ctx, head_dim].  Slot s holds the sequence `tokens[s]` at
    positions 0..len(tokens[s])-1.  Pages are allocated by the OS on first write, so a large n_ctx costs
    memory only as it fills; it may fill, so its full size must fit in the memory available (or `limit`)."""

    def __init__(self, config: ModelConfig, n_ctx: int, n_slots: int = 1, kv_type: str = "f16", backend=None,
                 limit: int | None = None):
        dtype = kv_dtype(kv_type)
        if n_ctx < 1 or n_slots < 1:
            raise PyllmError(f"a KV cache needs at least 1 token and 1 slot, not {n_ctx} and {n_slots}")
        ensure_fits(self.nbytes(config, n_ctx, n_slots, kv_type),
                    f"the KV cache ({n_slots} x {n_ctx} tokens, {kv_type})" if n_slots > 1 else
                    f"the KV cache ({n_ctx} tokens, {kv_type})", limit,
                    " (lower --ctx-size" + (" or --parallel)" if n_slots > 1 else ")"))
        self.n_ctx, self.n_slots, self.kv_type = n_ctx, n_slots, kv_type
        shape = (config.n_layers, n_slots, config.n_kv_heads, n_ctx, config.head_dim)
        zeros = backend.zeros if backend is not None else np.zeros
        self.k = zeros(shape, dtype)  # [n_layers, n_slots, n_kv_heads, n_ctx, head_dim]
        self.v = zeros(shape, dtype)  # [n_layers, n_slots, n_kv_heads, n_ctx, head_dim]
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]

    @staticmethod
    def nbytes(config: ModelConfig, n_ctx: int, n_slots: int = 1, kv_type: str = "f16") -> int:
        """What k and v take once full (Python ints: no overflow however large the request)."""
        return 2 * config.n_layers * n_slots * config.n_kv_heads * n_ctx * config.head_dim * \
            np.dtype(kv_dtype(kv_type)).itemsize

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
