"""qwen2: Qwen2 / Qwen2.5. Llama with biases on Q/K/V (found by tensor name) and NeoX-style RoPE."""
from .config import read_hparams

REQUIRED = ("attn_q.bias", "attn_k.bias", "attn_v.bias")


def config(meta, path):
    return read_hparams(meta, path, rope_neox=True)
