"""The GGUF fuzzer (fuzz/fuzz_gguf.py): a quick run in CI, and checks that the harness itself can fail.
The long run (>= 20,000 cases) is documented in the README."""
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
import fuzz_gguf  # noqa: E402

import pyllm  # noqa: E402
from pyllm.errors import GGUFError  # noqa: E402


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return [(raw, fuzz_gguf.gb.parse(raw)) for raw in fuzz_gguf.make_seeds(tmp_path_factory.mktemp("seeds"))]


def test_mutations_are_numbered_and_varied(seeds):
    files = [fuzz_gguf.mutate(seeds, case) for case in range(200)]
    assert files == [fuzz_gguf.mutate(seeds, case) for case in range(200)]  # case N is always the same file
    assert len(set(files)) >= 190  # two truncations may cut at the same byte
    assert fuzz_gguf.mutate(seeds, 5, master_seed=1) != files[5]
    originals = {raw for raw, _ in seeds}
    assert not originals & set(files)


@pytest.fixture
def seed_file(seeds, tmp_path):
    p = tmp_path / "seed.gguf"
    p.write_bytes(seeds[0][0])
    return str(p)


def test_harness_passes_a_good_file(seed_file):
    assert fuzz_gguf.run_case(seed_file, timeout=30)["outcome"] == "loaded"


@pytest.mark.parametrize("behaviour,outcome", [
    (lambda *a, **k: [][0], "crash"),
    (lambda *a, **k: time.sleep(60), "hang"),
    (lambda *a, **k: bytearray(1 << 62), "memory"),
    (lambda *a, **k: (_ for _ in ()).throw(GGUFError("x")), "crash"),  # refused, yet check_model passes
])
def test_harness_reports_what_pyllm_should_not_do(seed_file, monkeypatch, behaviour, outcome):
    monkeypatch.setattr(pyllm, "load", behaviour)
    r = fuzz_gguf.run_case(seed_file, timeout=1.0)
    assert r["outcome"] == outcome, r["detail"]


def test_quick_fuzz_run():
    """400 mutants across two worker processes (each capped at 1 GB over its warmed-up size): every one
    loads or is refused with a PyllmError, and the mutations reach every layer of validation."""
    stats = fuzz_gguf.fuzz(cases=400, jobs=2, timeout=20.0, mem_mb=1024)
    assert stats["cases"] == 400
    assert stats["failures"] == [], "\n\n".join(f"case {f['case']}: {f['outcome']}\n{f['detail']}"
                                               for f in stats["failures"][:3])
    assert stats["loaded"] > 20 and stats["rejected"] > 200
    reached = set(stats["stages"])
    assert {"GGUF structure", "hyper-parameters", "tensors", "tokenizer", "chat template"} <= reached, reached
