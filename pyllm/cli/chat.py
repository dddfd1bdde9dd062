"""`pyllm chat`: a conversation in the terminal (line editing, history, Ctrl-C stops a reply, not the session)
that is also scriptable: when stdin or stdout is not a terminal, each input line is one user message and only
the replies reach stdout, one per line, with no prompts or colours."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer

from ..errors import PyllmError
from . import app
from .cache import NoPromptCache, PromptCacheDir, PromptCacheMaxSize, PromptCacheRo, open_prompt_cache, warn
from .common import (CtxSize, Device, ForceCtx, FrequencyPenalty, KvType, MaxMemory, MaxTokens, MinP, ModelArg,
                     PresencePenalty, RepeatPenalty, Seed, Temp, Threads, TopK, TopP, Verbose, check_max_tokens, err,
                     load_model, sampler_from_options, set_threads)

HISTORY = Path.home() / ".cache" / "pyllm" / "chat_history"
BLOCK = '"""'
HELP = f"""\
  /help                this list
  /clear               start a new conversation (the system prompt stays)
  /system [TEXT]       set the system prompt (none: remove it)
  /set [NAME VALUE]    temp, top_p, top_k, min_p, seed, max_tokens (alone: show them)
  /save FILE           write the conversation as JSON
  /load FILE           continue a saved conversation
  /stats               tokens and speed of the last reply, context in use
  /regen               drop the last reply and sample a new one
  /bye, /exit          leave (or Ctrl-D)
  {BLOCK}                  begin and end a message of several lines (a paste stays one message anyway)
  Ctrl-C stops a reply; the part written so far stays in the conversation."""


def note(text: str) -> None:
    """A dim line on stderr (plain when stderr is not a terminal); text is never read as markup."""
    err.print(text, style="dim", markup=False)


def terminal_reader() -> Callable[[str], str]:
    """read(prompt) with line editing, a history file and bracketed paste (a pasted text with newlines stays
    one message).  Ctrl-C clears a typed line, or raises KeyboardInterrupt on an empty one; Ctrl-D: EOFError."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("c-c")
    def _(event):
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt)

    try:
        HISTORY.parent.mkdir(parents=True, exist_ok=True)
        open(HISTORY, "ab").close()  # prompt_toolkit appends after each line: fail here, not mid-session
        history = FileHistory(str(HISTORY))
    except OSError:
        history = InMemoryHistory()
    session = PromptSession(history=history, key_bindings=keys)
    return lambda prompt: session.prompt([("bold", prompt)])


def pipe_reader() -> Callable[[str], str]:
    """read(prompt) over plain stdin lines; the prompt is not shown.  EOFError at the end of the input."""
    sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 must not end the session

    def read(prompt: str) -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    return read


def read_block(read: Callable[[str], str], first: str) -> str:
    '''The message of a """ block: from after the opening quotes to before the closing ones (or end of input).'''
    text = first.lstrip()[len(BLOCK):]
    lines = []
    while not text.rstrip().endswith(BLOCK):
        lines.append(text)
        try:
            text = read("... ")
        except EOFError:
            return "\n".join(lines)
    lines.append(text.rstrip()[:-len(BLOCK)])
    return "\n".join(lines)


class Repl:
    def __init__(self, chat, verbose: bool):
        self.chat, self.verbose = chat, verbose
        self.commands = {"/help": self.help, "/?": self.help, "/clear": self.clear, "/system": self.system,
                         "/set": self.set, "/save": self.save, "/load": self.load, "/stats": self.stats,
                         "/regen": self.regen}

    def run(self, read: Callable[[str], str]) -> None:
        """Until Ctrl-D, end of input, /bye or /exit.  Nothing that goes wrong in a turn ends the session."""
        while True:
            try:
                line = read(">>> ")
                if line.startswith("/"):
                    name, _, arg = line.partition(" ")
                    if name in ("/bye", "/exit"):
                        return
                    self.command(name, arg.strip())
                    continue
                text = read_block(read, line) if line.lstrip().startswith(BLOCK) else line
                if text.strip():
                    self.stream(self.chat.send(text.strip()))
            except EOFError:
                return
            except KeyboardInterrupt:
                note("(Ctrl-D or /bye to leave)")
            except PyllmError as e:
                err.print(f"pyllm: error: {e}", markup=False)

    def command(self, name: str, arg: str) -> None:
        handler = self.commands.get(name)
        if handler is None:
            note(f"unknown command {name}: /help lists the commands (begin a message with a space to send text "
                 f"that starts with /)")
        else:
            handler(arg)

    def stream(self, reply: Iterator[str]) -> None:
        """Write the reply as it comes; Ctrl-C stops it (what was written stays in the conversation)."""
        out = sys.stdout
        interrupted = False
        try:
            for piece in reply:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            reply.close()
        out.write("\n")
        out.flush()
        if interrupted:
            note("(stopped; the partial reply stays in the conversation)")
        if self.verbose:
            self.stats("")

    # --- slash commands ----------------------------------------------------------------------------------
    def help(self, arg: str) -> None:
        err.print(HELP, markup=False)

    def clear(self, arg: str) -> None:
        self.chat.clear()
        note("(new conversation)")

    def system(self, arg: str) -> None:
        self.chat.system = arg or None
        note(f"(system prompt {'set' if arg else 'removed'})")

    def set(self, arg: str) -> None:
        if not arg:
            for name, value in self.chat.settings().items():
                note(f"  {name} {value}")
            return
        name, _, value = arg.partition(" ")
        if not value.strip():
            raise PyllmError("usage: /set NAME VALUE (/set alone shows the settings)")
        self.chat.set(name, value.strip())

    def save(self, arg: str) -> None:
        path = self._file_arg("save", arg)
        self.chat.save(path)
        note(f"(saved {len(self.chat.turns)} messages to {path})")

    def load(self, arg: str) -> None:
        path = self._file_arg("load", arg)
        self.chat.load(path)
        note(f"(loaded {len(self.chat.turns)} messages from {path}; {self.chat.n_cached} tokens in the cache)")

    def stats(self, arg: str) -> None:
        s, chat = self.chat.stats, self.chat
        note(f"prompt: {s.n_prefill} new tokens ({s.n_reused} reused from the cache), {s.prefill_tps():.1f} tok/s"
             f" | reply: {s.n_generated} tokens, {s.generate_tps():.1f} tok/s | context: {chat.n_cached}/{chat.n_ctx}")

    def regen(self, arg: str) -> None:
        self.stream(self.chat.regenerate())

    @staticmethod
    def _file_arg(command: str, arg: str) -> Path:
        if not arg:
            raise PyllmError(f"usage: /{command} FILE")
        return Path(arg).expanduser()


def template_override(spec: str | None) -> str | None:
    """--chat-template: a Jinja file's text, or a built-in's name passed through."""
    from ..chat_template import BUILTINS

    if spec is None or spec in BUILTINS:
        return spec
    try:
        return Path(spec).read_text(encoding="utf-8")
    except OSError as e:
        raise PyllmError(f"{spec}: cannot read chat template: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise PyllmError(f"{spec}: chat template is not UTF-8 text") from None


def chat_template(model, override: str | None):
    from ..chat_template import BUILTINS

    template = model.chat_template(override)  # a broken template raises, its message saying what is wrong
    if template is None:
        raise PyllmError(f"{Path(model.path).name} has no chat template and none of the built-ins fits: pass "
                         f"--chat-template FILE (Jinja) or one of {', '.join(BUILTINS)}")
    return template


@app.command()
def chat(
    model: ModelArg = None,
    system: Annotated[Optional[str], typer.Option("--system", help="system prompt")] = None,
    template: Annotated[Optional[str], typer.Option(
        "--chat-template", metavar="FILE", show_default=False,
        help="Jinja chat template file (or chatml, gemma, llama3) instead of the model's")] = None,
    max_tokens: MaxTokens = -1,
    temp: Temp = 0.8,
    top_k: TopK = 40,
    top_p: TopP = 0.95,
    min_p: MinP = 0.05,
    repeat_penalty: RepeatPenalty = 1.0,
    presence_penalty: PresencePenalty = 0.0,
    frequency_penalty: FrequencyPenalty = 0.0,
    seed: Seed = None,
    ctx_size: CtxSize = None,
    force_ctx: ForceCtx = False,
    kv_type: KvType = "f16",
    max_memory: MaxMemory = None,
    threads: Threads = None,
    device: Device = "auto",
    no_prompt_cache: NoPromptCache = False,
    prompt_cache_dir: PromptCacheDir = None,
    prompt_cache_max_size: PromptCacheMaxSize = "2G",
    prompt_cache_ro: PromptCacheRo = False,
    verbose: Verbose = False,
):
    """Talk with a model: multi-turn, streamed, each turn computing only its own new tokens.
    Type /help inside for the commands; Ctrl-D or /bye leaves."""
    from ..chat import Chat

    set_threads(threads)
    check_max_tokens(max_tokens)
    sampler = sampler_from_options(temp, top_k, top_p, min_p, repeat_penalty, presence_penalty, frequency_penalty,
                                   seed)
    override = template_override(template)
    prompt_cache = open_prompt_cache(no_prompt_cache, prompt_cache_dir, prompt_cache_max_size, None, prompt_cache_ro)
    m = load_model(model, verbose, device, max_memory)
    conversation = Chat(m, chat_template(m, override), sampler, system=system,
                        n_ctx=m.context_size(ctx_size, force_ctx), kv_type=kv_type, max_tokens=max_tokens, seed=seed,
                        prompt_cache=prompt_cache, notify=warn)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        note(f"{Path(m.path).name}, context {conversation.n_ctx} tokens. /help for commands, Ctrl-D or /bye to leave.")
    Repl(conversation, verbose).run(terminal_reader() if interactive else pipe_reader())
