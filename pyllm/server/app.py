"""`pyllm serve`'s ASGI app: the OpenAI API as a thin face over one continuous batch.

A request is parsed (openai_api), its prompts tokenized on a worker thread, and its choices submitted to the
engine (batch.BatchThread), which runs on a thread of its own and calls back per token.  Those callbacks hop
onto the event loop (call_soon_threadsafe) into one asyncio.Queue per HTTP request, which the handler reads to
stream server-sent events or to build the whole answer.  A client that goes away cancels its engine requests,
which leave their slots before the next decoding step.

Starlette routes; uvicorn serves (pyllm.cli.serve).  `Front` wraps the whole app: API key, one access-log line
per request, request counts.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ..batch import BatchThread, QueueFull
from ..batch import Request as EngineRequest
from ..errors import PyllmError
from ..sampling import Sampler
from . import openai_api as api
from .openai_api import ApiError, Fields

MAX_BODY = 4 << 20  # bytes: far above any prompt that fits a context, far below trouble


@dataclass
class Server:
    """What the app serves and how."""

    model: Any  # pyllm.model.Model
    engine: BatchThread
    name: str  # the model id in responses
    aliases: set[str] = field(default_factory=set)  # other names a request may give it
    template: Any = None  # ChatTemplate, or None for a model without one
    api_key: str | None = None
    max_body: int = MAX_BODY
    stop_timeout: float = 5.0  # seconds to wait for the engine thread at shutdown

    @property
    def n_ctx(self) -> int:
        return self.engine.batch.cache.n_ctx

    @property
    def n_slots(self) -> int:
        return self.engine.batch.cache.n_slots


class Metrics:
    """Prometheus series, in a registry of the app's own."""

    def __init__(self, server: Server):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pyllm_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("pyllm_prompt_tokens", "prompt tokens of completions", registry=r)
        self.cached_tokens = Counter("pyllm_prompt_tokens_cached", "prompt tokens a slot already held",
                                     registry=r)
        self.generated_tokens = Counter("pyllm_generated_tokens", "tokens generated", registry=r)
        Gauge("pyllm_queue_length", "requests waiting for a slot", registry=r).set_function(
            lambda: server.engine.n_queued)
        Gauge("pyllm_busy_slots", "slots prefilling or decoding", registry=r).set_function(
            lambda: server.engine.n_busy)
        Gauge("pyllm_slots", "slots (--parallel)", registry=r).set(server.n_slots)
        self.ttft = Histogram("pyllm_time_to_first_token_seconds", "request received -> first token", registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("pyllm_time_per_output_token_seconds", "time between two tokens of a sequence",
                              registry=r, buckets=(.005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56))
        self.duration = Histogram("pyllm_request_duration_seconds", "completions requests, received -> done",
                                  registry=r, buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300))


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False), status, headers, media_type="application/json")


def error_response(e: ApiError) -> Response:
    # ASCII: the message may quote what the client sent, lone surrogates included
    return Response(json.dumps(e.body()), e.status, e.headers, media_type="application/json")


# --- one request's engine jobs -----------------------------------------------------------------------------

class Job:
    """The engine requests (one per choice) of one HTTP request, and what the engine tells of them, in order:
    events (choice index, "token", (id, text, logprob)) and (choice index, "done", Result)."""

    def __init__(self, metrics: Metrics):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.metrics = metrics
        self.requests: list[EngineRequest] = []
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.last: list[float] = []  # per choice: when its latest token came

    def add(self, prompt: list[int], g: api.Generation, sampler: Sampler, room: int) -> EngineRequest:
        index = len(self.requests)
        request = EngineRequest(prompt, min(g.max_tokens or room, room), sampler, g.stop, id=index,
                                logprobs=g.logprobs)
        request.on_token = lambda token, text, logprob: self._token(index, token, text, logprob)
        request.on_done = lambda result: self._post(index, "done", result)
        self.requests.append(request)
        self.last.append(0.0)
        return request

    def _token(self, index: int, token: int, text: str, logprob) -> None:  # on the engine thread
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
            self.metrics.ttft.observe(now - self.t0)
        elif self.last[index]:
            self.metrics.tpot.observe(now - self.last[index])
        self.last[index] = now
        self._post(index, "token", (token, text, logprob))

    def _post(self, *event) -> None:  # on the engine thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def cancel(self) -> None:
        """The answer is no longer wanted: the engine drops these before its next step."""
        for request in self.requests:
            request.cancelled = True

    async def results(self) -> list:
        """Every choice's Result, once all are done."""
        results = [None] * len(self.requests)
        left = len(results)
        while left:
            index, kind, payload = await self.events.get()
            if kind == "done":
                results[index] = payload
                left -= 1
        return results


def engine_failure(result) -> ApiError | None:
    """An engine Result that is not an answer: an internal error, or the server stopping."""
    reason = result.stats.finish_reason
    if reason == "error":
        return ApiError(500, result.error or "internal error")
    if reason == "cancelled":
        return ApiError(503, "the server is stopping", code="stopping")
    return None


# --- handlers ----------------------------------------------------------------------------------------------

def server_of(request: Request) -> Server:
    return request.app.state.server


def log_of(request: Request) -> dict:
    """What the access-log line of this request says beyond method, path, status and time."""
    return request.scope.setdefault("pyllm.log", {})


def require_ready(server: Server) -> None:
    if server.engine.failure is not None:
        raise ApiError(503, f"the engine has stopped: {server.engine.failure}", code="engine_failed")
    if not server.engine.ready.is_set():
        raise ApiError(503, "the model is loading", code="loading", headers={"Retry-After": "1"})


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, at most `limit` bytes (413 beyond, without reading the rest)."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep, a 5000-digit number
        detail = f" ({e.msg} at line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ApiError(400, f"the request body is not valid JSON{detail}") from None


def check_model(server: Server, fields: Fields) -> None:
    name = fields.get("model")
    if name is None:
        return
    if not isinstance(name, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if name != server.name and name not in server.aliases:
        raise ApiError(404, f"the model {api.show(name)} does not exist here: this server runs {server.name!r}",
                       param="model", code="model_not_found")


async def completions(request: Request, chat: bool) -> Response:
    server = server_of(request)
    require_ready(server)
    fields = Fields(await read_json(request, server.max_body))
    check_model(server, fields)
    g = api.parse_generation(fields, chat)
    if chat:
        prompts = [await anyio.to_thread.run_sync(api.chat_prompt, server.model, server.template, fields)]
    else:
        prompts = await anyio.to_thread.run_sync(api.completion_prompts, server.model, fields)
    api.check_prompts(g, prompts, server.n_ctx, chat)
    metrics: Metrics = request.app.state.metrics
    job = Job(metrics)
    for prompt in g.prompts:
        for c in range(g.n):
            seed = None if g.seed is None else (g.seed + c) % 2**64
            try:
                sampler = Sampler(**g.sampling, seed=seed)
            except PyllmError as e:
                raise ApiError(400, str(e)) from None
            job.add(prompt, g, sampler, server.n_ctx - len(prompt))
    try:
        server.engine.submit(job.requests)
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e}; try again shortly", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    log = log_of(request)
    log["in"] = sum(len(p) for p in g.prompts)
    reply = Reply(server, metrics, job, g, chat, log)
    if g.stream:
        return EventStream(reply.stream(), on_close=reply.close, headers={"Cache-Control": "no-cache",
                                                                          "X-Accel-Buffering": "no"})
    try:
        results = await until_disconnect(request, job.results())
    finally:
        job.cancel()  # a no-op when all are done; else this handler was cancelled (shutdown)
    if results is None:
        raise ApiError(499, "the client closed the connection")
    return json_response(reply.whole(results))


async def until_disconnect(request: Request, work) -> Any:
    """Await `work`, or None as soon as the client disconnects (its connection closes)."""
    result = None

    async def watch(scope):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        result = await work
        tg.cancel_scope.cancel()
    return result


class Reply:
    """One completions request's answer: whole, or as server-sent events."""

    def __init__(self, server: Server, metrics: Metrics, job: Job, g: api.Generation, chat: bool, log: dict):
        self.server, self.metrics, self.job, self.g, self.chat, self.log = server, metrics, job, g, chat, log
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.tokenizer = server.model.tokenizer
        self.finished = False  # the stream got to [DONE]

    def _count(self, results) -> dict:
        """Usage of the finished request; also counted in the metrics and the access log."""
        n_in = sum(len(p) for p in self.g.prompts)
        n_out = sum(r.stats.n_generated for r in results)
        cached = sum(results[p * self.g.n].stats.n_reused for p in range(len(self.g.prompts)))
        self.metrics.prompt_tokens.inc(n_in)
        self.metrics.cached_tokens.inc(cached)
        self.metrics.generated_tokens.inc(n_out)
        self.metrics.duration.observe(time.perf_counter() - self.job.t0)
        self.log["out"] = n_out
        if self.job.t_first is not None:
            self.log["ttft"] = self.job.t_first - self.job.t0
        return api.usage(n_in, n_out, cached)

    def _logprobs(self, entries, offset: int = 0):
        if self.g.logprobs is None:
            return None
        if self.chat:
            return api.chat_logprobs(self.tokenizer, entries)
        return api.completion_logprobs(self.tokenizer, entries, offset)

    def whole(self, results) -> dict:
        for r in results:
            failure = engine_failure(r)
            if failure:
                raise failure
        choices = []
        for i, r in enumerate(results):
            logprobs = self._logprobs(list(zip(r.tokens, r.logprobs)))
            finish = api.FINISH[r.stats.finish_reason]
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": r.text},
                                "logprobs": logprobs, "finish_reason": finish})
            else:
                choices.append({"index": i, "text": r.text, "logprobs": logprobs, "finish_reason": finish})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.server.name, "choices": choices,
                "usage": self._count(results)}

    def _chunk(self, choices: list, usage: Any = None) -> bytes:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.server.name, "choices": choices}
        if self.g.include_usage:
            obj["usage"] = usage
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"

    def _choice(self, index: int, text: str, finish: str | None, logprobs, offset: int) -> dict:
        lp = self._logprobs(logprobs, offset)
        if self.chat:
            delta = {"content": text} if text else {}
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}

    async def stream(self) -> AsyncIterator[bytes]:
        """Server-sent events: a chunk per piece of text (whole characters: the engine holds back half ones),
        a last chunk per choice with its finish_reason, the usage chunk if asked, then [DONE]."""
        k = len(self.job.requests)
        if self.chat:
            yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None} for i in range(k)])
        sent = [0] * k  # characters sent per choice
        pending: list[list] = [[] for _ in range(k)]  # logprobs of tokens whose text is not sent yet
        results = [None] * k
        left = k
        self.log["out"] = 0  # tokens so far, for the log line of a stream cut short
        while left:
            index, kind, payload = await self.job.events.get()
            if kind == "token":
                token, text, logprob = payload
                self.log["out"] += 1
                if logprob is not None:
                    pending[index].append((token, logprob))
                if text:
                    yield self._chunk([self._choice(index, text, None, pending[index], sent[index])])
                    sent[index] += len(text)
                    pending[index] = []
                continue
            result = results[index] = payload
            failure = engine_failure(result)
            if failure:
                self.log["error"] = failure.message
                yield b"data: " + json.dumps(failure.body()).encode() + b"\n\n"
                return
            tail = result.text[sent[index]:]
            yield self._chunk([self._choice(index, tail, api.FINISH[result.stats.finish_reason], pending[index],
                                            sent[index])])
            left -= 1
        usage = self._count(results)
        if self.g.include_usage:
            yield self._chunk([], usage)
        yield b"data: [DONE]\n\n"
        self.finished = True

    def close(self) -> None:
        """The stream ended, one way or another: what is still generating is not wanted any more."""
        self.job.cancel()
        if not self.finished and "error" not in self.log:
            self.log["error"] = "stream cut short (client gone or shutdown)"


class EventStream(StreamingResponse):
    """text/event-stream that calls on_close however it ends: finished, client gone (Starlette cancels the
    stream when the connection closes), or cancelled at shutdown, even before its first chunk."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close, headers=None):
        super().__init__(content, headers=headers)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def chat_completions(request: Request) -> Response:
    return await completions(request, chat=True)


async def text_completions(request: Request) -> Response:
    return await completions(request, chat=False)


async def models(request: Request) -> Response:
    server = server_of(request)
    created = int(Path(server.model.path).stat().st_mtime)
    return json_response({"object": "list", "data": [
        {"id": server.name, "object": "model", "created": created, "owned_by": "pyllm",
         "meta": {"n_ctx": server.n_ctx, "n_ctx_train": server.model.config.ctx_train,
                  "n_vocab": server.model.tokenizer.n_vocab, "parallel": server.n_slots}}]})


async def health(request: Request) -> Response:
    server = server_of(request)
    if server.engine.failure is not None:
        return json_response({"status": "error", "error": str(server.engine.failure)}, 503)
    if not server.engine.ready.is_set():
        return json_response({"status": "loading"}, 503, {"Retry-After": "1"})
    busy = server.engine.n_busy
    return json_response({"status": "ok", "slots_idle": server.n_slots - busy, "slots_processing": busy,
                          "queued": server.engine.n_queued})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def tokenize(request: Request) -> Response:
    server = server_of(request)
    fields = Fields(await read_json(request, server.max_body))
    content = api.text_value(fields.get("content"), "content")
    add_special = fields.boolean("add_special", False)
    with_pieces = fields.boolean("with_pieces", False)
    ids = await anyio.to_thread.run_sync(lambda: server.model.tokenize(content, add_special=add_special,
                                                                       parse_special=True))
    if with_pieces:
        return json_response({"tokens": [{"id": t, "piece": api.token_text(server.model.tokenizer, t)[0]}
                                         for t in ids]})
    return json_response({"tokens": ids})


async def detokenize(request: Request) -> Response:
    server = server_of(request)
    fields = Fields(await read_json(request, server.max_body))
    tokens = fields.get("tokens")
    n_vocab = server.model.tokenizer.n_vocab
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab
                                               for t in tokens):
        raise ApiError(400, f"'tokens' must be a list of token ids (0..{n_vocab - 1})", param="tokens")
    return json_response({"content": server.model.detokenize(tokens)})


# --- the app -----------------------------------------------------------------------------------------------

async def on_api_error(request: Request, e: ApiError) -> Response:
    if e.status >= 500 or e.status == 499:
        log_of(request)["error"] = e.message
    return error_response(e)


async def on_http_error(request: Request, e: HTTPException) -> Response:
    if e.status_code == 404:
        return error_response(ApiError(404, f"no such endpoint: {request.method} {request.url.path}",
                                       code="not_found"))
    if e.status_code == 405:
        error = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        error.headers = dict(e.headers or {})
        return error_response(error)
    return error_response(ApiError(e.status_code, str(e.detail)))


async def on_disconnect(request: Request, e: ClientDisconnect) -> Response:
    return error_response(ApiError(499, "the client closed the connection"))


async def on_internal_error(request: Request, e: Exception) -> Response:
    log_of(request)["error"] = f"{type(e).__name__}: {e}"
    return error_response(ApiError(500, "internal error (the server log has the details)"))


ROUTES = {  # path -> (handler, method, endpoint label for the metrics)
    "/v1/chat/completions": (chat_completions, "POST"), "/chat/completions": (chat_completions, "POST"),
    "/v1/completions": (text_completions, "POST"), "/completions": (text_completions, "POST"),
    "/v1/models": (models, "GET"), "/models": (models, "GET"),
    "/health": (health, "GET"), "/metrics": (metrics, "GET"),
    "/tokenize": (tokenize, "POST"), "/detokenize": (detokenize, "POST"),
}


def create_app(server: Server):
    """The ASGI app; it starts the engine thread (if not started yet) and stops it at shutdown."""

    @asynccontextmanager
    async def lifespan(app):
        if not server.engine.thread.is_alive() and server.engine.thread.ident is None:
            server.engine.start()
        yield
        await anyio.to_thread.run_sync(server.engine.stop, server.stop_timeout)

    app = Starlette(routes=[Route(path, handler, methods=[method]) for path, (handler, method) in ROUTES.items()],
                    exception_handlers={ApiError: on_api_error, HTTPException: on_http_error,
                                        ClientDisconnect: on_disconnect, Exception: on_internal_error},
                    lifespan=lifespan)
    app.state.server = server
    app.state.metrics = Metrics(server)
    return Front(app, server, app.state.metrics)


def authorized(scope, key_digest: bytes) -> bool:
    """Authorization: Bearer KEY, compared in constant time (digests: not even the key's length leaks)."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return hmac.compare_digest(hashlib.sha256(token.strip()).digest(), key_digest)
    return False


class Front:
    """The outermost ASGI layer: the API key (every path but /health), then the app; one access-log line per
    request on stderr and its count in the metrics."""

    def __init__(self, app, server: Server, metrics: Metrics):
        self.app, self.server, self.metrics = app, server, metrics
        self.key_digest = hashlib.sha256(server.api_key.encode()).digest() if server.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        log = scope["pyllm.log"] = {}
        status = 0

        async def send_seen(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key_digest and scope["path"] != "/health" and not authorized(scope, self.key_digest):
                response = error_response(ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                                   code="invalid_api_key"))
                await response(scope, receive, send_seen)
            else:
                await self.app(scope, receive, send_seen)
        except asyncio.CancelledError:  # shutdown's grace period is over: the request ends here, quietly
            log.setdefault("error", "cancelled at shutdown")
        finally:
            self._account(scope, status or 500, time.perf_counter() - t0, log)

    def _account(self, scope, status: int, elapsed: float, log: dict) -> None:
        path = scope["path"]
        endpoint = path if path in ROUTES else "other"
        self.metrics.requests.labels(endpoint, str(status)).inc()
        client = scope.get("client") or ("-", 0)
        parts = [f"{client[0]}:{client[1]}", f'"{scope["method"]} {ascii(path)[1:-1]}"', str(status)]
        if "in" in log:
            parts.append(f"in={log['in']} out={log.get('out', '-')}")
        if "ttft" in log:
            parts.append(f"ttft={log['ttft'] * 1e3:.0f}ms")
        parts.append(f"total={elapsed * 1e3:.0f}ms")
        if "error" in log:
            parts.append(f"error={ascii(log['error'])}")
        print("pyllm: " + " ".join(parts), file=sys.stderr, flush=True)
