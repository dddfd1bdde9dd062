"""Byte-level BPE (tokenizer.ggml.model == "gpt2"), as llama.cpp's llm_tokenizer_bpe_session.

Per pre-tokenizer word: map its UTF-8 bytes to the GPT-2 byte-to-unicode alphabet, then merge adjacent
symbols by merge rank (lowest rank first, leftmost first on ties, one bigram at a time), exactly the
priority-queue order llama.cpp uses. Symbols that are not tokens fall back to single-byte tokens.
"""

from __future__ import annotations

import heapq

from ..errors import GGUFError
from . import pretokenize


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable code point map (llama.cpp unicode_byte_to_utf8_map)."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = [""] * 256
    for b in keep:
        table[b] = chr(b)
    n = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {ch: b for b, ch in enumerate(BYTE_TO_UNICODE)}
# latin-1 decoded bytes -> GPT-2 alphabet, for str.translate
_BYTE_ENCODE_TABLE = {b: ch for b, ch in enumerate(BYTE_TO_UNICODE)}


def byte_encode(word: str) -> str:
    """UTF-8 bytes of `word` spelled in the GPT-2 byte alphabet."""
    return word.encode("utf-8", "surrogatepass").decode("latin-1").translate(_BYTE_ENCODE_TABLE)


def byte_decode(text: str) -> bytes:
    """Inverse of byte_encode for a token text; llama.cpp's llama_decode_text (incl. its [UNK_BYTE_..] quirk)."""
    try:
        return bytes(UNICODE_TO_BYTE[ch] for ch in text)
    except KeyError:
        out = bytearray()
        for ch in text:
            b = UNICODE_TO_BYTE.get(ch)
            if b is not None:
                out.append(b)
            else:
                u = ch.encode("utf-8", "surrogatepass")
                out += b"[UNK_BYTE_0x" + u.hex().encode() + text.encode("utf-8", "surrogatepass") + b"]"
        return bytes(out)


class BPEEngine:
    """Encodes raw text fragments (no special tokens inside) to ids."""

    _CACHE_MAX = 200_000

    def __init__(self, token_to_id: dict[str, int], merges: list[str], pre: str):
        if pre not in pretokenize.PRE_TOKENIZERS:
            raise ValueError(pre)
        regexes, self.ignore_merges, _, _ = pretokenize.PRE_TOKENIZERS[pre]
        self.patterns = pretokenize.compile_all(regexes)
        self.token_to_id = token_to_id
        merges = [str(m) for m in merges] if not isinstance(merges, list) else merges
        # rank lookup keyed by the merge string itself ("left right"): byte-level token texts never
        # contain a space, so the key is unambiguous. First occurrence wins, as std::map::emplace.
        n = len(merges)
        self.ranks: dict[str, int] = dict(zip(merges, range(n)))
        if len(self.ranks) != n:
            self.ranks = dict(zip(reversed(merges), range(n - 1, -1, -1)))
        self._check_merges(merges)
        self._cache: dict[str, tuple[int, ...]] = {}

    def _check_merges(self, merges: list[str]) -> None:
        """GGUFError when a merge is not "left right" with both sides in the vocabulary."""
        items = " ".join(merges).split(" ")  # byte-level tokens contain no space: 2 items per merge
        if len(items) != 2 * len(merges) or "" in items:
            items = []
            for i, m in enumerate(merges):
                pos = m.find(" ", 1)  # llama.cpp splits at the first space after the first char
                if pos < 0:
                    raise GGUFError(f"tokenizer.ggml.merges[{i}] = {m!r} is not two tokens separated by a space")
                items += (m[:pos], m[pos + 1:])
        missing = set(items).difference(self.token_to_id)
        if missing:
            for i in range(len(merges)):
                a, b = items[2 * i], items[2 * i + 1]
                if a in missing or b in missing:
                    name = a if a in missing else b
                    raise GGUFError(
                        f"tokenizer.ggml.merges[{i}] = {merges[i]!r} names unknown token {name!r} "
                        f"({len(missing)} unknown merge operand(s) in all)"
                    )

    def encode(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for word in pretokenize.split(text, self.patterns):
            ids = cache.get(word)
            if ids is None:
                ids = self._encode_word(byte_encode(word))
                if len(cache) >= self._CACHE_MAX:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def _encode_word(self, w: str) -> tuple[int, ...]:
        t2i = self.token_to_id
        if self.ignore_merges:
            tid = t2i.get(w)
            if tid is not None:
                return (tid,)
        syms = list(w)
        n = len(syms)
        if n > 1:
            ranks = self.ranks
            prev = list(range(-1, n - 1))
            nxt = list(range(1, n + 1))
            nxt[-1] = -1
            heap = []
            for i in range(n - 1):
                r = ranks.get(syms[i] + " " + syms[i + 1])
                if r is not None:
                    heap.append((r, i, i + 1, syms[i] + syms[i + 1]))
            heapq.heapify(heap)
            while heap:
                _, left, right, text = heapq.heappop(heap)
                ls, rs = syms[left], syms[right]
                if not ls or not rs or ls + rs != text:
                    continue  # outdated bigram
                syms[left] = text
                syms[right] = ""
                nx = nxt[right]
                nxt[left] = nx
                if nx != -1:
                    prev[nx] = left
                p = prev[left]
                if p != -1:
                    r = ranks.get(syms[p] + " " + text)
                    if r is not None:
                        heapq.heappush(heap, (r, p, left, syms[p] + text))
                if nx != -1:
                    r = ranks.get(text + " " + syms[nx])
                    if r is not None:
                        heapq.heappush(heap, (r, left, nx, text + syms[nx]))
        out = []
        for s in syms:
            if not s:
                continue
            tid = t2i.get(s)
            if tid is not None:
                out.append(tid)
            else:
                # llama.cpp looks up each UTF-8 byte of the symbol as a one-byte string
                for b in s.encode("utf-8", "surrogatepass"):
                    if b < 0x80:
                        tid = t2i.get(chr(b))
                        if tid is not None:
                            out.append(tid)
        return tuple(out)
