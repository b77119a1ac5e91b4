"""CRC32C (Castagnoli), vstore's one checksum: superblocks, pool metadata, the journal, the
write-intent bitmap, iSCSI digests, and the per-block checksums of a pool made with
``--checksums`` (``vstore.stack.checksum``).

``crc32c`` checksums one buffer (the ``crc32c`` package, hardware-accelerated where the
CPU has it, a software table where not). ``block_sums`` checksums every 4 KiB block of a
buffer at once: a numba loop calling ISA-L's ``crc32_iscsi`` (``libisal2``, which picks
its code path at run time from the CPU, so no flag is assumed here) without going back to
Python between blocks, about 2.5x the per-block speed of a Python loop; without ISA-L it
is that Python loop. Both give the same numbers (tests/test_checksums.py checks them
against each other and against the RFC 3720 vectors).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import Any

import crc32c as _crc32c_mod
import numpy as np

BLOCK = 4096


def crc32c(data: Any, value: int = 0) -> int:
    """CRC32C of a buffer, continuing from ``value`` (the CRC of what came before)."""
    return _crc32c_mod.crc32c(data, value)


def _python_block_sums(buf: np.ndarray, out: np.ndarray, xor: int = 0) -> None:
    mv = memoryview(buf)
    for i in range(len(out)):
        out[i] = _crc32c_mod.crc32c(mv[i * BLOCK : (i + 1) * BLOCK]) ^ xor


@functools.cache
def _isal_kernel() -> Callable[[np.ndarray, np.ndarray, int], None] | None:
    """A numba kernel over ISA-L's crc32_iscsi, or None without ISA-L (or numba cannot call it).

    ``kernel(buf, out, xor)``: out[i] = CRC32C(block i of buf) XOR xor.
    """
    names = [n for n in (ctypes.util.find_library("isal"), "libisal.so.2", "libisal.so") if n]
    fn = None
    for name in names:
        try:
            fn = ctypes.CDLL(name).crc32_iscsi
            break
        except (OSError, AttributeError):
            continue
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    fn.restype = ctypes.c_uint32
    try:
        import numba

        # Not cached on disk: the function's address is compiled in, and differs per process.
        @numba.njit(nogil=True, cache=False)
        def kernel(buf: np.ndarray, out: np.ndarray, xor: int) -> None:  # pragma: no cover - compiled
            fold = np.uint32(0xFFFFFFFF) ^ np.uint32(xor)
            for i in range(out.shape[0]):
                # ISA-L's iSCSI CRC leaves out CRC32C's final inversion and takes the seed as is.
                out[i] = fn(buf[i * 4096 :].ctypes.data, 4096, np.uint32(0xFFFFFFFF)) ^ fold

        probe = np.zeros(BLOCK, dtype=np.uint8)
        got = np.empty(1, dtype=np.uint32)
        kernel(probe, got, 0)
        if int(got[0]) != crc32c(bytes(BLOCK)):
            return None
        return kernel
    except Exception:  # numba cannot lower the call here: the Python loop does the job
        return None


def block_sums(buf: np.ndarray, out: np.ndarray | None = None, xor: int = 0) -> np.ndarray:
    """The CRC32C (XOR ``xor``) of each whole 4 KiB block of a contiguous uint8 buffer, as uint32."""
    n = len(buf) // BLOCK
    if out is None:
        out = np.empty(n, dtype=np.uint32)
    if n:
        if not buf.flags.c_contiguous:
            buf = np.ascontiguousarray(buf)
        kernel = _isal_kernel()
        if kernel is not None:
            kernel(buf, out[:n], xor)
        else:
            _python_block_sums(buf, out[:n], xor)
    return out


def block_sums_of(views: list[np.ndarray], xor: int = 0) -> np.ndarray:
    """``block_sums`` of consecutive 1-D uint8 views (each a whole number of blocks), as one array."""
    out = np.empty(sum(len(v) for v in views) // BLOCK, dtype=np.uint32)
    kernel = _isal_kernel() or _python_block_sums
    pos = 0
    for v in views:
        n = len(v) >> 12
        if n:
            kernel(v if v.flags.c_contiguous else np.ascontiguousarray(v), out[pos : pos + n], xor)
            pos += n
    return out
