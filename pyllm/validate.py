"""check_model: every validation pyllm makes on a GGUF, one named check at a time (`pyllm info --check`).

Loading refuses a broken file at its first problem; this runs the same code step by step (GGUFFile, the
architecture's config, the Tokenizer, the Transformer's tensor checks) so each result can be shown, and adds
what loading does not need but a user wants to know before trusting a file: tensor types no kernel runs,
token texts that are not UTF-8, a chat template emitting special tokens the vocabulary lacks.
"""
from __future__ import annotations

import os
import re

from .errors import PyllmError, TemplateError

Check = tuple[str, bool, str]  # (what was checked, passed, detail)

# Chat-template markers that are special tokens in every vocabulary that uses them: <|im_start|>, <|eot_id|>,
# <start_of_turn>... (plain-text markers such as Llama 2's [INST] are left alone: they are meant as text).
_SPECIAL_MARKER = re.compile(r"<\|[^\s<>|]{1,64}\|>|<(?:start|end)_of_turn>")
_SAMPLE_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


def chat_template_for(meta: dict, tokenizer, override: str | None = None):
    """The chat template to use (override > the GGUF's > a built-in that fits), or None when there is none,
    refused with a TemplateError when its rendering of a conversation contains special-token markers the
    vocabulary lacks (the model would read them as plain text and never see a turn boundary)."""
    from .chat_template import ChatTemplate

    try:
        template = ChatTemplate.for_model(meta, override)
    except TemplateError:
        if override or meta.get("tokenizer.chat_template"):
            raise
        return None  # no template in the file and no built-in fits: prompts go in as plain text
    try:
        text = template.render(_SAMPLE_CHAT)
    except TemplateError:  # some templates refuse a system turn
        text = template.render(_SAMPLE_CHAT[1:2])
    missing = sorted({m for m in _SPECIAL_MARKER.findall(text) if tokenizer.token_to_id(m) is None})
    if missing:
        raise TemplateError(f"the chat template emits {', '.join(missing)}, which the vocabulary lacks "
                            f"(the model would see plain text, not a special token)")
    return template


def _first_non_utf8(tokens: list[str]) -> tuple[int, int] | None:
    """(id of the first token whose text is not valid UTF-8, how many are not), or None."""
    try:
        "".join(tokens).encode("utf-8")
        return None
    except UnicodeEncodeError:
        bad = [i for i, t in enumerate(tokens) if not t.isascii() and not _is_utf8(t)]
        return bad[0], len(bad)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # the parser keeps invalid bytes as lone surrogates
        return False


def check_model(path: str | os.PathLike) -> list[Check]:
    """Run every validation; never raises for a bad file (each problem is a failed check)."""
    from gguf.constants import GGMLQuantizationType

    from .gguf import GGUFFile
    from .kernels import cpu
    from .models import ARCHS
    from .models.transformer import Transformer
    from .quants import SUPPORTED, type_name
    from .tokenizer import Tokenizer

    path = str(path)
    checks: list[Check] = []

    def attempt(name: str, step, describe):
        """Run one step; record it passed (with describe(result)) or failed (with the error); return result."""
        try:
            result = step()
        except PyllmError as e:
            checks.append((name, False, str(e).removeprefix(f"{path}: ")))
            return None
        checks.append((name, True, describe(result)))
        return result

    gf = attempt("GGUF structure", lambda: GGUFFile(path), lambda g: f"GGUF v{g.version}, {g.file_size} bytes")
    if gf is None:
        return checks
    checks += [("metadata", True, f"{len(gf.metadata)} keys: counts, lengths and array nesting within bounds, "
                                  f"well-known keys of the right type"),
               ("tensor directory", True, f"{len(gf.tensors)} tensors: known types, positive dims matching their "
                                          f"byte sizes, data aligned and inside the file, no overlaps")]
    meta = gf.metadata

    unsupported = sorted({type_name(t.qtype) for t in gf.tensors.values() if t.qtype not in SUPPORTED})
    checks.append(("tensor types", not unsupported,
                   f"pyllm has no kernels for {', '.join(unsupported)}" if unsupported else
                   ", ".join(sorted({GGMLQuantizationType(t.qtype).name for t in gf.tensors.values()}))))

    checks.append(_finite_weights(gf))

    module = attempt("architecture", lambda: _arch_module(gf, ARCHS), lambda m: gf.architecture)
    config = module and attempt(
        "hyper-parameters", lambda: module.config(meta, path),
        lambda c: f"{c.n_layers} layers, embedding {c.d_model}, {c.n_heads} heads / {c.n_kv_heads} KV heads of "
                  f"{c.head_dim}, feed-forward {c.n_ff}, context {c.ctx_train}, vocabulary {c.n_vocab}")
    if config:
        attempt("tensors", lambda: Transformer(gf, config, module.REQUIRED, cpu),
                lambda t: f"the {len(gf.tensors)} tensors include every one {gf.architecture} needs, "
                          f"with the shapes the hyper-parameters imply")

    tokenizer = attempt("tokenizer", lambda: Tokenizer.from_metadata(meta),
                        lambda t: f"{t.model}, {t.n_vocab} tokens, BOS {t.bos_id}, EOS {t.eos_id}, "
                                  f"end-of-generation {sorted(t.eog_ids)}")
    embedding = gf.tensors.get("token_embd.weight")
    if tokenizer and config and embedding:
        rows = embedding.shape[0]
        same = tokenizer.n_vocab == config.n_vocab == rows
        checks.append(("vocabulary size", same, f"{tokenizer.n_vocab} tokens, model vocabulary {config.n_vocab}, "
                                                f"{rows} embedding rows" + ("" if same else ": they differ")))
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens:
        bad = _first_non_utf8(tokens)
        checks.append(("token text", bad is None, "all valid UTF-8" if bad is None else
                       f"token {bad[0]} ({tokens[bad[0]].encode('utf-8', 'surrogateescape')!r}) is not valid "
                       f"UTF-8 ({bad[1]} such tokens)"))
    if tokenizer:
        attempt("chat template", lambda: chat_template_for(meta, tokenizer),
                lambda t: "none (prompts go in as plain text)" if t is None else
                          f"{t.name}: renders a conversation; its special tokens are in the vocabulary")
    return checks


def _finite_weights(gf) -> Check:
    """Every tensor's float values (weights, or the fp16 scales and mins of quantized blocks) scanned for NaN and
    inf: the run-time check names only the token where they surface, this names the tensors."""
    from .quants import count_non_finite

    bad, skipped = [], 0
    for name, t in gf.tensors.items():
        n = count_non_finite(t.qtype, gf.tensor_data(name))
        if n is None:
            skipped += 1
        elif n:
            bad.append(f"{name} ({n})")
    if bad:
        return ("finite weights", False, f"NaN or inf in {len(bad)} tensor{'s' * (len(bad) > 1)}: {', '.join(bad[:8])}"
                + (f" and {len(bad) - 8} more" if len(bad) > 8 else ""))
    return ("finite weights", True, f"no NaN or inf in {len(gf.tensors) - skipped} tensors (weights, block scales "
                                    f"and mins)" + (f"; {skipped} of a type not scanned" if skipped else ""))


def _arch_module(gf, archs):
    from .errors import UnsupportedError

    if gf.architecture not in archs:
        raise UnsupportedError(f"architecture {gf.architecture!r} is not supported (pyllm runs "
                               f"{', '.join(sorted(archs))})")
    return archs[gf.architecture]
