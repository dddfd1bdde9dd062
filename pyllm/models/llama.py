"""llama: Llama 1/2/3, Mistral, SmolLM2, TinyLlama. The baseline decoder: RMSNorm, SwiGLU, adjacent-pair RoPE
(llama.cpp's converter permutes Q/K for it), optional output.weight (else tied to token_embd)."""
from .config import read_hparams

REQUIRED = ()


def config(meta, path):
    return read_hparams(meta, path)
