"""Prompt cache on disk: the KV state of prompts already seen, so a repeated prefix is never computed twice.

One self-describing file per entry:

    b"PYLLMKV\\0" | u32 JSON length | JSON header | token ids int32 [n_tokens] | zero padding to 64 bytes |
    K [n_layers, n_kv_heads, n_tokens, head_dim] | V [n_layers, n_kv_heads, n_tokens, head_dim]

K and V are stored in the cache's own element type (f16 bits or float32, little-endian), so a restored prefix is
bit-for-bit what the prefill wrote.  The header names the format version, the model's identity, the KV type and
head layout, the token count and a sha256 over the token ids and K/V bytes.  A file is written under a temporary
name and renamed, so readers see a whole file or none; a torn or altered one fails the size or checksum test.

`PromptCache` manages a directory (file names start with the model identity and KV type, so a lookup reads
only the headers of that model's entries; a size limit evicts the least recently used); `PromptCacheFile` is one
explicit file, as llama.cpp's --prompt-cache.  Both restore the longest stored prefix of a prompt into a KV cache
slot (generate() then prefills only the rest) and save a slot.  Bad files are reported through `warn` and never
used; the library prints nothing.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import struct
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .kv_cache import KV_TYPES

FORMAT_VERSION = 1
MAGIC = b"PYLLMKV\0"
SUFFIX = ".pkv"
ALIGN = 64  # the K/V payload starts on a 64-byte boundary of the file
MAX_HEADER = 1 << 16  # the JSON part is a few hundred bytes; a larger length field means a damaged file
DEFAULT_MAX_BYTES = 2 << 30
STALE_TMP_S = 3600  # a temporary file this old belongs to a writer that died


class PromptCacheWarning(UserWarning):
    pass


def _warn(message: str) -> None:
    warnings.warn(message, PromptCacheWarning, stacklevel=3)


def default_dir() -> Path:
    return Path.home() / ".cache" / "pyllm" / "prompt-cache"


class BadEntry(Exception):
    """A file that must not be used; str() says why."""


@dataclass
class Entry:
    """A cache file whose header has been read and checked (the payload not yet)."""

    path: Path
    header: dict
    tokens: np.ndarray  # int32 [n_tokens]
    payload_offset: int

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


_identities: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_identity(model) -> str:
    """model.fingerprint (GGUF header + tensor directory) plus samples of every tensor's bytes: two files with
    one layout but other weights (a fine-tune, another quantization recipe) must never share entries."""
    if model not in _identities:
        digest = hashlib.sha256(model.fingerprint.encode())
        for name in sorted(model.gguf.tensors):
            data = model.gguf.tensor_data(name)  # uint8 view of the memmap
            for start in (0, len(data) // 2, max(len(data) - 256, 0)):
                digest.update(data[start:start + 256])
        _identities[model] = digest.hexdigest()
    return _identities[model]


def _layout(model, cache) -> dict:
    """What an entry must agree on to be loaded into `cache` for `model`."""
    c = model.config
    return {"fingerprint": model_identity(model), "kv_type": cache.kv_type, "n_layers": c.n_layers,
            "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim}


def _payload_shape(header: dict) -> tuple[int, ...]:
    return (2, header["n_layers"], header["n_kv_heads"], header["n_tokens"], header["head_dim"])  # [K/V, L, H, T, D]


def _payload_offset(header_len: int, n_tokens: int) -> int:
    end = len(MAGIC) + 4 + header_len + 4 * n_tokens
    return end + (-end % ALIGN)


def read_entry(path: Path) -> Entry:
    """Read and check a file's header: BadEntry if it is not a whole entry of this format version."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[:len(MAGIC)] != MAGIC:
            raise BadEntry("not a pyllm prompt cache file")
        (header_len,) = struct.unpack("<I", head[len(MAGIC):])
        if header_len > MAX_HEADER:
            raise BadEntry("damaged header")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadEntry("damaged header") from None
        if not isinstance(header, dict):
            raise BadEntry("damaged header")
        if header.get("version") != FORMAT_VERSION:
            raise BadEntry(f"format version {header.get('version')!r}, this pyllm reads {FORMAT_VERSION}")
        for key in ("n_tokens", "n_layers", "n_kv_heads", "head_dim"):
            if not isinstance(header.get(key), int) or header[key] <= 0:
                raise BadEntry(f"damaged header ({key})")
        if header.get("kv_type") not in KV_TYPES or not isinstance(header.get("checksum"), str):
            raise BadEntry("damaged header")
        offset = _payload_offset(header_len, header["n_tokens"])
        expected = offset + math.prod(_payload_shape(header)) * np.dtype(KV_TYPES[header["kv_type"]]).itemsize
        if size != expected:
            raise BadEntry(f"truncated or damaged: {size} bytes where the header implies {expected}")
        tokens = np.frombuffer(f.read(4 * header["n_tokens"]), dtype="<i4")
    return Entry(Path(path), header, tokens, offset)


def _incompatibility(entry: Entry, model, cache) -> str | None:
    """Why the entry cannot go into this model's cache, or None."""
    want = _layout(model, cache)
    h = entry.header
    if h.get("fingerprint") != want["fingerprint"]:
        return f"made for another model ({h.get('model', '?')})"
    if h["kv_type"] != want["kv_type"]:
        return f"KV type {h['kv_type']}, the cache uses {want['kv_type']}"
    if any(h[k] != want[k] for k in ("n_layers", "n_kv_heads", "head_dim")):
        return "KV head layout differs from the model's"
    return None


def _verified_payload(entry: Entry) -> np.ndarray:
    """The K/V payload memory-mapped ([2, L, H, T, D]) after its checksum matched: BadEntry otherwise."""
    h = entry.header
    kv = np.memmap(entry.path, dtype=KV_TYPES[h["kv_type"]], mode="r", offset=entry.payload_offset,
                   shape=_payload_shape(h))
    digest = hashlib.sha256(entry.tokens.tobytes())
    digest.update(kv)
    if digest.hexdigest() != h["checksum"]:
        raise BadEntry("checksum mismatch (corrupted file)")
    return kv


def _matched(entry: Entry, tokens: np.ndarray) -> int:
    """Length of the common prefix of the entry's tokens and `tokens`."""
    m = min(entry.n_tokens, len(tokens))
    diff = np.flatnonzero(entry.tokens[:m] != tokens[:m])
    return int(diff[0]) if len(diff) else m


def _restore_best(entries: list[Entry], cache, tokens: list[int], slot: int, on_bad) -> tuple[int, Entry | None]:
    """Load the longest prefix of `tokens` any entry holds into the slot; returns (tokens held, entry used).

    The slot ends up holding exactly tokens[:n].  The last prompt token is never restored: its logits pick the
    next token and are not stored."""
    ids = np.asarray(tokens, dtype=np.int64)
    limit = max(min(len(tokens) - 1, cache.n_ctx), 0)
    have = min(cache.common_prefix(tokens, slot), limit)
    ranked = sorted(((min(_matched(e, ids), limit), e) for e in entries), key=lambda p: -p[0])
    for n, entry in ranked:
        if n <= have:
            break
        try:
            kv = _verified_payload(entry)
        except BadEntry as e:
            on_bad(entry.path, str(e))
            continue
        except OSError:
            continue  # removed by another process since its header was read
        cache.k[:, slot, :, have:n] = kv[0, :, :, have:n]
        cache.v[:, slot, :, have:n] = kv[1, :, :, have:n]
        cache.tokens[slot][have:] = [int(t) for t in tokens[have:n]]
        return n, entry
    cache.trim(have, slot)
    return have, None


def write_entry(path: Path, model, cache, slot: int = 0, n_tokens: int | None = None) -> None:
    """Store the first n_tokens (default: all) a slot holds; atomically, via a temporary file and a rename."""
    path = Path(path)
    tokens = np.asarray(cache.tokens[slot][:n_tokens], dtype="<i4")  # [n]
    n = len(tokens)
    # one layer at a time ([H, n, D] each): a long prompt's entry is never copied whole into memory
    layers = [a[layer, slot, :, :n] for a in (cache.k, cache.v) for layer in range(a.shape[0])]
    need = entry_bytes(cache, n)
    free = shutil.disk_usage(path.parent).free
    if need > free:
        raise OSError(errno.ENOSPC, f"the entry needs {need} bytes, {free} are free on the disk")
    digest = hashlib.sha256(tokens.tobytes())
    for part in layers:
        digest.update(np.ascontiguousarray(part))
    header = dict(_layout(model, cache), version=FORMAT_VERSION, n_tokens=n, n_ctx=cache.n_ctx,
                  model=Path(model.path).name, created=time.time(), checksum=digest.hexdigest(),
                  preview=_preview(model, tokens))
    blob = json.dumps(header).encode()
    start = MAGIC + struct.pack("<I", len(blob)) + blob + tokens.tobytes()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(start + bytes(_payload_offset(len(blob), n) - len(start)))
            for part in layers:
                f.write(np.ascontiguousarray(part))
        # no fsync: a file torn by a power cut fails the size or checksum test and is dropped
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def entry_bytes(cache, n_tokens: int) -> int:
    """About what an entry of n_tokens takes on disk (the JSON header aside): sized before anything is written."""
    return _payload_offset(0, n_tokens) + 2 * cache.k[:, 0, :, :n_tokens].size * cache.k.dtype.itemsize


def _preview(model, tokens: np.ndarray) -> str:
    """The start and the end of the cached text, for `pyllm cache ls` (chat prompts share their start)."""
    def text(ids):
        return " ".join(model.detokenize(ids.tolist()).split())

    if len(tokens) <= 64:
        return text(tokens)[:120]
    return f"{text(tokens[:32])[:50]} … {text(tokens[-32:])[-60:]}"


class PromptCache:
    """A directory of entries for any number of models, limited to max_bytes (least recently used go first)."""

    def __init__(self, directory: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 read_only: bool = False, warn: Callable[[str], None] = _warn):
        self.dir = Path(directory) if directory is not None else default_dir()
        self.max_bytes, self.read_only, self.warn = max_bytes, read_only, warn

    def _bad(self, path: Path, reason: str) -> None:
        """A damaged or stale file in our directory: never used again."""
        self.warn(f"prompt cache {path}: {reason}; removed")
        path.unlink(missing_ok=True)

    def _entries(self, model, cache) -> list[Entry]:
        """The readable entries this model and KV type could use (bad ones are reported and removed)."""
        found = []
        for path in self.dir.glob(f"{model_identity(model)[:16]}-{cache.kv_type}-*{SUFFIX}"):
            try:
                entry = read_entry(path)
            except BadEntry as e:
                self._bad(path, str(e))
                continue
            except OSError:
                continue  # removed by another process meanwhile
            why = _incompatibility(entry, model, cache)
            if why:
                self._bad(path, why)
            else:
                found.append(entry)
        return found

    def restore(self, model, cache, tokens: list[int], slot: int = 0) -> int:
        """Load the longest cached prefix of `tokens` into the slot; returns how many tokens the slot holds."""
        n, used = _restore_best(self._entries(model, cache), cache, tokens, slot, self._bad)
        if used is not None:
            _touch(used.path)
        return n

    def save(self, model, cache, slot: int = 0, n_tokens: int | None = None) -> Path | None:
        """Store the slot's first n_tokens (default: all it holds) unless an entry already covers them."""
        tokens = cache.tokens[slot][:n_tokens]
        if self.read_only or not tokens:
            return None
        ids = np.asarray(tokens, dtype=np.int64)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            entries = self._entries(model, cache)
            for e in entries:
                if e.n_tokens >= len(ids) and _matched(e, ids) == len(ids):
                    _touch(e.path)
                    return e.path
            if entry_bytes(cache, len(ids)) > self.max_bytes:  # it would only evict everything, itself included
                self.warn(f"prompt cache: an entry of {len(ids)} tokens takes {entry_bytes(cache, len(ids))} "
                          f"bytes, more than the cache's limit of {self.max_bytes} (--prompt-cache-max-size); "
                          f"not saved")
                return None
            name = hashlib.sha256(ids.astype("<i4").tobytes()).hexdigest()[:24]
            path = self.dir / f"{model_identity(model)[:16]}-{cache.kv_type}-{name}{SUFFIX}"
            write_entry(path, model, cache, slot, len(ids))
            for e in entries:  # entries the new one extends are now redundant
                if _matched(e, ids) == e.n_tokens:
                    e.path.unlink(missing_ok=True)
            self.evict()
        except OSError as e:
            self.warn(f"prompt cache {self.dir}: cannot save: {e.strerror or e}")
            return None
        return path if path.exists() else None

    def evict(self) -> None:
        """Remove least recently used entries until the directory fits max_bytes; drop dead writers' files."""
        files = []
        for path in self.dir.glob(f"*{SUFFIX}"):
            try:
                st = path.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, path))
        total = 0
        for _, size, path in sorted(files, reverse=True):
            total += size
            if total > self.max_bytes:
                path.unlink(missing_ok=True)
        for path in self.dir.glob(f".*{SUFFIX}.*.tmp"):
            try:
                if time.time() - path.stat().st_mtime > STALE_TMP_S:
                    path.unlink(missing_ok=True)
            except OSError:
                pass

    def listing(self) -> list[tuple[Path, int, float, dict | str]]:
        """Every file in the directory: (path, bytes, last used, header or why it is unreadable), newest first."""
        rows = []
        for path in self.dir.glob(f"*{SUFFIX}"):
            try:
                st = path.stat()
                try:
                    info = read_entry(path).header
                except BadEntry as e:
                    info = str(e)
            except OSError:
                continue
            rows.append((path, st.st_size, st.st_mtime, info))
        return sorted(rows, key=lambda r: -r[2])

    def clear(self) -> tuple[int, int]:
        """Remove every entry (and temporary file); returns (files removed, bytes freed)."""
        count = freed = 0
        for path in [*self.dir.glob(f"*{SUFFIX}"), *self.dir.glob(f".*{SUFFIX}.*.tmp")]:
            try:
                size = path.stat().st_size
                path.unlink()
            except OSError:
                continue
            count, freed = count + 1, freed + size
        return count, freed


class PromptCacheFile:
    """One explicit file (llama.cpp's --prompt-cache FILE): reused when it fits, rewritten after each run."""

    def __init__(self, path: str | os.PathLike, read_only: bool = False, warn: Callable[[str], None] = _warn):
        self.path, self.read_only, self.warn = Path(path), read_only, warn

    def _bad(self, path: Path, reason: str) -> None:
        self.warn(f"prompt cache {path}: {reason}; ignored")

    def restore(self, model, cache, tokens: list[int], slot: int = 0) -> int:
        """Load the file's longest common prefix with `tokens` into the slot; returns how many tokens it holds."""
        entries = []
        try:
            entry = read_entry(self.path)
            why = _incompatibility(entry, model, cache)
            if why:
                self._bad(self.path, why)
            else:
                entries.append(entry)
        except FileNotFoundError:
            pass  # the first run creates it
        except BadEntry as e:
            self._bad(self.path, str(e))
        except OSError as e:
            self._bad(self.path, e.strerror or str(e))
        return _restore_best(entries, cache, tokens, slot, self._bad)[0]

    def save(self, model, cache, slot: int = 0, n_tokens: int | None = None) -> Path | None:
        """Write the slot's first n_tokens (default: all); never over a file that is not a prompt cache."""
        if self.read_only or not cache.tokens[slot][:n_tokens]:
            return None
        try:
            with open(self.path, "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    self.warn(f"prompt cache {self.path}: not a pyllm prompt cache file; not overwritten")
                    return None
        except FileNotFoundError:
            pass  # the first run creates it
        except OSError as e:
            self.warn(f"prompt cache {self.path}: cannot save: {e.strerror or e}")
            return None
        try:
            write_entry(self.path, model, cache, slot, n_tokens)
        except OSError as e:
            self.warn(f"prompt cache {self.path}: cannot save: {e.strerror or e}")
            return None
        return self.path


def _touch(path: Path) -> None:
    """Mark an entry as just used (its mtime orders the LRU eviction)."""
    try:
        os.utime(path)
    except OSError:
        pass
