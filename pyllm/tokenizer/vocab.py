"""The Tokenizer: a GGUF vocabulary with llama.cpp's special-token handling, BOS/EOS and EOG rules.

What follows llama.cpp (src/llama-vocab.cpp) and how:
- token attributes from tokenizer.ggml.token_type; texts such as "<|im_end|>" or "<end_of_turn>" are
  promoted to CONTROL and collected as end-of-generation tokens the way llama_vocab::impl::load does;
- special-token partitioning (tokenizer_st_partition): every CONTROL / USER_DEFINED / UNKNOWN token,
  longest text first, is cut out of the raw text wherever it occurs before any BPE/SPM runs; without
  parse_special only USER_DEFINED tokens are cut out (so Gemma's whitespace-run and "\\n" tokens always
  are, and "<start_of_turn>" is only with parse_special);
- SPM fragments get a leading space when add_space_prefix and the previous fragment was a token;
- decode() is llama_detokenize(remove_special=False, unparse_special=True) by default: control tokens
  render as their text, SPM drops the leading space of the first piece when add_space_prefix, and
  clean_up_tokenization_spaces applies for the vocabs that set it (gpt-2, llama3 families).
"""

from __future__ import annotations

import codecs

import numpy as np

from ..errors import GGUFError, UnsupportedError
from . import pretokenize
from .bpe import BPEEngine, byte_decode
from .spm import BYTE_PIECES, SPMEngine

# llama_token_attr bits
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5

# GGUF token_type (sentencepiece numbering) -> attr
_TYPE_TO_ATTR = np.array(
    [ATTR_UNDEFINED, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE],
    dtype=np.int32,
)

_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")

_K = "tokenizer.ggml."


def _llama_replace(err: UnicodeDecodeError):
    # llama.cpp's unicode_cpts_from_utf8 replaces an invalid sequence one byte at a time
    return "\ufffd", err.start + 1


codecs.register_error("pyllm-llama-replace", _llama_replace)


def _utf8(s: str) -> bytes:
    """Bytes of a token text; GGUF strings that were not valid UTF-8 arrive surrogate-escaped."""
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return s.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return s.encode("utf-8", "surrogatepass")


_UTF8_LEN = (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)  # llama.cpp unicode_len_utf8, by high nibble


def _valid_text(text: str) -> str:
    """Input text as llama.cpp sees it: bytes that are not UTF-8 become U+FFFD, one per byte."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _utf8(text).decode("utf-8", "pyllm-llama-replace")


def _check_byte_tokens(tokens: list[str], attrs: np.ndarray) -> None:
    """GGUFError for a BYTE token that is not <0xNN>: its byte is read from that text when decoding."""
    for i in np.nonzero(attrs & ATTR_BYTE)[0].tolist():  # a few hundred at most in real vocabularies
        if tokens[i] not in BYTE_PIECES:
            shown = repr(tokens[i][:40]) + ("..." if len(tokens[i]) > 40 else "")
            raise GGUFError(f"tokenizer.ggml.tokens[{i}] = {shown} has token_type BYTE but is not of the form "
                            f"<0xNN> (two upper-case hex digits)")


def _get_array(meta: dict, key: str, n: int, dtype) -> np.ndarray | None:
    v = meta.get(key)
    if v is None:
        return None
    arr = np.asarray(v)
    if arr.ndim != 1 or len(arr) != n:
        raise GGUFError(f"{key} has {arr.size} entries but tokenizer.ggml.tokens has {n}")
    try:
        return arr.astype(dtype, copy=False)
    except (TypeError, ValueError):
        raise GGUFError(f"{key} is not a numeric array") from None


class Tokenizer:
    """Text <-> token ids for a GGUF vocabulary, matching llama.cpp's llama_tokenize/llama_detokenize."""

    def __init__(self):
        raise TypeError("use Tokenizer.from_metadata(meta)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_metadata(cls, meta: dict) -> "Tokenizer":
        self = object.__new__(cls)
        self._load(meta)
        return self

    def _load(self, meta: dict) -> None:
        model = meta.get(_K + "model")
        if model is None:
            raise GGUFError("no tokenizer.ggml.model in the metadata: this GGUF has no vocabulary")
        if model not in ("gpt2", "llama"):
            raise UnsupportedError(f"unsupported tokenizer model {model!r} (supported: 'gpt2' BPE, 'llama' SentencePiece)")
        self.model = model
        tokens = meta.get(_K + "tokens")
        if tokens is None or len(tokens) == 0:
            raise GGUFError("tokenizer.ggml.tokens is missing or empty")
        tokens = [str(t) for t in tokens] if not isinstance(tokens, list) else tokens
        n = len(tokens)
        token_to_id = dict(zip(tokens, range(n)))
        if "" in token_to_id:  # llama.cpp renames empty entries
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
            token_to_id = dict(zip(tokens, range(n)))
        self._tokens = tokens
        self.n_vocab = n
        if len(token_to_id) != n:
            seen: dict[str, int] = {}
            for i, t in enumerate(tokens):
                if t in seen:
                    raise GGUFError(f"duplicate token in vocabulary: {t!r} has ids {seen[t]} and {i}")
                seen[t] = i
        self._token_to_id = token_to_id

        scores = _get_array(meta, _K + "scores", n, np.float32)
        types = _get_array(meta, _K + "token_type", n, np.int32)
        if types is None:
            attrs = np.full(n, ATTR_NORMAL, dtype=np.int32)
        else:
            t = np.where((types >= 0) & (types < len(_TYPE_TO_ATTR)), types, 0)
            attrs = _TYPE_TO_ATTR[t]
        self._attrs = attrs  # int32[n], llama_token_attr bits

        # defaults per tokenizer model (llama_vocab::impl::load)
        pre = meta.get(_K + "pre") or ""
        ids = {"bos": None, "eos": None, "unk": None, "sep": None, "pad": None, "mask": None,
               "eot": None, "eom": None, "fim_pre": None, "fim_suf": None, "fim_mid": None,
               "fim_pad": None, "fim_rep": None, "fim_sep": None}
        if model == "llama":
            ids.update(bos=1, eos=2, unk=0)
            add_space_prefix, add_bos, add_eos, clean_spaces = True, True, False, False
            self.pre = pre
        else:
            ids.update(bos=11, eos=11)
            if not pre:
                pre = "default"  # llama.cpp warns and uses the default pre-tokenizer
            if pre not in pretokenize.PRE_TOKENIZERS:
                raise UnsupportedError(f"unsupported BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre)")
            _, _, add_bos, clean_spaces = pretokenize.PRE_TOKENIZERS[pre]
            add_space_prefix, add_eos = False, False
            self.pre = pre
        for k in ids:  # defaults outside the vocab are disabled
            if ids[k] is not None and ids[k] >= n:
                ids[k] = None
        keys = {"bos": "bos_token_id", "eos": "eos_token_id", "eot": "eot_token_id", "eom": "eom_token_id",
                "unk": "unknown_token_id", "sep": "seperator_token_id", "pad": "padding_token_id",
                "mask": "mask_token_id", "fim_pre": "fim_pre_token_id", "fim_suf": "fim_suf_token_id",
                "fim_mid": "fim_mid_token_id", "fim_pad": "fim_pad_token_id", "fim_rep": "fim_rep_token_id",
                "fim_sep": "fim_sep_token_id"}
        for k, key in keys.items():
            v = meta.get(_K + key)
            if v is None:
                continue
            v = int(v)
            if not 0 <= v < n:
                if k in ("bos", "eos"):
                    raise GGUFError(f"tokenizer.ggml.{key} = {v} is outside the vocabulary (0..{n - 1})")
                continue  # llama.cpp: "bad special token", keeps the default
            ids[k] = v
        v = meta.get(_K + "add_space_prefix")
        if v is not None:
            add_space_prefix = bool(v)
        v = meta.get(_K + "add_bos_token")
        if v is not None:
            add_bos = bool(v)
        v = meta.get(_K + "add_eos_token")
        if v is not None:
            add_eos = bool(v)
        if add_bos and ids["bos"] is None:
            raise GGUFError("tokenizer.ggml.add_bos_token is true, but tokenizer.ggml.bos_token_id is not set")
        if add_eos and ids["eos"] is None:
            raise GGUFError("tokenizer.ggml.add_eos_token is true, but tokenizer.ggml.eos_token_id is not set")
        self.add_space_prefix = add_space_prefix
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.clean_spaces = clean_spaces

        # auto-detect EOT/EOM/FIM tokens by text; such tokens become CONTROL (llama.cpp does the same)
        def find(texts):
            for s in texts:
                i = token_to_id.get(s)
                if i is not None:
                    return i
            return None

        def make_control(i):
            attrs[i] |= ATTR_CONTROL

        for k, texts in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), *_FIM_TEXTS.items()):
            if ids[k] is None:
                i = find(texts)
                if i is not None:
                    ids[k] = i
                    make_control(i)
        # control tokens whose text says "unused"
        for i in np.nonzero(attrs & ATTR_CONTROL)[0].tolist():
            if "unused" in tokens[i]:
                attrs[i] |= ATTR_UNUSED

        eog = set()
        for k in ("fim_pad", "fim_rep", "fim_sep"):
            if ids[k] is not None:
                eog.add(ids[k])
        for s in _EOG_TEXTS:
            i = token_to_id.get(s)
            if i is not None:
                eog.add(i)
                make_control(i)
        for s in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always rendered
            i = token_to_id.get(s)
            if i is not None:
                attrs[i] = ATTR_USER_DEFINED
        for k in ("eos", "eot", "eom"):
            if ids[k] is not None:
                eog.add(ids[k])
        texts_in_eog = {tokens[i]: i for i in eog}
        if "<|end|>" in texts_in_eog and (
            ("<|return|>" in texts_in_eog and ("<|call|>" in texts_in_eog or "<|calls|>" in texts_in_eog))
            or (("<|call|>" in texts_in_eog or "<|calls|>" in texts_in_eog) and "<|flush|>" in texts_in_eog)
        ):
            i = texts_in_eog["<|end|>"]
            eog.discard(i)
            attrs[i] = ATTR_USER_DEFINED
        if "<|tool_response>" in texts_in_eog and "</s>" in texts_in_eog:
            i = texts_in_eog["</s>"]
            eog.discard(i)
            attrs[i] = ATTR_NORMAL

        self._ids = ids
        self.bos_id = ids["bos"]
        self.eos_id = ids["eos"]
        self.eot_id = ids["eot"]
        self.unk_id = ids["unk"]
        self.pad_id = ids["pad"]
        self.eog_ids = frozenset(eog)

        # special tokens for partitioning, longest text first. llama.cpp uses std::sort (unstable) on
        # length only; equal-length ties keep id order here.
        special = np.nonzero(attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))[0].tolist()
        special.sort(key=lambda i: -len(_utf8(tokens[i])))
        self._special = [(tokens[i], i, bool(attrs[i] & (ATTR_CONTROL | ATTR_UNKNOWN))) for i in special]

        _check_byte_tokens(tokens, attrs)
        if model == "gpt2":
            merges = meta.get(_K + "merges")
            if merges is None:
                raise GGUFError("BPE vocabulary without tokenizer.ggml.merges")
            self._engine = BPEEngine(token_to_id, merges, pre)
        else:
            if scores is None:
                scores = np.zeros(n, dtype=np.float32)
            self._engine = SPMEngine(tokens, scores, (attrs & ATTR_BYTE) != 0, ids["unk"])
        self._piece_cache: dict[tuple[int, bool], bytes] = {}

    # ------------------------------------------------------------------ queries
    def token_text(self, token_id: int) -> str:
        """The vocabulary entry as stored in the GGUF (GPT-2 alphabet for BPE, U+2581 for SPM)."""
        return self._tokens[token_id]

    def token_to_id(self, text: str) -> int | None:
        return self._token_to_id.get(text)

    def token_attr(self, token_id: int) -> int:
        return int(self._attrs[token_id])

    def is_control(self, token_id: int) -> bool:
        return bool(self._attrs[token_id] & ATTR_CONTROL)

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos}, eog_ids={sorted(self.eog_ids)})")

    # ------------------------------------------------------------------ encode
    def _partition(self, text: str, parse_special: bool) -> list:
        """llama.cpp tokenizer_st_partition: list of str fragments and int token ids."""
        frags: list = [text]
        for tok, tid, is_ctrl in self._special:
            if is_ctrl and not parse_special:
                continue
            if tok not in text:  # cheap global test; fragments are substrings of text
                continue
            new: list = []
            for f in frags:
                if type(f) is not str or tok not in f:
                    new.append(f)
                    continue
                parts = f.split(tok)
                for j, p in enumerate(parts):
                    if j:
                        new.append(tid)
                    if p:
                        new.append(p)
            frags = new
        return frags

    def encode(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama_tokenize(text, add_special, parse_special)."""
        out: list[int] = []
        if self.model == "gpt2":
            text = _valid_text(text)  # llama.cpp's BPE pre-tokenizer sees U+FFFD for invalid bytes
        if add_special and self.add_bos:
            out.append(self.bos_id)
        frags = self._partition(text, parse_special) if text else []
        engine = self._engine
        if self.model == "llama":
            prev_special = True
            for f in frags:
                if type(f) is str:
                    if self.add_space_prefix and prev_special:
                        f = " " + f
                    f = f.replace(" ", "\u2581")
                    try:
                        f.encode("utf-8")
                    except UnicodeEncodeError:
                        self._spm_invalid_utf8(f, out)
                    else:
                        engine.encode(f, out)
                    prev_special = False
                else:
                    out.append(f)
                    prev_special = True
        else:
            for f in frags:
                if type(f) is str:
                    engine.encode(f, out)
                else:
                    out.append(f)
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    def _spm_invalid_utf8(self, f: str, out: list[int]) -> None:
        """SPM fragment with (surrogate-escaped) invalid UTF-8, as llama.cpp's SPM session sees it.

        llama.cpp cuts the bytes into symbols by the lead byte's length (unicode_len_utf8); a symbol that
        is not valid UTF-8 can never merge into a token and comes out as byte tokens. The valid stretches
        between such symbols go through sentencepiece as usual.
        """
        raw = _utf8(f)
        t2i = self._token_to_id
        i = run = 0
        n = len(raw)
        while i < n:
            m = min(_UTF8_LEN[raw[i] >> 4], n - i)
            sym = raw[i:i + m]
            try:
                sym.decode("utf-8")
            except UnicodeDecodeError:
                if run < i:
                    self._engine.encode(raw[run:i].decode("utf-8"), out)
                for b in sym:
                    tid = t2i.get(f"<0x{b:02X}>")
                    if tid is not None:
                        out.append(tid)
                run = i + m
            i += m
        if run < n:
            self._engine.encode(raw[run:].decode("utf-8"), out)

    # ------------------------------------------------------------------ decode
    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """Raw bytes of one token, as llama.cpp's token_to_piece(token, lstrip=0, special).

        BPE normal tokens: GPT-2 byte alphabet reversed. SPM normal tokens: U+2581 -> space.
        Byte tokens <0xNN>: that byte. Control/unknown tokens: their text when special, else b"".
        User-defined tokens: their text, always. Unused/undefined tokens: b"".
        """
        key = (token_id, special)
        b = self._piece_cache.get(key)
        if b is None:
            b = self._piece(token_id, special)
            self._piece_cache[key] = b
        return b

    def _piece(self, token_id: int, special: bool) -> bytes:
        if not 0 <= token_id < self.n_vocab:
            raise IndexError(f"token id {token_id} outside the vocabulary (0..{self.n_vocab - 1})")
        attr = int(self._attrs[token_id])
        text = self._tokens[token_id]
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL):
            return _utf8(text) if special else b""
        if attr & ATTR_USER_DEFINED:
            return _utf8(text)
        if attr & ATTR_NORMAL:
            if self.model == "llama":
                return _utf8(text.replace("\u2581", " "))
            return byte_decode(text)
        if attr & ATTR_BYTE:
            return bytes([int(text[3:5], 16)])
        return b""

    def decode_bytes(self, ids, special: bool = True, remove_special: bool = False) -> bytes:
        """llama_detokenize(ids, remove_special, unparse_special=special) as bytes."""
        ids = [int(i) for i in ids]
        remove_space = self.add_space_prefix
        if remove_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if remove_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        parts = []
        for i in ids:
            p = self.token_bytes(i, special)
            if remove_space and p.startswith(b" "):
                p = p[1:]
            remove_space = False
            parts.append(p)
        out = b"".join(parts)
        if self.clean_spaces and out:
            out = _clean_spaces(out)
        return out

    def decode(self, ids, special: bool = True, remove_special: bool = False) -> str:
        """Text of `ids` (invalid UTF-8 replaced by U+FFFD). See decode_bytes."""
        return self.decode_bytes(ids, special, remove_special).decode("utf-8", "replace")


def _clean_spaces(text: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces passes, byte for byte."""
    t = bytearray(text)
    # first pass: " ?", " !", " .", " ,"
    out = bytearray(t[:1])
    for i in range(1, len(t)):
        x = t[i]
        if t[i - 1] == 0x20 and x in b"?!.,":
            out.pop()
        out.append(x)
    t = out
    # second pass: strip single apostrophe between spaces " ' "
    out = bytearray(t[:1])
    i = 1
    n = len(t)
    while i < n:
        x = t[i]
        if x == 0x27 and i + 1 < n and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            out.pop()  # the space before
            i += 1
            t[i] = 0  # llama.cpp overwrites the space after with NUL and skips it
        out.append(x)
        i += 1
    t = out
    # third pass: " 's", " 'm", " 're", " 've"
    out = bytearray(t[:1])
    n = len(t)
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = t[i + 1]
            if x1 in b"sm":
                out.pop()
            elif x1 not in b"td" and i + 2 < n:
                x2 = t[i + 2]
                if (x1 == 0x72 and x2 == 0x65) or (x1 == 0x76 and x2 == 0x65):
                    out.pop()
        out.append(x)
    return bytes(out)
