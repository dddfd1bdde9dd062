"""Tokenizers that match llama.cpp: byte-level BPE ("gpt2") and SentencePiece ("llama") GGUF vocabularies.

    tok = Tokenizer.from_metadata(pyllm.gguf.read_metadata(path))
    ids = tok.encode(text, add_special=True, parse_special=True)
    text = tok.decode(ids)
    dec = StreamDecoder(tok); for i in ids: print(dec.feed(i), end=""); print(dec.flush())
"""

from .stream import StreamDecoder
from .vocab import Tokenizer

__all__ = ["Tokenizer", "StreamDecoder"]
