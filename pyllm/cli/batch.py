"""`pyllm batch`: prompts in (one per line, plain text or JSONL), one result per prompt out (JSONL or text).

Input is read by a thread as it arrives, so `tail -f`-style producers work; each result is written and flushed
as soon as it may be (in input order unless --unordered).  A bad line becomes an error record in its place and
the rest go on (exit status 1 at the end); Ctrl-C writes the results finished so far and exits 130.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import queue
import sys
import threading
import time
from typing import Annotated, Any, BinaryIO, List, Optional

import typer

from . import app
from .common import (CtxSize, Device, ForceCtx, FrequencyPenalty, KvType, MaxMemory, MaxTokens, MinP, ModelArg,
                     PresencePenalty, RepeatPenalty, Seed, Temp, Threads, TopK, TopP, Verbose, check_max_tokens, err,
                     load_model, sampler_from_options, set_threads)
from ..errors import PyllmError

FORMATS = ("jsonl", "text")
INPUT_FORMATS = ("auto", "text", "jsonl")
# per-line JSON fields that override an option: name -> (types allowed, check, what a valid value is)
OVERRIDES = {
    "max_tokens": (int, lambda v: v >= -1, "an integer, -1 or more"),
    "temperature": ((int, float), lambda v: v >= 0, "a number, 0 or more"),
    "top_p": ((int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "seed": (int, lambda v: v >= 0, "an integer, 0 or more"),
    "system": (str, lambda v: True, "a string"),
}


class BadLine(Exception):
    """An input line that cannot become a request; str() says why."""


def read_lines(stream: BinaryIO, lines: queue.Queue) -> None:
    """Reader thread: (line number, bytes) for each line as it arrives, then None.  A read error is passed on
    as the OSError itself."""
    try:
        for number, line in enumerate(stream, 1):
            lines.put((number, line))
    except OSError as e:
        lines.put(e)
    lines.put(None)


def parse_line(line: bytes, input_format: str) -> dict:
    """The prompt and per-line settings of one input line: {"prompt": str} or {"messages": [...]}, plus any of
    id, stop and OVERRIDES.  Raises BadLine."""
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise BadLine("not UTF-8 text") from None
    if input_format == "text" or (input_format == "auto" and not text.lstrip().startswith("{")):
        return {"prompt": text}
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(fields, dict):
        raise BadLine("a JSON line must be an object with \"prompt\" or \"messages\"")
    if ("prompt" in fields) == ("messages" in fields):
        raise BadLine("a JSON line needs exactly one of \"prompt\" and \"messages\"")
    if "prompt" in fields and not isinstance(fields["prompt"], str):
        raise BadLine("\"prompt\" must be a string")
    messages = fields.get("messages")
    if messages is not None and not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise BadLine("\"messages\" must be a non-empty list of {\"role\": ..., \"content\": ...} strings")
    stop = fields.get("stop", [])
    if isinstance(stop, str):
        fields["stop"] = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise BadLine("\"stop\" must be a string or a list of strings")
    for name, (types, check, valid) in OVERRIDES.items():
        value = fields.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types) or not check(value)):
            raise BadLine(f"\"{name}\" must be {valid}, not {json.dumps(value)}")
    return fields


def escape_line(text: str) -> str:
    """One output per line: backslashes and line breaks written as \\\\, \\n and \\r."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


class Output:
    """Writes one record per prompt to stdout, flushed at once, in input order unless `ordered` is False."""

    def __init__(self, output_format: str, ordered: bool):
        self.output_format, self.ordered = output_format, ordered
        self.held: dict[int, tuple[Any, dict]] = {}  # index -> (id, fields): finished, waiting for an earlier one
        self.next = 0  # the index written next when ordered
        self.n_done = self.n_failed = 0

    def error(self, index: int, number: int, label, message: str) -> None:
        err.print(f"pyllm: line {number}: {message}", markup=False)
        self.n_failed += 1
        self.put(index, label, {"error": message, "finish_reason": "error"})

    def result(self, index: int, number: int, label, result) -> None:
        if result.error:
            return self.error(index, number, label, result.error)
        s = result.stats
        self.put(index, label, {"text": result.text, "finish_reason": s.finish_reason,
                                "prompt_tokens": s.n_reused + s.n_prefill, "cached_tokens": s.n_reused,
                                "completion_tokens": s.n_generated, "prefill_ms": round(s.prefill_s * 1e3, 1),
                                "generate_ms": round(s.generate_s * 1e3, 1)})

    def put(self, index: int, label, fields: dict) -> None:
        self.n_done += 1
        if not self.ordered:
            return self._write(label, fields)
        self.held[index] = (label, fields)
        while self.next in self.held:
            self._write(*self.held.pop(self.next))
            self.next += 1

    def drain(self) -> None:
        """Write every finished record now, even those still waiting for an earlier one (Ctrl-C)."""
        for index in sorted(self.held):
            self._write(*self.held.pop(index))

    def _write(self, label, fields: dict) -> None:
        if self.output_format == "text":
            line = escape_line(fields.get("text", ""))
        else:
            line = json.dumps({"id": label, **fields}, ensure_ascii=False)
        sys.stdout.buffer.write(line.encode("utf-8") + b"\n")
        sys.stdout.buffer.flush()


def open_input(source: str | None) -> tuple[BinaryIO, str]:
    """The input stream and its name for messages: -i FILE, -i - or piped stdin."""
    if source is None and sys.stdin.isatty():
        raise PyllmError("no prompts: use -i FILE, or pipe prompts (one per line) on stdin")
    if source in (None, "-"):
        # a reader of our own on fd 0: the reader thread may still hold it at exit, and a daemon thread inside
        # sys.stdin's lock aborts the interpreter's shutdown
        return open(sys.stdin.fileno(), "rb", closefd=False), "stdin"
    try:
        return open(source, "rb"), source
    except OSError as e:
        raise PyllmError(f"{source}: cannot read prompts: {e.strerror}") from None


def progress_bar():
    """A live counter on stderr when it is a terminal (else None): results written and aggregate speed."""
    if not err.is_terminal:
        return None
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.completed} done, {task.fields[failed]} failed, "
                                                "{task.fields[tps]:.1f} tok/s"), TimeElapsedColumn(),
                    console=err, transient=True)


@app.command()
def batch(
    model: ModelArg = None,
    input: Annotated[Optional[str], typer.Option("--input", "-i", help="prompts file, or - for stdin (default: "
                                                 "stdin)", show_default=False)] = None,
    output_format: Annotated[str, typer.Option("--format", help="jsonl: one object per prompt (id, text, "
                                               "finish_reason, token counts, timings); text: one line per prompt, "
                                               "line breaks written as \\n")] = "jsonl",
    input_format: Annotated[str, typer.Option("--input-format", help="auto: a line starting with { is JSON, any "
                                              "other a prompt; text: every line is a prompt; jsonl: every line is "
                                              "JSON")] = "auto",
    unordered: Annotated[bool, typer.Option("--unordered", help="write each result as soon as it is done, not "
                                            "in input order")] = False,
    parallel: Annotated[Optional[int], typer.Option("--parallel", help="sequences decoded together (default: "
                                                    "from the model and free memory, at most 8)",
                                                    show_default=False)] = None,
    max_tokens: MaxTokens = -1,
    temp: Temp = 0.8,
    top_k: TopK = 40,
    top_p: TopP = 0.95,
    min_p: MinP = 0.05,
    repeat_penalty: RepeatPenalty = 1.0,
    presence_penalty: PresencePenalty = 0.0,
    frequency_penalty: FrequencyPenalty = 0.0,
    seed: Seed = None,
    stop: Annotated[Optional[List[str]], typer.Option("--stop", help="stop at this text (repeatable)")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="system prompt (chat template only)")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="send prompts as they are, without the chat template")] = False,
    ctx_size: CtxSize = None,
    force_ctx: ForceCtx = False,
    kv_type: KvType = "f16",
    max_memory: MaxMemory = None,
    threads: Threads = None,
    device: Device = "auto",
    verbose: Verbose = False,
):
    """Run many prompts (one per line of a file or stdin; plain text or JSONL with "prompt" or "messages" and
    optional id, max_tokens, temperature, top_p, seed, stop, system) with continuous batching: one JSON line
    (or text line) per prompt on stdout."""
    from ..batch import ContinuousBatch, Request, default_parallel
    from ..chat import prompt_tokens, render_tokens, with_system

    if output_format not in FORMATS:
        raise PyllmError(f"--format must be one of {', '.join(FORMATS)}, not {output_format!r}")
    if input_format not in INPUT_FORMATS:
        raise PyllmError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, not {input_format!r}")
    set_threads(threads)
    check_max_tokens(max_tokens)
    if parallel is not None and parallel < 1:
        raise PyllmError(f"--parallel must be at least 1, not {parallel}")
    # the options' sampling settings are checked once here, not as an error on every line
    sampler_from_options(temp, top_k, top_p, min_p, repeat_penalty, presence_penalty, frequency_penalty, seed)
    stream, source_name = open_input(input)
    m = load_model(model, verbose, device, max_memory)
    n_ctx = m.context_size(ctx_size, force_ctx)
    engine = ContinuousBatch(m, default_parallel(m, n_ctx, kv_type) if parallel is None else parallel, n_ctx, kv_type)

    def request(index: int, fields: dict) -> Request:
        if "messages" in fields:
            if raw:
                raise BadLine("\"messages\" need the chat template (drop --raw)")
            template = m.chat_template()
            if template is None:
                raise BadLine("\"messages\" need a chat template, and the model has none")
            ids = render_tokens(m, template, with_system(fields.get("system", system), fields["messages"]))
        else:
            ids = prompt_tokens(m, fields["prompt"], raw, fields.get("system", system))
        limit = fields.get("max_tokens", max_tokens)
        sampler = sampler_from_options(fields.get("temperature", temp), top_k, fields.get("top_p", top_p), min_p,
                                       repeat_penalty, presence_penalty, frequency_penalty, fields.get("seed", seed))
        return Request(ids, n_ctx - len(ids) if limit < 0 else limit, sampler, fields.get("stop", stop or []),
                       id=index)

    lines: queue.Queue = queue.Queue(maxsize=4 * engine.cache.n_slots)  # bounded: a huge file is not read ahead
    threading.Thread(target=read_lines, args=(stream, lines), daemon=True).start()
    out = Output(output_format, ordered=not unordered)
    lines_of: dict[int, tuple[int, Any]] = {}  # request index -> (line number, the id written in its record)
    counter = itertools.count()

    def take(block: bool) -> Request | None:
        """The next request for the scheduler (queue.Queue.get's contract); bad lines are answered here."""
        while True:
            item = lines.get(block)
            if item is None:
                return None
            if isinstance(item, OSError):
                raise PyllmError(f"{source_name}: cannot read prompts: {item.strerror}")
            number, line = item
            if not line.strip():
                continue  # blank lines are not prompts
            index = next(counter)
            lines_of[index] = number, number
            try:
                fields = parse_line(line, input_format)
                lines_of[index] = number, fields.get("id", number)
                return request(index, fields)
            except (BadLine, PyllmError) as e:
                out.error(index, *lines_of.pop(index), str(e))

    bar = progress_bar()
    task = bar.add_task("batch", total=None, failed=0, tps=0.0) if bar else None
    t0 = time.perf_counter()
    try:  # a closed stdout (`| head`) ends quietly through main()
        with bar or contextlib.nullcontext():
            for result in engine.run(take):
                out.result(result.id, *lines_of.pop(result.id), result)
                if bar:
                    bar.update(task, completed=out.n_done, failed=out.n_failed,
                               tps=engine.n_decoded / max(engine.decode_s, 1e-9))
    except KeyboardInterrupt:
        out.drain()
        raise typer.Exit(130)
    if verbose or err.is_terminal:
        wall = time.perf_counter() - t0
        err.print(f"[dim]{out.n_done} prompts ({out.n_failed} failed) in {wall:.1f} s, {engine.cache.n_slots} "
                  f"parallel | prefill: {engine.n_prefill} tokens, {engine.n_prefill / max(engine.prefill_s, 1e-9):.1f}"
                  f" tok/s | decode: {engine.n_decoded} tokens, {engine.n_decoded / max(engine.decode_s, 1e-9):.1f} "
                  f"tok/s aggregate[/dim]")
    if out.n_failed:
        err.print(f"pyllm: {out.n_failed} of {out.n_done} prompts failed", markup=False)
        raise typer.Exit(1)
