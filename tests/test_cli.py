"""The `pyllm` command as a user runs it: real subprocesses, pipes, exit codes, one-line errors."""
import os
import subprocess
import sys

import pytest

from tiny import write_tiny_model

PYLLM = [sys.executable, "-m", "pyllm"]


def pyllm(*args, input=None, timeout=300):
    return subprocess.run(PYLLM + list(args), input=input, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "tiny.gguf")


def test_run_streams_text_and_seed_repeats(tiny_path):
    a = pyllm("run", tiny_path, "-p", "the cat", "--raw", "-n", "12", "--seed", "7")
    b = pyllm("run", tiny_path, "-p", "the cat", "--raw", "-n", "12", "--seed", "7")
    assert a.returncode == 0, a.stderr
    assert a.stdout and a.stdout == b.stdout
    assert "Traceback" not in a.stderr


def test_prompt_from_stdin_and_dash(tiny_path):
    piped = pyllm("run", tiny_path, "--raw", "-n", "5", "--temp", "0", input="hello there")
    dash = pyllm("run", tiny_path, "-p", "-", "--raw", "-n", "5", "--temp", "0", input="hello there")
    flag = pyllm("run", tiny_path, "-p", "hello there", "--raw", "-n", "5", "--temp", "0")
    assert piped.returncode == dash.returncode == flag.returncode == 0
    assert piped.stdout == dash.stdout == flag.stdout


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"not a gguf at all", "not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00\x05", "truncated"),
])
def test_bad_model_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    if content is not None:
        path.write_bytes(content)
    r = pyllm("run", str(path), "-p", "hi")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], r.stderr


def test_empty_prompt_and_too_long_prompt(tiny_path):
    r = pyllm("run", tiny_path, "-p", "   ")
    assert r.returncode == 1 and "empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = pyllm("run", tiny_path, "-p", "word " * 100, "--raw", "--ctx-size", "16")
    assert r.returncode == 1 and "context" in r.stderr and "Traceback" not in r.stderr


def test_closed_stdout_ends_quietly(tiny_path):
    cmd = " ".join(f"'{a}'" for a in PYLLM + ["run", tiny_path, "-p", "go", "--raw", "-n", "200"])
    # pipefail: the status is pyllm's, not head's; bytes: head may cut a character
    r = subprocess.run(["bash", "-o", "pipefail", "-c", f"{cmd} | head -c 3"], capture_output=True, timeout=300)
    assert r.returncode == 0 and b"Traceback" not in r.stderr and b"Error" not in r.stderr


def test_info_lists_metadata_and_types(tiny_path):
    r = pyllm("info", tiny_path)
    assert r.returncode == 0, r.stderr
    assert "llama.block_count" in r.stdout and "Q8_0" in r.stdout and "F32" in r.stdout


def test_stop_string(tiny_path):
    full = pyllm("run", tiny_path, "-p", "abc", "--raw", "-n", "30", "--temp", "0").stdout
    assert len(full) > 4
    stop = full[2:4]
    cut = pyllm("run", tiny_path, "-p", "abc", "--raw", "-n", "30", "--temp", "0", "--stop", stop).stdout
    assert cut == full[:full.find(stop)]


def test_real_model_paris(smollm2):
    r = pyllm("run", str(smollm2), "-p", "The capital of France is", "--raw", "--temp", "0", "-n", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris.")


@pytest.mark.parametrize("args, message", [
    (["--kv-type", "f8"], "--kv-type must be one of"),
    (["--ctx-size", "-5"], "--ctx-size must be at least 1"),
    (["--min-p", "2"], "min_p must be between 0 and 1"),
    (["--top-p", "0"], "top_p must be above 0"),
    (["--temp", "-1"], "temperature must be at least 0"),
])
def test_bad_option_values_are_one_line(tiny_path, args, message):
    r = pyllm("run", tiny_path, "-p", "hi", "--raw", "-n", "2", *args)
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_prompt_cache_path_that_is_a_directory_is_a_warning(tiny_path, tmp_path):
    r = pyllm("run", tiny_path, "-p", "hi", "--raw", "-n", "2", "--prompt-cache", str(tmp_path))
    assert r.returncode == 0 and "warning" in r.stderr and "Traceback" not in r.stderr, r.stderr
