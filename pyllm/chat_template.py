"""Chat templates: turn a list of messages into the prompt text a model was trained on.

A GGUF's `tokenizer.chat_template` is Jinja code written by whoever made the file, so we treat it as hostile
(CVE-2024-34359 was exactly this: llama-cpp-python rendered it in a plain jinja2 Environment). We render it
the way Hugging Face transformers does -- ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
loopcontrols, raise_exception/strftime_now/tojson -- and add what the sandbox lacks: limits on time,
output size and the size of any value a single operation may build.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import sys
import time
from contextlib import contextmanager
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, Namespace
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from pyllm.errors import TemplateError

MAX_SECONDS = 2.0  # wall clock for compiling or rendering one template
MAX_CHARS = 1_000_000  # rendered text, template source, and any single string/list built on the way
MAX_RANGE = 10_000  # range() length (jinja's own sandbox allows 100k)
MAX_PRODUCT = 10**8  # one call combining two inputs (e.g. str.replace(old, new)) may build at most this much
MAX_INT_BITS = 4096  # integers built by arithmetic (stops 10**10**10 and repeated squaring)
_BIG_WIDTH = re.compile(r"\d{7}")  # a 7-digit width/precision in a format string builds >= 1 MB

BUILTINS = {
    # llama.cpp's built-in "chatml" (src/llama-chat.cpp)
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    # llama.cpp's built-in "gemma": no system role, so system text is trimmed and folded into the next user
    # turn; "assistant" is "model". llama.cpp's C++ version emits no <bos> and lets the tokenizer add it
    # (add_bos_token=true); we render bos_token as the official HF Gemma templates do, so renders_bos() is
    # True and the token stream is the same: <bos><start_of_turn>user\n...
    "gemma": "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] | trim %}{% else %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if ns.system and role != 'model' %}{{ ns.system + '\\n\\n' }}{% set ns.system = '' %}{% endif %}"
    "{{ m['content'] | trim + '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
    # llama.cpp's built-in "llama3" (plus bos_token, as Meta's template has it)
    "llama3": "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
}


def _fail(why: str) -> TemplateError:
    return TemplateError(f"unsafe or broken chat template: {why}")


class _Timeout(BaseException):
    """Raised inside the template's frames; a BaseException so no `except Exception` on the way swallows it."""


@contextmanager
def _deadline(seconds: float):
    """Check the clock on every line of Python run meanwhile (template code and the jinja runtime it calls).
    Plain `for` loops with empty bodies never call back into the sandbox, so only tracing can stop them."""
    end = time.monotonic() + seconds

    def tracer(frame, event, arg):
        if time.monotonic() > end:
            raise _Timeout
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
    except _Timeout:
        raise _fail(f"rendering took longer than {seconds:g} s (endless loop?)") from None
    finally:
        sys.settrace(previous)


def _check_in(value, *params) -> None:
    """Check a call before C code runs it: `value` is what is operated on, `params` the arguments. Integer
    parameters are widths, counts and repeats; and one call (replace, indent, join, format...) can build a
    result as large as the product of its two largest inputs."""
    sizes = [0, 0]
    for v in (value, *params):
        if v is not value and isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_CHARS:
            raise _fail(f"argument {v} is too large")
        if isinstance(v, (str, list, tuple)):
            sizes.append(len(_check_out(v)))
    sizes.sort()
    if sizes[-1] * sizes[-2] > MAX_PRODUCT:
        raise _fail("a call would build too large a value")


def _check_out(value):
    """Whatever one operation built must stay small, so that no chain of operations can grow without bound."""
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_CHARS:
        raise _fail(f"a value grew beyond {MAX_CHARS} items")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _fail("an integer grew too large")
    return value


def _guarded_filter(f):
    @functools.wraps(f)  # copies jinja's pass_context/pass_environment marker too
    def g(*args, **kwargs):
        value, *params = [a for a in args if not isinstance(a, (Context, EvalContext, jinja2.Environment))] or [None]
        _check_in(value, *params, *kwargs.values())
        if f.__name__ == "do_format" and isinstance(value, str) and _BIG_WIDTH.search(value):
            raise _fail("format width too large")
        return _check_out(f(*args, **kwargs))

    return g


class _Namespace(Namespace):
    def __setitem__(self, name, value):  # `{% set ns.x = ... %}`: the one way to carry values across loop turns
        super().__setitem__(name, _check_out(value))


def _range(*args):
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise _fail(f"range of {len(r)} items (limit {MAX_RANGE})")
    return r


def _raise_exception(message):
    raise _fail(f"the template rejected the conversation: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's tojson: plain str, keeps non-ASCII, supports indent (jinja's own escapes HTML and has no ensure_ascii)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Env(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})  # also stops jinja from constant-folding them

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        self.filters["tojson"] = _tojson
        self.filters = {name: _guarded_filter(f) for name, f in self.filters.items()}
        del self.globals["lipsum"]  # lorem ipsum generator: no chat template needs it
        self.globals.update(
            range=_range,
            namespace=_Namespace,
            raise_exception=_raise_exception,
            strftime_now=lambda fmt: datetime.now().strftime(fmt),
        )

    def unsafe_undefined(self, obj, attribute):
        # the stock sandbox returns an Undefined that renders as "" -- fail loudly instead
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        # 'sep'.join(xs), '{:>9}'.format(x): the str counts too (the sandbox wraps str.format, hence __wrapped__)
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        if isinstance(owner, str):  # str methods are where one call blows up: center, zfill, replace, join...
            _check_in(owner, *args, *kwargs.values())
            if __obj.__name__ in ("format", "format_map") and _BIG_WIDTH.search(owner):
                raise _fail("format width too large")
        for a in (*args, *kwargs.values()):  # macros, namespace(): values carried along must stay small
            _check_out(a)
        return _check_out(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            n, seq = (left, right) if isinstance(left, int) else (right, left)
            if isinstance(n, int) and hasattr(seq, "__len__") and len(seq) * n > MAX_CHARS:
                raise _fail(f"a value grew beyond {MAX_CHARS} items")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * left.bit_length() > MAX_INT_BITS:
                raise _fail("an integer grew too large")
        if operator == "%" and isinstance(left, str):
            _check_in(left, *(right if isinstance(right, tuple) else (right,)))
            if _BIG_WIDTH.search(left):
                raise _fail("format width too large")
        return _check_out(super().call_binop(context, operator, left, right))


@contextmanager
def _as_template_error():
    """One error type and one-line message for everything a template can do wrong."""
    try:
        yield
    except TemplateError:
        raise
    except SecurityError as e:
        raise _fail(f"blocked unsafe operation: {e}") from None
    except RecursionError:
        raise _fail("recursion too deep") from None
    except MemoryError:
        raise _fail("ran out of memory") from None
    except jinja2.TemplateError as e:
        raise _fail(f"{type(e).__name__}: {e}") from None
    except Exception as e:  # a template can raise anything its operations raise (TypeError, ZeroDivisionError...)
        raise _fail(f"{type(e).__name__}: {e}") from None


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "gguf"):
        if not isinstance(source, str) or len(source) > MAX_CHARS:
            raise _fail("template is not a string or is too long")
        self.source, self.bos_token, self.eos_token, self.name = source, bos_token, eos_token, name
        self._env = _Env()
        with _as_template_error(), _deadline(MAX_SECONDS):
            self._template = self._env.from_string(source)
        self._renders_bos: bool | None = None

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, **extra) -> str:
        context = dict(
            messages=messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            date_string=datetime.now().strftime("%d %b %Y"),
        )
        context.update(extra)
        context = copy.deepcopy(context)  # the template only ever sees a private copy of the caller's data
        out, size = [], 0
        with _as_template_error(), _deadline(MAX_SECONDS):
            for chunk in self._template.generate(**context):
                size += len(chunk)
                if size > MAX_CHARS:
                    raise _fail(f"rendered text exceeds {MAX_CHARS} characters")
                out.append(chunk)
        return "".join(out)

    def renders_bos(self) -> bool:
        """True when the rendered text starts with bos_token: the caller must then not add another BOS."""
        if self._renders_bos is None:
            try:
                text = self.render([{"role": "user", "content": "Hi"}])
            except TemplateError:  # e.g. a template that insists on a system turn: fall back to reading it
                text = self.bos_token if "bos_token" in self.source else ""
            self._renders_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return self._renders_bos

    @classmethod
    def for_model(cls, meta: dict, override: str | None = None) -> "ChatTemplate":
        """override (template text, or a built-in name as llama.cpp's --chat-template takes)
        > meta['tokenizer.chat_template'] > a built-in chosen by architecture and vocabulary."""
        tokens = meta.get("tokenizer.ggml.tokens")
        tokens = [] if tokens is None else tokens

        def token(key):
            i = meta.get(key)
            return str(tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else ""

        specials = dict(bos_token=token("tokenizer.ggml.bos_token_id"), eos_token=token("tokenizer.ggml.eos_token_id"))
        if override:
            if override in BUILTINS:
                return cls(BUILTINS[override], name=override, **specials)
            return cls(override, name="override", **specials)
        if meta.get("tokenizer.chat_template"):
            return cls(meta["tokenizer.chat_template"], name="gguf", **specials)
        arch = str(meta.get("general.architecture", ""))
        vocab = set(tokens)
        if arch.startswith("gemma") or "<start_of_turn>" in vocab:
            name = "gemma"
        elif "<|im_start|>" in vocab:
            name = "chatml"
        elif "<|start_header_id|>" in vocab:
            name = "llama3"
        else:
            raise _fail(f"the model ({arch or 'unknown architecture'}) has no tokenizer.chat_template and no "
                        f"built-in fits; pass one (template text or one of: {', '.join(BUILTINS)})")
        return cls(BUILTINS[name], name=name, **specials)
