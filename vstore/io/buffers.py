"""Buffers whose address suits code that needs alignment (O_DIRECT, ISA-L, the RAID kernels)."""

from __future__ import annotations

import numpy as np


def aligned_empty(shape: int | tuple[int, ...], align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous uint8 array whose first byte is ``align``-aligned."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    size = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(size + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + size].reshape(shape)
