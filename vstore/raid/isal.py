"""ISA-L's ``xor_gen`` and ``pq_gen`` through ctypes: an independent oracle and a baseline.

Debian package ``libisal2``. ISA-L takes an array of pointers, sources first and
the parity buffers last, with every pointer 32-byte aligned and, for ``pq_gen``,
a length that is a multiple of 32. Inputs that do not meet this are copied into
padded, aligned scratch buffers, so any (k, n) uint8 array works.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

import numpy as np

_ALIGN = 64
_NAMES = ("libisal.so.2", "libisal.so")


@functools.cache
def _lib() -> ctypes.CDLL | None:
    candidates = list(_NAMES)
    found = ctypes.util.find_library("isal")
    if found:
        candidates.insert(0, found)
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        for fn in (lib.xor_gen, lib.pq_gen):
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
            fn.restype = ctypes.c_int
        return lib
    return None


def available() -> bool:
    """True when libisal could be loaded."""
    return _lib() is not None


def _require() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise RuntimeError("ISA-L (libisal.so.2, Debian package libisal2) is not installed")
    return lib


def _aligned(rows: int, n: int) -> np.ndarray:
    raw = np.zeros(rows * n + _ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start : start + rows * n].reshape(rows, n)


def _usable(a: np.ndarray, n_mult: int) -> bool:
    # ISA-L reads every row through its own pointer: rows must be contiguous
    # and aligned, and the length a multiple of its vector width.
    return (
        a.dtype == np.uint8
        and a.ndim == 2
        and a.strides[1] == 1
        and a.shape[1] % n_mult == 0
        and a.ctypes.data % 32 == 0
        and a.strides[0] % 32 == 0
    )


def _call(fn, data: np.ndarray, nparity: int, n_mult: int) -> np.ndarray:
    k, n = data.shape
    npad = max(-(-n // n_mult) * n_mult, n_mult)
    if _usable(data, n_mult) and npad == n:
        src = data
    else:
        src = _aligned(k, npad)
        src[:, :n] = data
    par = _aligned(nparity, npad)
    ptrs = (ctypes.c_void_p * (k + nparity))()
    for j in range(k):
        ptrs[j] = src[j].ctypes.data
    for j in range(nparity):
        ptrs[k + j] = par[j].ctypes.data
    rc = fn(k + nparity, npad, ptrs)
    if rc != 0:
        raise RuntimeError(f"ISA-L returned {rc} for k={k}, n={n}")
    return par[:, :n]


def xor_gen(data: np.ndarray) -> np.ndarray:
    """P = XOR of the k rows of data (k, n), computed by ISA-L."""
    data = np.asarray(data, dtype=np.uint8)
    k, n = data.shape
    if k == 1:
        # ISA-L needs at least two sources; the parity of one row is the row itself.
        return data[0].copy()
    return _call(_require().xor_gen, data, 1, 32)[0]


def pq_gen(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, Q) of the k rows of data (k, n), computed by ISA-L."""
    data = np.asarray(data, dtype=np.uint8)
    k, n = data.shape
    if k == 1:
        # ISA-L rejects a single source; pad with a zero row, which adds nothing
        # to P and g^1 * 0 = 0 to Q.
        data = np.concatenate([data, np.zeros((1, n), dtype=np.uint8)])
    par = _call(_require().pq_gen, data, 2, 32)
    return par[0], par[1]


def prepared_call(data: np.ndarray, parity: np.ndarray) -> Callable[[], None]:
    """A no-argument call of xor_gen (1 parity row) or pq_gen (2 rows) on these exact buffers.

    For benchmarks: the pointer array is built once, so a call measures ISA-L
    alone. Every row must be 32-byte aligned and n a multiple of 32; k >= 2.
    """
    lib = _require()
    k, n = data.shape
    nparity = parity.shape[0]
    if nparity not in (1, 2) or k < 2 or not (_usable(data, 32) and _usable(parity, 32)):
        raise ValueError("prepared_call needs k >= 2 aligned rows, n % 32 == 0, 1 or 2 parity rows")
    fn = lib.xor_gen if nparity == 1 else lib.pq_gen
    rows = [data[j].ctypes.data for j in range(k)] + [parity[j].ctypes.data for j in range(nparity)]
    ptrs = (ctypes.c_void_p * (k + nparity))(*rows)
    vects = k + nparity

    # The default argument keeps the buffers alive as long as the raw pointers.
    def call(_buffers: tuple = (data, parity)) -> None:
        fn(vects, n, ptrs)

    return call
