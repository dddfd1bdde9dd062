"""pyllm: run GGUF language models locally with quantized numba kernels.

    import pyllm
    model = pyllm.load("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = model.tokenize("The capital of France is")
    for t in model.generate(ids, max_tokens=8): ...
"""
from .errors import PyllmError

__all__ = ["Model", "PyllmError", "load", "load_tokenizer"]
__version__ = "0.1.0"


def __getattr__(name):
    """Model, load and load_tokenizer are imported on first use: they bring numba, which commands such as
    `pyllm list`, `pull` or `--help` do not need (0.2 s of start-up)."""
    if name in ("Model", "load", "load_tokenizer"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'pyllm' has no attribute {name!r}")
