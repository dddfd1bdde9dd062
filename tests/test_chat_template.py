"""Chat templates: real templates render the ChatML/Gemma text their formats specify, built-ins match llama.cpp,
and a hostile template can neither run code, mutate our data, nor hang or flood us."""

import json
import mmap
import struct
import sys
import time
from pathlib import Path

import jinja2
import pytest

from pyllm import chat_template
from pyllm.chat_template import BUILTINS, ChatTemplate
from pyllm.errors import TemplateError

MODELS = Path(__file__).resolve().parent.parent / "models"
SMOLLM2 = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN = MODELS / "qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf"
GEMMA = MODELS / "gemma-3-270m-q4_k_m.gguf"
PREFIX = "unsafe or broken chat template: "

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]
# ChatML, written from the format itself: <|im_start|>{role}\n{content}<|im_end|>\n per turn, then the open reply
CHATML_EXPECTED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n"
    "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# llama.cpp's built-in "gemma" (src/llama-chat.cpp): system folded into the first user turn, assistant -> model;
# <bos> first, as HF's Gemma template renders it and llama.cpp's tokenizer adds it (add_bos_token=true)
GEMMA_EXPECTED = (
    "<bos><start_of_turn>user\nYou are a helpful assistant.\n\nWhat is 2+2?<end_of_turn>\n"
    "<start_of_turn>model\n4<end_of_turn>\n"
    "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
    "<start_of_turn>model\n"
)

# the templates stored in the GGUFs (embedded so the tests also run where the models are not downloaded)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------- reading real GGUF metadata (test helper)
def read_gguf_metadata(path: Path) -> dict:
    """Metadata key/values of a GGUF (no tensors). gguf.GGUFReader takes up to ~10 s on these files."""
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 0

        def take(fmt):
            nonlocal pos
            (value,) = struct.unpack_from("<" + fmt, m, pos)
            pos += struct.calcsize(fmt)
            return value

        def string():
            nonlocal pos
            n = take("Q")
            pos += n
            return m[pos - n : pos].decode("utf-8", errors="replace")

        def value(kind):
            nonlocal pos
            if kind == 8:
                return string()
            if kind != 9:
                return take(scalar[kind])
            item, count = take("I"), take("Q")
            if item in scalar:  # numeric arrays (scores, token types): skip, no test needs them
                pos += count * struct.calcsize(scalar[item])
                return None
            return [value(item) for _ in range(count)]

        assert m[:4] == b"GGUF"
        pos = 4 + 4 + 8  # magic, version, tensor count
        return {string(): value(take("I")) for _ in range(take("Q"))}


_META = {}


def real_meta(path: Path) -> dict:
    if not path.exists():
        pytest.skip(f"{path.name} not downloaded")
    if path not in _META:
        _META[path] = read_gguf_metadata(path)
    return _META[path]


# ---------------------------------------------------------------- real templates and built-ins
@pytest.mark.parametrize("where", ["embedded", "gguf"])
def test_smollm2_template_renders_chatml(where):
    source = real_meta(SMOLLM2)["tokenizer.chat_template"] if where == "gguf" else SMOLLM2_TEMPLATE
    t = ChatTemplate(source)
    assert t.render(CONVERSATION) == CHATML_EXPECTED
    assert t.render(CONVERSATION, add_generation_prompt=False) == CHATML_EXPECTED.removesuffix(
        "<|im_start|>assistant\n"
    )
    # SmolLM2's own rule: no system turn -> it inserts its default one
    assert t.render(CONVERSATION[1:2]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_smollm2_real_model_chooses_gguf_template_and_knows_its_bos():
    meta = real_meta(SMOLLM2)
    t = ChatTemplate.for_model(meta)
    assert t.name == "gguf" and t.render(CONVERSATION) == CHATML_EXPECTED
    # SmolLM2's BOS token *is* <|im_start|>, so the rendered text already begins with BOS: adding one would
    # tokenize to <|im_start|><|im_start|>system (the double-BOS trap)
    assert (t.bos_token, t.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert t.renders_bos() is True


def test_qwen_real_template_renders_chatml_with_and_without_tools():
    meta = real_meta(QWEN)
    t = ChatTemplate.for_model(meta)
    assert (t.name, t.bos_token, t.eos_token) == ("gguf", "<|endoftext|>", "<|im_end|>")
    assert t.render(CONVERSATION) == CHATML_EXPECTED
    assert t.renders_bos() is False
    assert t.render(CONVERSATION[1:2]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"city": {"type": "string"}}}}
    chat = [
        {"role": "user", "content": "Wetter in Köln?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Köln"}}}]},
        {"role": "tool", "content": "12°C"},
    ]
    text = t.render(chat, tools=[tool])
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n")
    # HF-style tojson: non-ASCII kept as is, ", " and ": " separators
    assert '<tools>\n{"type": "function", "function": {"name": "weather", "parameters": {"city": {"type": "string"}}}}\n</tools>' in text
    assert text.endswith(
        "<|im_start|>user\nWetter in Köln?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "weather", "arguments": {"city": "Köln"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n12°C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_gemma_builtin_matches_llama_cpp_format():
    t = ChatTemplate(BUILTINS["gemma"], bos_token="<bos>", eos_token="<eos>", name="gemma")
    assert t.render(CONVERSATION) == GEMMA_EXPECTED
    assert t.renders_bos() is True
    # llama.cpp trims contents; without a system turn nothing is folded
    assert t.render([{"role": "user", "content": "  hi \n"}]) == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert t.render(CONVERSATION[:3], add_generation_prompt=False).endswith("<start_of_turn>model\n4<end_of_turn>\n")


def test_gemma_real_model_has_no_template_and_gets_the_builtin():
    meta = real_meta(GEMMA)
    assert "tokenizer.chat_template" not in meta
    t = ChatTemplate.for_model(meta)
    assert (t.name, t.bos_token, t.eos_token) == ("gemma", "<bos>", "<eos>")
    assert t.render(CONVERSATION) == GEMMA_EXPECTED
    assert t.renders_bos() is True


def test_chatml_builtin():
    assert ChatTemplate(BUILTINS["chatml"]).render(CONVERSATION) == CHATML_EXPECTED


# ---------------------------------------------------------------- choosing a template
def meta_with(tokens, arch="llama", template=None):
    meta = {"general.architecture": arch, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1}
    if template is not None:
        meta["tokenizer.chat_template"] = template
    return meta


def test_for_model_precedence_and_special_tokens():
    meta = meta_with(["<s>", "</s>", "<|im_start|>"], template="{{ bos_token }}[gguf]{{ eos_token }}")
    assert ChatTemplate.for_model(meta).render([]) == "<s>[gguf]</s>"
    over = ChatTemplate.for_model(meta, override="[override]{{ messages[0].content }}")
    assert (over.name, over.render(CONVERSATION[1:2])) == ("override", "[override]What is 2+2?")
    named = ChatTemplate.for_model(meta, override="chatml")  # a built-in name, as llama.cpp's --chat-template
    assert (named.name, named.render(CONVERSATION)) == ("chatml", CHATML_EXPECTED)


@pytest.mark.parametrize(
    "arch, tokens, expected",
    [
        ("gemma", ["<pad>", "<eos>"], "gemma"),
        ("gemma2", ["<pad>", "<eos>"], "gemma"),
        ("gemma3", ["<pad>", "<eos>"], "gemma"),
        ("llama", ["<s>", "</s>", "<start_of_turn>"], "gemma"),
        ("llama", ["<|endoftext|>", "<|im_end|>", "<|im_start|>"], "chatml"),
        ("llama", ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>"], "llama3"),
    ],
)
def test_for_model_builtin_fallback(arch, tokens, expected):
    assert ChatTemplate.for_model(meta_with(tokens, arch)).name == expected


def test_for_model_without_any_fit_raises():
    with pytest.raises(TemplateError, match="^unsafe or broken chat template: .*no tokenizer.chat_template"):
        ChatTemplate.for_model(meta_with(["<s>", "</s>"], "mamba"))


def test_renders_bos():
    assert ChatTemplate("{{ bos_token }}{{ messages[0].content }}", bos_token="<s>").renders_bos() is True
    assert ChatTemplate("{{ messages[0].content }}", bos_token="<s>").renders_bos() is False
    assert ChatTemplate(BUILTINS["chatml"], bos_token="<|endoftext|>").renders_bos() is False
    assert ChatTemplate("{{ bos_token }}x", bos_token="").renders_bos() is False  # no BOS text: nothing to double
    # a template that refuses the probe conversation is judged by its source
    picky = "{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}{{ bos_token }}"
    assert ChatTemplate(picky, bos_token="<s>").renders_bos() is True


# ---------------------------------------------------------------- HF compatibility of the environment
def test_hf_environment_features():
    t = ChatTemplate(
        # trim_blocks + lstrip_blocks: block tags leave no indentation or newline behind; loopcontrols: break
        "{% for m in messages %}\n  {% if loop.index0 == 1 %}{% break %}{% endif %}\n{{ m.role }}\n{% endfor %}"
        "{{ {'k': 'ü', 'n': [1]} | tojson(indent=2) }}|{{ tools }}|{{ date_string }}|{{ strftime_now('%Y') }}|{{ custom }}"
    )
    out = t.render(CONVERSATION, custom="extra")
    year = time.strftime("%Y")
    assert out == 'system\n{\n  "k": "ü",\n  "n": [\n    1\n  ]\n}|None|' + time.strftime("%d %b %Y") + f"|{year}|extra"


def test_raise_exception_message_surfaces():
    t = ChatTemplate("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}")
    with pytest.raises(TemplateError, match="^unsafe or broken chat template: .*System role not supported"):
        t.render(CONVERSATION)


@pytest.mark.parametrize("source", ["{% for %}", "{{ messages[ }}", "{% if x %}no endif", "{% generation %}x{% endgeneration %}"])
def test_broken_template_fails_at_load(source):
    with pytest.raises(TemplateError, match="^" + PREFIX):
        ChatTemplate(source)


def test_runtime_errors_become_template_errors():
    with pytest.raises(TemplateError, match="^" + PREFIX + "ZeroDivisionError"):
        ChatTemplate("{{ 1 // 0 }}").render([])
    with pytest.raises(TemplateError, match="^" + PREFIX):
        ChatTemplate("{{ messages[0].content.nope.deeper }}").render(CONVERSATION)


# ---------------------------------------------------------------- hostile templates: no code runs, nothing mutates
PAYLOADS = [
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ namespace.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self.__init__ }}",  # the stock sandbox renders this as "" instead of failing
    "{{ self._TemplateReference__context }}",
    "{{ raise_exception.__globals__['os'].popen('touch MARKER') }}",
    "{{ strftime_now.__globals__ }}",
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}{{ c(['touch', 'MARKER']) }}{% endif %}{% endfor %}",
    "{{ ''|attr('__class__')|attr('__mro__') }}",
    "{{ messages|map(attribute='__class__')|list }}",
    "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "{{ messages.__getitem__(0) }}",
    "{% set ns = namespace() %}{{ ns.__init__.__globals__ }}",
    "{% set ns = namespace(m=messages) %}{{ ns.m.append({'role': 'evil'}) }}",
    "{{ messages.append({'role': 'evil'}) }}",
    "{{ messages.pop() }}",
    "{{ messages[0].update({'content': 'evil'}) }}",
    "{{ messages[0].clear() }}",
    "{{ tools.append('evil') }}",
    "{% set x = messages[0].setdefault('evil', 1) %}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_hostile_template_raises_and_has_no_effect(payload, tmp_path):
    marker = tmp_path / "pwned"
    messages = json.loads(json.dumps(CONVERSATION))
    tools = [{"name": "t"}]
    with pytest.raises(TemplateError, match="^" + PREFIX):
        ChatTemplate(payload.replace("MARKER", str(marker))).render(messages, tools=tools)
    assert not marker.exists()
    assert messages == CONVERSATION and tools == [{"name": "t"}]


def test_payload_is_a_real_exploit_outside_the_sandbox(tmp_path):
    """Control for the test above: the same text in a plain jinja2 Environment does run a shell command."""
    marker = tmp_path / "pwned"
    jinja2.Environment().from_string(PAYLOADS[0].replace("MARKER", str(marker))).render()
    assert marker.exists()


def test_template_sees_a_copy_of_the_callers_data():
    # namespace attributes are the one writable thing in the sandbox: rebinding them must not reach the caller
    messages = json.loads(json.dumps(CONVERSATION))
    ChatTemplate("{% set ns = namespace(m=messages[0]) %}{% set ns.m = 'x' %}{{ ns.m }}").render(messages)
    assert messages == CONVERSATION


# ---------------------------------------------------------------- hostile templates: no hang, no flood
SLOW_OR_HUGE = [
    "{% for i in range(10**9) %}{% endfor %}",
    "{% for i in range(100000) %}{% endfor %}",  # over the range cap
    "{% for i in range(9999) %}{% for j in range(9999) %}{% for k in range(9999) %}{% endfor %}{% endfor %}{% endfor %}",
    "{% set s = 'ab' * 400000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",  # plain loops, no calls
    "{% set ns = namespace(i=0) %}{% for a in range(9999) %}{% for b in range(9999) %}{% set ns.i = ns.i + 1 %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% macro f() %}{{ f() }}{{ f() }}{% endmacro %}{{ f() }}",
    "{% macro f(n) %}{% if n < 500 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
    "{{ 'x' * 10**8 }}",
    "{{ 'x' * 100000000 }}",
    "{{ ['x'] * 10**8 }}",
    "{% for i in range(9999) %}{% for j in range(9999) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    "{% for i in range(9999) %}{{ messages[0].content * 1000 }}{% endfor %}",
    "{{ 10 ** (10 ** 10) }}",
    "{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f('x', 64) }}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ '%999999999d'|format(1) }}",
    "{% set a = 'x' * 100000 %}{{ a|replace('', a) }}",
    "{% set a = 'x\n' * 400000 %}{{ a|indent(' ' * 20000) }}",
    "{{ (['x'] * 100000)|join('y' * 10000) }}",
    "{{ ('y' * 10000).join(['x'] * 100000) }}",
    "{{ lipsum(n=10**6) }}",
]


@pytest.mark.parametrize("source", SLOW_OR_HUGE)
def test_endless_or_huge_template_fails_fast(source, monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.5)  # keeps the suite quick; the default is tested below
    start = time.monotonic()
    with pytest.raises(TemplateError, match="^" + PREFIX):
        ChatTemplate(source).render(CONVERSATION)
    assert time.monotonic() - start < 1.5


def test_default_time_limit_is_about_two_seconds():
    start = time.monotonic()
    with pytest.raises(TemplateError, match="^unsafe or broken chat template: rendering took longer than 2 s"):
        ChatTemplate("{% for a in range(9999) %}{% for b in range(9999) %}{% endfor %}{% endfor %}").render([])
    assert 1.9 < time.monotonic() - start < 3.0


def test_limits_leave_no_tracer_behind():
    before = sys.gettrace()
    ChatTemplate(BUILTINS["chatml"]).render(CONVERSATION)
    with pytest.raises(TemplateError):
        ChatTemplate("{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}").render([])
    assert sys.gettrace() is before


@pytest.mark.parametrize("name", ["chatml", "gemma"])
def test_long_but_legitimate_conversation_renders(name):
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 20000} for i in range(8)]
    text = ChatTemplate(BUILTINS[name]).render(chat)
    assert len(text) > 790_000 and text.count("word") == 160_000


def test_big_numbers_as_data_are_fine():
    # the caps are on widths/repeats (filter parameters, str-method arguments), not on numbers being printed
    t = ChatTemplate("{% macro show(n) %}{{ n }}{% endmacro %}{{ 5000000|string }} {{ 10**30 }} {{ show(123456789) }}"
                     " {{ {'max': 10**12}|tojson }}")
    assert t.render([]) == '5000000 1000000000000000000000000000000 123456789 {"max": 1000000000000}'
    # a 7-digit number in a message is data, not a format width
    phone = [{"role": "user", "content": " call 5551234567 "}]
    assert ChatTemplate("{{ messages[0].content.strip() }}|{{ '{}'.format(messages[0].content) }}").render(phone) == (
        "call 5551234567| call 5551234567 "
    )
