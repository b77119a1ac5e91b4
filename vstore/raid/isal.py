"""ISA-L's ``xor_gen`` and ``pq_gen`` through ctypes: an independent oracle and a baseline.

Debian package ``libisal2``. ISA-L takes an array of pointers, sources first and
the parity buffers last. Its contract differs per CPU path and is not checked
by ISA-L: the AVX and AVX2 paths (picked by the dispatcher on a CPU with AVX2
but no AVX-512) load with aligned moves and die with SIGSEGV on a pointer that
is not 32-byte aligned, and every ``pq_gen`` path needs a length that is a
multiple of 32 (16 for SSE), else it returns 1. Inputs that do not meet the
strictest contract (64-byte aligned rows, length a multiple of 64) are copied
into padded, aligned scratch buffers, so any (k, n) uint8 array works on every
path.

The library exports each path under its own name (``pq_gen_avx2``, ...):
``variants()`` lists those this CPU can run, and every call takes one of them,
so tests exercise all of them whichever path the dispatcher would pick here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

import numpy as np

_ALIGN = 64  # the strictest pointer and length contract of any path (AVX-512)
_NAMES = ("libisal.so.2", "libisal.so")

# Each CPU path of xor_gen / pq_gen, the cpuinfo flags it needs. xor_gen has no
# AVX2 path: the dispatcher uses the AVX one there.
_PATHS: dict[str, tuple[str, ...]] = {
    "base": (),
    "sse": ("sse4_1",),
    "avx": ("avx",),
    "avx2": ("avx2",),
    "avx512": ("avx512f", "avx512bw", "avx512vl"),
}
_XOR_NAMES = {"base": "xor_gen_base", "sse": "xor_gen_sse", "avx": "xor_gen_avx", "avx2": "xor_gen_avx",
              "avx512": "xor_gen_avx512"}  # fmt: skip


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
            _declare(fn)
        return lib
    return None


def _declare(fn: ctypes._CFuncPtr) -> ctypes._CFuncPtr:
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
    fn.restype = ctypes.c_int
    return fn


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def variants() -> list[str]:
    """The CPU paths of ISA-L this machine can run (``base`` always), slowest first."""
    if _lib() is None:
        return []
    flags = _cpu_flags()
    return [name for name, need in _PATHS.items() if all(f in flags for f in need)]


@functools.cache
def _function(op: str, variant: str | None) -> ctypes._CFuncPtr:
    lib = _require()
    if variant is None:
        return getattr(lib, op)  # ISA-L's own dispatch for this CPU
    if variant not in variants():
        raise ValueError(f"ISA-L path {variant!r} cannot run on this CPU (have {variants()})")
    name = _XOR_NAMES[variant] if op == "xor_gen" else f"pq_gen_{variant}"
    return _declare(getattr(lib, name))


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
        and a.ctypes.data % _ALIGN == 0
        and a.strides[0] % _ALIGN == 0
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


def xor_gen(data: np.ndarray, variant: str | None = None) -> np.ndarray:
    """P = XOR of the k rows of data (k, n), computed by ISA-L (one CPU path, or its dispatch)."""
    data = np.asarray(data, dtype=np.uint8)
    k, n = data.shape
    if k == 1:
        # ISA-L needs at least two sources; the parity of one row is the row itself.
        return data[0].copy()
    return _call(_function("xor_gen", variant), data, 1, _ALIGN)[0]


def pq_gen(data: np.ndarray, variant: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(P, Q) of the k rows of data (k, n), computed by ISA-L (one CPU path, or its dispatch)."""
    data = np.asarray(data, dtype=np.uint8)
    k, n = data.shape
    if k == 1:
        # ISA-L rejects a single source; pad with a zero row, which adds nothing
        # to P and g^1 * 0 = 0 to Q.
        data = np.concatenate([data, np.zeros((1, n), dtype=np.uint8)])
    par = _call(_function("pq_gen", variant), data, 2, _ALIGN)
    return par[0], par[1]


def prepared_call(data: np.ndarray, parity: np.ndarray) -> Callable[[], None]:
    """A no-argument call of xor_gen (1 parity row) or pq_gen (2 rows) on these exact buffers.

    For benchmarks: the pointer array is built once, so a call measures ISA-L
    alone. Every row must be 64-byte aligned and n a multiple of 64; k >= 2.
    """
    k, n = data.shape
    nparity = parity.shape[0]
    if nparity not in (1, 2) or k < 2 or not (_usable(data, _ALIGN) and _usable(parity, _ALIGN)):
        raise ValueError("prepared_call needs k >= 2 rows 64-byte aligned, n % 64 == 0, 1 or 2 parity rows")
    fn = _function("xor_gen" if nparity == 1 else "pq_gen", None)
    rows = [data[j].ctypes.data for j in range(k)] + [parity[j].ctypes.data for j in range(nparity)]
    ptrs = (ctypes.c_void_p * (k + nparity))(*rows)
    vects = k + nparity

    # The default argument keeps the buffers alive as long as the raw pointers.
    def call(_buffers: tuple = (data, parity)) -> None:
        fn(vects, n, ptrs)

    return call
