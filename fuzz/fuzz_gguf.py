"""Fuzz pyllm's loading of GGUF files: mutate tiny real models and require that pyllm either loads each
mutant or refuses it with its own error (a PyllmError), within a time and a memory bound.

    python fuzz/fuzz_gguf.py --cases 20000 --jobs 2     # the long run
    python fuzz/fuzz_gguf.py --replay 1234              # one case in this process, with its traceback

Seeds are tiny models of every architecture (tests/tiny.py) plus one with a SentencePiece vocabulary. Each
case applies one to three mutations: aimed at the header's integer fields (counts, lengths, types, dims,
offsets), random bytes, truncation, splices, or structural edits re-encoded as valid GGUF (values of the
wrong type or out of range, deep arrays, broken vocabularies and merges, hostile chat templates, lying
tensor shapes and offsets). The target: pyllm.load (then tokenize, detokenize, chat template),
pyllm.load_tokenizer, and validate.check_model, which must never raise and must fail a check whenever
loading fails. Cases run in worker processes (RLIMIT_AS caps memory; a timer and a watchdog catch hangs; a
worker that dies is a finding too) and are numbered: case N is the same file on every run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import gguf_bytes as gb  # noqa: E402

SAMPLE_TEXT = "Hello wörld ✓ <|im_start|>user\n the in \x00\t<0x41> 🦙"


# --------------------------------------------------------------------------------------------------- seeds
def make_seeds(directory: Path) -> list[bytes]:
    """Tiny models of every architecture and quant family, and a SentencePiece-vocabulary variant."""
    from gguf import GGMLQuantizationType as Q
    from tiny import write_tiny_model

    seeds = [Path(write_tiny_model(directory / f"seed-{arch}.gguf", arch=arch, qtype=qtype, tied=tied)).read_bytes()
             for arch, qtype, tied in (("llama", Q.Q8_0, True), ("qwen2", Q.F16, False), ("gemma3", Q.Q4_0, True))]
    return seeds + [gb.build(spm_variant(gb.parse(seeds[0])))]


def spm_variant(g: gb.GGUF) -> gb.GGUF:
    """The same model with a SentencePiece vocabulary of the same size: specials, 256 byte tokens, pieces."""
    n = len(g.kv("tokenizer.ggml.tokens").value)
    pieces = ["\u2581", "\u2581t", "he", "\u2581the", "e", "t", "h", "a", "n", "i", "\u2581a", "in"][:n - 259]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    g = copy.deepcopy(g)
    for key in ("tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.ggml.token_type"):
        g.drop(key)
    g.set("tokenizer.ggml.model", gb.STRING, "llama")
    g.set("tokenizer.ggml.tokens", gb.ARRAY, tokens, gb.STRING)
    g.set("tokenizer.ggml.scores", gb.ARRAY, [-float(i) for i in range(n)], gb.FLOAT32)
    g.set("tokenizer.ggml.token_type", gb.ARRAY, types, gb.INT32)
    g.set("tokenizer.ggml.bos_token_id", gb.UINT32, 1)
    g.set("tokenizer.ggml.eos_token_id", gb.UINT32, 2)
    g.set("tokenizer.chat_template", gb.STRING, "{% for m in messages %}{{ bos_token + m['content'] + eos_token }}"
                                                "{% endfor %}")
    return g


# ------------------------------------------------------------------------------------------------ mutator
def interesting_int(rng: random.Random, size: int, current: int = 0) -> int:
    """A value for a `size`-byte field that breaks length, count and offset arithmetic: small numbers, the
    edges of the width, near or scaled from the current value, or random (small randoms stay in the file)."""
    top = (1 << (8 * size)) - 1
    pick = rng.randrange(8)
    if pick == 0:
        return rng.choice([0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 31, 32, 33, 64, 255, 256])
    if pick == 1:
        return rng.choice([top, top - 1, top >> 1, (top >> 1) + 1, 1 << 31, 1 << 32, 1 << 62]) & top
    if pick == 2:
        return (current + rng.randint(-16, 16)) & top
    if pick == 3:
        return (current * rng.choice([2, 3, 4, 8, 1 << 16])) & top
    if pick == 4:
        return (current >> rng.randint(1, 8)) & top
    return rng.getrandbits(8 * size) & (top if pick == 5 else 0xFFFF)


def _value_of_kind(rng: random.Random) -> tuple[int, object, int | None]:
    """A random GGUF value of a random type (vtype, value, etype)."""
    kind = rng.randrange(8)
    if kind == 0:
        return gb.STRING, rng.choice(["", "llama", "gpt2", "x" * 300, "\udcff\udcfe", "none", "linear"]), None
    if kind == 1:
        return gb.FLOAT32, rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e-30, 3.5, 1e30]), None
    if kind == 2:
        return gb.BOOL, rng.random() < 0.5, None
    if kind == 3:
        return gb.ARRAY, [rng.randint(-5, 300) for _ in range(rng.randint(0, 6))], gb.INT32
    if kind == 4:
        return gb.ARRAY, [rng.choice(["a", "", "<s>", "Ġt"]) for _ in range(rng.randint(0, 6))], gb.STRING
    if kind == 5:
        return gb.ARRAY, [(gb.UINT8, [1, 2])], gb.ARRAY
    vtype = rng.choice([gb.UINT8, gb.INT8, gb.UINT16, gb.INT16, gb.UINT32, gb.INT32, gb.UINT64, gb.INT64])
    size = struct.calcsize(gb.SCALAR_FORMATS[vtype])
    value = interesting_int(rng, size)
    if vtype in (gb.INT8, gb.INT16, gb.INT32, gb.INT64) and value >= 1 << (8 * size - 1):
        value -= 1 << (8 * size)
    return vtype, value, None


def _nested(depth: int):
    value = (gb.UINT8, [1])
    for _ in range(depth - 1):
        value = (gb.ARRAY, [value])
    return value


HOSTILE_TEMPLATES = [
    "{{ '<|unknown_marker|>' + messages[0]['content'] }}",
    "{% for m in messages %}{{ m['nope']['deeper'] }}{% endfor %}",
    "{{ raise_exception('no') }}",
    "{% for %}",
    "{{ ''.__class__.__mro__ }}",
    "{{ 'x' * 100000000 }}",
    "{{ bos_token }}{{ messages | length }}<start_of_turn>",
    "",
]


def mutate_structure(g: gb.GGUF, rng: random.Random) -> gb.GGUF:
    """One structural edit, re-encoded as valid GGUF bytes: the file parses, its meaning is broken."""
    g = copy.deepcopy(g)
    arch = g.kv("general.architecture").value
    kv = rng.choice(g.kvs)
    tokens = g.kv("tokenizer.ggml.tokens").value
    op = rng.randrange(16)
    if op == 0:  # a number out of range (or of another integer width)
        numeric = [k for k in g.kvs if k.vtype in gb.SCALAR_FORMATS and k.vtype != gb.BOOL]
        k = rng.choice(numeric)
        vtype, value, _ = _value_of_kind(rng)
        if vtype in gb.SCALAR_FORMATS and vtype not in (gb.BOOL, gb.FLOAT32):
            k.vtype, k.value = vtype, value
        elif k.vtype in (gb.FLOAT32, gb.FLOAT64):
            k.value = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30])
    elif op == 1:  # a value of the wrong type
        kv.vtype, kv.value, kv.etype = _value_of_kind(rng)
    elif op == 2:
        g.drop(kv.key)
    elif op == 3:  # the same key twice
        g.kvs.append(copy.deepcopy(kv))
    elif op == 4:  # an array nested deeper than any reader should follow
        etype, items = _nested(rng.choice([2, 7, 8, 9, 12, 50]))
        g.set("general.nested", gb.ARRAY, items, etype)
    elif op == 5:  # token texts: invalid UTF-8, empty, duplicated, very long
        i = rng.randrange(len(tokens))
        tokens[i] = rng.choice(["\udcff", "a\udcc3", "", tokens[rng.randrange(len(tokens))], "<|im_end|>",
                                "x" * 5000, "<0xZZ>", "<0x4"])
    elif op == 6:  # a vocabulary of another size than the embedding
        del tokens[rng.randrange(len(tokens)):]
    elif op == 7 and any(k.key == "tokenizer.ggml.merges" for k in g.kvs):  # merges naming unknown tokens
        merges = g.kv("tokenizer.ggml.merges").value
        merges[rng.randrange(len(merges))] = rng.choice(["zz qq", "nospace", "", " ", "a  b", "Ġ t h", "\udcff t"])
    elif op == 8:  # special token ids anywhere
        key = rng.choice(["bos", "eos", "unknown", "padding", "eot", "seperator"])
        g.set(f"tokenizer.ggml.{key}_token_id", gb.UINT32, interesting_int(rng, 4, len(tokens)))
    elif op == 9:  # per-token arrays of the wrong length or with odd values
        key = rng.choice(["tokenizer.ggml.token_type", "tokenizer.ggml.scores"])
        n = len(tokens) + rng.choice([-1, 0, 1, 0])
        g.set(key, gb.ARRAY, [rng.randint(-3, 300) for _ in range(n)], gb.INT32)
    elif op == 10:
        g.set("tokenizer.chat_template", gb.STRING, rng.choice(HOSTILE_TEMPLATES))
    elif op == 11:
        g.set("tokenizer.ggml.model", gb.STRING, rng.choice(["llama", "gpt2", "bert", ""]))
        if rng.random() < 0.5:
            g.set("tokenizer.ggml.pre", gb.STRING, rng.choice(["qwen2", "smollm", "unknown-pre", ""]))
    elif op == 12:  # hyper-parameters that disagree with each other
        key = rng.choice(["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                          "attention.head_count_kv", "attention.key_length", "context_length", "vocab_size",
                          "rope.dimension_count", "attention.sliding_window"])
        g.set(f"{arch}.{key}", gb.INT32, rng.choice([0, -1, 1, 2, 3, 5, 16, 48, 63, 64, 128, 264, 1 << 20,
                                                    (1 << 31) - 1]))
    else:  # tensors: shapes, types, offsets, names that lie
        t = rng.choice(g.tensors)
        edit = rng.randrange(7)
        if edit == 0:
            t.dims = [interesting_int(rng, 8, d) if rng.random() < 0.5 else d for d in t.dims]
        elif edit == 1:
            t.dims = list(reversed(t.dims)) if len(t.dims) > 1 else t.dims + [1]
        elif edit == 2:
            t.qtype = rng.choice([0, 1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 20, 30, 31, 39, 40, 41, 1 << 31])
        elif edit == 3:
            t.offset = rng.choice([0, 1, 31, 32, len(t.data), 1 << 40])
        elif edit == 4:
            t.name = rng.choice(g.tensors).name
        elif edit == 5:
            g.tensors.remove(t)
        else:
            t.dims = t.dims + [rng.choice([1, 2, 0])] * rng.randint(1, 4)
    return g


def mutate(seeds: list[tuple[bytes, gb.GGUF]], case: int, master_seed: int = 0) -> bytes:
    """Case `case`'s file: deterministic in (master_seed, case), and never a seed itself."""
    rng = random.Random(f"{master_seed}:{case}")
    raw, parsed = rng.choice(seeds)
    while True:  # some mutations write back the value that was there
        mutant = _mutate_once(raw, parsed, rng)
        if mutant != raw:
            return mutant


def _mutate_once(raw: bytes, parsed: gb.GGUF, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        raw = gb.build(mutate_structure(parsed, rng))
        if rng.random() < 0.7:
            return raw
    buf = bytearray(raw)
    fields = parsed.fields
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        header_end = min(len(buf), parsed.data_start)
        op = rng.randrange(10)
        if op < 5:  # an integer field of the header (positions are the seed's: later ops may drift)
            f = rng.choice(fields)
            if f.pos + f.size <= len(buf):
                current = int.from_bytes(buf[f.pos:f.pos + f.size], "little")
                buf[f.pos:f.pos + f.size] = interesting_int(rng, f.size, current).to_bytes(f.size, "little")
        elif op == 5:
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
        elif op == 6:
            i = rng.randrange(header_end)
            buf[i:i + rng.randint(1, 16)] = rng.randbytes(rng.randint(1, 16))
        elif op == 7:
            cut = rng.randrange(header_end) if rng.random() < 0.7 else rng.randrange(len(buf))
            del buf[cut:]
        elif op == 8:
            i, j = sorted(rng.randrange(header_end) for _ in range(2))
            buf[i:i] = buf[i:j] if rng.random() < 0.5 else b""
            if rng.random() < 0.5:
                del buf[i:j]
        else:
            i = rng.randrange(header_end)
            buf[i:i] = rng.randbytes(rng.randint(1, 64))
        if len(buf) < 4:
            break
    return bytes(buf)


# ------------------------------------------------------------------------------------------------- target
class CaseTimeout(BaseException):
    """Raised by the case timer; a BaseException so that no `except Exception` in pyllm swallows it."""


def exercise(path: str) -> tuple[str, str]:
    """Run pyllm on one file. Returns ("loaded" | "rejected", first failed check) or raises what pyllm
    should not (anything but a PyllmError)."""
    import pyllm
    from pyllm.errors import PyllmError
    from pyllm.tokenizer import StreamDecoder
    from pyllm.validate import chat_template_for, check_model

    rejected = []
    try:
        model = pyllm.load(path, device="cpu")
        tok = model.tokenizer
        ids = model.tokenize(SAMPLE_TEXT, parse_special=True)
        model.detokenize(ids)
        decoder = StreamDecoder(tok)
        for i in list(range(min(tok.n_vocab, 600))) + ids:
            decoder.feed(i)
        decoder.flush()
        template = chat_template_for(model.metadata, tok)
        if template is not None:
            text = template.render([{"role": "user", "content": SAMPLE_TEXT}])
            model.tokenize(text, add_special=not template.renders_bos(), parse_special=True)
    except PyllmError as e:
        rejected.append(f"load: {type(e).__name__}: {e}")
    try:
        tok = pyllm.load_tokenizer(path)
        tok.decode(tok.encode(SAMPLE_TEXT, add_special=True, parse_special=True))
    except PyllmError as e:
        rejected.append(f"load_tokenizer: {type(e).__name__}: {e}")
    failed = [name for name, ok, _ in check_model(path) if not ok]
    if rejected and not failed:
        raise AssertionError(f"pyllm refused the file ({rejected[0]}) but check_model passed every check")
    # the first failed check says which validation stopped the file (for the run's statistics)
    return ("rejected" if rejected else "loaded"), (failed[0] if failed else "all checks pass")


def run_case(path: str, timeout: float) -> dict:
    """exercise() under a timer; anything but loading or a PyllmError is a failure, with its traceback."""
    def on_alarm(signum, frame):
        raise CaseTimeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    t0 = time.perf_counter()
    try:
        outcome, detail = exercise(path)
    except CaseTimeout:
        outcome, detail = "hang", f"still running after {timeout} s:\n" + traceback.format_exc()
    except MemoryError:
        outcome, detail = "memory", traceback.format_exc()
    except Exception:  # noqa: BLE001 (any other exception is exactly what the fuzzer looks for)
        outcome, detail = "crash", traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return {"outcome": outcome, "detail": detail, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------- worker
def worker(master_seed: int, timeout: float, mem_mb: int) -> None:
    """Read case numbers on stdin, answer one JSON line each on stdout."""
    with tempfile.TemporaryDirectory(prefix="pyllm-fuzz-") as tmp:
        seeds = [(raw, gb.parse(raw)) for raw in make_seeds(Path(tmp))]
        exercise(str(Path(tmp) / "seed-llama.gguf"))  # warm up: imports, kernels, before the memory cap
        exercise(str(Path(tmp) / "seed-gemma3.gguf"))
        vm = _vm_bytes()
        resource.setrlimit(resource.RLIMIT_AS, (vm + mem_mb * 2**20, vm + mem_mb * 2**20))
        path = str(Path(tmp) / "case.gguf")
        for line in sys.stdin:
            case = int(line)
            Path(path).write_bytes(mutate(seeds, case, master_seed))
            result = run_case(path, timeout)
            result.update(case=case, max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            print(json.dumps(result), flush=True)


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


class _Worker:
    def __init__(self, args):
        env = dict(os.environ, NUMBA_NUM_THREADS="1")  # tiny vectors: a thread pool only costs time here
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", "--seed", str(args.seed),
                                      "--timeout", str(args.timeout), "--mem-mb", str(args.mem_mb)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.case, self.deadline = None, None

    def send(self, case: int, timeout: float):
        self.case = case
        self.deadline = time.monotonic() + timeout + 60  # startup and warm-up included on the first case
        self.proc.stdin.write(f"{case}\n")
        self.proc.stdin.flush()

    def kill(self):
        self.proc.kill()
        self.proc.wait()


def fuzz(cases: int, jobs: int = 1, seed: int = 0, timeout: float = 20.0, mem_mb: int = 1024, start: int = 0,
         out: Path | None = None, progress=None) -> dict:
    """Run cases [start, start + cases) over `jobs` workers. Returns counts, failures and resource peaks."""
    args = argparse.Namespace(seed=seed, timeout=timeout, mem_mb=mem_mb)
    stats = {"cases": 0, "loaded": 0, "rejected": 0, "failures": [], "max_rss_mb": 0.0, "max_case_seconds": 0.0,
             "stages": {}}
    todo = list(range(start, start + cases))[::-1]
    sel = selectors.DefaultSelector()
    workers = []

    def record(case, outcome, detail):
        stats["failures"].append({"case": case, "outcome": outcome, "detail": detail})
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            seeds = _parent_seeds()
            (out / f"case-{case}.gguf").write_bytes(mutate(seeds, case, seed))
            (out / f"case-{case}.txt").write_text(f"{outcome}\n{detail}\n")

    def start_worker():
        w = _Worker(args)
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        workers.append(w)
        if todo:
            w.send(todo.pop(), timeout)

    def retire(w):
        sel.unregister(w.proc.stdout)
        workers.remove(w)
        w.kill()

    t0 = time.monotonic()
    for _ in range(min(jobs, cases)):
        start_worker()
    while workers:
        for key, _ in sel.select(timeout=1.0):
            w = key.data
            line = w.proc.stdout.readline()
            if not line:  # the worker died: a segfault, an abort, the kernel's OOM killer
                code = w.proc.wait()
                stats["cases"] += 1
                record(w.case, "died", f"worker exit status {code}")
                retire(w)
                if todo:
                    start_worker()
                continue
            r = json.loads(line)
            stats["cases"] += 1
            stats["max_rss_mb"] = max(stats["max_rss_mb"], r["max_rss_mb"])
            stats["max_case_seconds"] = max(stats["max_case_seconds"], r["seconds"])
            if r["outcome"] in ("loaded", "rejected"):
                stats[r["outcome"]] += 1
                stats["stages"][r["detail"]] = stats["stages"].get(r["detail"], 0) + 1
            else:
                record(r["case"], r["outcome"], r["detail"])
            if progress and stats["cases"] % 1000 == 0:
                progress(stats, time.monotonic() - t0)
            if todo:
                w.send(todo.pop(), timeout)
            else:
                retire(w)
        for w in list(workers):
            if time.monotonic() > w.deadline:  # stuck where the timer cannot interrupt (native code)
                stats["cases"] += 1
                record(w.case, "hang", "killed by the watchdog")
                retire(w)
                if todo:
                    start_worker()
    stats["seconds"] = time.monotonic() - t0
    return stats


_SEEDS = []


def _parent_seeds():
    if not _SEEDS:
        with tempfile.TemporaryDirectory() as tmp:
            _SEEDS.extend((raw, gb.parse(raw)) for raw in make_seeds(Path(tmp)))
    return _SEEDS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--start", type=int, default=0, help="first case number")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--seed", type=int, default=0, help="master seed: another seed, other mutations")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case")
    ap.add_argument("--mem-mb", type=int, default=1024, help="memory a case may add to a warmed-up worker")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "pyllm-fuzz-failures",
                    help="where failing cases are saved (file + traceback)")
    ap.add_argument("--replay", type=int, help="run this one case here, print its outcome and traceback")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.seed, args.timeout, args.mem_mb)
        return 0
    if args.replay is not None:
        path = Path(tempfile.gettempdir()) / f"pyllm-fuzz-case-{args.replay}.gguf"
        path.write_bytes(mutate(_parent_seeds(), args.replay, args.seed))
        r = run_case(str(path), args.timeout)
        print(f"{path}: {r['outcome']} in {r['seconds']:.2f} s\n{r['detail']}")
        return r["outcome"] not in ("loaded", "rejected")

    def progress(stats, seconds):
        print(f"{stats['cases']} cases, {len(stats['failures'])} failures, {seconds:.0f} s", file=sys.stderr)

    stats = fuzz(args.cases, args.jobs, args.seed, args.timeout, args.mem_mb, args.start, args.out, progress)
    print(f"{stats['cases']} cases in {stats['seconds']:.0f} s: {stats['loaded']} loaded, {stats['rejected']} "
          f"rejected with a PyllmError, {len(stats['failures'])} failures (crash, hang, memory, died); slowest "
          f"case {stats['max_case_seconds']:.2f} s, peak worker RSS {stats['max_rss_mb']:.0f} MB")
    print("first failed check: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["stages"].items())))
    for f in stats["failures"]:
        print(f"case {f['case']}: {f['outcome']}: {f['detail'].strip().splitlines()[-1]}")
    return 1 if stats["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
