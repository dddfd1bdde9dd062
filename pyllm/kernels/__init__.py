"""Kernel backends with one interface: `cpu` (numba, always there) and `cuda` (numba.cuda, optional)."""
from __future__ import annotations

import ctypes
import os
import sys

from ..errors import PyllmError

# numba's OpenMP threads spin ~300k times waiting for the next parallel region.  On a busy machine that spinning
# steals the cores the work needs (SmolLM2 decode, 2 threads, 6 busy processes: median 84 ms/token); 20k spins
# still bridge the few microseconds between our kernels (quiet machine: 5.4 ms/token either way) and bring the
# busy case to 31 ms.  Read by libgomp when numba first starts its thread pool; the user's setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

DEVICES = ("auto", "cpu", "cuda")


def get_backend(device: str = "auto"):
    """The kernel module for a device: "auto" picks CUDA when a GPU is usable, else the CPU, silently."""
    if device not in DEVICES:
        raise PyllmError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if device != "cpu":
        reason = _cuda_unusable()
        if reason is None:
            from . import cuda

            return cuda
        if device == "cuda":
            raise PyllmError(f"no CUDA device found: {reason}")
    from . import cpu

    return cpu


def _cuda_unusable() -> str | None:
    """None when a CUDA GPU can run our kernels, else why not."""
    if not _driver_present():
        return "the NVIDIA driver library (libcuda) is not installed"
    try:
        from . import cuda
    except ImportError as e:
        return f"the CUDA backend is not installed ({e})"
    return cuda.unusable_reason()


def _driver_present() -> bool:
    """A cheap look for the NVIDIA driver, so that machines without one skip importing numba.cuda (~0.5 s)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or os.environ.get("NUMBA_CUDA_DRIVER"):
        return True  # the simulator needs no driver; a driver named explicitly is numba's to find
    for name in (("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            pass
    return False
