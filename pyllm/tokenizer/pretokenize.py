"""Pre-tokenizer regexes of llama.cpp's BPE vocabularies, reproduced exactly.

llama.cpp (src/unicode.cpp, unicode_regex_split) never runs these regexes on the raw text. It first
"collapses" the text: every code point >= 128 becomes one byte standing for its Unicode category
(whitespace -> 0x0B, \\p{N} -> 0xD1, \\p{L} -> 0xD2, \\p{P} -> 0xD3, \\p{M} -> 0xD4, \\p{S} -> 0xD5,
anything else -> 0xD0), ASCII stays as is, and \\p{X} in the regex becomes a class of that byte plus
the ASCII members of X. The regexes then run with ECMAScript std::regex, whose \\s is ASCII-only.
The GPT-2 and Llama-3 regexes go through hand-written matchers instead, which behave exactly like
the regex over the same category flags. We do the same collapse with str.translate and run Python's
`re` over it, writing \\s as an explicit ASCII class (Python's \\s would also match \\x1c-\\x1f).

Several regexes apply in sequence: each one splits the pieces the previous one produced (matches and
the gaps between them both become pieces), never across a piece boundary.
"""

from __future__ import annotations

import re
import unicodedata

# Unicode White_Space property (PropList.txt): llama.cpp's unicode_set_whitespace.
_WHITESPACE = frozenset(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680]
    + list(range(0x2000, 0x200B))
    + [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)
_CATEGORY_BYTE = {"N": "\xd1", "L": "\xd2", "P": "\xd3", "M": "\xd4", "S": "\xd5"}


class _CollapseTable(dict):
    """str.translate table: code point -> collapsed category char, filled lazily and cached."""

    def __missing__(self, cp: int) -> str:
        if cp < 128:
            ch = chr(cp)
        elif cp in _WHITESPACE:
            ch = "\x0b"
        else:
            ch = _CATEGORY_BYTE.get(unicodedata.category(chr(cp))[0], "\xd0")
        self[cp] = ch
        return ch


_COLLAPSE = _CollapseTable()


def collapse(text: str) -> str:
    """One char per code point, same length as `text`: ASCII kept, the rest mapped to category bytes."""
    if text.isascii():
        return text
    return text.translate(_COLLAPSE)


# Building blocks (collapsed alphabet). WS is C's isspace() set; non-ASCII whitespace is already \x0b.
_WS = r"\t\n\x0b\x0c\r "
_N = r"\xd10-9"
_L = r"\xd2A-Za-z"
_P = r"\xd3!-#%-*,-/:-;?-@\[-\]_{}"
_S = r"\xd5$+<-=>^`|"

_CONTRACTIONS_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)  (+ \s+ as the custom matcher does)
GPT2 = (
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{_L}]+| ?[{_N}]+| ?[^{_WS}{_L}{_N}]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
# (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
LLAMA3 = (
    rf"{_CONTRACTIONS_CI}|[^\r\n{_L}{_N}]?[{_L}]+|[{_N}]{{1,3}}| ?[^{_WS}{_L}{_N}]+[\r\n]*"
    rf"|[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
# Qwen2: as Llama-3 but single digits.
QWEN2 = (
    rf"{_CONTRACTIONS_CI}|[^\r\n{_L}{_N}]?[{_L}]+|[{_N}]| ?[^{_WS}{_L}{_N}]+[\r\n]*"
    rf"|[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
# Seed-Coder: single digits, no [\r\n] inside the punctuation run.
SEED_CODER = (
    rf"{_CONTRACTIONS_CI}|[^\r\n{_L}{_N}]?[{_L}]+|[{_N}]| ?[^{_WS}{_L}{_N}\r\n]+"
    rf"|[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
DIGIT = rf"[{_N}]"
DIGITS = rf"[{_N}]+"
DIGITS3 = r"[0-9][0-9][0-9]"
# default: [\p{P}\$\+<=>\^~\|]+ ;  falcon adds `
PUNCT_DEFAULT = rf"[{_P}$+<=>^~|]+"
PUNCT_FALCON = rf"[{_P}$+<=>^~|`]+"

# tokenizer.ggml.pre -> (regex list, ignore_merges, default add_bos, clean_spaces), as llama-vocab.cpp.
_GPT2_FAMILY = ([GPT2], False, False, True)
PRE_TOKENIZERS: dict[str, tuple[list[str], bool, bool, bool]] = {
    "default": ([PUNCT_DEFAULT, GPT2, DIGITS, DIGITS3], False, False, True),
    "gpt-2": _GPT2_FAMILY,
    "phi-2": _GPT2_FAMILY,
    "jina-es": _GPT2_FAMILY,
    "jina-de": _GPT2_FAMILY,
    "gigachat": _GPT2_FAMILY,
    "jina-v2-es": _GPT2_FAMILY,
    "jina-v2-de": _GPT2_FAMILY,
    "a.x-4.0": _GPT2_FAMILY,
    "mellum": _GPT2_FAMILY,
    "mpt": _GPT2_FAMILY,
    "olmo": _GPT2_FAMILY,
    "jais": _GPT2_FAMILY,
    "exaone4": _GPT2_FAMILY,
    "trillion": ([GPT2], False, False, False),
    "granite-docling": ([GPT2], False, False, False),
    "llama3": ([LLAMA3], True, True, True),
    "llama-v3": ([LLAMA3], True, True, True),
    "llama-bpe": ([LLAMA3], True, True, True),
    "falcon3": ([LLAMA3], True, True, True),
    "falcon-h1": ([LLAMA3], True, True, True),
    "pixtral": ([LLAMA3], True, True, True),
    "midm-2.0": ([LLAMA3], True, True, True),
    "lfm2": ([LLAMA3], True, True, True),
    "dbrx": ([LLAMA3], False, False, True),
    "smaug-bpe": ([LLAMA3], False, False, True),
    "qwen2": ([QWEN2], False, False, False),
    "deepseek-r1-qwen": ([QWEN2], False, False, False),
    "megrez": ([QWEN2], False, False, True),
    "stablelm2": ([QWEN2], False, False, True),
    "grok-2": ([QWEN2], False, False, False),
    "seed-coder": ([SEED_CODER], False, False, False),
    "starcoder": ([DIGIT, GPT2], False, False, True),
    "refact": ([DIGIT, GPT2], False, False, True),
    "codeshell": ([DIGIT, GPT2], False, False, True),
    "exaone": ([DIGIT, GPT2], False, False, True),
    "minerva-7b": ([DIGIT, GPT2], False, False, True),
    "mellum2": ([DIGIT, GPT2], False, False, True),
    "smollm": ([DIGIT, GPT2], False, False, False),
    "command-r": ([DIGIT, GPT2], False, False, False),
    "falcon": ([PUNCT_FALCON, GPT2, DIGITS3], False, False, True),
}

_compiled: dict[str, re.Pattern] = {}


def compile_all(regexes: list[str]) -> list[re.Pattern]:
    out = []
    for r in regexes:
        p = _compiled.get(r)
        if p is None:
            p = _compiled[r] = re.compile(r)
        out.append(p)
    return out


def split(text: str, patterns: list[re.Pattern]) -> list[str]:
    """Split `text` into pre-tokenizer words (code-point strings), as llama.cpp's unicode_regex_split."""
    if not text:
        return []
    col = collapse(text)
    bounds = [0, len(text)]  # piece boundaries, ascending
    for pat in patterns:
        new = [0]
        for i in range(len(bounds) - 1):
            start, end = bounds[i], bounds[i + 1]
            pos = start
            for m in pat.finditer(col, start, end):
                s, e = m.span()
                if s > pos:
                    new.append(s)
                if e > s:
                    new.append(e)
                    pos = e
            if end > pos:
                new.append(end)
        bounds = new
    return [text[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
