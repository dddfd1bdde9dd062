"""The OpenAI API's shapes, apart from the web stack: a request body -> what to generate (or an ApiError saying
what is wrong, with the status to answer), and results -> response objects and stream chunks.

Unknown fields are ignored, as llama-server does; a known field of the wrong type or out of range is a 400 that
names it.  Sampling defaults are pyllm's (llama.cpp's): temperature 0.8, top_k 40, top_p 0.95, min_p 0.05.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..chat import render_tokens
from ..errors import PyllmError

MAX_CHOICES = 16  # n times the number of prompts
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
MAX_INT = 2**31 - 1
FINISH = {"stop": "stop", "length": "length", "context": "length"}  # engine's finish_reason -> the API's
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An answer other than 200, as OpenAI's error object."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 499: "invalid_request_error",
             503: "unavailable_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Generation:
    """One completions request, parsed: the prompts and how to continue each of them."""

    prompts: list[list[int]]  # token ids per prompt (chat: the rendered conversation)
    n: int = 1  # choices per prompt
    max_tokens: int | None = None  # None: until the model stops or the context is full
    sampling: dict = field(default_factory=dict)  # Sampler keyword arguments
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # how many alternatives per token (0: the chosen token's only); None: none
    stream: bool = False
    include_usage: bool = False


def _name(param: str, index: int | None = None, key: str | None = None) -> str:
    return param + (f"[{index}]" if index is not None else "") + (f".{key}" if key else "")


def _bad(param: str, rule: str, value: Any = None) -> ApiError:
    shown = f", not {show(value)}" if value is not None else ""
    return ApiError(400, f"'{param}' must be {rule}{shown}", param=param.split("[")[0].split(".")[0])


def show(value: Any) -> str:
    """A short, ASCII-safe picture of a value for an error message (the value may be huge or hostile)."""
    text = ascii(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def text_value(value: Any, param: str) -> str:
    """A string that can be encoded (JSON lets through lone surrogates, which no tokenizer can take)."""
    if not isinstance(value, str):
        raise _bad(param, "a string", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{param}' is not valid Unicode (lone surrogate)", param=param.split("[")[0]) from None
    return value


class Fields:
    """Typed reads of a request body's fields; null counts as absent."""

    def __init__(self, body: Any):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self.body = body

    def get(self, name: str) -> Any:
        return self.body.get(name)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _bad(name, "true or false", value)
        return value

    def number(self, name: str, default, low: float, high: float, integer: bool = False, open_low: bool = False):
        value = self.body.get(name)
        if value is None:
            return default
        kind = "an integer" if integer else "a number"
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or (isinstance(value, float) and not math.isfinite(value)):
            raise _bad(name, kind, value)
        if value < low or value > high or (open_low and value == low):
            bracket = "(" if open_low else "["
            raise _bad(name, f"{kind} in {bracket}{low:g}, {high:g}]", value)
        return value


def parse_generation(fields: Fields, chat: bool) -> Generation:
    """The settings shared by /v1/chat/completions and /v1/completions (the prompts come apart: check_prompts)."""
    g = Generation([])
    g.n = fields.number("n", 1, 1, MAX_CHOICES, integer=True)
    g.max_tokens = fields.number("max_completion_tokens", None, 1, MAX_INT, integer=True)
    if g.max_tokens is None:
        g.max_tokens = fields.number("max_tokens", None, 1, MAX_INT, integer=True)
    g.sampling = dict(
        temperature=fields.number("temperature", 0.8, 0, 1e6),
        top_p=fields.number("top_p", 0.95, 0, 1),
        top_k=fields.number("top_k", 40, 0, MAX_INT, integer=True),
        min_p=fields.number("min_p", 0.05, 0, 1),
        repeat_penalty=fields.number("repeat_penalty", 1.0, 0, 1e6, open_low=True),
        presence_penalty=fields.number("presence_penalty", 0.0, -2, 2),
        frequency_penalty=fields.number("frequency_penalty", 0.0, -2, 2),
    )
    g.sampling["top_p"] = max(g.sampling["top_p"], 1e-9)  # 0 means "the most likely token" in the API
    g.seed = fields.number("seed", None, -2**63, 2**64 - 1, integer=True)
    stop = fields.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > MAX_STOP:
            raise _bad("stop", f"a string or a list of at most {MAX_STOP} strings", stop)
        g.stop = [text_value(s, _name("stop", i)) for i, s in enumerate(stops)]
    if chat:
        if fields.boolean("logprobs", False):
            g.logprobs = fields.number("top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
    else:
        g.logprobs = fields.number("logprobs", None, 0, 5, integer=True)  # the legacy API's 0..5
    g.stream = fields.boolean("stream", False)
    options = fields.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options", "an object", options)
        g.include_usage = Fields(options).boolean("include_usage", False)
    response_format = fields.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind != "text":
            raise ApiError(400, "response_format: only {\"type\": \"text\"} is supported (structured output is "
                                "not there yet)", param="response_format")
    return g


def check_prompts(g: Generation, prompts: list[list[int]], n_ctx: int, chat: bool) -> None:
    """Each prompt must leave room in the context for a token; n choices of each, at most MAX_CHOICES."""
    param = "messages" if chat else "prompt"
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ApiError(400, "the prompt is empty", param=param)
        if len(prompt) >= n_ctx:
            which = "" if len(prompts) == 1 else f" {i}"
            raise ApiError(400, f"the prompt{which} has {len(prompt)} tokens but the context holds {n_ctx} (and "
                                f"needs room for at least one more)", param=param, code="context_length_exceeded")
    if g.n * len(prompts) > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n={g.n} choices is more than {MAX_CHOICES}", param="n")
    g.prompts = prompts


def chat_prompt(model, template, fields: Fields) -> list[int]:
    """The token ids of the request's messages through the chat template."""
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of messages", messages)
    if template is None:
        raise ApiError(400, "this model has no chat template: use /v1/completions, or start the server with "
                            "--chat-template", param="messages")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(_name("messages", i), "an object with \"role\" and \"content\"", m)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(_name("messages", i, "role"), "one of " + ", ".join(ROLES), role)
        plain.append({"role": ROLES[role], "content": message_text(m.get("content"), _name("messages", i, "content"),
                                                                   role)})
    try:
        return render_tokens(model, template, plain)
    except PyllmError as e:  # the template refused the conversation (e.g. roles that do not alternate)
        raise ApiError(400, f"the chat template cannot render these messages: {e}", param="messages") from None


def message_text(content: Any, param: str, role: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if content is None and role == "assistant":
        return ""
    if isinstance(content, str):
        return text_value(content, param)
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise ApiError(400, f"'{param}[{j}]': only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                    f"supported", param="messages")
            texts.append(text_value(part.get("text"), f"{param}[{j}].text"))
        return "".join(texts)
    raise _bad(param, "a string or a list of text parts", content)


def completion_prompts(model, fields: Fields) -> list[list[int]]:
    """The prompts of /v1/completions: a string, a list of strings, a list of token ids, or a list of those."""
    prompt = fields.get("prompt")
    n_vocab = model.tokenizer.n_vocab

    def ids(value, param) -> list[int]:
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in value):
            raise _bad(param, f"a list of token ids (0..{n_vocab - 1})")
        return list(value)

    def one(value, param) -> list[int]:
        if isinstance(value, str):
            return model.tokenize(text_value(value, param), add_special=True, parse_special=True)
        if isinstance(value, list) and value and not isinstance(value[0], (str, list)):
            return ids(value, param)
        raise _bad(param, "a string or a list of token ids", value)

    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) > MAX_CHOICES:
            raise _bad("prompt", f"at most {MAX_CHOICES} prompts")
        return [one(p, _name("prompt", i)) for i, p in enumerate(prompt)]
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt")
    return [one(prompt, "prompt")]


# --- responses ---------------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token, True)
    return raw.decode("utf-8", "replace"), list(raw)


def chat_logprobs(tokenizer, entries) -> dict:
    """logprobs of a chat choice (or chunk): entries are (token, (logprob, [(id, logprob)...]))."""
    content = []
    for token, (lp, top) in entries:
        text, raw = token_text(tokenizer, token)
        alternatives = []
        for alt, alt_lp in top:
            alt_text, alt_raw = token_text(tokenizer, alt)
            alternatives.append({"token": alt_text, "logprob": alt_lp, "bytes": alt_raw})
        content.append({"token": text, "logprob": lp, "bytes": raw, "top_logprobs": alternatives})
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, entries, offset: int) -> dict:
    """The legacy API's logprobs: parallel lists, text offsets from `offset` on."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, (lp, top) in entries:
        text, _ = token_text(tokenizer, token)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({token_text(tokenizer, alt)[0]: alt_lp for alt, alt_lp in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out
