"""Kernel backends with one interface: `cpu` (numba, always there) and `cuda` (numba.cuda, optional)."""
from __future__ import annotations

from ..errors import PyllmError

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
    try:
        from . import cuda
    except ImportError as e:
        return f"the CUDA backend is not installed ({e})"
    return cuda.unusable_reason()
