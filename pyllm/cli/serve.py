"""`pyllm serve`: an OpenAI-compatible HTTP server (pyllm.server) on uvicorn."""
from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from .chat import template_override
from .common import CtxSize, Device, KvType, ModelArg, Threads, Verbose, err, load_model, set_threads
from ..errors import PyllmError


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one clear line (and --port 0 picks one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise PyllmError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise PyllmError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@app.command()
def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option("--host", help="address to listen on (localhost only unless told)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port (0: any free one, printed at start)")] = 8080,
    parallel: Annotated[Optional[int], typer.Option("--parallel", help="sequences decoded together "
                                                    "(default: from the model and free memory, at most 8)",
                                                    show_default=False)] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="requests waiting for a slot before 429")] = 64,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="PYLLM_API_KEY", show_envvar=True,
                                                   help="require Authorization: Bearer KEY (not on /health)",
                                                   show_default=False)] = None,
    template: Annotated[Optional[str], typer.Option(
        "--chat-template", metavar="FILE", show_default=False,
        help="Jinja chat template file (or chatml, gemma, llama3) instead of the model's")] = None,
    alias: Annotated[Optional[str], typer.Option("--alias", help="the model's name in the API (default: the "
                                                 "known name or the file name)", show_default=False)] = None,
    grace: Annotated[float, typer.Option("--shutdown-timeout", help="seconds to let requests in flight finish "
                                         "after SIGTERM or Ctrl-C")] = 10.0,
    ctx_size: CtxSize = None,
    kv_type: KvType = "f16",
    threads: Threads = None,
    device: Device = "auto",
    verbose: Verbose = False,
):
    """Serve a model over the OpenAI API (chat completions, completions, models; streaming as server-sent
    events), every request sharing one continuous batch."""
    import uvicorn

    from ..batch import BatchThread, ContinuousBatch, default_parallel
    from ..registry import KNOWN
    from ..server.app import Server, create_app

    if max_queue < 0:
        raise PyllmError(f"--max-queue must be 0 or more, not {max_queue}")
    if api_key is not None and not api_key.strip():
        raise PyllmError("--api-key is empty")
    set_threads(threads)
    override = template_override(template)
    m = load_model(model, verbose, device)
    chat_template = m.chat_template(override)
    n_ctx = m.context_size(ctx_size)
    engine = BatchThread(ContinuousBatch(m, default_parallel(m, n_ctx, kv_type) if parallel is None else parallel,
                                         n_ctx, kv_type), max_queue)
    file_name = Path(m.path).name
    known = next((k.name for k in KNOWN.values() if k.file == file_name), None)
    name = alias or known or file_name
    names = {n for n in (known, file_name, Path(file_name).stem, model, alias) if n} - {name}
    server = Server(m, engine, name, names, chat_template, api_key)
    sock = listen(host, port)
    where = sock.getsockname()
    err.print(f"pyllm: serving {name} on http://{host}:{where[1]} ({engine.batch.cache.n_slots} slots, context "
              f"{n_ctx}, queue {max_queue}{', API key required' if api_key else ''})", markup=False, highlight=False)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"pyllm: warning: listening on {host} without --api-key", markup=False)
    config = uvicorn.Config(create_app(server), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=grace, server_header=False)
    # uvicorn catches SIGTERM/SIGINT to shut down gracefully, then raises the signal again into the handlers it
    # found: with these no-ops that ends nothing, and the command exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    if engine.failure is not None:
        raise PyllmError(f"the engine stopped: {engine.failure}")
