"""pyllm: run GGUF language models locally with quantized numba kernels.

    import pyllm
    model = pyllm.load("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = model.tokenize("The capital of France is")
    for t in model.generate(ids, max_tokens=8): ...
"""
from .errors import PyllmError
from .model import Model, load, load_tokenizer

__all__ = ["Model", "PyllmError", "load", "load_tokenizer"]
__version__ = "0.1.0"
