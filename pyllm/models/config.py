"""ModelConfig: the hyper-parameters the forward pass needs, read from a GGUF's `{arch}.*` metadata."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import GGUFError


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    d_model: int
    n_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_vocab: int
    ctx_train: int
    norm_eps: float
    rope_dim: int
    rope_neox: bool  # rotate (x[i], x[i+d/2]) pairs (NeoX) instead of adjacent pairs
    activation: str  # "silu" (SwiGLU) or "gelu" (GeGLU, tanh approximation)
    embed_scale: float  # token embeddings are multiplied by this (Gemma: sqrt(d_model))
    attn_scale: float  # attention scores = q.k * attn_scale
    layer_window: tuple[int, ...]  # per layer: sliding-window size, 0 = global attention
    layer_rope_base: tuple[float, ...]  # per layer RoPE base (Gemma 3: local layers use their own)
    layer_rope_scale: tuple[float, ...]  # per layer position multiplier (linear RoPE scaling: 1/factor)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def read_hparams(meta: dict, path: str, **arch_defaults) -> ModelConfig:
    """The standard `{arch}.*` keys, checked for sanity; `arch_defaults` holds what a GGUF does not state
    (NeoX RoPE, activation, embedding scale, sliding-window pattern, ...) as the architecture file decides."""
    arch = meta.get("general.architecture", "")

    def get(key, default=None, kind=int):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{path}: metadata {arch}.{key} is missing")
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or (kind is int and value != int(value))):
            raise GGUFError(f"{path}: metadata {arch}.{key} is {value!r}, expected a finite number")
        return kind(value)

    n_layers = get("block_count")
    d_model = get("embedding_length")
    n_heads = get("attention.head_count")
    n_kv_heads = get("attention.head_count_kv", n_heads)
    for key, value in (("block_count", n_layers), ("embedding_length", d_model),
                       ("attention.head_count", n_heads), ("attention.head_count_kv", n_kv_heads)):
        if value <= 0 or value > 1 << 20:
            raise GGUFError(f"{path}: metadata {arch}.{key} is {value}, expected a positive size")
    if n_heads % n_kv_heads:
        raise GGUFError(f"{path}: {n_heads} attention heads do not divide into {n_kv_heads} key/value heads")
    if f"{arch}.attention.key_length" not in meta and d_model % n_heads:
        raise GGUFError(f"{path}: embedding size {d_model} is not a multiple of the head count {n_heads}")
    head_dim = get("attention.key_length", d_model // n_heads)
    if not 0 < head_dim <= 1 << 16:
        raise GGUFError(f"{path}: attention head size {head_dim} (metadata {arch}.attention.key_length), "
                        f"expected a positive size")
    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = get("vocab_size", len(tokens) if tokens is not None else None)
    window = get("attention.sliding_window", 0)
    rope_base = get("rope.freq_base", 10000.0, float)
    if window < 0 or rope_base <= 0:
        raise GGUFError(f"{path}: metadata {arch}.attention.sliding_window {window} or {arch}.rope.freq_base "
                        f"{rope_base} is out of range")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = get("rope.scaling.factor", 1.0, float)
    if scaling not in ("none", "linear") and factor != 1.0:
        from ..errors import UnsupportedError
        raise UnsupportedError(f"{path}: RoPE scaling {scaling!r} is not supported")
    rope_scale = 1.0 / factor if scaling == "linear" and factor > 0 else 1.0

    # which layers use the sliding window: a pattern of n (n-1 local layers, then one global), 0 = all local
    pattern = arch_defaults.pop("swa_pattern", 0)
    local_base = arch_defaults.pop("rope_base_local", rope_base)
    local = [window > 0 and (pattern == 0 or il % pattern < pattern - 1) for il in range(n_layers)]
    fields = dict(
        arch=arch, n_layers=n_layers, d_model=d_model, n_ff=get("feed_forward_length"),
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, n_vocab=n_vocab,
        ctx_train=get("context_length", 4096), norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float),
        rope_dim=get("rope.dimension_count", head_dim), rope_neox=False, activation="silu",
        embed_scale=1.0, attn_scale=1.0 / math.sqrt(head_dim),
        layer_window=tuple(window if is_local else 0 for is_local in local),
        layer_rope_base=tuple(local_base if is_local else rope_base for is_local in local),
        layer_rope_scale=tuple(1.0 if is_local else rope_scale for is_local in local),
    )
    fields.update(arch_defaults)
    if fields["ctx_train"] <= 0:
        raise GGUFError(f"{path}: metadata {arch}.context_length is {fields['ctx_train']}, expected > 0")
    if not 0 < fields["rope_dim"] <= head_dim or fields["rope_dim"] % 2:
        raise GGUFError(f"{path}: RoPE dimension {fields['rope_dim']} does not fit head size {head_dim}")
    return ModelConfig(**fields)
