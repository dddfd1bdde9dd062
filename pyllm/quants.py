"""GGML quantization types: block geometry and the QTensor that carries a weight matrix in its GGUF encoding.

The kernels that read these encodings live in kernels/qmatmul.py; gguf-py (`gguf.quants`) is the reference
they are tested against.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

# Types kernels/qmatmul.py can run (matmul, get_rows, dequantize).
SUPPORTED: frozenset[int] = frozenset(
    int(t)
    for t in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
)


def type_name(qtype: int) -> str:
    try:
        return Q(qtype).name
    except ValueError:
        return f"type {qtype}"


def block_size(qtype: int) -> int:
    """Weights per block (1 for float types)."""
    return GGML_QUANT_SIZES[Q(qtype)][0]


def type_size(qtype: int) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[Q(qtype)][1]


def row_bytes(qtype: int, n_in: int) -> int:
    bs, ts = GGML_QUANT_SIZES[Q(qtype)]
    if n_in % bs:
        raise ValueError(f"row length {n_in} is not a multiple of the {type_name(qtype)} block size {bs}")
    return n_in // bs * ts


class QTensor:
    """A 2-D weight still in its GGUF encoding.

    shape = (n_out, n_in) in numpy order (rows, cols); data is uint8 [n_out, row_bytes], usually a zero-copy
    view into the GGUF memmap. Float weights (F32/F16/BF16) are QTensors too, their raw bytes viewed as uint8.
    """

    __slots__ = ("name", "qtype", "shape", "data")

    def __init__(self, name: str, qtype: int, shape: tuple[int, int], data: np.ndarray):
        n_out, n_in = int(shape[0]), int(shape[1])
        self.name = name
        self.qtype = int(qtype)
        self.shape = (n_out, n_in)
        if data.dtype != np.uint8:
            data = data.view(np.uint8)
        if data.ndim != 2 and qtype in SUPPORTED:
            data = data.reshape(n_out, row_bytes(qtype, n_in))
        if data.flags.writeable:
            # weights are read-only, as GGUF memmaps are: numba compiles (and caches) one variant, not two
            data = data.view()
            data.flags.writeable = False
        self.data = data  # uint8 [n_out, row_bytes]
        if qtype in SUPPORTED and data.shape != (n_out, row_bytes(qtype, n_in)):
            raise ValueError(
                f"tensor '{name}': {type_name(qtype)} {self.shape} needs {n_out}x{row_bytes(qtype, n_in)} bytes, "
                f"got {data.shape}"
            )

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def __repr__(self) -> str:
        return f"QTensor({self.name!r}, {type_name(self.qtype)}, {self.shape})"


# Where each block keeps its fp16 scale (and min): byte offsets inside the block.  Their NaN or inf spoils every
# weight of the block, and the integer quants cannot hold one, so these are all `pyllm info --check` must scan.
BLOCK_FLOATS: dict[int, tuple[int, ...]] = {
    int(Q.Q4_0): (0,), int(Q.Q4_1): (0, 2), int(Q.Q5_0): (0,), int(Q.Q5_1): (0, 2), int(Q.Q8_0): (0,),
    int(Q.Q2_K): (80, 82), int(Q.Q3_K): (108,), int(Q.Q4_K): (0, 2), int(Q.Q5_K): (0, 2), int(Q.Q6_K): (208,),
}
_FLOAT_VIEWS = {int(Q.F32): np.float32, int(Q.F16): np.float16}


def count_non_finite(qtype: int, raw: np.ndarray) -> int | None:
    """NaN and inf among a tensor's float values (its weights, or its blocks' fp16 scales and mins), from its raw
    bytes (uint8); None for a type this cannot read.  Scans 64 MiB at a time: no copy of a whole tensor."""
    raw = raw.reshape(-1)
    step = 1 << 26
    if qtype == Q.BF16:  # no numpy dtype: all exponent bits set is inf or NaN
        words = raw.view(np.uint16)
        return sum(int(((words[i:i + step] & 0x7F80) == 0x7F80).sum()) for i in range(0, len(words), step))
    if qtype in _FLOAT_VIEWS:
        values = raw.view(_FLOAT_VIEWS[qtype])
        return sum(int((~np.isfinite(values[i:i + step])).sum()) for i in range(0, len(values), step))
    if qtype not in BLOCK_FLOATS:
        return None
    blocks = raw.reshape(-1, type_size(qtype))  # [n_blocks, bytes per block]
    bad = 0
    for i in range(0, len(blocks), step // blocks.shape[1]):
        part = blocks[i:i + step // blocks.shape[1]]
        for offset in BLOCK_FLOATS[qtype]:
            scales = np.ascontiguousarray(part[:, offset:offset + 2]).view(np.float16)  # [n, 1]
            bad += int((~np.isfinite(scales)).sum())
    return bad
