"""GGUF files at the byte level, for hostile-input tests and the fuzzer.

gguf.GGUFWriter refuses to write a broken file, so crafted ones are built here: `parse` splits a well-formed
file into KV pairs and tensors (and records where every integer field sits, so a mutator can aim at them);
`build` writes KV pairs and tensors back, lies included (counts, offsets, types, nesting) when asked.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

# GGUF value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALAR_FORMATS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
                  FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}


@dataclass
class KV:
    key: str
    vtype: int
    value: object  # scalar, str, list for arrays ((etype, list) items when nested), or bytes: written as is
    etype: int | None = None  # element type of an array
    count: int | None = None  # the length written for a string or array value, when it should lie


@dataclass
class Tensor:
    name: str
    dims: list[int]  # GGUF order: fastest-varying first
    qtype: int
    data: bytes = b""
    offset: int | None = None  # relative to the data section; None = next aligned place (and data written)


@dataclass
class Field:
    """An integer field of the file: where it is, how wide, and what it means (for aimed mutations)."""
    pos: int
    size: int
    kind: str  # "version", "count", "length", "vtype", "etype", "value", "n_dims", "dim", "qtype", "offset"


@dataclass
class GGUF:
    kvs: list[KV]
    tensors: list[Tensor]
    version: int = 3
    fields: list[Field] = field(default_factory=list)
    data_start: int = 0

    def kv(self, key: str) -> KV:
        return next(kv for kv in self.kvs if kv.key == key)

    def set(self, key: str, vtype: int, value, etype: int | None = None, count: int | None = None):
        """Replace (or add, at the end) a KV pair."""
        self.kvs = [kv for kv in self.kvs if kv.key != key] + [KV(key, vtype, value, etype, count)]

    def drop(self, key: str):
        self.kvs = [kv for kv in self.kvs if kv.key != key]

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)


def _str(s, count: int | None = None) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(b) if count is None else count) + b


def _value(vtype: int, value, etype=None, count=None) -> bytes:
    if isinstance(value, bytes) and vtype != STRING:
        return value  # a crafted encoding (or an unknown type): written as it is
    if vtype in SCALAR_FORMATS:
        return struct.pack(SCALAR_FORMATS[vtype], value)
    if vtype == STRING:
        return _str(value, count)
    if vtype == ARRAY:
        head = struct.pack("<IQ", etype, len(value) if count is None else count)
        if etype == ARRAY:
            return head + b"".join(_value(ARRAY, items, inner) for inner, items in value)
        return head + b"".join(_value(etype, v) for v in value)
    raise ValueError(f"cannot encode {value!r} as GGUF value type {vtype}")


def encode_kv(kv: KV) -> bytes:
    return _str(kv.key) + struct.pack("<I", kv.vtype) + _value(kv.vtype, kv.value, kv.etype, kv.count)


def build(g: GGUF, *, alignment: int = 32, n_tensors: int | None = None, n_kv: int | None = None,
          magic: bytes = b"GGUF") -> bytes:
    """The file's bytes. n_tensors/n_kv override the counts written in the header (to make them lie)."""
    align = next((kv.value for kv in g.kvs if kv.key == "general.alignment"), alignment)
    align = align if isinstance(align, int) and align > 0 else alignment  # lay out even a lying alignment
    head = magic + struct.pack("<IQQ", g.version, len(g.tensors) if n_tensors is None else n_tensors,
                               len(g.kvs) if n_kv is None else n_kv)
    head += b"".join(encode_kv(kv) for kv in g.kvs)
    offsets, end = [], 0
    for t in g.tensors:  # a tensor with an explicit offset claims bytes: its own data is not written
        off = -(-end // align) * align if t.offset is None else t.offset
        offsets.append(off)
        end = end if t.offset is not None else off + len(t.data)
    for t, off in zip(g.tensors, offsets):
        head += _str(t.name) + struct.pack("<I", len(t.dims)) + struct.pack(f"<{len(t.dims)}Q", *t.dims)
        head += struct.pack("<IQ", t.qtype, off)
    head += b"\0" * (-len(head) % align)
    data = bytearray(-(-end // align) * align)
    for t, off in zip(g.tensors, offsets):
        if t.offset is None:
            data[off:off + len(t.data)] = t.data
    return head + bytes(data)


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos, self.fields = buf, 0, []

    def int(self, fmt: str, kind: str):
        size = struct.calcsize(fmt)
        self.fields.append(Field(self.pos, size, kind))
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def str(self) -> str:
        n = self.int("<Q", "length")
        s = self.buf[self.pos:self.pos + n].decode("utf-8", "surrogateescape")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in SCALAR_FORMATS:
            return self.int(SCALAR_FORMATS[vtype], "value")
        if vtype == STRING:
            return self.str()
        etype, n = self.int("<I", "etype"), self.int("<Q", "count")
        return etype, [self.value(etype) for _ in range(n)]


def parse(buf: bytes) -> GGUF:
    """Split a well-formed GGUF (trusted: a seed, not an input under test) into KV pairs and tensors."""
    r = _Reader(buf)
    r.pos = 4
    version = r.int("<I", "version")
    n_tensors, n_kv = r.int("<Q", "count"), r.int("<Q", "count")
    kvs = []
    for _ in range(n_kv):
        key = r.str()
        vtype = r.int("<I", "vtype")
        value = r.value(vtype)
        if vtype == ARRAY:
            etype, items = value
            kvs.append(KV(key, ARRAY, items, etype))
        else:
            kvs.append(KV(key, vtype, value))
    infos = []
    for _ in range(n_tensors):
        name = r.str()
        n_dims = r.int("<I", "n_dims")
        dims = [r.int("<Q", "dim") for _ in range(n_dims)]
        infos.append((name, dims, r.int("<I", "qtype"), r.int("<Q", "offset")))
    align = next((kv.value for kv in kvs if kv.key == "general.alignment"), 32)
    data_start = -(-r.pos // align) * align
    offsets = sorted({off for *_, off in infos}) + [len(buf) - data_start]
    ends = {off: nxt for off, nxt in zip(offsets, offsets[1:])}
    tensors = [Tensor(name, dims, qtype, buf[data_start + off:data_start + ends[off]])
               for name, dims, qtype, off in infos]
    return GGUF(kvs, tensors, version, r.fields, data_start)
