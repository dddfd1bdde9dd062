"""`pyllm run`: one prompt in, streamed text out."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import app
from .cache import (NoPromptCache, PromptCacheAll, PromptCacheDir, PromptCacheFile, PromptCacheMaxSize, PromptCacheRo,
                    open_prompt_cache)
from .common import (CtxSize, Device, ForceCtx, FrequencyPenalty, KvType, MaxMemory, MaxTokens, MinP, ModelArg,
                     PresencePenalty, RepeatPenalty, Seed, Temp, Threads, TopK, TopP, Verbose, check_max_tokens, err,
                     load_model, read_prompt, sampler_from_options, set_threads)


@app.command()
def run(
    model: ModelArg = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="prompt text, or - for stdin")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="read the prompt from a file")] = None,
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
    raw: Annotated[bool, typer.Option("--raw", help="send the prompt as is, without the chat template")] = False,
    ctx_size: CtxSize = None,
    force_ctx: ForceCtx = False,
    kv_type: KvType = "f16",
    max_memory: MaxMemory = None,
    threads: Threads = None,
    device: Device = "auto",
    no_prompt_cache: NoPromptCache = False,
    prompt_cache_dir: PromptCacheDir = None,
    prompt_cache_max_size: PromptCacheMaxSize = "2G",
    prompt_cache: PromptCacheFile = None,
    prompt_cache_ro: PromptCacheRo = False,
    prompt_cache_all: PromptCacheAll = False,
    verbose: Verbose = False,
):
    """Generate text for one prompt, streamed to stdout as it is produced."""
    from ..chat import prompt_tokens
    from ..generate import Stats, generate, stream_text

    set_threads(threads)
    check_max_tokens(max_tokens)
    sampler = sampler_from_options(temp, top_k, top_p, min_p, repeat_penalty, presence_penalty,
                                   frequency_penalty, seed)
    prefix_cache = open_prompt_cache(no_prompt_cache, prompt_cache_dir, prompt_cache_max_size, prompt_cache,
                                     prompt_cache_ro)
    text = read_prompt(prompt, file)
    if not text.strip():
        from ..errors import PyllmError

        raise PyllmError("the prompt is empty")
    m = load_model(model, verbose, device, max_memory)
    ids = prompt_tokens(m, text, raw, system)
    n_ctx = m.context_size(ctx_size, force_ctx)
    cache = m.new_cache(n_ctx, kv_type=kv_type)
    if prefix_cache is not None:
        prefix_cache.restore(m, cache, ids)
    limit = n_ctx - len(ids) if max_tokens < 0 else max_tokens
    stats = Stats()
    tokens = generate(m, cache, ids, sampler, max_tokens=max(limit, 0), stats=stats)
    out = sys.stdout
    interrupted = False
    try:
        for piece in stream_text(m.tokenizer, tokens, stop or []):
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        interrupted = True
    if out.isatty():
        out.write("\n")
    out.flush()
    if prefix_cache is not None:
        prefix_cache.save(m, cache, n_tokens=None if prompt_cache_all else len(ids))
    if verbose or err.is_terminal:
        reused = f" (+{stats.n_reused} from cache)" if stats.n_reused else ""
        err.print(f"[dim]prompt: {stats.n_prefill} tokens{reused}, {stats.prefill_tps():.1f} tok/s | generated: "
                  f"{stats.n_generated} tokens, {stats.generate_tps():.1f} tok/s[/dim]")
    if interrupted:
        raise typer.Exit(130)
