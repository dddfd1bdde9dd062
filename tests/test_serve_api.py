"""pyllm serve against bad and hostile requests, on a tiny random model (a real server process, real HTTP):
every one gets OpenAI's error object with the right status, never a 5xx, and the server stays healthy.
Plus the endpoints beside completions (models, tokenize, detokenize, metrics), the API key and a fuzz of
request bodies (hypothesis; PYLLM_FUZZ_EXAMPLES sets how many, 200 by default; PYLLM_FUZZ_SEED=N draws
other bodies than the fixed ones)."""
import json
import os
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from serving import serve
from tiny import write_tiny_model

N_CTX = 256  # the tiny model's context


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("serve-tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def server(tiny_path, tmp_path_factory):
    with serve(tiny_path, "--parallel", "2", "--max-queue", "32", log_dir=tmp_path_factory.mktemp("log")) as s:
        yield s


def post(server, path, body, headers=None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json",
                                                                   **(headers or {})}, timeout=60)


def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    if param:
        assert error["param"] == param, error
    if code:
        assert error["code"] == code, error
    return error


CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]

BAD = [  # (path, body, status, param, code)
    (CHAT, b'{"messages": [', 400, None, None),
    (CHAT, b"[1, 2]", 400, None, None),
    (CHAT, b"\xff\xfe{}", 400, None, None),
    (CHAT, b"", 400, None, None),
    (CHAT, b"[" * 100_000 + b"]" * 100_000, 400, None, None),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "n": ' + b"9" * 5000 + b"}", 400, None, None),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature", None),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages", None),
    (CHAT, {"messages": "hi"}, 400, "messages", None),
    (CHAT, {"messages": []}, 400, "messages", None),
    (CHAT, {}, 400, "messages", None),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", None),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages", None),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages", None),
    (CHAT, {"messages": HI, "temperature": "hot"}, 400, "temperature", None),
    (CHAT, {"messages": HI, "temperature": -1}, 400, "temperature", None),
    (CHAT, {"messages": HI, "top_p": 1.5}, 400, "top_p", None),
    (CHAT, {"messages": HI, "stream": "yes"}, 400, "stream", None),
    (CHAT, {"messages": HI, "max_tokens": -5}, 400, "max_tokens", None),
    (CHAT, {"messages": HI, "max_tokens": 0}, 400, "max_tokens", None),
    (CHAT, {"messages": HI, "max_tokens": 1.5}, 400, "max_tokens", None),
    (CHAT, {"messages": HI, "max_tokens": True}, 400, "max_tokens", None),
    (CHAT, {"messages": HI, "max_tokens": 10**30}, 400, "max_tokens", None),
    (CHAT, {"messages": HI, "max_completion_tokens": -1}, 400, "max_completion_tokens", None),
    (CHAT, {"messages": HI, "n": 0}, 400, "n", None),
    (CHAT, {"messages": HI, "n": 1000}, 400, "n", None),
    (CHAT, {"messages": HI, "seed": "x"}, 400, "seed", None),
    (CHAT, {"messages": HI, "stop": [1, 2]}, 400, "stop", None),
    (CHAT, {"messages": HI, "stop": ["x"] * 100}, 400, "stop", None),
    (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs", None),
    (CHAT, {"messages": HI, "stream_options": 3}, 400, "stream_options", None),
    (CHAT, {"messages": HI, "response_format": {"type": "json_object"}}, 400, "response_format", None),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages", "context_length_exceeded"),
    (CHAT, {"messages": HI, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    (CHAT, {"messages": HI, "model": 7}, 400, "model", None),
    ("/v1/completions", {}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [[1], "a", 3]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": ["a"] * 5, "n": 4}, 400, "n", None),
    ("/v1/completions", {"prompt": "x", "logprobs": 9}, 400, "logprobs", None),
    ("/v1/completions", {"prompt": "x " * 300}, 400, "prompt", "context_length_exceeded"),
    ("/tokenize", {"content": 5}, 400, "content", None),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", None),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens", None),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD, ids=range(len(BAD)))
def test_bad_request_gets_an_error_object(server, path, body, status, param, code):
    assert_error(post(server, path, body), status, param, code)


def test_size_limits_methods_and_paths(server):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (5 << 20)}]}).encode()
    assert_error(post(server, CHAT, big), 413, code="request_too_large")
    # a body that says nothing of its length (chunked) is cut off at the limit too
    assert_error(httpx.post(server.url + CHAT, content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                            timeout=60), 413)
    assert_error(httpx.get(server.url + CHAT, timeout=10), 405)
    assert_error(httpx.get(server.url + "/v2/nothing", timeout=10), 404, code="not_found")
    assert_error(httpx.post(server.url + "/health", timeout=10), 405)
    assert server.health()["status"] == "ok"


def test_openai_client_reads_errors(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=HI)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=HI, max_tokens=-1)
    assert "max_tokens" in str(e.value)


def test_models_tokenize_detokenize(server, tiny_path):
    models = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny.gguf"]
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in c.models.list()] == ["tiny.gguf"]
    for name in ("tiny.gguf", "tiny", None):  # the file name, its stem, or no model at all
        body = {"messages": HI, "max_tokens": 3, "temperature": 0} | ({"model": name} if name else {})
        assert post(server, CHAT, body).status_code == 200
    ids = post(server, "/tokenize", {"content": "the cat sat"}).json()["tokens"]
    assert ids and all(isinstance(t, int) for t in ids)
    pieces = post(server, "/tokenize", {"content": "the cat", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "the cat"
    assert post(server, "/detokenize", {"tokens": ids}).json()["content"] == "the cat sat"
    out = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 4, "temperature": 0}).json()
    assert out == out | {"object": "text_completion"} and out["usage"]["prompt_tokens"] == len(ids)
    multi = post(server, "/v1/completions", {"prompt": ["a", "b c"], "n": 2, "max_tokens": 2}).json()
    assert [ch["index"] for ch in multi["choices"]] == [0, 1, 2, 3]


def test_completion_logprobs_and_stream_shapes(server):
    out = post(server, "/v1/completions", {"prompt": "the cat", "max_tokens": 5, "temperature": 0,
                                           "logprobs": 2}).json()
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 5,
                                                                    "temperature": 0, "stream": True},
                      timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == out["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]


def test_metrics_and_access_log(server):
    post(server, CHAT, {"messages": HI, "max_tokens": 2})
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("pyllm_requests_total", "pyllm_prompt_tokens_total", "pyllm_generated_tokens_total",
                 "pyllm_queue_length", "pyllm_busy_slots", "pyllm_time_to_first_token_seconds_bucket",
                 "pyllm_time_per_output_token_seconds_bucket"):
        assert name in text
    time.sleep(0.2)
    chat_lines = [line for line in server.log_lines() if '"POST /v1/chat/completions" 200' in line]
    assert chat_lines and all(" in=" in line and " out=" in line and " total=" in line for line in chat_lines)
    assert "Traceback" not in "\n".join(server.log_lines())


def test_api_key(tiny_path, tmp_path):
    with serve(tiny_path, "--parallel", "1", log_dir=tmp_path, env={"PYLLM_API_KEY": "s3cret"}) as s:
        assert_error(post(s, CHAT, {"messages": HI}), 401, code="invalid_api_key")
        assert_error(post(s, CHAT, {"messages": HI}, headers={"authorization": "Bearer s3cres"}), 401)
        assert_error(httpx.get(s.url + "/v1/models", headers={"authorization": "s3cret"}, timeout=10), 401)
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200  # for load balancers
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert c.chat.completions.create(model="tiny", messages=HI, max_tokens=2).usage.completion_tokens <= 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()


# --- fuzz ----------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]),
                                        "text": st.text(max_size=20) | json_values}), max_size=3)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", ""])
                                 | json_values, "content": st.text(max_size=40) | parts | json_values})
FIELDS = {
    "model": st.sampled_from(["tiny", "tiny.gguf", "gpt-4o", ""]) | json_values,
    "messages": st.lists(message, max_size=4) | json_values,
    "prompt": st.text(max_size=60) | st.lists(st.integers(-5, 300), max_size=8) | st.lists(st.text(max_size=9), max_size=3)
    | json_values,
    "max_tokens": st.integers(-3, 2**40) | json_values,
    "max_completion_tokens": st.integers(-3, 300) | json_values,
    "temperature": st.floats(-1, 3) | json_values, "top_p": st.floats(-0.5, 1.5) | json_values,
    "top_k": st.integers(-2, 100) | json_values, "min_p": st.floats(-0.5, 1.5) | json_values,
    "repeat_penalty": st.floats(-1, 3) | json_values,
    "presence_penalty": st.floats(-3, 3) | json_values, "frequency_penalty": st.floats(-3, 3) | json_values,
    "seed": st.integers(-2**64, 2**65) | json_values, "n": st.integers(-1, 20) | json_values,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=20) | json_values,
    "logprobs": st.booleans() | st.integers(-1, 8) | json_values, "top_logprobs": st.integers(-1, 25) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | json_values}) | json_values,
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}) | json_values,
    "content": st.text(max_size=60) | json_values, "tokens": st.lists(st.integers(-5, 300), max_size=8) | json_values,
    "add_special": st.booleans() | json_values, "with_pieces": st.booleans() | json_values,
}
# sane values (some at the edges), so that a good share of the bodies gets as far as generating
SANE = {
    "model": st.sampled_from(["tiny", "tiny.gguf"]),
    "max_tokens": st.integers(1, 48) | st.just(2**31 - 1), "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1), "top_k": st.integers(0, 100), "min_p": st.floats(0, 1),
    "repeat_penalty": st.floats(0.5, 2), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "seed": st.integers(0, 2**64 - 1), "n": st.integers(1, 4), "stop": st.text(max_size=3) | st.lists(st.text(
        max_size=3), max_size=4), "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
sane_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                "content": st.text(max_size=40)}), min_size=1, max_size=4)
bodies = (st.fixed_dictionaries({}, optional=FIELDS)
          | st.fixed_dictionaries({"messages": sane_messages}, optional=SANE)
          | st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=60)},
                                  optional=SANE | {"logprobs": st.integers(0, 5)}))
PATHS = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]


def mutate(raw: bytes, data) -> bytes:
    """A few byte edits of a valid body: truncations, flips, insertions."""
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        kind = data.draw(st.sampled_from(["cut", "flip", "insert"]))
        if kind == "cut":
            del raw[at:]
        elif kind == "flip" and at < len(raw):
            raw[at] = data.draw(st.integers(0, 255))
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    return bytes(raw)


FUZZ_EXAMPLES = int(os.environ.get("PYLLM_FUZZ_EXAMPLES", "200"))
FUZZ_SEED = os.environ.get("PYLLM_FUZZ_SEED")  # unset: the same bodies every run (CI); set: other ones
fuzz_count = {"bodies": 0, "ok": 0}


@(seed(int(FUZZ_SEED)) if FUZZ_SEED else (lambda f: f))
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not FUZZ_SEED, database=None,
          suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(PATHS), body=bodies, raw=st.booleans(), data=st.data())
def fuzz_one(server, path, body, raw, data):
    content = json.dumps(body).encode()  # json's NaN/Infinity pass through: Python's parser accepts them
    if raw:
        content = mutate(content, data)
    fuzz_count["bodies"] += 1
    if body.get("stream") is True and not raw:
        with httpx.stream("POST", server.url + path, content=content, timeout=120) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code < 500, (content, r.status_code)
        if r.headers["content-type"].startswith("text/event-stream"):
            assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines), lines
        else:
            assert r.status_code != 200 or path in ("/tokenize", "/detokenize"), (content, lines)
    else:
        r = httpx.post(server.url + path, content=content, timeout=120)
        assert r.status_code < 500, (content, r.text)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    fuzz_count["ok"] += r.status_code == 200


def test_fuzz_request_bodies(server):
    t0 = time.monotonic()
    fuzz_one(server)
    spent = time.monotonic() - t0
    print(f"\nfuzz: {fuzz_count['bodies']} bodies ({fuzz_count['ok']} answered 200) in {spent:.0f} s, no 5xx")
    assert fuzz_count["bodies"] >= FUZZ_EXAMPLES * 0.9
    assert server.health()["status"] == "ok"
    server.wait_idle(within=5.0)
    assert "Traceback" not in "\n".join(server.log_lines())


def test_start_up_errors_are_one_line(tiny_path, tmp_path):
    import socket
    import subprocess

    from serving import PYLLM

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        for args, code in ((["serve", str(tmp_path / "missing.gguf")], 2),
                           (["serve", str(tiny_path), "--port", str(taken.getsockname()[1])], 1),
                           (["serve", str(tiny_path), "--port", "0", "--max-queue", "-1"], 1)):
            r = subprocess.run(PYLLM + args, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
            assert r.returncode == code and len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert r.stderr.startswith("pyllm: error: ") and "Traceback" not in r.stderr
    finally:
        taken.close()
