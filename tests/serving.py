"""A real `pyllm serve` process on a free localhost port, for the server tests (no mocks: HTTP over loopback)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

PYLLM = [sys.executable, "-m", "pyllm"]


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def wait_idle(self, within: float) -> float:
        """Seconds until /health shows no busy slot and no queue; AssertionError past `within`."""
        t0 = time.monotonic()
        while True:
            h = self.health()
            if h["slots_processing"] == 0 and h["queued"] == 0:
                return time.monotonic() - t0
            assert time.monotonic() - t0 < within, f"still busy {within} s later: {h}"
            time.sleep(0.02)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the server did not stop within {timeout} s of {sig!r}") from None


@contextlib.contextmanager
def serve(model: str | Path, *args: str, log_dir: Path, env: dict | None = None, ready_timeout: float = 600):
    """Start `pyllm serve MODEL --port 0 ARGS`, wait until /health says ok, yield it; stop it (SIGTERM) after."""
    log = Path(log_dir) / f"serve-{os.getpid()}-{time.monotonic_ns()}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(PYLLM + ["serve", str(model), "--port", "0", *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})})
    served = None
    try:
        deadline = time.monotonic() + ready_timeout
        while served is None:
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
            if m:
                served = Served(proc, m.group(1), log)
            assert proc.poll() is None, f"pyllm serve exited: {log.read_text()}"
            assert time.monotonic() < deadline, "pyllm serve did not start"
            time.sleep(0.05)
        while True:
            try:
                if httpx.get(served.url + "/health", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, f"pyllm serve exited: {log.read_text()}"
            assert time.monotonic() < deadline, "pyllm serve never became ready"
            time.sleep(0.1)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
