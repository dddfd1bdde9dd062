"""A conversation with a model, as a library: the messages, their rendering through the chat template, and a KV
cache kept between turns so that each turn prefills only its own new tokens.

Every turn renders the whole conversation and tokenizes it; generate() reuses the cache's longest common prefix
with that, so a turn costs its own tokens as long as the earlier turns render to the tokens that were evaluated.
They do because a reply is stored as exactly the text of the tokens generated (without the end token), which
tokenizes back to them (measured on SmolLM2, Qwen2.5 and Gemma 3: every cached token is reused).

When the conversation no longer fits, the oldest exchanges after the system prompt are dropped (context shift);
the system prompt itself is never cut.  The library prints nothing: what the user should know goes to `notify`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import ContextError, PyllmError
from .generate import Stats, generate, stream_text
from .sampling import Sampler

SAVE_FORMAT = "pyllm-chat"
SAVE_VERSION = 1
# /set NAME: (Sampler attribute or None for the chat's own, type, check, what a valid value is)
SETTINGS = {
    "temp": ("temperature", float, lambda v: v >= 0, "0 or more (0: greedy)"),
    "top_k": ("k", int, lambda v: v >= 0, "0 or more (0: all)"),
    "top_p": ("p", float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_p": ("min_p", float, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "seed": (None, int, lambda v: v >= 0, "0 or more"),
    "max_tokens": (None, int, lambda v: v == -1 or v > 0, "-1 (until the model stops) or more than 0"),
}


def with_system(system: str | None, messages: list[dict]) -> list[dict]:
    """`messages` after a system message, when there is a system prompt and they do not start with their own."""
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def render_tokens(model, template, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The token ids of `messages` rendered by the chat template (no second BOS when the template renders one)."""
    text = template.render(messages, add_generation_prompt=add_generation_prompt)
    return model.tokenize(text, add_special=not template.renders_bos(), parse_special=True)


def prompt_tokens(model, text: str, raw: bool, system: str | None = None) -> list[int]:
    """The prompt's token ids: through the model's chat template unless raw (or the model has none)."""
    if not raw:
        template = model.chat_template()
        if template is not None:
            return render_tokens(model, template, with_system(system, [{"role": "user", "content": text}]))
    return model.tokenize(text, add_special=True, parse_special=True)


class Chat:
    """A multi-turn conversation over one KV cache slot.

    `send(text)` and `regenerate()` return an iterator of reply text (whole UTF-8 characters); the reply joins
    the conversation however the iteration ends: finished, closed early, or interrupted by an exception
    (Ctrl-C), in which case the partial reply is kept.
    """

    def __init__(self, model, template, sampler: Sampler, *, system: str | None = None, n_ctx: int | None = None,
                 kv_type: str = "f16", max_tokens: int = -1, seed: int | None = None, prompt_cache=None,
                 notify: Callable[[str], None] = lambda message: None):
        self.model, self.template, self.sampler = model, template, sampler
        self.cache = model.new_cache(n_ctx, kv_type=kv_type)
        self.system = system or None
        self.turns: list[dict] = []  # user and assistant messages, oldest first; the system prompt is apart
        self.max_tokens, self.seed = max_tokens, seed
        self.prompt_cache = prompt_cache  # PromptCache-like (restore/save) for a conversation's first prompt
        self.notify = notify
        self.stats = Stats()  # the last reply's

    @property
    def messages(self) -> list[dict]:
        return with_system(self.system, self.turns)

    @property
    def n_ctx(self) -> int:
        return self.cache.n_ctx

    @property
    def n_cached(self) -> int:
        """Tokens the KV cache holds now."""
        return len(self.cache.tokens[0])

    # --- turns ---------------------------------------------------------------------------------------------
    def send(self, text: str) -> Iterator[str]:
        """Add a user message and start the reply.  Raises (leaving the conversation as it was) when the message
        cannot be rendered or does not fit in the context even alone with the system prompt."""
        self.turns.append({"role": "user", "content": text})
        try:
            prompt = self._fit()
        except BaseException:  # also Ctrl-C: a message never answered must not stay
            self.turns.pop()
            raise
        return self._reply(prompt)

    def regenerate(self) -> Iterator[str]:
        """Drop the last reply and sample a new one for the same user message."""
        if not self.turns:
            raise PyllmError("nothing to regenerate: the conversation is empty")
        last = self.turns.pop() if self.turns[-1]["role"] == "assistant" else None
        try:
            prompt = self._fit()
        except BaseException:
            if last is not None:
                self.turns.append(last)
            raise
        return self._reply(prompt)

    def clear(self) -> None:
        """A new conversation with the same system prompt (its KV stays cached, so the next turn reuses it)."""
        self.turns = []

    def _reply_room(self) -> int:
        """Tokens to keep free for a reply when deciding whether old turns must go."""
        if self.max_tokens > 0:
            return min(self.max_tokens, self.n_ctx // 2)
        return self.n_ctx // 4

    def _fit(self) -> list[int]:
        """The prompt for the next reply: the conversation's tokens, after dropping the oldest exchanges (never
        the system prompt, never the last user message) until a reply has room."""
        turns = list(self.turns)
        dropped = 0
        while True:
            prompt = render_tokens(self.model, self.template, with_system(self.system, turns))
            if len(prompt) + self._reply_room() <= self.n_ctx:
                break
            users = [i for i, t in enumerate(turns) if t["role"] == "user"]
            if len(users) < 2:
                break  # only the last user message is left
            del turns[:users[1]]  # the oldest exchange: its user message and what answered it
            dropped += 1
        if len(prompt) >= self.n_ctx:
            what = "the system prompt and this message take" if self.system else "this message takes"
            raise ContextError(f"{what} {len(prompt)} tokens but the context holds {self.n_ctx} "
                               f"(shorten it, or raise --ctx-size up to the model's {self.model.config.ctx_train})")
        if dropped:
            self.turns = turns
            self.notify(f"context full: dropped the {dropped} oldest exchange{'s' * (dropped > 1)} "
                        f"(the system prompt is kept)")
        return prompt

    def _reply(self, prompt: list[int]) -> Iterator[str]:
        opening = len(self.turns) == 1  # the first prompt of a conversation: worth a prompt cache entry
        self.stats = stats = Stats()
        room = self.n_ctx - len(prompt)
        limit = min(self.max_tokens, room) if self.max_tokens > 0 else room
        tokens = generate(self.model, self.cache, prompt, self.sampler, max_tokens=limit, stats=stats)
        pieces = []
        try:
            if opening and self.prompt_cache is not None:
                self.prompt_cache.restore(self.model, self.cache, prompt)
            for piece in stream_text(self.model.tokenizer, tokens):
                pieces.append(piece)
                yield piece
        finally:
            tokens.close()
            self.turns.append({"role": "assistant", "content": "".join(pieces)})
        if opening and self.prompt_cache is not None:
            self.prompt_cache.save(self.model, self.cache, n_tokens=len(prompt))
        if stats.n_generated >= room:
            self.notify(f"context full ({self.n_ctx} tokens): the reply was cut off; the oldest exchanges will "
                        f"be dropped at the next message")

    # --- settings ------------------------------------------------------------------------------------------
    def settings(self) -> dict:
        return {name: getattr(self.sampler, attr) if attr else getattr(self, name)
                for name, (attr, *_) in SETTINGS.items()}

    def set(self, name: str, value: str) -> None:
        """/set NAME VALUE, VALUE as typed."""
        if name not in SETTINGS:
            raise PyllmError(f"unknown setting {name!r} (one of: {', '.join(SETTINGS)})")
        attr, kind, valid, rule = SETTINGS[name]
        try:
            v = kind(value)
        except ValueError:
            v = None
        if v is None or (kind is float and not math.isfinite(v)) or not valid(v):
            raise PyllmError(f"{name} must be {'an integer' if kind is int else 'a number'} {rule}, not {value!r}")
        if attr:
            setattr(self.sampler, attr, v)
        else:
            setattr(self, name, v)
        if name == "seed":
            self.sampler.rng = np.random.default_rng(v)

    # --- save / load ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the conversation as JSON; its KV state goes to the prompt cache (if any) for load()."""
        data = {"format": SAVE_FORMAT, "version": SAVE_VERSION, "model": Path(self.model.path).name,
                "system": self.system, "messages": self.turns}
        try:
            Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        except OSError as e:
            raise PyllmError(f"{path}: cannot write: {e.strerror or e}") from None
        if self.prompt_cache is not None and self.cache.tokens[0]:
            self.prompt_cache.save(self.model, self.cache)

    def load(self, path: str | Path) -> None:
        """Continue a saved conversation, with its KV state: from the prompt cache when it holds it, else
        prefilled now, so the next turn again costs only its own tokens."""
        system, turns, model_name = read_conversation(path)
        if model_name != Path(self.model.path).name:
            self.notify(f"{path} was saved with {model_name}; continuing it with {Path(self.model.path).name}")
        self.system, self.turns = system, turns
        if not turns:
            return
        tokens = render_tokens(self.model, self.template, self.messages, add_generation_prompt=False)
        if len(tokens) >= self.n_ctx:
            self.notify(f"the conversation takes {len(tokens)} tokens, more than the context ({self.n_ctx}): "
                        f"the oldest exchanges will be dropped at the next message")
            return
        if self.prompt_cache is not None:
            self.prompt_cache.restore(self.model, self.cache, tokens)
        held = self.cache.common_prefix(tokens)
        self.cache.trim(held)
        if held < len(tokens):
            self.model.eval(self.cache, tokens[held:])


def read_conversation(path: str | Path) -> tuple[str | None, list[dict], str]:
    """(system prompt, messages, model file name) of a file written by Chat.save; PyllmError if it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise PyllmError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PyllmError(f"{path}: not a saved conversation (not JSON text)") from None
    if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
        raise PyllmError(f"{path}: not a saved conversation (no \"format\": \"{SAVE_FORMAT}\")")
    if data.get("version") != SAVE_VERSION:
        raise PyllmError(f"{path}: conversation format version {data.get('version')!r}, this pyllm reads "
                         f"{SAVE_VERSION}")
    system, turns = data.get("system"), data.get("messages")
    roles = ["user", "assistant"] * (len(turns) // 2 + 1) if isinstance(turns, list) else []
    if not (system is None or isinstance(system, str)) or not isinstance(turns, list) or not all(
            isinstance(t, dict) and t.keys() == {"role", "content"} and t["role"] == role
            and isinstance(t["content"], str) for t, role in zip(turns, roles)):
        raise PyllmError(f"{path}: damaged conversation (messages must alternate user/assistant, with text)")
    return system or None, turns, str(data.get("model", "?"))
