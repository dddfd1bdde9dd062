"""Every command and option with bad values, as a user types them: each must end in one `pyllm: error:` line
on stderr with the documented exit status (README, "Exit status"), never a traceback, a usage box or an
"internal error".  Runs the real CLI in subprocesses; the model is a tiny random one.

What this matrix found before issue 22's fixes ("internal error" unless said otherwise):
  run --repeat-penalty 1e-300          ValueError: Probabilities contain NaN (and numpy RuntimeWarning lines)
  run --presence-penalty -inf          ValueError: Probabilities contain NaN
  run --seed -1                        ValueError: expected non-negative integer
  run --ctx-size 10**30                ValueError: Maximum allowed dimension exceeded
  run --ctx-size 100000000000          MemoryError: Unable to allocate 11.6 TiB ...
  run /proc/self/mem (unreadable)      OSError: [Errno 5] Input/output error (also info, info --check)
  bench -p 0                           ValueError: eval needs at least one token
  bench -p -5, bench -n -1             ValueError: negative dimensions are not allowed
  perplexity -c -1, perplexity -c 1    ZeroDivisionError: float division by zero
  bench -p 100000000                   no error: ran past the 120 s limit (a hang, in effect)
and, without "internal error": usage errors in 4 lines; --temp inf, --presence-penalty nan, --frequency-penalty
inf, --repeat-penalty inf, -n -5, bench -r 0 / -o xml / -p '', perplexity -c 0 (silently 512) and --chunks -3
accepted; batch --top-p 2 failed every line instead of once; `run ""` ran the default model.
"""
import os
import subprocess
import sys

import pytest

from tiny import write_tiny_model

PYLLM = [sys.executable, "-m", "pyllm"]
HUGE = "9" * 30
UNREADABLE = "/proc/self/mem"  # opens, but reading it fails (EIO) even for root, which chmod 000 cannot stop


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("matrix")
    (d / "empty.gguf").write_bytes(b"")
    (d / "prompt.txt").write_text("hello there")
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (d / "empty.txt").write_text("")
    (d / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    (d / "adir").mkdir()
    return {"tiny": write_tiny_model(d / "tiny.gguf"), "dir": str(d / "adir"), "missing": str(d / "missing.gguf"),
            "empty": str(d / "empty.gguf"), "prompt": str(d / "prompt.txt"), "binary": str(d / "binary.txt"),
            "empty_txt": str(d / "empty.txt"), "jsonl": str(d / "prompts.jsonl"), "root": str(d)}


def _run_args(*extra):
    return ["run", "{tiny}", "-p", "hi", "--raw", "-n", "2", *extra]


# (args, exit status, text the error line must contain); {name} is replaced by files[name]
ERRORS = [
    # run: numbers
    (_run_args("--threads", "0"), 1, "--threads must be at least 1"),
    (_run_args("--threads", "-3"), 1, "--threads must be at least 1"),
    (_run_args("--threads", "abc"), 2, "--threads"),
    (_run_args("-n", "-5"), 1, "--max-tokens must be -1"),
    (_run_args("-n", "x"), 2, "--max-tokens"),
    (_run_args("--temp", "-1"), 1, "temperature must be"),
    (_run_args("--temp", "nan"), 1, "temperature must be"),
    (_run_args("--temp", "inf"), 1, "temperature must be"),
    (_run_args("--temp", ""), 2, "--temp"),
    (_run_args("--top-k", "-1"), 1, "top_k must be"),
    (_run_args("--top-p", "0"), 1, "top_p must be"),
    (_run_args("--top-p", "1.5"), 1, "top_p must be"),
    (_run_args("--top-p", "nan"), 1, "top_p must be"),
    (_run_args("--min-p", "-0.1"), 1, "min_p must be"),
    (_run_args("--min-p", "nan"), 1, "min_p must be"),
    (_run_args("--repeat-penalty", "0"), 1, "repeat_penalty must be"),
    (_run_args("--repeat-penalty", "-1"), 1, "repeat_penalty must be"),
    (_run_args("--repeat-penalty", "inf"), 1, "repeat_penalty must be"),
    (_run_args("--repeat-penalty", "nan"), 1, "repeat_penalty must be"),
    (_run_args("--presence-penalty", "nan"), 1, "presence_penalty must be"),
    (_run_args("--presence-penalty", "-inf"), 1, "presence_penalty must be"),
    (_run_args("--frequency-penalty", "inf"), 1, "frequency_penalty must be"),
    (_run_args("--seed", "-1"), 1, "seed must be"),
    (_run_args("--seed", "x"), 2, "--seed"),
    (_run_args("--ctx-size", "0"), 1, "--ctx-size must be at least 1"),
    (_run_args("--ctx-size", "-5"), 1, "--ctx-size must be at least 1"),
    (_run_args("--ctx-size", "1"), 1, "context"),
    (_run_args("--ctx-size", HUGE, "--force-ctx"), 1, "available"),
    (_run_args("--ctx-size", "100000000000", "--force-ctx"), 1, "available"),
    (_run_args("--ctx-size", "100000", "--force-ctx", "--max-memory", "1M"), 1, "--max-memory"),
    (_run_args("--max-memory", "lots"), 1, "--max-memory"),
    (_run_args("--max-memory", "0"), 1, "--max-memory"),
    (_run_args("--max-memory", "-1G"), 1, "--max-memory"),
    (_run_args("--max-memory", "1K"), 1, "--max-memory"),
    (_run_args("--kv-type", "f8"), 1, "--kv-type must be one of"),
    (_run_args("--kv-type", ""), 1, "--kv-type must be one of"),
    (_run_args("--device", "gpu"), 1, "device"),
    (_run_args("--prompt-cache-max-size", "lots"), 1, "--prompt-cache-max-size"),
    (_run_args("--prompt-cache-max-size", "-1G"), 1, "--prompt-cache-max-size"),
    (_run_args("--prompt-cache-max-size", ""), 1, "--prompt-cache-max-size"),
    (_run_args("--no-such-option"), 2, "--no-such-option"),
    # run: prompts and files
    (["run", "{tiny}", "-p", ""], 1, "empty"),
    (["run", "{tiny}", "-f", "{missing}"], 1, "cannot read"),
    (["run", "{tiny}", "-f", "{dir}"], 1, "cannot read"),
    (["run", "{tiny}", "-f", UNREADABLE], 1, "cannot read"),
    (["run", "{tiny}", "-f", "{binary}"], 1, "not UTF-8"),
    (["run", "{tiny}", "-f", "{empty_txt}"], 1, "empty"),
    (["run", "{missing}", "-p", "hi"], 2, "no such file"),
    (["run", "{dir}", "-p", "hi"], 2, "directory"),
    (["run", "{empty}", "-p", "hi"], 2, "not a GGUF file"),
    (["run", UNREADABLE, "-p", "hi"], 2, UNREADABLE),
    (["run", "{prompt}", "-p", "hi"], 2, "not a GGUF file"),
    (["run", "no-such-model", "-p", "hi"], 1, "not a known model"),
    (["run", "", "-p", "hi"], 1, "the model argument is empty"),
    # chat
    (["chat", "{tiny}", "--chat-template", "{missing}"], 1, "cannot read chat template"),
    (["chat", "{tiny}", "--chat-template", "{dir}"], 1, "cannot read chat template"),
    (["chat", "{tiny}", "--chat-template", UNREADABLE], 1, "cannot read chat template"),
    (["chat", "{tiny}", "--chat-template", "{binary}"], 1, "not UTF-8"),
    (["chat", "{tiny}", "--ctx-size", "0"], 1, "--ctx-size must be at least 1"),
    (["chat", "{tiny}", "--temp", "nan"], 1, "temperature must be"),
    (["chat", "{tiny}", "-n", "-2"], 1, "--max-tokens must be -1"),
    (["chat", "{tiny}", "--threads", "0"], 1, "--threads must be at least 1"),
    (["chat", "{tiny}", "--kv-type", "q4"], 1, "--kv-type must be one of"),
    (["chat", "{missing}"], 2, "no such file"),
    # batch
    (["batch", "{tiny}", "-i", "{missing}"], 1, "cannot read prompts"),
    (["batch", "{tiny}", "-i", "{dir}"], 1, "cannot read prompts"),
    (["batch", "{tiny}", "-i", UNREADABLE], 1, "cannot read prompts"),
    (["batch", "{tiny}", "-i", "{jsonl}", "--parallel", "0"], 1, "--parallel must be at least 1"),
    (["batch", "{tiny}", "-i", "{jsonl}", "--parallel", "-2"], 1, "--parallel must be at least 1"),
    (["batch", "{tiny}", "-i", "{jsonl}", "--parallel", "100000000", "--max-memory", "1G"], 1, "--max-memory"),
    (["batch", "{tiny}", "-i", "{jsonl}", "--parallel", "x"], 2, "--parallel"),
    (["batch", "{tiny}", "-i", "{jsonl}", "--format", "xml"], 1, "--format must be one of"),
    (["batch", "{tiny}", "-i", "{jsonl}", "--input-format", ""], 1, "--input-format must be one of"),
    (["batch", "{tiny}", "-i", "{jsonl}", "-n", "-7"], 1, "--max-tokens must be -1"),
    (["batch", "{tiny}", "-i", "{jsonl}", "--top-p", "2"], 1, "top_p must be"),
    (["batch", "{tiny}", "-i", "{jsonl}", "--ctx-size", "0"], 1, "--ctx-size must be at least 1"),
    (["batch", "{missing}", "-i", "{jsonl}"], 2, "no such file"),
    # bench
    (["bench", "{tiny}", "-p", "0", "-n", "0"], 1, "nothing to measure"),
    (["bench", "{tiny}", "-p", "-5"], 1, "--n-prompt"),
    (["bench", "{tiny}", "-p", "abc"], 1, "--n-prompt"),
    (["bench", "{tiny}", "-p", ""], 1, "--n-prompt"),
    (["bench", "{tiny}", "-p", "100000000"], 1, "context"),
    (["bench", "{tiny}", "-n", "-1"], 1, "--n-gen"),
    (["bench", "{tiny}", "-n", "1,x"], 1, "--n-gen"),
    (["bench", "{tiny}", "-r", "0"], 1, "--repetitions must be at least 1"),
    (["bench", "{tiny}", "-r", "-2"], 1, "--repetitions must be at least 1"),
    (["bench", "{tiny}", "-o", "xml"], 1, "--output must be"),
    (["bench", "{tiny}", "--threads", "0"], 1, "--threads must be at least 1"),
    (["bench", "{tiny}", "--kv-type", "x"], 1, "--kv-type must be one of"),
    (["bench", "{dir}"], 2, "directory"),
    # perplexity
    (["perplexity", "{tiny}"], 2, "--file"),
    (["perplexity", "{tiny}", "-f", "{missing}"], 1, "cannot read"),
    (["perplexity", "{tiny}", "-f", "{dir}"], 1, "cannot read"),
    (["perplexity", "{tiny}", "-f", UNREADABLE], 1, "cannot read"),
    (["perplexity", "{tiny}", "-f", "{binary}"], 1, "not UTF-8"),
    (["perplexity", "{tiny}", "-f", "{empty_txt}"], 1, "fewer than one chunk"),
    (["perplexity", "{tiny}", "-f", "{prompt}", "-c", "0"], 1, "--ctx-size must be at least"),
    (["perplexity", "{tiny}", "-f", "{prompt}", "-c", "-1"], 1, "--ctx-size must be at least"),
    (["perplexity", "{tiny}", "-f", "{prompt}", "-c", "1"], 1, "--ctx-size must be at least"),
    (["perplexity", "{tiny}", "-f", "{prompt}", "-c", "100000000"], 1, "fewer than one chunk"),
    (["perplexity", "{tiny}", "-f", "{prompt}", "--chunks", "-3"], 1, "--chunks must be"),
    # info, pull, list, cache
    (["info", "{missing}"], 2, "no such file"),
    (["info", "{dir}"], 2, "directory"),
    (["info", "{empty}"], 2, "not a GGUF file"),
    (["info", UNREADABLE], 2, UNREADABLE),
    (["info", "--check", "{dir}"], 2, "directory"),
    (["info", "--check", UNREADABLE], 2, UNREADABLE),
    (["pull", "no-such-model"], 1, "unknown model"),
    (["pull", ""], 1, "unknown model"),
    (["pull"], 2, "Missing argument 'name'"),
    (["list", "extra"], 2, "extra"),
    (["cache", "frobnicate"], 2, "frobnicate"),
]


def pyllm(args, files, input=""):
    """PYLLM_MODELS: an empty directory, so that no case runs (or downloads) a real model by accident."""
    args = [a.format(**files) for a in args]
    return subprocess.run(PYLLM + args, input=input, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYLLM_MODELS": files["root"] + "/no-models"})


def assert_one_error_line(r, status: int, text: str):
    """Exit status as documented, and stderr: warnings allowed, then exactly one error line, nothing else."""
    lines = r.stderr.strip().splitlines()
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert lines and lines[-1].startswith("pyllm: error: "), r.stderr
    assert all(line.startswith("pyllm: warning: ") for line in lines[:-1]), r.stderr
    assert text in lines[-1], r.stderr
    assert r.returncode == status, (r.returncode, r.stderr)


def _id(args):
    return " ".join(args).replace("{", "").replace("}", "").replace("tiny -p hi --raw -n 2 ", "") or "(none)"


@pytest.mark.parametrize("args, status, text", ERRORS, ids=[_id(a) for a, _, _ in ERRORS])
def test_bad_value_is_one_line(files, args, status, text):
    assert_one_error_line(pyllm(args, files), status, text)


# values at the edge that are not errors: the command runs (exit 0) and may warn, but only in one line each
ACCEPTED = [
    _run_args("--threads", "100000"),  # more threads than cores: capped
    _run_args("--threads", HUGE),
    _run_args("-n", HUGE),  # until the context is full
    _run_args("--top-k", HUGE),
    _run_args("--ctx-size", HUGE),
    _run_args("-n", "0"),
    _run_args("--top-k", "100000000"),
    _run_args("--seed", "0"),
    _run_args("--seed", "123456789012345678901234567890"),
    _run_args("--stop", ""),
    _run_args("--ctx-size", "100000000000"),  # above the training context: capped, with a warning
    _run_args("--max-memory", "64G"),
    _run_args("--prompt-cache-max-size", "0"),
    _run_args("--prompt-cache", "{dir}"),  # a directory where a cache file should be: a warning, not an error
    _run_args("--prompt-cache-dir", "{prompt}"),  # a file where the directory should be: a warning
    ["bench", "{tiny}", "-p", "8", "-n", "0", "-r", "1"],  # -n 0: no generation test, as llama-bench
    ["bench", "{tiny}", "-p", "0", "-n", "4", "-r", "1"],
    ["perplexity", "{tiny}", "-f", "{prompt}", "-c", "4", "--chunks", "1"],
    ["cache", "ls", "--prompt-cache-dir", "{prompt}"],
    ["cache", "ls", "--prompt-cache-dir", "{missing}"],
]


@pytest.mark.parametrize("args", ACCEPTED, ids=[_id(a) for a in ACCEPTED])
def test_edge_value_is_accepted(files, args):
    r = pyllm(args, files)
    assert r.returncode == 0, r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert all(line.startswith("pyllm: warning: ") or not line.startswith("pyllm")
               for line in r.stderr.strip().splitlines()), r.stderr


def test_usage_error_points_to_help(files):
    r = pyllm(_run_args("--threads", "abc"), files)
    assert "pyllm run --help" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_no_arguments_still_shows_help(files):
    r = pyllm([], files)
    assert r.returncode == 2 and "Commands" in r.stdout + r.stderr


def test_chat_bad_input_lines_keep_the_session(files):
    """In a session, a bad /command value is one error line and the chat goes on (exit 0 at the end)."""
    r = pyllm(["chat", "{tiny}", "-n", "2"], files, input="/set temp nan\n/set top_k -1\n/load {missing}\n"
              "/load {dir}\n/save {dir}\nhello\n".format(**files))
    assert r.returncode == 0, r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("pyllm: error:") == 5, r.stderr


def test_internal_error_is_kept_for_real_bugs(files, tmp_path):
    """A bug (here: an exception planted in the library) still says "internal error" and offers --verbose."""
    boot = ("import sys, pyllm.model as m\n"
            "def boom(*a, **k): raise ZeroDivisionError('planted')\n"
            "m.Model.context_size = boom\n"
            "from pyllm.cli import main\nmain(sys.argv[1:])\n")
    args = [a.format(**files) for a in _run_args()]
    r = subprocess.run([sys.executable, "-c", boot, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 70 and "internal error: ZeroDivisionError: planted" in r.stderr
    assert "--verbose" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-c", boot, *args, "--verbose"], capture_output=True, text=True, timeout=300)
    assert "Traceback" in r.stderr and "planted" in r.stderr
