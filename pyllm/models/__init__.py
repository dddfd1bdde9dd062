"""Architectures pyllm runs: GGUF `general.architecture` -> module with `config(meta, path)` and `REQUIRED`
(per-layer tensors beyond the llama baseline). Adding an architecture = one module + one entry here."""
from . import gemma3, llama, qwen2

ARCHS = {"llama": llama, "qwen2": qwen2, "gemma3": gemma3}
