"""Tiny random models written as real GGUF files with gguf.GGUFWriter, for tests that need a whole model.

Every architecture pyllm runs can be built here; the vocabulary is byte-level BPE (the 256 GPT-2 byte symbols,
a few merges, ChatML control tokens) so text round-trips and chat templates render.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def byte_symbols() -> list[str]:
    """GPT-2's byte -> printable unicode mapping, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def _vocab():
    sym = byte_symbols()
    tokens = list(sym)
    merges = []
    for a, b in (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")):
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * len(tokens) + [3] * len(specials)
    tokens += specials
    return tokens, types, merges


def _weight(rng, rows, cols, qtype, scale=0.08):
    w = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    if qtype == GGMLQuantizationType.F32:
        return w, None
    if qtype == GGMLQuantizationType.F16:
        return w.astype(np.float16), None
    return quants.quantize(w, qtype), qtype


def write_tiny_model(path, arch: str = "llama", qtype=GGMLQuantizationType.Q8_0, n_layers: int = 2,
                     d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2, n_ff: int = 96,
                     head_dim: int | None = None, ctx: int = 256, sliding_window: int = 8, seed: int = 0,
                     tied: bool = True, chat_template: str | None = CHATML) -> str:
    """Write a random model of `arch` ("llama", "qwen2", "gemma3") with 2-D weights in `qtype`; return the path.

    Row lengths are multiples of 32, so every non-K block type fits; use d_model/n_ff multiples of 256 for K-quants.
    """
    rng = np.random.default_rng(seed)
    head_dim = head_dim or d_model // n_heads
    tokens, types, merges = _vocab()
    n_vocab = len(tokens)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(ctx)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-6 if arch == "gemma3" else 1e-5)
    w.add_rope_freq_base(10000.0)
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(sliding_window)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(n_vocab - 3)
    w.add_eos_token_id(n_vocab - 1)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    def add(name, rows, cols=None):
        if cols is None:  # norms near 1, biases near 0
            base = 0.0 if name.endswith(".bias") else 1.0
            w.add_tensor(name, (base + 0.1 * rng.standard_normal(rows)).astype(np.float32))
            return
        data, raw_type = _weight(rng, rows, cols, qtype)
        w.add_tensor(name, data, raw_dtype=raw_type)

    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    add("token_embd.weight", n_vocab, d_model)
    add("output_norm.weight", d_model)
    if not tied:
        add("output.weight", n_vocab, d_model)
    for il in range(n_layers):
        p = f"blk.{il}."
        add(p + "attn_norm.weight", d_model)
        add(p + "attn_q.weight", q_dim, d_model)
        add(p + "attn_k.weight", kv_dim, d_model)
        add(p + "attn_v.weight", kv_dim, d_model)
        add(p + "attn_output.weight", d_model, q_dim)
        add(p + "ffn_norm.weight", d_model)
        add(p + "ffn_gate.weight", n_ff, d_model)
        add(p + "ffn_up.weight", n_ff, d_model)
        add(p + "ffn_down.weight", d_model, n_ff)
        if arch == "qwen2":
            add(p + "attn_q.bias", q_dim)
            add(p + "attn_k.bias", kv_dim)
            add(p + "attn_v.bias", kv_dim)
        if arch == "gemma3":
            add(p + "attn_q_norm.weight", head_dim)
            add(p + "attn_k_norm.weight", head_dim)
            add(p + "post_attention_norm.weight", d_model)
            add(p + "post_ffw_norm.weight", d_model)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
