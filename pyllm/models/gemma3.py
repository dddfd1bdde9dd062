"""gemma3: Gemma 3 text models.

What the GGUF states is read from it; the rest follows llama.cpp's conventions for the architecture:
5 sliding-window layers then 1 global layer, local layers with RoPE base 10000, queries scaled by
1/sqrt(head_dim), embeddings by sqrt(d_model), GeGLU, RMSNorm weights used as stored (the converter folded
Gemma's 1 + w into them), Q/K norms and post-norms around attention and FFN (found by tensor name).
"""
import math

from .config import read_hparams

REQUIRED = ("attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight", "post_ffw_norm.weight")


def config(meta, path):
    d_model = meta.get("gemma3.embedding_length", 1)  # read_hparams checks it
    return read_hparams(meta, path, rope_neox=True, activation="gelu", embed_scale=math.sqrt(abs(d_model)),
                        swa_pattern=6, rope_base_local=10000.0)
