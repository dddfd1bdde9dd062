"""pyllm serve against the engine it wraps: aggregate speed of N concurrent streaming clients and the time to
first token of a lone short request, beside the same work done in-process (ContinuousBatch, generate).

    python bench/bench_serve.py smollm2-135m --clients 8 -n 64 -r 3 -t 2 [--llama-server PATH]

--llama-server adds llama.cpp's server (a binary you built, e.g. target llama-server of the llama-cpp-python
sdist's vendor/llama.cpp) on the same file, with -np = clients, to each round: the same streaming clients.

The server runs as a real process on a free 127.0.0.1 port with --parallel = clients; the clients stream over
httpx (raw /v1/completions, greedy, the prompts of bench_batch.py).  Each round alternates server and
in-process so a noisy neighbour slows both alike.  Aggregate speed is generated tokens / wall time of the
wave, prefill included, on both sides; time to first token is request sent -> first text chunk received,
against prefill + first sample in-process.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from bench_batch import prompt_texts  # noqa: E402

SHORT = "Hello"


def start_server(model: str, parallel: int, threads: int | None):
    log = tempfile.NamedTemporaryFile(prefix="bench-serve-", suffix=".log", delete=False)
    args = [sys.executable, "-m", "pyllm", "serve", model, "--port", "0", "--parallel", str(parallel),
            "--ctx-size", "512"] + (["-t", str(threads)] if threads else [])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)

    def url():  # the port it took, once it has said so
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", open(log.name, errors="replace").read())
        return m and m.group(1)

    return wait_healthy(proc, url, 600, lambda: f"the server did not start: {open(log.name).read()}")


def start_llama_server(binary: str, path: str, parallel: int, threads: int | None):
    """llama.cpp's server on a free 127.0.0.1 port, the same context per slot as ours (512)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [binary, "-m", path, "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
            "-c", str(512 * parallel)] + (["-t", str(threads), "-tb", str(threads)] if threads else [])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return wait_healthy(proc, lambda: f"http://127.0.0.1:{port}", 300, lambda: "llama-server did not start")


def wait_healthy(proc, url, seconds: float, failure):
    """(proc, its url) once GET url()/health answers 200; url() is None until the address is known.  A server
    that exits or takes longer than `seconds` is killed and ends the benchmark with failure()."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        address = url()
        if address:
            try:
                if httpx.get(address + "/health", timeout=5).status_code == 200:
                    return proc, address
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(failure())


def stream_one(url: str, prompt: str, max_tokens: int, out: dict) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    text = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["text"] and "ttft" not in out:
                    out["ttft"] = time.perf_counter() - t0
                text.append(choice["text"])
                out["chunks"] = out.get("chunks", 0) + bool(choice["text"])
    out["text"] = "".join(text)


def server_wave(url: str, prompts: list[str], max_tokens: int):
    outs = [{} for _ in prompts]
    threads = [threading.Thread(target=stream_one, args=(url, p, max_tokens, o)) for p, o in zip(prompts, outs)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(o.get("tokens", o.get("chunks", 0)) for o in outs)  # usage, else one chunk a token
    return tokens / wall, [o["text"] for o in outs], statistics.median(o["ttft"] for o in outs)


def batch_wave(model, prompts: list[str], max_tokens: int):
    from pyllm.batch import ContinuousBatch, Request
    from pyllm.sampling import Sampler

    engine = ContinuousBatch(model, len(prompts), n_ctx=512)
    requests = iter(Request(model.tokenize(p), max_tokens, Sampler(temperature=0.0), id=i)
                    for i, p in enumerate(prompts))
    t0 = time.perf_counter()
    results = {r.id: r for r in engine.run(lambda block: next(requests, None))}
    wall = time.perf_counter() - t0
    return sum(r.stats.n_generated for r in results.values()) / wall, [results[i].text for i in range(len(prompts))]


def lone_ttft_server(url: str) -> float:
    out = {}
    stream_one(url, SHORT, 1, out)
    return out["ttft"]


def lone_ttft_inprocess(model) -> float:
    from pyllm.generate import generate
    from pyllm.sampling import Sampler

    t0 = time.perf_counter()
    next(generate(model, model.new_cache(512), model.tokenize(SHORT), Sampler(temperature=0.0), max_tokens=1))
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("-n", "--max-tokens", type=int, default=64)
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--llama-server", default=None, help="path of a llama-server binary to compare with")
    args = ap.parse_args()

    import pyllm
    from pyllm.cli.common import set_threads
    from pyllm.registry import resolve

    set_threads(args.threads)
    model = pyllm.load(resolve(args.model))
    prompts = prompt_texts(args.clients)
    proc, url = start_server(args.model, args.clients, args.threads)
    llama = (start_llama_server(args.llama_server, str(resolve(args.model)), args.clients, args.threads)
             if args.llama_server else None)
    try:
        batch_wave(model, prompts[:2], 4)  # kernels loaded, caches warm on both sides
        server_wave(url, prompts[:2], 4)
        if llama:
            server_wave(llama[1], prompts[:2], 4)
        served, inproc, ttft_s, ttft_i, ttft_wave, theirs = [], [], [], [], [], []
        for rep in range(args.repeats):
            tps_s, texts_s, wave_ttft = server_wave(url, prompts, args.max_tokens)
            tps_i, texts_i = batch_wave(model, prompts, args.max_tokens)
            if llama:
                tps_l, _, ttft_l = server_wave(llama[1], prompts, args.max_tokens)
                theirs.append(tps_l)
                print(f"  round {rep + 1}: llama-server -np {args.clients}: {tps_l:.1f} tok/s, median time to first "
                      f"token in the wave {ttft_l * 1e3:.0f} ms", file=sys.stderr)
            served.append(tps_s)
            inproc.append(tps_i)
            ttft_wave.append(wave_ttft)
            same = "identical" if texts_s == texts_i else "DIFFERENT"
            print(f"  round {rep + 1}: server {tps_s:.1f} tok/s, in-process batch {tps_i:.1f} tok/s "
                  f"({tps_s / tps_i:.2f}x), outputs {same}; median time to first token in the wave "
                  f"{wave_ttft * 1e3:.0f} ms", file=sys.stderr)
            for _ in range(5):
                ttft_s.append(lone_ttft_server(url))
                ttft_i.append(lone_ttft_inprocess(model))
        s, i = statistics.median(served), statistics.median(inproc)
        ts, ti = statistics.median(ttft_s), statistics.median(ttft_i)
        print(f"| {args.model} | {args.clients} streaming clients | server {s:.1f} tok/s | in-process {i:.1f} tok/s "
              f"| {s / i:.2f}x | lone short request: time to first token {ts * 1e3:.1f} ms (server, HTTP) vs "
              f"{ti * 1e3:.1f} ms (in-process), +{(ts - ti) * 1e3:.1f} ms | wave median TTFT "
              f"{statistics.median(ttft_wave) * 1e3:.0f} ms |")
        if theirs:
            t = statistics.median(theirs)
            print(f"| {args.model} | {args.clients} streaming clients | pyllm serve {s:.1f} tok/s | llama-server "
                  f"{t:.1f} tok/s | {s / t:.2f}x |")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if llama:
            llama[0].terminate()
            llama[0].wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
