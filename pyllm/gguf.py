"""Open a GGUF file: metadata and tensor directory parsed in bulk, tensor data left in a read-only memmap.

gguf.GGUFReader is the reference (tests compare against it) but it builds Python objects for every vocab
entry and takes seconds on a 262k-token vocabulary; this parser reads the same layout in one pass over a
bytes buffer and checks every length and offset against the file size before trusting it, because GGUF
files come from strangers (a count in the header is a claim, not an allocation size).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import GGUFError

GGUF_MAGIC = b"GGUF"
MAX_ARRAY_DEPTH = 8  # nested arrays deeper than this are rejected (GGUFReader recurses without bound)

# GGUF value types -> (struct format, numpy dtype)
_SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9

# The GGUF types of the well-known keys whose readers trust them ("{arch}" is general.architecture): a file
# that stores, say, the token list as a number or the head count as a string is refused here, by name.
_INT, _NUM, _FLAG = ("int",), ("int", "float"), ("bool", "int")
KEY_KINDS = {
    "general.architecture": ("str",), "general.alignment": _INT,
    "tokenizer.ggml.model": ("str",), "tokenizer.ggml.pre": ("str",), "tokenizer.chat_template": ("str",),
    "tokenizer.ggml.tokens": ("array[str]",), "tokenizer.ggml.merges": ("array[str]",),
    "tokenizer.ggml.scores": ("array[float]", "array[int]"), "tokenizer.ggml.token_type": ("array[int]",),
    "tokenizer.ggml.add_bos_token": _FLAG, "tokenizer.ggml.add_eos_token": _FLAG,
    "tokenizer.ggml.add_space_prefix": _FLAG,
    **{f"{{arch}}.{k}": _INT for k in (
        "block_count", "context_length", "embedding_length", "feed_forward_length", "vocab_size",
        "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
        "attention.sliding_window", "rope.dimension_count")},
    **{f"{{arch}}.{k}": _NUM for k in (
        "rope.freq_base", "rope.scaling.factor", "attention.layer_norm_rms_epsilon")},
    "{arch}.rope.scaling.type": ("str",),
}
TOKEN_ID_KEY = re.compile(r"tokenizer\.ggml\.\w+_token_id")  # bos/eos/unknown/padding/...: all ints


def value_kind(value) -> str:
    """The GGUF type family of a parsed value: int, float, bool, str, array[int|float|bool|str|array]."""
    if isinstance(value, (bool, int, float, str)):
        return type(value).__name__
    if isinstance(value, np.ndarray):
        return "array[" + {"b": "bool", "f": "float"}.get(value.dtype.kind, "int") + "]"
    if value and not isinstance(value[0], str):
        return "array[array]"
    return "array[str]"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest-varying first): GGUF's dims reversed
    qtype: int  # GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads over the header bytes."""

    def __init__(self, buf: bytes, path: str, file_size: int):
        self.buf, self.pos, self.path, self.file_size = buf, 0, path, file_size

    def fail(self, what: str):
        raise GGUFError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            if start + n > self.file_size:
                self.fail(f"truncated file: {what} runs past the end of the file (offset {start}, {n} bytes)")
            raise _NeedMore(start + n)
        self.pos = start + n
        return start

    def scalar(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def u32(self, what):
        return self.scalar("<I", what)

    def u64(self, what):
        return self.scalar("<Q", what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        start = self.take(n, what)
        return self.buf[start:start + n].decode("utf-8", errors="replace")

    def count(self, what: str, min_item_bytes: int) -> int:
        """A length field: bounded by what the rest of the file could hold."""
        n = self.u64(what)
        if n * max(1, min_item_bytes) > self.file_size - self.pos:
            self.fail(f"{what} is {n}, more than the file could hold")
        return n


class _NeedMore(Exception):
    """The header is longer than the prefix read so far: read more and parse again."""

    def __init__(self, need: int):
        self.need = need


def _read_value(c: _Cursor, vtype: int, key: str, depth: int = 0):
    if vtype in _SCALARS:
        v = c.scalar(_SCALARS[vtype][0], f"value of {key}")
        return v.item() if isinstance(v, np.generic) else v
    if vtype == _STRING:
        return c.string(f"value of {key}")
    if vtype == _ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            c.fail(f"metadata {key}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        etype = c.u32(f"element type of {key}")
        if etype in _SCALARS:
            fmt, dtype = _SCALARS[etype]
            n = c.count(f"length of array {key}", struct.calcsize(fmt))
            start = c.take(n * struct.calcsize(fmt), f"array {key}")
            return np.frombuffer(c.buf, dtype=np.dtype(dtype).newbyteorder("<"), count=n, offset=start).copy()
        if etype == _STRING:
            n = c.count(f"length of array {key}", 8)
            return _read_strings(c, n, key)
        if etype == _ARRAY:
            n = c.count(f"length of array {key}", 12)
            return [_read_value(c, _ARRAY, key, depth + 1) for _ in range(n)]
        c.fail(f"metadata {key}: unknown array element type {etype}")
    c.fail(f"metadata {key}: unknown value type {vtype}")


def _read_strings(c: _Cursor, n: int, key: str) -> list[str]:
    # The hot loop of opening a model (262k vocab entries): plain int/slice operations on one bytes object.
    buf, pos, end = c.buf, c.pos, len(c.buf)
    out = [None] * n
    from_bytes = int.from_bytes
    for i in range(n):
        if pos + 8 > end:
            c.pos = pos
            c.take(8, f"array {key}")
        ln = from_bytes(buf[pos:pos + 8], "little")
        pos += 8
        if pos + ln > end:
            c.pos = pos
            c.take(ln, f"array {key}")
        out[i] = buf[pos:pos + ln].decode("utf-8", errors="surrogateescape")
        pos += ln
    c.pos = pos
    return out


class GGUFFile:
    """A parsed GGUF file. `metadata`: key -> value; `tensors`: name -> TensorInfo; `tensor_data(name)`: raw bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise GGUFError(f"{self.path}: no such file")
        if os.path.isdir(self.path):
            raise GGUFError(f"{self.path}: is a directory, not a GGUF file")
        try:
            self._read_header()
        except OSError as e:  # unreadable: permissions, an I/O error, a special file
            raise GGUFError(f"{self.path}: cannot read: {e.strerror or e}") from None
        self._mmap = None

    def _read_header(self):
        self.file_size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise GGUFError(f"{self.path}: not a GGUF file ({self.file_size} bytes, too short for a header)")
            if head != GGUF_MAGIC:
                raise GGUFError(f"{self.path}: not a GGUF file (starts with {head!r}, expected b'GGUF')")
            # Read a prefix big enough for most headers; grow only if the parse runs past it.
            size = min(self.file_size, 1 << 24)
            while True:
                f.seek(0)
                buf = f.read(size)
                try:
                    self._parse(buf)
                    break
                except _NeedMore as e:
                    size = min(self.file_size, max(e.need + (1 << 20), size * 4))

    def _parse(self, buf: bytes):
        c = _Cursor(buf, self.path, self.file_size)
        c.take(4, "magic")
        self.version = c.u32("version")
        if self.version not in (2, 3):
            c.fail(f"unsupported GGUF version {self.version} (pyllm reads versions 2 and 3)")
        n_tensors = c.count("tensor count", 24)
        n_kv = c.count("metadata count", 12)
        meta: dict = {}
        for _ in range(n_kv):
            key = c.string("metadata key")
            if key in meta:
                c.fail(f"metadata key {key!r} is stored twice")
            vtype = c.u32(f"type of {key}")
            meta[key] = _read_value(c, vtype, key)
        self.metadata = meta
        self._check_key_kinds(c)
        align = meta.get("general.alignment", 32)
        if align <= 0 or align & (align - 1) or align > 1 << 16:
            c.fail(f"general.alignment is {align}, expected a power of two up to 65536")
        infos = []
        for _ in range(n_tensors):
            name = c.string("tensor name")
            n_dims = c.u32(f"dimension count of tensor {name!r}")
            if not 1 <= n_dims <= 4:
                c.fail(f"tensor {name!r} has {n_dims} dimensions (1 to 4 allowed)")
            dims = [c.u64(f"dimensions of tensor {name!r}") for _ in range(n_dims)]
            qtype = c.u32(f"type of tensor {name!r}")
            offset = c.u64(f"offset of tensor {name!r}")
            infos.append((name, dims, qtype, offset))
        data_start = -(-c.pos // align) * align
        self.data_start = data_start
        self.header_bytes = buf[:c.pos]
        self.tensors = {}
        spans = []
        for name, dims, qtype, offset in infos:
            info = self._check_tensor(name, dims, qtype, offset, align, data_start)
            if name in self.tensors:
                c.fail(f"tensor {name!r} is listed twice")
            self.tensors[name] = info
            spans.append((info.offset, info.offset + info.nbytes, name))
        spans.sort()
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                c.fail(f"tensors {n0!r} and {n1!r} overlap")

    def _check_key_kinds(self, c: _Cursor):
        arch = self.metadata.get("general.architecture")
        for key, value in self.metadata.items():
            if isinstance(arch, str) and key.startswith(arch + "."):
                kinds = KEY_KINDS.get("{arch}" + key[len(arch):])
            else:
                kinds = _INT if TOKEN_ID_KEY.fullmatch(key) else KEY_KINDS.get(key)
            if kinds and value_kind(value) not in kinds:
                c.fail(f"metadata {key} is of type {value_kind(value)}, expected {' or '.join(kinds)}")

    def _check_tensor(self, name, dims, qtype, offset, align, data_start) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        try:
            qtype_name = GGMLQuantizationType(qtype).name
        except ValueError:
            raise GGUFError(f"{where} has unknown type {qtype}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise GGUFError(f"{where} has type {qtype_name} with no known block layout")
        if any(d <= 0 for d in dims):
            raise GGUFError(f"{where} has a non-positive dimension {dims}")
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise GGUFError(f"{where}: row length {dims[0]} is not a multiple of the {qtype_name} block size {block}")
        n_elements = 1
        for d in dims:
            n_elements *= d
        nbytes = n_elements // block * type_size
        if offset % align:
            raise GGUFError(f"{where}: data offset {offset} is not aligned to {align}")
        start = data_start + offset
        if start + nbytes > self.file_size:
            raise GGUFError(f"{where}: data ends at byte {start + nbytes} but the file has {self.file_size} "
                            f"bytes (truncated file?)")
        return TensorInfo(name, tuple(reversed(dims)), qtype, start, nbytes)

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    def fingerprint(self) -> str:
        """Identity of the model for caches: sha256 of the header (metadata + tensor directory) and file size."""
        h = hashlib.sha256(self.header_bytes)
        h.update(str(self.file_size).encode())
        return h.hexdigest()

    def tensor_data(self, name: str) -> np.ndarray:
        """The raw bytes of one tensor: a zero-copy uint8 view into the read-only memmap."""
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        info = self.tensors[name]
        return np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=info.offset)


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a GGUF file (works on vocab-only files)."""
    return GGUFFile(path).metadata
