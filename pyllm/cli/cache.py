"""Prompt cache options shared by run, chat and batch; `pyllm cache ls` and `pyllm cache clear`."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from .common import err, parse_size, warn  # noqa: F401  (warn: chat imports it from here)
from ..kv_cache import fmt_bytes

NoPromptCache = Annotated[bool, typer.Option("--no-prompt-cache", help="neither reuse nor store prompt KV state")]
PromptCacheDir = Annotated[Optional[Path], typer.Option(
    "--prompt-cache-dir", envvar="PYLLM_PROMPT_CACHE_DIR", show_default=False,
    help="directory of the automatic prompt cache (default: ~/.cache/pyllm/prompt-cache)")]
PromptCacheMaxSize = Annotated[str, typer.Option(
    "--prompt-cache-max-size", help="size limit of the cache directory; least recently used entries go first")]
PromptCacheFile = Annotated[Optional[Path], typer.Option(
    "--prompt-cache", show_default=False, help="reuse and save the prompt's KV state in FILE instead of the directory")]
PromptCacheRo = Annotated[bool, typer.Option("--prompt-cache-ro", help="reuse the prompt cache but never write it")]
PromptCacheAll = Annotated[bool, typer.Option("--prompt-cache-all", help="store the generated tokens too")]

def open_prompt_cache(disabled: bool, directory: Path | None, max_size: str, file: Path | None,
                      read_only: bool):
    """The prompt cache the options ask for: a PromptCacheFile, a PromptCache directory, or None."""
    from ..prompt_cache import PromptCache, PromptCacheFile as CacheFile

    if disabled:
        return None
    if file is not None:
        return CacheFile(file, read_only=read_only, warn=warn)
    return PromptCache(directory, parse_size(max_size, "--prompt-cache-max-size"), read_only=read_only, warn=warn)


cache_app = typer.Typer(no_args_is_help=True, help="Inspect or empty the prompt cache directory.")
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def ls(directory: PromptCacheDir = None):
    """List cached prompts: entry, tokens, size, last use, model and the start and end of the text."""
    from ..prompt_cache import PromptCache

    pc = PromptCache(directory)
    rows = pc.listing() if pc.dir.is_dir() else []
    # plain lines: greppable when piped, cut to the terminal's width when not
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    if rows:
        print(f"{'entry':12}  {'tokens':>7}  {'size':>9}  {'last used':16}  model / text")
    for path, size, used, info in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(used))
        if isinstance(info, dict):
            tokens, about = str(info["n_tokens"]), f"{info.get('model', '?')}  {info.get('preview', '')}"
        else:
            tokens, about = "?", f"unusable: {info}"
        line = f"{path.stem[-12:]:12}  {tokens:>7}  {fmt_bytes(size):>9}  {when:16}  {about}"
        print(line if width is None or len(line) <= width else line[:width - 1] + "…")
    err.print(f"{len(rows)} entries, {fmt_bytes(sum(r[1] for r in rows))} in {pc.dir}", markup=False)


@cache_app.command("clear")
def clear(directory: PromptCacheDir = None):
    """Remove every cached prompt."""
    from ..prompt_cache import PromptCache

    pc = PromptCache(directory)
    count, freed = pc.clear() if pc.dir.is_dir() else (0, 0)
    err.print(f"removed {count} entries ({fmt_bytes(freed)}) from {pc.dir}", markup=False)
