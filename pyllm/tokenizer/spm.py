"""SentencePiece vocabularies (tokenizer.ggml.model == "llama"), encoded by the sentencepiece library.

We serialize a sentencepiece ModelProto straight from the GGUF vocab (no protobuf dependency: the
wire format of the few fields we need is written by hand) and let sentencepiece's BPE do the merging.

To behave like llama.cpp's own SPM tokenizer (llm_tokenizer_spm_session), which merges by score over
*every* vocab entry and knows nothing of piece types, all pieces are declared NORMAL except the byte
pieces (<0xNN>, needed for byte fallback) and the one unknown piece sentencepiece insists on. The
normalizer is the identity: no NFKC, no dummy prefix, no whitespace folding; the caller escapes " " as
"\u2581" and adds llama.cpp's leading space itself, because that depends on the special-token split.
"""

from __future__ import annotations


import numpy as np

from ..errors import GGUFError

# sentencepiece_model.proto field numbers
_PIECE_NORMAL, _PIECE_UNKNOWN, _PIECE_BYTE = 1, 2, 6
_MODEL_BPE = 2
MAX_PIECE_BYTES = 7999  # sentencepiece refuses longer pieces ("piece is too long")
BYTE_PIECES = frozenset(f"<0x{b:02X}>" for b in range(256))  # spelled as sentencepiece and llama.cpp spell them


def _varint(n: int) -> bytes:
    if n < 0:
        n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_VARINT_1B = [bytes([i]) for i in range(128)]


def _len_prefixed(tag: bytes, payload: bytes) -> bytes:
    n = len(payload)
    return tag + (_VARINT_1B[n] if n < 128 else _varint(n)) + payload


def _pieces_numpy(tokens, scores: np.ndarray, types: np.ndarray) -> bytes:
    """The repeated `pieces` field, laid out with numpy: ~10x faster than a Python loop for 262k pieces.

    Each record: 0x0A varint(B) | 0x0A varint(L) piece[L] | 0x15 score[4] | 0x18 type   (B = body size)
    Varints here are 1 or 2 bytes: sizes < 16384, as pieces are at most MAX_PIECE_BYTES.
    """
    enc = [t.encode("utf-8", "surrogatepass") for t in tokens]
    blob = np.frombuffer(b"".join(enc), dtype=np.uint8)
    L = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
    vl = 1 + (L >= 128)
    B = 1 + vl + L + 7
    vb = 1 + (B >= 128)
    rec = 1 + vb + B
    end = np.cumsum(rec)
    start = end - rec
    out = np.zeros(int(end[-1]) if len(end) else 0, dtype=np.uint8)

    def put_varint(pos, val, nbytes):
        one = nbytes == 1
        out[pos[one]] = val[one]
        two = ~one
        out[pos[two]] = (val[two] & 0x7F) | 0x80
        out[pos[two] + 1] = val[two] >> 7

    out[start] = 0x0A
    put_varint(start + 1, B, vb)
    p2 = start + 1 + vb
    out[p2] = 0x0A
    put_varint(p2 + 1, L, vl)
    p3 = p2 + 1 + vl  # piece text
    blob_start = np.cumsum(L) - L
    out[np.repeat(p3 - blob_start, L) + np.arange(len(blob))] = blob
    p4 = p3 + L
    out[p4] = 0x15
    sb = np.ascontiguousarray(scores, dtype="<f4").view(np.uint8).reshape(-1, 4)
    for k in range(4):
        out[p4 + 1 + k] = sb[:, k]
    out[p4 + 5] = 0x18
    out[p4 + 6] = types
    return out.tobytes()


def build_model_proto(tokens: list[str], scores: np.ndarray, is_byte: np.ndarray, unk_id: int | None) -> bytes:
    """Serialized sentencepiece ModelProto (BPE, byte fallback, identity normalizer)."""
    n = len(tokens)
    types = np.full(n, _PIECE_NORMAL, dtype=np.int64)
    types[is_byte] = _PIECE_BYTE
    extra = b""
    # a byte piece cannot also be the unknown piece: byte fallback needs all 256
    if unk_id is not None and 0 <= unk_id < n and not is_byte[unk_id]:
        types[unk_id] = _PIECE_UNKNOWN
        unk = unk_id
    else:
        # sentencepiece needs exactly one unknown piece; add one that no text can produce
        extra = _len_prefixed(b"\x0a", _len_prefixed(b"\x0a", "<pyllm-unk>".encode()) + b"\x18\x02")
        unk = n
    pieces = _pieces_numpy(tokens, scores, types)
    has_bytes = bool(is_byte.any())
    trainer = (
        b"\x18" + _varint(_MODEL_BPE)          # model_type = BPE
        + b"\x20" + _varint(n + (1 if extra else 0))  # vocab_size
        + b"\x98\x02" + _varint(int(has_bytes))  # byte_fallback (35)
        + b"\xc0\x02" + _varint(unk)           # unk_id (40)
        + b"\xc8\x02" + _varint(-1)            # bos_id (41): we add BOS ourselves
        + b"\xd0\x02" + _varint(-1)            # eos_id (42)
        + b"\xd8\x02" + _varint(-1)            # pad_id (43)
    )
    normalizer = (
        _len_prefixed(b"\x0a", b"identity")    # name
        + b"\x18\x00"                          # add_dummy_prefix = false
        + b"\x20\x00"                          # remove_extra_whitespaces = false
        + b"\x28\x00"                          # escape_whitespaces = false (done by the caller)
    )
    return b"".join([pieces, extra, _len_prefixed(b"\x12", trainer), _len_prefixed(b"\x1a", normalizer)])


def check_pieces(tokens: list[str], is_byte: np.ndarray) -> None:
    """GGUFError for what sentencepiece would refuse to load, found here so that a bad vocabulary fails when
    the tokenizer is made, not at its first encode. The byte pieces' texts are already known to be BYTE_PIECES."""
    n_bytes = int(np.count_nonzero(is_byte))
    if 0 < n_bytes < 256:
        missing = min(BYTE_PIECES.difference(tokens[i] for i in np.nonzero(is_byte)[0].tolist()))
        raise GGUFError(f"tokenizer.ggml.tokens has BYTE tokens for only {n_bytes} of the 256 bytes (none is "
                        f"{missing}), but SentencePiece byte fallback needs all of them")
    if "\x00" in "".join(tokens):
        i = next(i for i, t in enumerate(tokens) if "\x00" in t)
        raise GGUFError(f"tokenizer.ggml.tokens[{i}] contains a NUL character, which a SentencePiece piece cannot hold")
    if max(map(len, tokens)) * 4 > MAX_PIECE_BYTES:  # at most 4 bytes per character: only then look closer
        for i, t in enumerate(tokens):
            size = len(t.encode("utf-8", "surrogatepass"))
            if size > MAX_PIECE_BYTES:
                raise GGUFError(f"tokenizer.ggml.tokens[{i}] is {size} bytes long; a SentencePiece piece has at "
                                f"most {MAX_PIECE_BYTES}")


class SPMEngine:
    """Encodes raw text fragments (already split on special tokens) with sentencepiece."""

    def __init__(self, tokens: list[str], scores: np.ndarray, is_byte: np.ndarray, unk_id: int | None):
        check_pieces(tokens, is_byte)
        self._args = (tokens, scores, is_byte, unk_id)
        self._sp = None  # built on first use: ~0.5 s for a 262k vocab, and not needed to decode

    def _processor(self):
        if self._sp is None:
            import sentencepiece

            proto = build_model_proto(*self._args)
            sp = sentencepiece.SentencePieceProcessor()
            try:
                sp.LoadFromSerializedProto(proto)
            except (RuntimeError, UnicodeDecodeError) as e:  # a rule check_pieces does not know
                # sentencepiece's message quotes the piece, and fails to decode when that is not UTF-8
                reason = str(e).removeprefix("INTERNAL: ") if isinstance(e, RuntimeError) else "a piece is not UTF-8"
                raise GGUFError(f"tokenizer.ggml.tokens: sentencepiece refuses this vocabulary: {reason}") from None
            self._sp = sp
        return self._sp

    def encode(self, text: str, out: list[int]) -> None:
        """`text` must already have spaces escaped as U+2581."""
        if text:
            out.extend(self._processor().EncodeAsIds(text))
