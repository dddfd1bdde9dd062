"""`pyllm bench` as a user runs it: speeds, and how close generation comes to the machine's memory speed."""
import json
import subprocess
import sys
from pathlib import Path

from tiny import write_tiny_model


def test_bench_reports_speeds_and_weight_bandwidth(tmp_path):
    path = Path(write_tiny_model(tmp_path / "tiny.gguf"))
    r = subprocess.run([sys.executable, "-m", "pyllm", "bench", str(path), "-p", "16", "-n", "8", "-r", "1",
                        "-o", "json", "-t", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    pp, tg = info["results"]
    assert (pp["test"], tg["test"]) == ("pp16", "tg8") and pp["tokens_per_s"] > 0 and tg["tokens_per_s"] > 0
    assert "weights_gb_s" not in pp
    # weights streamed per generated token: bytes per token (every matrix of the file but the embedding) x tok/s
    assert 0 < info["weight_bytes_per_token"] < path.stat().st_size
    assert tg["weights_gb_s"] == round(tg["tokens_per_s"] * info["weight_bytes_per_token"] / 1e9, 2)
    assert info["read_bandwidth_gb_s"] > 0.5
