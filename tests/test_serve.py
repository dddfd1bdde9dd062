"""pyllm serve on a real model (smollm2-135m): a real server process, the official openai client and httpx.

Greedy answers equal `pyllm run --temp 0`; concurrent clients (some streaming, some leaving midway) each get
their lone greedy output; a client that leaves frees its slot at once; SIGTERM finishes what is in flight."""
import json
import random
import signal
import subprocess
import threading
import time

import httpx
import openai
import pytest
from serving import PYLLM, serve

SYSTEM = "You are a helpful assistant. Answer briefly."
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"  # greedy goes on counting: a long answer, no early end
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
             "What is 2 + 2?", "Why is the sky blue?", "Give me a word that rhymes with cat.",
             "What do bees make?", "Translate 'thank you' into Spanish."]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    with serve(smollm2, "--parallel", "4", log_dir=tmp_path_factory.mktemp("serve")) as s:
        yield s


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300, **kw)


def pyllm_run(model, question, system=None, n=32):
    args = PYLLM + ["run", str(model), "-p", question, "--temp", "0", "-n", str(n)]
    if system:
        args += ["--system", system]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return r.stdout


def messages(question, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_greedy_chat_equals_pyllm_run(server, smollm2, system):
    c = client(server)
    for question in QUESTIONS[:2]:
        expected = pyllm_run(smollm2, question, system)
        whole = c.chat.completions.create(model="smollm2-135m", messages=messages(question, system),
                                          temperature=0, max_tokens=32)
        assert whole.choices[0].message.content == expected
        assert whole.usage.completion_tokens <= 32 and whole.usage.prompt_tokens > 0
        assert whole.choices[0].finish_reason in ("stop", "length")
        stream = c.chat.completions.create(model="smollm2-135m", messages=messages(question, system),
                                           temperature=0, max_tokens=32, stream=True,
                                           stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == expected
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_greedy_completion_equals_pyllm_run_raw(server, smollm2):
    prompt = "The capital of France is"
    r = subprocess.run(PYLLM + ["run", str(smollm2), "--raw", "-p", prompt, "--temp", "0", "-n", "16"],
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    out = client(server).completions.create(model="smollm2-135m", prompt=prompt, temperature=0, max_tokens=16)
    assert out.choices[0].text == r.stdout and out.usage.completion_tokens == 16


def test_logprobs_and_n(server):
    c = client(server)
    out = c.chat.completions.create(model="smollm2-135m", messages=messages(QUESTIONS[0]), temperature=0,
                                    max_tokens=6, logprobs=True, top_logprobs=3, n=2)
    assert [ch.index for ch in out.choices] == [0, 1]
    assert out.choices[0].message.content == out.choices[1].message.content  # greedy: the same twice
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens / 2
    for entry in content:
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == entry.top_logprobs[0].logprob
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
    sampled = c.chat.completions.create(model="smollm2-135m", messages=messages(QUESTIONS[2]), temperature=1.0,
                                        max_tokens=12, seed=7, n=3)
    again = c.chat.completions.create(model="smollm2-135m", messages=messages(QUESTIONS[2]), temperature=1.0,
                                      max_tokens=12, seed=7, n=3)
    assert [ch.message.content for ch in sampled.choices] == [ch.message.content for ch in again.choices]


def lone_outputs(server, cases, max_tokens):
    """Each case's greedy answer asked alone (one request at a time)."""
    c = client(server)
    return [c.chat.completions.create(model="smollm2-135m", messages=m, temperature=0,
                                      max_tokens=max_tokens).choices[0].message.content for m in cases]


def test_concurrent_clients_some_leaving(server):
    """16 clients at once, half streaming, a quarter leaving at a random point: every answer that completes
    equals its lone greedy output, and no slot is busy a second after the last client."""
    rng = random.Random(16)
    cases = [messages(q, SYSTEM if i % 2 else None) for i, q in enumerate(QUESTIONS * 2)]
    max_tokens = 24
    expected = lone_outputs(server, cases, max_tokens)
    outcomes = [None] * len(cases)

    def one(i):
        streaming, leaving = i % 2 == 0, i % 8 in (1, 2)  # 8 streaming; 4 leaving, 2 of them streaming
        body = {"model": "smollm2-135m", "messages": cases[i], "temperature": 0, "max_tokens": max_tokens,
                "stream": streaming}
        time.sleep(rng.random() * 0.3)
        try:
            if streaming:
                with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=300) as r:
                    text, stop_after = "", rng.randint(1, 10) if leaving else None
                    for n, line in enumerate(r.iter_lines()):
                        if stop_after is not None and n >= stop_after:
                            outcomes[i] = "left"
                            return  # closing the response drops the connection
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                    outcomes[i] = text
            else:
                timeout = rng.uniform(0.05, 1.0) if leaving else 300
                try:
                    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)
                    outcomes[i] = r.json()["choices"][0]["message"]["content"]
                except httpx.ReadTimeout:
                    outcomes[i] = "left"
        except Exception as e:  # noqa: BLE001 (reported below)
            outcomes[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    server.wait_idle(within=1.0)
    assert all(not isinstance(o, Exception) and o is not None for o in outcomes), outcomes
    completed = [i for i, o in enumerate(outcomes) if o != "left"]
    assert len(completed) >= 12
    for i in completed:
        assert outcomes[i] == expected[i], f"client {i} differs from its lone output"
    assert server.proc.poll() is None and server.health()["status"] == "ok"


@pytest.fixture(scope="module")
def one_slot(smollm2, tmp_path_factory):
    with serve(smollm2, "--parallel", "1", "--max-queue", "1", log_dir=tmp_path_factory.mktemp("serve1")) as s:
        yield s


def generated_total(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("pyllm_generated_tokens_total")))


def test_a_client_that_leaves_frees_its_slot(one_slot):
    body = {"prompt": COUNTING, "temperature": 0, "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", one_slot.url + "/v1/completions", json=body, timeout=300) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 6:
                break
    one_slot.wait_idle(within=1.0)
    # not streaming: the client gives up while the answer is being decoded
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(one_slot.url + "/v1/completions", json={**body, "stream": False}, timeout=1.0)
    one_slot.wait_idle(within=1.0)
    # queued: a request waiting behind a long one leaves; it is never run (its tokens never counted)
    before = generated_total(one_slot)
    with httpx.stream("POST", one_slot.url + "/v1/completions", json=body, timeout=300) as r:
        lines = r.iter_lines()
        next(lines)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(one_slot.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 5},
                       timeout=0.3)
    one_slot.wait_idle(within=1.0)
    out = client(one_slot).chat.completions.create(model="smollm2-135m", messages=messages("Hi"), max_tokens=4)
    assert out.usage.completion_tokens <= 4
    log = "\n".join(one_slot.log_lines())
    assert log.count("499") >= 2 and "stream cut short" in log
    assert generated_total(one_slot) - before < 3000


def test_full_queue_is_429_with_retry_after(one_slot):
    body = {"prompt": COUNTING, "temperature": 0, "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", one_slot.url + "/v1/completions", json=body, timeout=300) as running:
        lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
        next(lines)
        with httpx.stream("POST", one_slot.url + "/v1/completions", json=body, timeout=300) as queued:
            time.sleep(0.3)  # its headers come at once, but it waits in the queue (of 1) for the slot
            r = httpx.post(one_slot.url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            del queued
    one_slot.wait_idle(within=1.0)


def test_sigterm_finishes_requests_in_flight_and_exits_0(smollm2, tmp_path):
    with serve(smollm2, "--parallel", "2", "--shutdown-timeout", "120", log_dir=tmp_path) as s:
        body = {"messages": messages(QUESTIONS[4]), "temperature": 0, "max_tokens": 16, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=300) as r:
            lines = r.iter_lines()
            next(lines)
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # finished within the grace period
        assert s.proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(s.url + "/health", timeout=5)
        assert "Traceback" not in "\n".join(s.log_lines())


def test_sigterm_past_the_grace_period_cancels_and_exits_0(smollm2, tmp_path):
    with serve(smollm2, "--parallel", "1", "--shutdown-timeout", "0.5", log_dir=tmp_path) as s:
        body = {"prompt": COUNTING, "temperature": 0, "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=300) as r:
            lines = r.iter_lines()
            next(lines)
            s.proc.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.RemoteProtocolError):  # cut off: no [DONE]
                list(lines)
        assert s.proc.wait(60) == 0
        log = "\n".join(s.log_lines())
        assert "Traceback" not in log and "stream cut short" in log
