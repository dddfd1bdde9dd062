"""pyllm batch: the continuous-batching scheduler (library) and the command in real pipelines (subprocesses)."""
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
from tiny import write_tiny_model

from pyllm.batch import ContinuousBatch, Request, generate_batch
from pyllm.generate import Stats, generate, stream_text
from pyllm.model import Model
from pyllm.sampling import Sampler

PYLLM = [sys.executable, "-m", "pyllm"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(write_tiny_model(tmp_path_factory.mktemp("batch") / "tiny.gguf"))


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return Model(tiny_path, device="cpu")


def prompts(model, n):
    """Prompts of different lengths (so sequences join and leave the batch at different steps)."""
    words = "the cat sat on a mat while two dogs ran after one ball in the park".split()
    return [model.tokenize(" ".join(words[: 2 + (3 * i) % 11]) + f" {i}") for i in range(n)]


def alone(model, prompt, max_tokens, stop=()):
    """The reference: one sequence through generate() in a cache of its own."""
    stats = Stats()
    tokens = list(generate(model, model.new_cache(256), prompt, Sampler(temperature=0.0), max_tokens=max_tokens,
                           stats=stats))
    return tokens, "".join(stream_text(model.tokenizer, tokens, stop)), stats.finish_reason


@pytest.mark.parametrize("n_parallel", [1, 3, 5])
def test_greedy_output_does_not_depend_on_the_batch(tiny, n_parallel):
    ps = prompts(tiny, 9)
    budgets = [4 + (5 * i) % 9 for i in range(len(ps))]
    requests = [Request(p, max_tokens=n, id=i) for i, (p, n) in enumerate(zip(ps, budgets))]
    results = list(generate_batch(tiny, requests, n_parallel=n_parallel, n_ctx=256))
    assert sorted(r.id for r in results) == list(range(len(ps)))
    for r in results:
        tokens, text, reason = alone(tiny, ps[r.id], budgets[r.id])
        assert r.tokens == tokens, f"prompt {r.id} differs in a batch of {n_parallel}"
        assert (r.text, r.stats.finish_reason, r.stats.n_generated) == (text, reason, len(tokens))
        assert r.stats.n_reused + r.stats.n_prefill == len(ps[r.id])


def test_sequences_leave_and_join_at_every_step(tiny):
    """Short requests finish first (results come as they end); freed slots take the waiting prompts."""
    ps = prompts(tiny, 6)
    budgets = [12, 1, 2, 12, 3, 1]
    batch = ContinuousBatch(tiny, 2, n_ctx=256)
    requests = iter([Request(p, max_tokens=n, id=i) for i, (p, n) in enumerate(zip(ps, budgets))])
    results = list(batch.run(lambda block: next(requests, None)))
    assert [r.stats.finish_reason for r in results] == ["length"] * 6
    # 0 runs; 1 ends on its prefill; 2 joins and ends after step 1; 3 joins then and ends after step 12;
    # 0 ends after step 11, 4 joins and needs 2 steps; 5 (joining after step 12) ends on its prefill
    assert [r.id for r in results] == [1, 2, 0, 3, 5, 4]
    assert batch.running == {} and batch.n_decoded == 11 + 1 + 11 + 2


def test_prompts_that_join_together_share_one_prefill_pass(tiny, monkeypatch):
    """Four prompts start in four free slots: one forward pass prefills them all (then one per decode step)."""
    calls = []
    forward = tiny.transformer.forward
    monkeypatch.setattr(tiny.transformer, "forward", lambda *a, **k: calls.append(k.get("decode", False))
                        or forward(*a, **k))
    ps = prompts(tiny, 4)
    results = list(generate_batch(tiny, [Request(p, max_tokens=3, id=i) for i, p in enumerate(ps)], n_parallel=4,
                                  n_ctx=256))
    assert calls == [False, True, True]
    for r in results:
        assert r.tokens == alone(tiny, ps[r.id], 3)[0]
        assert r.stats.n_prefill == len(ps[r.id]) and r.stats.prefill_s > 0


def test_shared_prefix_is_not_prefilled_again(tiny):
    system = tiny.tokenize("you are a cat that sat on a mat while two dogs ran")
    requests = [Request(system + tiny.tokenize(f" {w}", add_special=False), max_tokens=2, id=w)
                for w in ("ball", "park", "one")]
    results = list(generate_batch(tiny, requests, n_parallel=1, n_ctx=256))
    assert results[0].stats.n_reused == 0
    for r in results[1:]:  # at least the shared part, never the whole prompt (its last token gives the logits)
        assert len(system) <= r.stats.n_reused < r.stats.n_reused + r.stats.n_prefill
    prompt_of = {q.id: q.prompt for q in requests}
    for r in results:
        assert r.tokens == alone(tiny, prompt_of[r.id], 2)[0]


def test_shared_prefix_is_copied_from_a_running_slot(tiny):
    """A prompt joining a freed slot takes the system prompt's keys and values from the slot still decoding."""
    system = tiny.tokenize("you are a cat that sat on a mat while two dogs ran")
    own = [system + tiny.tokenize(" ball", add_special=False), tiny.tokenize("one park"),
           system + tiny.tokenize(" the park", add_special=False)]
    budgets = [12, 1, 3]
    requests = iter([Request(p, max_tokens=n, id=i) for i, (p, n) in enumerate(zip(own, budgets))])
    results = {r.id: r for r in ContinuousBatch(tiny, 2, n_ctx=256).run(lambda block: next(requests, None))}
    assert results[2].stats.n_reused >= len(system)  # 2 joined the slot of 1, which never held the system prompt
    for i, r in results.items():
        assert r.tokens == alone(tiny, own[i], budgets[i])[0]


def test_generated_tokens_are_not_shared(tiny):
    """A prompt that goes on from an earlier answer reuses only that earlier prompt: the answer's keys and
    values came from decode steps, not from the prefill the new prompt gets alone."""
    first = tiny.tokenize("the cat sat on")
    answer = alone(tiny, first, 6)[0]
    follow = first + answer[:4] + tiny.tokenize(" mat", add_special=False)
    requests = iter([Request(first, max_tokens=6, id=0), Request(follow, max_tokens=3, id=1)])
    results = {r.id: r for r in ContinuousBatch(tiny, 1, n_ctx=256).run(lambda block: next(requests, None))}
    assert results[0].tokens == answer
    assert results[1].stats.n_reused == len(first)
    assert results[1].tokens == alone(tiny, follow, 3)[0]


def test_stop_strings_and_bad_requests(tiny):
    p = prompts(tiny, 1)[0]
    full = alone(tiny, p, 12)[1]
    stop = full[4:6]
    assert stop, "the tiny model's text is too short for this test"
    requests = [Request(p, max_tokens=12, stop=[stop], id="stop"), Request(p * 100, max_tokens=3, id="long"),
                Request([], max_tokens=3, id="empty"), Request(p, max_tokens=0, id="none")]
    results = {r.id: r for r in generate_batch(tiny, requests, n_parallel=2, n_ctx=64)}
    assert results["stop"].text == full[: full.find(stop)] == alone(tiny, p, 12, [stop])[1]
    assert results["stop"].stats.finish_reason == "stop"
    assert "context" in results["long"].error and results["long"].stats.finish_reason == "error"
    assert "empty" in results["empty"].error
    assert (results["none"].tokens, results["none"].stats.finish_reason) == ([], "length")


def test_sequence_ends_at_the_context_size(tiny):
    p = prompts(tiny, 1)[0]
    (r,) = generate_batch(tiny, [Request(p, max_tokens=100)], n_parallel=1, n_ctx=len(p) + 5)
    assert r.stats.finish_reason == "context" and len(r.tokens) == 6


# --- the command, in real pipelines ------------------------------------------------------------------------

def sh(script, **kw):
    return subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True, text=True, timeout=300,
                          **kw)


def batch_cmd(tiny_path, *args):
    return " ".join([sys.executable, "-m", "pyllm", "batch", tiny_path, "--temp", "0", *args])


def test_one_text_line_per_prompt(tiny_path):
    r = sh(f"printf 'a\\nb\\nc\\n' | {batch_cmd(tiny_path, '-n', '4', '--format', 'text')} | wc -l")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3"


def test_jsonl_with_a_broken_line(tiny_path, tmp_path):
    lines = ['{"prompt": "the cat", "id": "first", "max_tokens": 3}', "plain text prompt",
             '{"prompt": "broken", oops',  # a long message: it must stay one line on stderr
             '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": 3, "temperature": 0.5}',
             "", '{"prompt": "x", "top_p": 7}', '{"prompt": "the dog", "stop": ["zz"]}']
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(lines) + "\n")
    r = subprocess.run(PYLLM + ["batch", tiny_path, "-i", str(f), "-n", "3", "--temp", "0"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["id"] for rec in records] == ["first", 2, 3, 4, 6, 7]  # input order; the blank line is skipped
    errors = {rec["id"]: rec["error"] for rec in records if "error" in rec}
    assert set(errors) == {3, 6}
    assert "JSON" in errors[3] and "top_p" in errors[6]
    for rec in records:
        if "error" not in rec:
            assert rec["finish_reason"] in ("stop", "length") and rec["completion_tokens"] <= 3
            assert rec["prompt_tokens"] > 0 and isinstance(rec["text"], str)
    assert "Traceback" not in r.stderr
    diagnostics = [line for line in r.stderr.splitlines() if line.startswith("pyllm: line")]
    assert len(diagnostics) == 2 and "line 3: not valid JSON (" in diagnostics[0] and diagnostics[0].endswith(")")
    assert "2 of 6 prompts failed" in r.stderr


def test_consumer_that_closes_early(tiny_path):
    r = sh(f"printf 'one\\ntwo\\nthree\\nfour\\nfive\\nsix\\n' | {batch_cmd(tiny_path, '-n', '3', '--parallel', '2')}"
           " | head -n 1")
    assert r.returncode == 0, r.stderr  # pipefail: pyllm itself exited 0
    assert len(r.stdout.splitlines()) == 1 and json.loads(r.stdout)["id"] == 1
    assert r.stderr == ""


def read_line(proc, timeout=120):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no result within the timeout"
    return proc.stdout.readline()


def test_reads_stdin_as_it_arrives_and_sigint_exits_130(tiny_path):
    proc = subprocess.Popen(PYLLM + ["batch", tiny_path, "--temp", "0", "-n", "2", "--format", "text"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for prompt in ("first", "second"):
            proc.stdin.write(prompt + "\n")
            proc.stdin.flush()
            assert read_line(proc)  # answered while stdin is still open
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()


def test_unordered_results_and_option_errors(tiny_path, tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("".join(f'{{"prompt": "p{i}", "max_tokens": {8 - 3 * i}}}\n' for i in range(3)))
    r = subprocess.run(PYLLM + ["batch", tiny_path, "-i", str(f), "--unordered", "--temp", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(rec["id"] for rec in records) == [1, 2, 3]
    assert [rec["completion_tokens"] for rec in sorted(records, key=lambda rec: rec["id"])] == [8, 5, 2]
    assert records[0]["id"] == 3  # the shortest ends first and is written at once
    for args in (["--format", "xml"], ["-i", str(tmp_path / "missing.txt")], ["--parallel", "0"]):
        r = subprocess.run(PYLLM + ["batch", tiny_path, "-i", str(f)] + args, capture_output=True, text=True,
                           timeout=300, stdin=subprocess.DEVNULL)
        assert r.returncode != 0 and r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_output_keeps_input_order_and_drains_on_interrupt(capfdbinary):
    from pyllm.cli.batch import Output

    out = Output("jsonl", ordered=True)
    out.put(1, "b", {"text": "B"})
    out.put(3, "d", {"text": "D"})
    assert capfdbinary.readouterr().out == b""  # waiting for record 0
    out.put(0, "a", {"text": "A"})
    assert [json.loads(line)["id"] for line in capfdbinary.readouterr().out.splitlines()] == ["a", "b"]
    out.drain()  # Ctrl-C: what is finished goes out even though record 2 never came
    assert [json.loads(line)["id"] for line in capfdbinary.readouterr().out.splitlines()] == ["d"]
    text = Output("text", ordered=False)
    text.put(5, "x", {"text": "two\nlines \\ here"})
    assert capfdbinary.readouterr().out == b"two\\nlines \\\\ here\n"


# --- BatchThread: the batch driven by a thread, requests submitted while it decodes (the server's engine) ---

class Listener:
    """A request's callbacks, recording what the thread tells it."""

    def __init__(self, cancel_after: int | None = None):
        self.tokens, self.pieces, self.logprobs = [], [], []
        self.result = None
        self.done = threading.Event()
        self.cancel_after = cancel_after
        self.request = None

    def attach(self, request):
        self.request = request
        request.on_token, request.on_done = self.on_token, self.on_done
        return request

    def on_token(self, token, piece, logprob):
        self.tokens.append(token)
        self.pieces.append(piece)
        self.logprobs.append(logprob)
        if self.cancel_after is not None and len(self.tokens) >= self.cancel_after:
            self.request.cancelled = True

    def on_done(self, result):
        assert self.result is None, "on_done called twice"
        self.result = result
        self.done.set()


def thread_for(model, n_parallel, max_queue=16):
    from pyllm.batch import BatchThread

    engine = BatchThread(ContinuousBatch(model, n_parallel, n_ctx=256), max_queue).start()
    assert engine.ready.wait(120)
    return engine


def test_thread_streams_each_token_and_outputs_equal_alone(tiny):
    engine = thread_for(tiny, 3)
    try:
        ps = prompts(tiny, 7)
        budgets = [3 + (4 * i) % 9 for i in range(len(ps))]
        listeners = [Listener() for _ in ps]
        engine.submit([ls.attach(Request(p, max_tokens=n, id=i)) for i, (p, n, ls) in
                       enumerate(zip(ps, budgets, listeners))])
        for i, ls in enumerate(listeners):
            assert ls.done.wait(60)
            tokens, text, reason = alone(tiny, ps[i], budgets[i])
            assert ls.result.tokens == ls.tokens == tokens and ls.result.text == text
            assert text.startswith("".join(ls.pieces)) and ls.result.stats.finish_reason == reason
        assert engine.n_busy == 0 and engine.n_queued == 0
    finally:
        engine.stop(10)
    assert not engine.thread.is_alive()


def test_cancelled_request_frees_its_slot_at_once(tiny):
    """With one slot: a request cancelled after 3 tokens ends without a 4th, the queued one runs next; one
    cancelled while it waits is never prefilled."""
    engine = thread_for(tiny, 1)
    try:
        p = prompts(tiny, 1)[0]
        first, waiting, after = Listener(cancel_after=3), Listener(), Listener()
        gone = Request(p, max_tokens=5, id="gone")
        engine.submit([first.attach(Request(p, max_tokens=200, id="first")), waiting.attach(gone),
                       after.attach(Request(p, max_tokens=4, id="after"))])
        gone.cancelled = True
        assert first.done.wait(60) and after.done.wait(60) and waiting.done.wait(60)
        assert first.result.stats.finish_reason == "cancelled" and len(first.result.tokens) == 3
        assert waiting.result.stats.finish_reason == "cancelled" and waiting.result.stats.n_prefill == 0
        assert after.result.tokens == alone(tiny, p, 4)[0]
    finally:
        engine.stop(10)


def test_full_queue_takes_none_of_a_request(tiny):
    from pyllm.batch import QueueFull

    engine = thread_for(tiny, 1, max_queue=2)
    try:
        p = prompts(tiny, 1)[0]
        hold = Listener(cancel_after=200)
        engine.submit([hold.attach(Request(p, max_tokens=10_000))])  # keeps the slot while the queue fills
        deadline = time.monotonic() + 30
        while engine.n_busy == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = [Listener(), Listener()]
        engine.submit([ls.attach(Request(p, max_tokens=2)) for ls in queued])
        with pytest.raises(QueueFull):
            engine.submit([Request(p, max_tokens=2)])
        assert engine.n_queued == 2
        queued[0].request.cancelled = True  # its client left: its place is free at once, it ends at the next step
        assert engine.n_queued == 1
        late = Listener()
        engine.submit([late.attach(Request(p, max_tokens=2))])
        assert queued[0].done.wait(60) and queued[0].result.stats.finish_reason == "cancelled"
        assert not hold.done.is_set()  # it ended without waiting for the slot
        assert all(ls.done.wait(60) for ls in [hold, queued[1], late])
    finally:
        engine.stop(10)


def test_logprobs_of_greedy_tokens(tiny):
    import numpy as np

    engine = thread_for(tiny, 2)
    try:
        p = prompts(tiny, 1)[0]
        ls = Listener()
        engine.submit([ls.attach(Request(p, max_tokens=5, logprobs=3))])
        assert ls.done.wait(60)
        assert ls.result.tokens == alone(tiny, p, 5)[0] and len(ls.result.logprobs) == 5
        assert ls.logprobs == ls.result.logprobs
        for token, (lp, top) in zip(ls.result.tokens, ls.result.logprobs):
            assert len(top) == 3 and top[0] == (token, lp)  # greedy: the chosen token is the most likely
            assert [t[1] for t in top] == sorted((t[1] for t in top), reverse=True)
            assert lp <= 0 and sum(np.exp(t[1]) for t in top) <= 1 + 1e-9
    finally:
        engine.stop(10)


def test_an_error_in_a_step_ends_its_requests_and_the_thread_goes_on(tiny, monkeypatch):
    engine = thread_for(tiny, 2)
    try:
        p = prompts(tiny, 1)[0]
        decode = tiny.decode
        calls = []

        def broken_once(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("boom")
            return decode(*a, **k)

        monkeypatch.setattr(tiny, "decode", broken_once)
        hit = Listener()
        engine.submit([hit.attach(Request(p, max_tokens=6))])
        assert hit.done.wait(60)
        assert hit.result.stats.finish_reason == "error" and "boom" in hit.result.error
        later = Listener()
        engine.submit([later.attach(Request(p, max_tokens=4))])
        assert later.done.wait(60) and later.result.tokens == alone(tiny, p, 4)[0]
    finally:
        engine.stop(10)
