"""The decoder shared by every architecture, written against the kernels and never against a quant type.

Per-architecture differences are config values (RoPE style, activation, scales, windows) or the presence of
a tensor (biases, Q/K norms, post-norms): weights are kept under their GGUF names, so loading needs no table.
"""
from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType

from ..errors import GGUFError
from ..gguf import GGUFFile
from ..kernels import cpu
from ..kernels.qmatmul import dequantize
from ..quants import QTensor
from .config import ModelConfig

# per-layer tensors every architecture has; optional ones are used when present
LAYER_REQUIRED = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                  "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
LAYER_OPTIONAL = ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_q_norm.weight", "attn_k_norm.weight",
                  "post_attention_norm.weight", "post_ffw_norm.weight")


def _expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes (numpy order: rows, cols) the config implies for each per-layer tensor."""
    return {
        "attn_norm.weight": (c.d_model,), "ffn_norm.weight": (c.d_model,),
        "post_attention_norm.weight": (c.d_model,), "post_ffw_norm.weight": (c.d_model,),
        "attn_q.weight": (c.q_dim, c.d_model), "attn_k.weight": (c.kv_dim, c.d_model),
        "attn_v.weight": (c.kv_dim, c.d_model), "attn_output.weight": (c.d_model, c.q_dim),
        "attn_q.bias": (c.q_dim,), "attn_k.bias": (c.kv_dim,), "attn_v.bias": (c.kv_dim,),
        "attn_q_norm.weight": (c.head_dim,), "attn_k_norm.weight": (c.head_dim,),
        "ffn_gate.weight": (c.n_ff, c.d_model), "ffn_up.weight": (c.n_ff, c.d_model),
        "ffn_down.weight": (c.d_model, c.n_ff),
    }


class Transformer:
    """Weights under their GGUF names and the forward pass.  `backend` is a kernel module (kernels.cpu or
    kernels.cuda) with the same functions; every array operation of the forward pass goes through it, so
    activations and the KV cache can live on a device."""

    def __init__(self, gf: GGUFFile, config: ModelConfig, required: tuple[str, ...] = (), backend=cpu):
        self.config = c = config
        self.backend = backend
        self._gf = gf
        self.token_embd = self._matrix("token_embd.weight", (c.n_vocab, c.d_model))
        self.output_norm = self._vector("output_norm.weight", (c.d_model,))
        # tied output embedding when the file has no separate output.weight
        self.output = (self._matrix("output.weight", (c.n_vocab, c.d_model))
                       if "output.weight" in gf.tensors else self.token_embd)
        shapes = _expected_shapes(c)
        self.layers: list[dict[str, np.ndarray | QTensor]] = []
        for il in range(c.n_layers):
            layer = {}
            for name in LAYER_REQUIRED + LAYER_OPTIONAL:
                full = f"blk.{il}.{name}"
                if full not in gf.tensors:
                    if name in LAYER_REQUIRED or name in required:
                        raise GGUFError(f"{gf.path}: tensor {full!r} is missing")
                    continue
                shape = shapes[name]
                layer[name] = self._vector(full, shape) if len(shape) == 1 else self._matrix(full, shape)
            self.layers.append(layer)
        freqs = gf.tensors.get("rope_freqs.weight")
        self.rope_factors = (self._vector("rope_freqs.weight", (c.rope_dim // 2,)) if freqs is not None
                             else self.backend.upload_vector(np.ones(c.rope_dim // 2, dtype=np.float32)))  # [rope_dim/2]

    def _check_shape(self, name: str, shape: tuple[int, ...]):
        info = self._gf.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self._gf.path}: tensor {name!r} is missing")
        if tuple(info.shape) != shape:
            raise GGUFError(f"{self._gf.path}: tensor {name!r} has shape {list(info.shape)}, "
                            f"the model's metadata implies {list(shape)}")
        return info

    def _matrix(self, name: str, shape: tuple[int, int]) -> QTensor:
        info = self._check_shape(name, shape)
        raw = self._gf.tensor_data(name).reshape(shape[0], -1)  # [rows, row_bytes], zero-copy
        return self.backend.upload_matrix(QTensor(name, info.qtype, shape, raw))

    def _vector(self, name: str, shape: tuple[int]) -> np.ndarray:
        """Small 1-D weights (norms, biases) as float32 — the only tensors ever converted at load time."""
        info = self._check_shape(name, shape)
        raw = self._gf.tensor_data(name)
        if info.qtype == GGMLQuantizationType.F32:  # the usual case: no kernel needed (saves its load time)
            vec = raw.view(np.float32).copy()
        elif info.qtype == GGMLQuantizationType.F16:
            vec = raw.view(np.float16).astype(np.float32)
        else:
            vec = dequantize(QTensor(name, info.qtype, (1, shape[0]), raw.reshape(1, -1)))[0]
        if not np.isfinite(vec).all():  # converted here anyway: checking costs nothing, and a NaN norm spoils all
            raise GGUFError(f"{self._gf.path}: tensor {name!r} holds {int((~np.isfinite(vec)).sum())} NaN or "
                            f"infinite values")
        return self.backend.upload_vector(vec)

    def forward(self, tokens: np.ndarray, pos: np.ndarray, slot: np.ndarray, kv, logit_rows: np.ndarray,
                decode: bool = False, probe=None) -> np.ndarray:
        """Run T tokens through the model, writing their keys/values into `kv`.

        tokens, pos, slot: [T] (token t sits at position pos[t] of sequence slot[t]; tokens of one slot in
        order); logit_rows: indices into T whose logits are wanted.  Returns float32 [len(logit_rows), n_vocab].
        decode: a decoding step (one new token per sequence; int8 activations, memory-bound) rather than prompt
        processing (qmatmul's "prefill" path: float tiles or int8 by quant type, compute-bound).  Each path computes every row the same way whatever T is, so a
        sequence's result never depends on what else is in the batch or how its prompt was chunked.
        probe(name, array): called with each stage's output when given (Model uses it to find the first layer
        whose output is NaN or inf).
        """
        probe = probe or (lambda name, x: None)
        c, k_ = self.config, self.backend
        path = "int8" if decode else "prefill"

        def matmul(w, x):
            return k_.matmul(w, x, path=path)

        T = len(tokens)
        tokens, pos, slot = k_.upload_ints(tokens), k_.upload_ints(pos), k_.upload_ints(slot)
        x = k_.get_rows(self.token_embd, tokens)  # [T, d_model]
        if c.embed_scale != 1.0:
            k_.scale(x, c.embed_scale)
        probe("token_embd (the embedding rows)", x)
        h = k_.empty((T, c.d_model))  # [T, d_model] normed input of each sub-block
        attn = k_.empty((T, c.q_dim))  # [T, n_heads * head_dim]
        eps = np.float32(c.norm_eps)
        for il, L in enumerate(self.layers):
            # attention
            k_.rmsnorm(x, L["attn_norm.weight"], eps, h)
            q = matmul(L["attn_q.weight"], h)  # [T, n_heads * head_dim]
            k = matmul(L["attn_k.weight"], h)  # [T, n_kv_heads * head_dim]
            v = matmul(L["attn_v.weight"], h)  # [T, n_kv_heads * head_dim]
            if "attn_q.bias" in L:
                k_.add(q, L["attn_q.bias"])
                k_.add(k, L["attn_k.bias"])
                k_.add(v, L["attn_v.bias"])
            if "attn_q_norm.weight" in L:  # per-head RMSNorm of queries and keys (Gemma 3)
                k_.rmsnorm(q, L["attn_q_norm.weight"], eps, q)
                k_.rmsnorm(k, L["attn_k_norm.weight"], eps, k)
            base, scale = c.layer_rope_base[il], c.layer_rope_scale[il]
            k_.rope(q, pos, c.n_heads, c.head_dim, c.rope_dim, base, scale, self.rope_factors, c.rope_neox)
            k_.rope(k, pos, c.n_kv_heads, c.head_dim, c.rope_dim, base, scale, self.rope_factors, c.rope_neox)
            k_.kv_write(kv.k[il], kv.v[il], slot, pos, k, v)
            k_.attention(q, kv.k[il], kv.v[il], slot, pos, c.layer_window[il], np.float32(c.attn_scale), attn)
            o = matmul(L["attn_output.weight"], attn)  # [T, d_model]
            if "post_attention_norm.weight" in L:
                k_.rmsnorm(o, L["post_attention_norm.weight"], eps, o)
            k_.add(x, o)
            probe(f"blk.{il} attention", x)
            # feed-forward
            k_.rmsnorm(x, L["ffn_norm.weight"], eps, h)
            gate = matmul(L["ffn_gate.weight"], h)  # [T, n_ff]
            up = matmul(L["ffn_up.weight"], h)  # [T, n_ff]
            (k_.gelu_mul if c.activation == "gelu" else k_.silu_mul)(gate, up)
            o = matmul(L["ffn_down.weight"], gate)  # [T, d_model]
            if "post_ffw_norm.weight" in L:
                k_.rmsnorm(o, L["post_ffw_norm.weight"], eps, o)
            k_.add(x, o)
            probe(f"blk.{il} feed-forward", x)
        out = k_.take_rows(x, logit_rows)  # [R, d_model]
        k_.rmsnorm(out, self.output_norm, eps, out)
        probe("output_norm", out)
        return k_.to_numpy(matmul(self.output, out))  # [R, n_vocab]
