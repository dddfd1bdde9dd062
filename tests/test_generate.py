"""stream_text: whole UTF-8 characters only, stop strings cut exactly (even across tokens)."""
from pyllm.generate import stream_text


class ByteTokenizer:
    """Token i is the single byte i: multi-byte characters always arrive split."""

    def token_bytes(self, i, special=True):
        return bytes([i])

    def decode(self, ids, **kw):
        return bytes(ids).decode("utf-8", errors="replace")


def ids(text):
    return list(text.encode("utf-8"))


def test_multibyte_characters_are_never_split():
    pieces = list(stream_text(ByteTokenizer(), ids("héllo 世界 🙂")))
    assert "".join(pieces) == "héllo 世界 🙂"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_across_tokens_is_cut_and_not_printed():
    pieces = list(stream_text(ByteTokenizer(), ids("The answer is 42.\nUser: more"), stop=["\nUser:"]))
    assert "".join(pieces) == "The answer is 42."


def test_stop_consumes_no_more_tokens_than_needed():
    seen = []

    def tokens():
        for t in ids("abcSTOPdef"):
            seen.append(t)
            yield t

    assert "".join(stream_text(ByteTokenizer(), tokens(), stop=["STOP"])) == "abc"
    assert bytes(seen) == b"abcSTOP"


def test_no_stop_match_prints_everything():
    assert "".join(stream_text(ByteTokenizer(), ids("almost STO"), stop=["STOP"])) == "almost STO"
