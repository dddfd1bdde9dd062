"""pyllm.chat (conversation over a kept KV cache) and `pyllm chat` driven as a user would: through a pseudo-terminal
(pexpect) and through pipes."""
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pexpect
import pytest

import pyllm
from pyllm.chat import Chat, read_conversation, render_tokens
from pyllm.chat_template import ChatTemplate
from pyllm.errors import ContextError, PyllmError
from pyllm.gguf import read_metadata
from pyllm.prompt_cache import PromptCache
from pyllm.sampling import Sampler
from tiny import write_tiny_model

TIMEOUT = 600  # seconds for one expected reply: the test machine is shared and can be very slow


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("chat") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return pyllm.load(tiny_path)


def new_chat(model, **options):
    notes = []
    options.setdefault("max_tokens", 6)
    chat = Chat(model, ChatTemplate.for_model(model.metadata), Sampler(temperature=0), notify=notes.append,
                **options)
    return chat, notes


def reply(chat, text):
    return "".join(chat.send(text))


# --- the library ---------------------------------------------------------------------------------------------
def test_second_turn_prefills_only_its_own_tokens(smollm2):
    """The stored reply renders back to the tokens generated, so the whole cache is reused."""
    model = pyllm.load(smollm2)
    chat, _ = new_chat(model, max_tokens=8, system="You are terse.")
    reply(chat, "My name is Ada.")
    cached = chat.n_cached
    reply(chat, "What is my name?")
    prompt = render_tokens(model, chat.template, chat.messages[:-1])
    assert chat.stats.n_reused == cached
    assert chat.stats.n_prefill == len(prompt) - cached < 25 < cached


def test_interrupted_reply_stays_in_the_conversation(tiny):
    chat, _ = new_chat(tiny, max_tokens=20)
    stream = chat.send("hello")
    pieces = [next(stream), next(stream)]
    stream.close()  # what the REPL does on Ctrl-C between two pieces
    assert chat.turns[-1] == {"role": "assistant", "content": "".join(pieces)}

    stream = chat.send("again")
    first = next(stream)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C arriving inside the model's evaluation
        stream.throw(KeyboardInterrupt)
    assert chat.turns[-1] == {"role": "assistant", "content": first}
    assert [t["role"] for t in chat.turns] == ["user", "assistant"] * 2
    assert reply(chat, "and on") is not None and len(chat.turns) == 6


def test_context_shift_drops_oldest_exchanges_and_keeps_the_system_prompt(tiny):
    chat, notes = new_chat(tiny, n_ctx=96, max_tokens=8, system="SYSTEM RULES")
    for i in range(12):
        reply(chat, f"message number {i} with a few words")
        assert chat.n_cached <= 96
    assert any("dropped" in n for n in notes), notes
    assert chat.messages[0] == {"role": "system", "content": "SYSTEM RULES"}
    assert chat.turns[0]["role"] == "user" and chat.turns[0]["content"] != "message number 0 with a few words"
    assert chat.turns[-2]["content"] == "message number 11 with a few words"
    assert "SYSTEM RULES" in tiny.detokenize(chat.cache.tokens[0])


def test_message_too_long_is_refused_and_the_conversation_kept(tiny):
    chat, _ = new_chat(tiny, n_ctx=128, system="SYSTEM")
    reply(chat, "hi")
    before = list(chat.turns)
    with pytest.raises(ContextError, match="system prompt and this message take"):
        chat.send("word " * 80)
    assert chat.turns == before
    reply(chat, "short")
    assert len(chat.turns) == 4


def test_regenerate_replaces_the_last_reply(tiny):
    chat, _ = new_chat(tiny)
    with pytest.raises(PyllmError, match="nothing to regenerate"):
        chat.regenerate()
    reply(chat, "hi")
    first = chat.turns[-1]["content"]
    chat.set("temp", "1.5")
    chat.set("top_k", "0")
    chat.set("min_p", "0")
    chat.set("seed", "1")
    again = [("".join(chat.regenerate())) for _ in range(3)]
    assert len(chat.turns) == 2 and chat.turns[-1]["content"] == again[-1]
    assert any(a != first for a in again)


def test_set_validates_and_applies(tiny):
    chat, _ = new_chat(tiny)
    chat.set("temp", "0.5")
    chat.set("top_k", "7")
    chat.set("top_p", "0.9")
    chat.set("max_tokens", "3")
    chat.set("seed", "11")
    assert (chat.sampler.temperature, chat.sampler.k, chat.sampler.p) == (0.5, 7, 0.9)
    assert chat.settings()["max_tokens"] == 3 and chat.settings()["seed"] == 11
    assert chat.sampler.rng.random() == np.random.default_rng(11).random()
    reply(chat, "x")
    assert chat.stats.n_generated <= 3
    for name, value in [("temp", "-1"), ("top_p", "0"), ("top_k", "2.5"), ("max_tokens", "0"), ("nope", "1"),
                        ("seed", "abc")]:
        with pytest.raises(PyllmError):
            chat.set(name, value)


def test_save_and_load_restore_the_conversation_and_its_cache(tiny, tmp_path):
    chat, _ = new_chat(tiny, system="SYS")
    reply(chat, "first")
    reply(chat, "second ünïcödé")
    chat.save(tmp_path / "c.json")

    other, _ = new_chat(tiny)
    other.load(tmp_path / "c.json")
    assert (other.system, other.turns) == (chat.system, chat.turns)
    assert other.cache.tokens[0] == render_tokens(tiny, other.template, other.messages, add_generation_prompt=False)
    held = other.n_cached
    reply(other, "third")
    assert other.stats.n_reused == held


def test_load_takes_the_cache_from_the_prompt_cache(tiny, tmp_path, monkeypatch):
    cache_dir = PromptCache(tmp_path / "pc")
    chat, _ = new_chat(tiny, prompt_cache=cache_dir)
    reply(chat, "first")
    reply(chat, "second")
    chat.save(tmp_path / "c.json")

    evaluated = []
    eval_ = tiny.eval
    monkeypatch.setattr(tiny, "eval", lambda cache, tokens, **kw: evaluated.append(len(tokens)) or eval_(
        cache, tokens, **kw))
    other, _ = new_chat(tiny, prompt_cache=cache_dir)
    other.load(tmp_path / "c.json")
    assert other.n_cached > 20 and sum(evaluated) <= 3  # only the end-of-turn tokens the saved state lacked


def test_bad_conversation_files_are_one_clear_error(tmp_path):
    cases = {"missing.json": None, "text.json": "not json", "other.json": '{"format": "x"}',
             "roles.json": '{"format": "pyllm-chat", "version": 1, "messages": [{"role": "assistant", "content": "a"}]}',
             "version.json": '{"format": "pyllm-chat", "version": 9, "messages": []}'}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(PyllmError, match=re.escape(str(path))):
            read_conversation(path)


def test_model_without_template_names_the_option():
    from pyllm.cli.chat import chat_template

    from pyllm.validate import chat_template_for

    meta = {"general.architecture": "llama", "tokenizer.ggml.tokens": ["a", "b"]}
    model = SimpleNamespace(metadata=meta, path="/m/base.gguf",
                            chat_template=lambda override: chat_template_for(meta, None, override))
    with pytest.raises(PyllmError, match="base.gguf has no chat template.*--chat-template FILE"):
        chat_template(model, None)


# --- the command through pipes -------------------------------------------------------------------------------
def pyllm_chat(*args, input, home):
    env = dict(os.environ, HOME=str(home))
    return subprocess.run([sys.executable, "-m", "pyllm", "chat", *map(str, args)], input=input, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_piped_lines_are_messages_and_only_replies_reach_stdout(smollm2, tmp_path):
    r = pyllm_chat(smollm2, "--temp", "0", "-n", "6", "-v", input="Hi!\n/stats\n/nope\nHow are you?\n",
                   home=tmp_path)
    assert r.returncode == 0, r.stderr
    turns = re.findall(r"prompt: (\d+) new tokens \((\d+) reused", r.stderr)
    assert len(turns) == 3 and int(turns[2][1]) > 0  # two replies (+ /stats), the second on the kept cache
    assert "unknown command /nope" in r.stderr
    assert ">>>" not in r.stdout and "\x1b" not in r.stdout + r.stderr and len(r.stdout.strip()) > 0


def test_chat_template_file_overrides_the_models(tiny_path, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ raise_exception('custom template in use') }}")
    r = pyllm_chat(tiny_path, "--chat-template", template, input="hi\n", home=tmp_path)
    # the override is used: it is checked on a sample conversation at start, and refuses it (exit 2, bad input)
    assert r.returncode == 2 and "custom template in use" in r.stderr and "Traceback" not in r.stderr
    r = pyllm_chat(tiny_path, "--chat-template", tmp_path / "none.jinja", input="hi\n", home=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "cannot read chat template" in r.stderr


# --- the command through a pseudo-terminal -------------------------------------------------------------------
STATS = re.compile(r"prompt: (\d+) new tokens \((\d+) reused from the cache\).*?reply: (\d+) tokens.*?context: (\d+)/")


class Terminal:
    """`pyllm chat MODEL --temp 0 -v ...` in a pseudo-terminal; with -v every reply ends with a stats line."""

    def __init__(self, model, *args, home):
        env = dict(os.environ, HOME=str(home), PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm")
        self.p = pexpect.spawn(sys.executable, ["-m", "pyllm", "chat", str(model), "--temp", "0", "-v", *args],
                               env=env, encoding="utf-8", timeout=TIMEOUT, dimensions=(50, 300))
        self.prompt()

    def prompt(self):
        self.p.expect(">>>")

    def ask(self, text: str) -> dict:
        """Send a message, wait for the whole reply; its stats."""
        self.p.sendline(text)
        return self.finish()

    def finish(self) -> dict:
        self.p.expect(STATS)
        self.reply = self.p.before  # the echoed message and the reply
        stats = dict(zip(("prefill", "reused", "generated", "context"), map(int, self.p.match.groups())))
        self.prompt()
        return stats

    def command(self, line: str, expect: str):
        self.p.sendline(line)
        self.p.expect(expect)
        self.prompt()

    def ctrl_d(self) -> int:
        self.p.sendeof()
        self.p.expect(pexpect.EOF)
        self.p.close()
        return self.p.exitstatus


def test_second_answer_uses_the_first_and_prefills_only_the_new_turn(qwen25, tmp_path):
    term = Terminal(qwen25, home=tmp_path)
    first = term.ask("My name is Ada.")
    second = term.ask("What is my name?")
    assert "Ada" in term.reply
    term.command(f"/save {tmp_path / 'ada.json'}", "saved 4 messages")
    assert term.ctrl_d() == 0
    # the second turn prefilled exactly its own tokens: the whole cache after the first turn was reused
    messages = json.loads((tmp_path / "ada.json").read_text())["messages"]
    model = pyllm.load_tokenizer(qwen25)
    template = ChatTemplate.for_model(read_metadata(qwen25))
    prompt2 = model.encode(template.render(messages[:3]), add_special=not template.renders_bos(), parse_special=True)
    assert second["reused"] == first["prefill"] + first["generated"] == first["context"]
    assert second["prefill"] == len(prompt2) - second["reused"] < 20
    print(f"turn 1: prefill {first['prefill']}, generated {first['generated']}; turn 2: prefill "
          f"{second['prefill']} of {len(prompt2)} prompt tokens, {second['reused']} reused")


def test_ctrl_c_stops_the_reply_and_the_session_goes_on(smollm2, tmp_path):
    term = Terminal(smollm2, "-n", "400", home=tmp_path)
    term.p.sendintr()  # on an empty line: says how to leave
    term.p.expect("Ctrl-D or /bye to leave")
    term.prompt()
    term.p.sendline("Write a long story about a dragon.")
    term.p.expect_exact("\x1b[?2004l")  # the prompt is done: from here on the model writes
    term.p.expect(r"\w+\W+\w+\W+\w+")
    term.p.sendintr()
    term.p.expect("stopped; the partial reply stays")
    stopped = term.finish()
    assert stopped["generated"] < 400
    term.command("/set max_tokens 5", ">>>")
    after = term.ask("Thanks. What is 2+2?")
    assert after["reused"] >= stopped["context"] - 1 and after["generated"] > 0
    term.command(f"/save {tmp_path / 'c.json'}", "saved 4 messages")
    term.p.sendline("/bye")
    term.p.expect(pexpect.EOF)
    term.p.close()
    assert term.p.exitstatus == 0
    partial = json.loads((tmp_path / "c.json").read_text())["messages"][1]["content"]
    assert len(partial.split()) >= 3


def test_multiline_paste_save_and_load(smollm2, tmp_path):
    term = Terminal(smollm2, "-n", "4", home=tmp_path)
    term.command("/hello", "unknown command /hello")
    term.p.send('"""\r')
    term.p.send("first line\r")
    term.p.send('second line"""\r')
    term.finish()
    term.p.send("\x1b[200~pasted one\npasted two\x1b[201~\r")  # bracketed paste, then Enter
    turn = term.finish()
    term.command(f"/save {tmp_path / 'c.json'}", "saved 4 messages")
    term.command("/clear", "new conversation")
    term.p.sendline(f"/load {tmp_path / 'c.json'}")
    term.p.expect(r"loaded 4 messages .*?; (\d+) tokens in the cache")
    loaded = int(term.p.match.group(1))
    term.prompt()
    after = term.ask("Thanks!")
    assert term.ctrl_d() == 0

    users = [m["content"] for m in json.loads((tmp_path / "c.json").read_text())["messages"][::2]]
    assert users == ["first line\nsecond line", "pasted one\npasted two"]
    assert loaded > turn["context"]  # the whole conversation, up to the end of the last reply
    assert after["reused"] == loaded
    assert (tmp_path / ".cache" / "pyllm" / "chat_history").read_text().count("+") >= 4
