"""Incremental detokenizer: feed token ids one at a time, get back only whole UTF-8 characters.

A token may end in the middle of a multi-byte character (byte-level BPE tokens, SPM <0xNN> byte
fallback tokens): those bytes are held until the character is complete, so no U+FFFD ever appears for
a character split across tokens. Bytes that can never become valid UTF-8 are replaced at once.

Leading space: llama.cpp streams each token's piece as token_to_piece(lstrip=0) (llama-cli and
llama-server both), so " Paris" after "The capital of France is" keeps its space; that is the default.
`lstrip_first=True` instead reproduces llama_detokenize on a whole sequence: for vocabs with
add_space_prefix (SentencePiece) one leading space of the first piece is dropped, so the concatenated
stream equals tokenizer.decode(ids) (apart from clean_up_tokenization_spaces, which llama.cpp does not
apply while streaming either).
"""

from __future__ import annotations

import codecs


class StreamDecoder:
    def __init__(self, tokenizer, *, special: bool = True, lstrip_first: bool = False):
        self._tok = tokenizer
        self._special = special
        self._strip = lstrip_first and tokenizer.add_space_prefix
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        piece = self._tok.token_bytes(int(token_id), self._special)
        if self._strip:
            self._strip = False
            if piece.startswith(b" "):
                piece = piece[1:]
        return self._dec.decode(piece)

    def flush(self) -> str:
        """Whatever is still held (an incomplete character comes out as U+FFFD); resets the decoder."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

    def pending(self) -> bytes:
        """Bytes held back because they do not yet form a whole character."""
        return self._dec.getstate()[0]
