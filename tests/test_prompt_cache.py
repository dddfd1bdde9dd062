"""Prompt cache on disk: prefix reuse is bit-exact, bad files are reported and never used, writers never tear."""
import json
import multiprocessing
import os
import struct

import numpy as np
import pytest

import pyllm
from pyllm.cli import main
from pyllm.cli.common import parse_size
from pyllm.generate import Stats, generate
from pyllm.prompt_cache import MAGIC, SUFFIX, PromptCache, PromptCacheFile, model_identity, read_entry, write_entry
from pyllm.sampling import Sampler
from tiny import write_tiny_model

N_CTX = 96


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return pyllm.load(write_tiny_model(tmp_path_factory.mktemp("m") / "a.gguf", seed=0))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Same shapes, other weights: a cache made for `model` must never be used for it."""
    return pyllm.load(write_tiny_model(tmp_path_factory.mktemp("m") / "b.gguf", seed=1))


def ids_for(seed: int, n: int = 40) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 256, size=n)]


def prefilled(model, ids, kv_type="f16"):
    cache = model.new_cache(N_CTX, kv_type=kv_type)
    model.eval(cache, ids)
    return cache


@pytest.fixture
def messages():
    return []


def entry_files(directory):
    return sorted(directory.glob(f"*{SUFFIX}"))


def test_prefix_reuse_is_bit_exact(model, tmp_path, messages):
    ids = ids_for(1)
    more = ids_for(2, 8)
    first = prefilled(model, ids)
    pc = PromptCache(tmp_path, warn=messages.append)
    pc.save(model, first)

    cache = model.new_cache(N_CTX)
    assert pc.restore(model, cache, ids + more) == len(ids)
    assert cache.tokens[0] == ids
    assert np.array_equal(cache.k[:, 0, :, :len(ids)], first.k[:, 0, :, :len(ids)])
    assert np.array_equal(cache.v[:, 0, :, :len(ids)], first.v[:, 0, :, :len(ids)])
    # the same numerics as computing it: logits after the extension match bit for bit
    assert np.array_equal(model.eval(cache, more), model.eval(first, more))
    assert messages == []


def test_whole_prompt_cached_leaves_last_token_to_evaluate(model, tmp_path):
    ids = ids_for(3)
    pc = PromptCache(tmp_path)
    pc.save(model, prefilled(model, ids))
    cache = model.new_cache(N_CTX)
    assert pc.restore(model, cache, ids) == len(ids) - 1  # its logits pick the next token
    assert cache.tokens[0] == ids[:-1]


def test_changed_middle_token_reuses_only_up_to_it(model, tmp_path):
    ids = ids_for(4)
    first = prefilled(model, ids)
    pc = PromptCache(tmp_path)
    pc.save(model, first)
    changed = ids.copy()
    changed[17] = (changed[17] + 1) % 256
    cache = model.new_cache(N_CTX)
    assert pc.restore(model, cache, changed) == 17
    assert cache.tokens[0] == ids[:17]
    assert np.array_equal(cache.k[:, 0, :, :17], first.k[:, 0, :, :17])


def test_longest_of_several_entries_wins_and_slot_is_respected(model, tmp_path):
    base = ids_for(5)
    pc = PromptCache(tmp_path)
    pc.save(model, prefilled(model, base[:10] + ids_for(6, 20)))
    longer = prefilled(model, base[:30] + ids_for(7, 5))
    pc.save(model, longer)
    cache = model.new_cache(N_CTX, n_slots=2)
    assert pc.restore(model, cache, base, slot=1) == 30
    assert cache.tokens == [[], base[:30]]
    assert np.array_equal(cache.k[:, 1, :, :30], longer.k[:, 0, :, :30])


def test_greedy_generation_identical_with_and_without_cache(model, tmp_path):
    ids = ids_for(8)
    uncached_stats = Stats()
    cache = model.new_cache(N_CTX)
    uncached = list(generate(model, cache, ids, Sampler(temperature=0), max_tokens=6, stats=uncached_stats))
    pc = PromptCache(tmp_path)
    pc.save(model, cache, n_tokens=len(ids))
    stats = Stats()
    cache = model.new_cache(N_CTX)
    pc.restore(model, cache, ids)
    cached = list(generate(model, cache, ids, Sampler(temperature=0), max_tokens=6, stats=stats))
    assert cached == uncached
    assert (stats.n_reused, stats.n_prefill) == (len(ids) - 1, 1)
    assert uncached_stats.n_reused == 0


def test_save_keeps_one_entry_per_prefix_chain(model, tmp_path):
    ids = ids_for(9)
    pc = PromptCache(tmp_path)
    cache = prefilled(model, ids)
    short = pc.save(model, cache, n_tokens=20)
    full = pc.save(model, cache)
    assert entry_files(tmp_path) == [full]  # the shorter entry is covered by the longer one
    assert short != full
    assert pc.save(model, cache, n_tokens=30) == full  # already covered: nothing new written
    assert entry_files(tmp_path) == [full]


def test_other_models_entries_are_left_alone(model, other_model, tmp_path, messages):
    assert model.fingerprint == other_model.fingerprint  # same header: only the weights tell them apart
    ids = ids_for(10)
    pc = PromptCache(tmp_path, warn=messages.append)
    mine = pc.save(model, prefilled(model, ids))
    cache = other_model.new_cache(N_CTX)
    assert pc.restore(other_model, cache, ids) == 0
    assert cache.tokens[0] == []
    assert entry_files(tmp_path) == [mine] and messages == []


def test_entry_of_another_model_under_our_name_is_removed(model, other_model, tmp_path, messages):
    ids = ids_for(11)
    pc = PromptCache(tmp_path, warn=messages.append)
    theirs = pc.save(other_model, prefilled(other_model, ids))
    disguised = tmp_path / f"{model_identity(model)[:16]}-f16-0123456789abcdef01234567{SUFFIX}"
    theirs.rename(disguised)
    assert pc.restore(model, model.new_cache(N_CTX), ids) == 0
    assert not disguised.exists()
    assert len(messages) == 1 and "another model" in messages[0] and "\n" not in messages[0]


def test_explicit_file_of_another_model_or_kv_type_is_ignored(model, other_model, tmp_path, messages):
    ids = ids_for(12)
    path = tmp_path / "prompt.pkv"
    assert PromptCacheFile(path).save(other_model, prefilled(other_model, ids)) == path
    f = PromptCacheFile(path, warn=messages.append)
    assert f.restore(model, model.new_cache(N_CTX), ids) == 0
    assert "another model" in messages[-1]
    PromptCacheFile(path).save(model, prefilled(model, ids))  # a run of `model` rewrites the file
    assert f.restore(model, model.new_cache(N_CTX, kv_type="f32"), ids) == 0
    assert "KV type f16" in messages[-1]
    assert f.restore(model, model.new_cache(N_CTX), ids) == len(ids) - 1
    assert len(messages) == 2


def test_explicit_file_never_overwrites_a_foreign_file(model, tmp_path, messages):
    path = tmp_path / "notes.txt"
    path.write_text("my notes")
    f = PromptCacheFile(path, warn=messages.append)
    assert f.restore(model, model.new_cache(N_CTX), ids_for(13)) == 0
    assert f.save(model, prefilled(model, ids_for(13))) is None
    assert path.read_text() == "my notes"
    assert len(messages) == 2 and all("not a pyllm prompt cache" in m for m in messages)


def test_read_only_writes_nothing(model, tmp_path):
    cache = prefilled(model, ids_for(14))
    assert PromptCache(tmp_path, read_only=True).save(model, cache) is None
    assert PromptCacheFile(tmp_path / "x.pkv", read_only=True).save(model, cache) is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cut", [1, 100, "header", "magic"])
def test_truncated_file_is_reported_removed_and_not_used(model, tmp_path, messages, cut):
    ids = ids_for(15)
    pc = PromptCache(tmp_path, warn=messages.append)
    path = pc.save(model, prefilled(model, ids))
    size = path.stat().st_size
    keep = {"magic": 5, "header": len(MAGIC) + 20}.get(cut, size - cut if isinstance(cut, int) else 0)
    with open(path, "r+b") as f:
        f.truncate(keep)
    cache = model.new_cache(N_CTX)
    assert pc.restore(model, cache, ids) == 0
    assert cache.tokens[0] == [] and not path.exists()
    assert len(messages) == 1 and str(path) in messages[0] and "removed" in messages[0]


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("where", ["k", "v", "token"])
def test_flipped_bytes_fail_the_checksum(model, tmp_path, messages, where):
    ids = ids_for(16)
    pc = PromptCache(tmp_path, warn=messages.append)
    path = pc.save(model, prefilled(model, ids))
    entry = read_entry(path)
    payload = path.stat().st_size - entry.payload_offset
    (header_len,) = struct.unpack("<I", path.read_bytes()[len(MAGIC):len(MAGIC) + 4])
    offset = {"k": entry.payload_offset + payload // 4, "v": entry.payload_offset + 3 * payload // 4,
              # the last id's high byte: the stored id changes, yet the prompt still matches the others
              "token": len(MAGIC) + 4 + header_len + 4 * len(ids) - 1}[where]
    flip_byte(path, offset)
    cache = model.new_cache(N_CTX)
    assert pc.restore(model, cache, ids) == 0
    assert cache.tokens[0] == [] and not path.exists()
    assert len(messages) == 1 and "checksum" in messages[0]


def test_other_format_version_is_removed(model, tmp_path, messages):
    ids = ids_for(17)
    pc = PromptCache(tmp_path, warn=messages.append)
    path = pc.save(model, prefilled(model, ids))
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"version": 1', b'"version": 7', 1))
    assert pc.restore(model, model.new_cache(N_CTX), ids) == 0
    assert not path.exists() and "format version 7" in messages[0]


def _write_repeatedly(model, cache, path, n_tokens, rounds):
    """Child process: write the same entry again and again; every read in between must see a whole file."""
    for i in range(rounds):
        write_entry(path, model, cache, n_tokens=n_tokens)
        entry = read_entry(path)
        assert entry.n_tokens == n_tokens
        PromptCacheFile(path, warn=lambda m: os._exit(3)).restore(model, model.new_cache(N_CTX), [*entry.tokens, 0])
    os._exit(0)


def test_two_processes_writing_the_same_entry(model, tmp_path):
    ids = ids_for(18)
    cache = prefilled(model, ids)
    path = tmp_path / f"entry{SUFFIX}"
    ctx = multiprocessing.get_context("fork")  # the children inherit the loaded model: no reload, no compile
    procs = [ctx.Process(target=_write_repeatedly, args=(model, cache, path, len(ids), 25)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    fresh = model.new_cache(N_CTX)
    assert PromptCacheFile(path).restore(model, fresh, ids + [1]) == len(ids)
    assert np.array_equal(fresh.k[:, 0, :, :len(ids)], cache.k[:, 0, :, :len(ids)])


def test_lru_limit_evicts_least_recently_used(model, tmp_path):
    caches = [prefilled(model, ids_for(20 + i)) for i in range(3)]
    probe = PromptCache(tmp_path / "probe")
    entry_size = probe.save(model, caches[0]).stat().st_size
    pc = PromptCache(tmp_path / "lru", max_bytes=int(2.5 * entry_size))
    a = pc.save(model, caches[0])
    b = pc.save(model, caches[1])
    os.utime(a, (1, 1000))
    os.utime(b, (1, 2000))
    pc.restore(model, model.new_cache(N_CTX), ids_for(20))  # using `a` makes it the most recent
    c = pc.save(model, caches[2])
    assert entry_files(tmp_path / "lru") == sorted([a, c])
    assert not b.exists()


def test_entry_larger_than_the_limit_is_not_kept(model, tmp_path):
    warned = []
    pc = PromptCache(tmp_path, max_bytes=1000, warn=warned.append)
    assert pc.save(model, prefilled(model, ids_for(30))) is None
    assert entry_files(tmp_path) == []
    assert len(warned) == 1 and "more than the cache's limit of 1000" in warned[0]  # sized first, never written


def test_stale_temporary_files_are_cleaned(model, tmp_path):
    stale = tmp_path / f".x{SUFFIX}.123.abcd.tmp"
    live = tmp_path / f".y{SUFFIX}.456.abcd.tmp"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    os.utime(stale, (1, 1))
    PromptCache(tmp_path).save(model, prefilled(model, ids_for(31)))
    assert not stale.exists() and live.exists()


def test_parse_size():
    assert parse_size("2G", "--x") == 2 << 30
    assert parse_size("500MB", "--x") == 500 << 20
    assert parse_size("1.5k", "--x") == 1536
    assert parse_size("4096", "--x") == 4096
    from pyllm.errors import PyllmError
    with pytest.raises(PyllmError, match="--x: 'lots' is not a size"):
        parse_size("lots", "--x")


def test_cli_run_reuses_cache_and_cache_commands(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYLLM_PROMPT_CACHE_DIR", str(tmp_path / "pc"))
    argv = ["run", model.path, "--raw", "-p", "the cat sat on the mat and then " * 3, "--temp", "0", "-n", "4",
            "-v", "--threads", "2"]
    outs = []
    for _ in range(2):
        main(argv)
        outs.append(capsys.readouterr())
    assert outs[0].out == outs[1].out
    assert "from cache" not in outs[0].err and "from cache" in outs[1].err
    main(argv + ["--no-prompt-cache"])
    assert capsys.readouterr().out == outs[0].out

    main(["cache", "ls"])
    listed = capsys.readouterr()
    assert "a.gguf" in listed.out and "1 entries" in listed.err
    main(["cache", "clear"])
    assert "removed 1 entries" in capsys.readouterr().err
    assert entry_files(tmp_path / "pc") == []


def test_cli_bad_cache_file_is_one_warning_line(model, tmp_path, capsys):
    bad = tmp_path / "p.pkv"
    bad.write_bytes(MAGIC + struct.pack("<I", 3) + b"{}x")
    main(["run", model.path, "--raw", "-p", "hello there", "--temp", "0", "-n", "2", "--prompt-cache", str(bad)])
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "Traceback" not in err
    assert read_entry(bad).n_tokens > 0  # rewritten as a valid cache by the run


def test_real_model_greedy_identical_with_and_without_cache(smollm2, tmp_path):
    m = pyllm.load(smollm2)
    doc = "The library opens at nine. Books can be borrowed for three weeks and renewed twice online. " * 6
    ids = m.tokenize(doc + "How long can I keep a book?")
    longer = m.tokenize(doc + "How long can I keep a book? Answer briefly.")
    assert longer[:len(ids)] == ids

    def greedy(prompt, pc):
        cache = m.new_cache(512)
        if pc is not None:
            pc.restore(m, cache, prompt)
        stats = Stats()
        out = list(generate(m, cache, prompt, Sampler(temperature=0), max_tokens=8, stats=stats))
        if pc is not None:
            pc.save(m, cache, n_tokens=len(prompt))
        return out, stats

    pc = PromptCache(tmp_path)
    first, _ = greedy(ids, pc)
    again, stats = greedy(ids, pc)
    assert again == first and stats.n_prefill == 1
    extended, stats = greedy(longer, pc)
    assert extended == greedy(longer, None)[0]
    assert stats.n_reused == len(ids) and stats.n_prefill == len(longer) - len(ids)
