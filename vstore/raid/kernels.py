"""Fast RAID kernels (numba), same signatures and results as ``vstore.raid.reference``.

GF(2^8) with polynomial 0x11d and generator {02} (Linux md, ISA-L).

How they are fast:

* XOR and P+Q are compiled once per number of data rows k from generated,
  straight-line source: one load per row per element, P and Q held in
  registers, Q by Horner's rule (``Q = D0 ^ 2*(D1 ^ 2*(D2 ^ ...))``). A loop
  with k as a runtime value keeps P and Q in memory and is 3-4x slower.
* Arithmetic is written on uint8 elements, which LLVM vectorises 32 or 64
  bytes at a time; multiply-by-{02} becomes add + sign mask + masked xor
  (vpaddb, vpmovb2m, vpxor{k} with AVX-512BW). The same Horner step on uint64
  lanes with shifts and masks (Linux lib/raid6 ``int.uc``) needs twice the
  instructions and measured 0.74-0.9x ISA-L's pq_gen here against 1.0-1.06x
  for this form; it also needs a separate byte loop for ``n % 8`` tails, while
  here every length is handled by the same loop.
* Multiplication by an arbitrary constant c (recovery, partial-stripe Q
  update) uses GFNI's gf2p8affineqb (64 bytes times an 8x8 bit matrix, one
  instruction, as ISA-L) through a small numba intrinsic when the CPU has
  GFNI and AVX-512BW (``HAVE_GFNI``; ``VSTORE_NO_GFNI=1`` turns it off).
  Elsewhere it is Horner over the bits of c, ``r = 2*r ^ (v & mask_b)``,
  3-4x slower but still vectorised: per-byte table lookups are not (LLVM can
  only make slow gathers of them; about 1 GB/s).
* Recovery passes the surviving rows as a tuple in which lost rows are a
  shared zero buffer: the survivors' syndromes are written straight into the
  lost rows, then combined there in place. No copies, no scratch rows.

Every kernel releases the GIL (``nogil=True``) so callers may run it in a
thread. Kernels compile on first use per k and are cached on disk by numba;
``precompile`` does it ahead of time. A stripe whose rows are contiguous but
not adjacent (a view into a wider buffer) is used as it is; only bytes strided
within a row are copied first, and strided outputs are written back.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from vstore.io.buffers import aligned_empty  # noqa: F401 - part of this module's API
from vstore.raid.reference import GF_LOG as _GF_LOG
from vstore.raid.reference import GF_MUL as _GF_MUL
from vstore.raid.reference import gf_inv, gf_pow2

__all__ = [
    "HAVE_GFNI",
    "aligned_empty",
    "gf_mul_const",
    "locate_pq_error",
    "pq_syndrome",
    "precompile",
    "recover_data2",
    "recover_data_p",
    "recover_data_q",
    "rmw_p",
    "rmw_pq",
    "xor_parity",
]

_JIT = {"nogil": True, "cache": True}

# GF(2^8) multiplication table: constants, and the byte tails of the GFNI kernels.
_MUL = _GF_MUL
_R = np.uint8(0x1D)
_Z = np.uint8(0)


@numba.njit(inline="always", **_JIT)
def _mul2(v: np.uint8) -> np.uint8:
    # v * {02}: double, and reduce by 0x1d when the top bit fell out. Written on
    # bytes, LLVM vectorises it as add + sign mask + masked xor (vpaddb,
    # vpmovb2m, vpblendmb/vpxor with AVX-512BW, as measured here): half the
    # instructions of the same step done with shifts and masks on uint64 lanes.
    return np.uint8(np.uint8(v + v) ^ (_R if v >= 128 else _Z))


@numba.njit(inline="always", **_JIT)
def _bit_masks(c: int) -> tuple:
    # Byte masks for the bits of c, highest first: 0xff where the bit is set.
    return (
        np.uint8(0xFF if (c >> 7) & 1 else 0),
        np.uint8(0xFF if (c >> 6) & 1 else 0),
        np.uint8(0xFF if (c >> 5) & 1 else 0),
        np.uint8(0xFF if (c >> 4) & 1 else 0),
        np.uint8(0xFF if (c >> 3) & 1 else 0),
        np.uint8(0xFF if (c >> 2) & 1 else 0),
        np.uint8(0xFF if (c >> 1) & 1 else 0),
        np.uint8(0xFF if c & 1 else 0),
    )


@numba.njit(inline="always", **_JIT)
def _mulc(v: np.uint8, m: tuple) -> np.uint8:
    # c * v, Horner over the bits of c (masks from _bit_masks): no table lookups,
    # which LLVM could only vectorise as slow gathers.
    r = np.uint8(v & m[0])
    r = np.uint8(_mul2(r) ^ (v & m[1]))
    r = np.uint8(_mul2(r) ^ (v & m[2]))
    r = np.uint8(_mul2(r) ^ (v & m[3]))
    r = np.uint8(_mul2(r) ^ (v & m[4]))
    r = np.uint8(_mul2(r) ^ (v & m[5]))
    r = np.uint8(_mul2(r) ^ (v & m[6]))
    return np.uint8(_mul2(r) ^ (v & m[7]))


@numba.njit(inline="always", **_JIT)
def _mulc2(a: np.uint8, ma: tuple, b: np.uint8, mb: tuple) -> np.uint8:
    # ca * a ^ cb * b in one Horner pass: the two products share the doublings.
    r = np.uint8((a & ma[0]) ^ (b & mb[0]))
    r = np.uint8(_mul2(r) ^ (a & ma[1]) ^ (b & mb[1]))
    r = np.uint8(_mul2(r) ^ (a & ma[2]) ^ (b & mb[2]))
    r = np.uint8(_mul2(r) ^ (a & ma[3]) ^ (b & mb[3]))
    r = np.uint8(_mul2(r) ^ (a & ma[4]) ^ (b & mb[4]))
    r = np.uint8(_mul2(r) ^ (a & ma[5]) ^ (b & mb[5]))
    r = np.uint8(_mul2(r) ^ (a & ma[6]) ^ (b & mb[6]))
    return np.uint8(_mul2(r) ^ (a & ma[7]) ^ (b & mb[7]))


# --------------------------------------------------------------------------
# k-specialised XOR and P+Q, generated per k.

# Each template is the body of one kernel for k rows; ``{rows}`` binds one name
# per row (LLVM then sees k independent streams it can vectorise), ``{horner}``
# folds rows k-2..0 into the running P (pp) and Q (qq) of the row-k-1 start.
# The recovery variants read a shared zero buffer in place of the lost rows,
# so the survivors' syndromes need no zeroing, and the rows being rebuilt are
# never read while written (which would defeat vectorisation). The GF
# multiplications of recovery run as a second, k-independent pass over the
# rebuilt rows: fused into the syndrome loop they cost 2x (too many live
# vector registers).

_TEMPLATES = {
    "xor": """
def _xor_k{k}(d, p):
{rows}
    for i in range(d.shape[1]):
        p[i] = {xor_expr}
""",
    "pq": """
def _pq_k{k}(d, p, q):
{rows}
    for i in range(d.shape[1]):
        v = r{last}[i]
        pp = v
        qq = v
{horner}
        p[i] = pp
        q[i] = qq
""",
    # a = P ^ Pxy, b = Q ^ Qxy, with Pxy and Qxy the syndromes of the survivors.
    "syn": """
def _syn_k{k}(d, x, y, zero, p, q):
{lost_rows}
    a = d[y]
    b = d[x]
    for i in range(p.shape[0]):
        v = r{last}[i]
        pp = v
        qq = v
{horner}
        a[i] = p[i] ^ pp
        b[i] = q[i] ^ qq
""",
    # Row x = Q ^ Qx, with Qx the Q of the survivors.
    "synq": """
def _synq_k{k}(d, x, zero, q):
{lost_row}
    b = d[x]
    for i in range(q.shape[0]):
        qq = r{last}[i]
{horner_q}
        b[i] = q[i] ^ qq
""",
    # Row x = P ^ the surviving rows.
    "recq": """
def _recq_k{k}(d, x, zero, p):
{lost_row}
    dx = d[x]
    for i in range(p.shape[0]):
        dx[i] = p[i] ^ {xor_expr}
""",
}


def _source(kind: str, k: int) -> str:
    horner, horner_q = [], []
    # Q = D0 ^ g*(D1 ^ g*(D2 ^ ...)): start from the last row and walk down.
    for j in range(k - 2, -1, -1):
        horner += [f"        v = r{j}[i]", "        pp ^= v", "        qq = _mul2(qq) ^ v"]
        horner_q += [f"        qq = _mul2(qq) ^ r{j}[i]"]
    return _TEMPLATES[kind].format(
        k=k,
        rows="\n".join(f"    r{j} = d[{j}]" for j in range(k)),
        lost_rows="\n".join(f"    r{j} = zero if x == {j} or y == {j} else d[{j}]" for j in range(k)),
        lost_row="\n".join(f"    r{j} = zero if x == {j} else d[{j}]" for j in range(k)),
        last=k - 1,
        horner="\n".join(horner),
        horner_q="\n".join(horner_q),
        xor_expr=" ^ ".join(f"r{j}[i]" for j in range(k)),
    )


_specialised: dict[tuple[str, int], Callable] = {}
_specialised_lock = threading.Lock()
# The hot kinds again, keyed by k alone: a cheaper lookup on every call.
_XOR: dict[int, Callable] = {}
_PQ: dict[int, Callable] = {}


def _kernel_for(kind: str, k: int) -> Callable:
    """The kernel ``kind`` (a key of _TEMPLATES) for k rows, compiled on first use."""
    key = (kind, k)
    fn = _specialised.get(key)
    if fn is not None:
        return fn
    with _specialised_lock:
        fn = _specialised.get(key)
        if fn is None:
            # Compiled under this file's name so numba's on-disk cache (keyed by
            # source file, function name and bytecode) works for generated code:
            # each (kind, k) gets its own entry, invalidated when this file changes.
            code = compile(_source(kind, k), __file__, "exec")
            namespace = {"np": np, "_mul2": _mul2, "__name__": __name__}
            exec(code, namespace)  # noqa: S102 - source built above from integers only
            fn = numba.njit(**_JIT)(namespace[f"_{kind}_k{k}"])
            _specialised[key] = fn
            {"xor": _XOR, "pq": _PQ}.get(kind, {})[k] = fn
    return fn


# --------------------------------------------------------------------------
# Generic (k-independent) kernels.


@numba.njit(**_JIT)
def _xor3_inplace(p, a, b):  # p ^= a ^ b
    for i in range(p.shape[0]):
        p[i] ^= a[i] ^ b[i]


@numba.njit(**_JIT)
def _rmw_pq_portable(p, q, old, new, c):  # p ^= old ^ new; q ^= c * (old ^ new)
    m = _bit_masks(c)
    for i in range(p.shape[0]):
        delta = old[i] ^ new[i]
        p[i] ^= delta
        q[i] ^= _mulc(delta, m)


@numba.njit(**_JIT)
def _combine_portable(ca, cb, dx, dy):
    # In: dy = a = P^Pxy, dx = b = Q^Qxy. Out: Dx = ca*a ^ cb*b, Dy = a ^ Dx
    # (H. P. Anvin, "The mathematics of RAID-6"). In place, so no scratch rows:
    # each element is read before it is written, and dx and dy never overlap.
    ma = _bit_masks(ca)
    mb = _bit_masks(cb)
    for i in range(dx.shape[0]):
        a = dy[i]
        x = _mulc2(a, ma, dx[i], mb)
        dx[i] = x
        dy[i] = a ^ x


@numba.njit(**_JIT)
def _mul_inplace_portable(c, v):  # v = c * v
    m = _bit_masks(c)
    for i in range(v.shape[0]):
        v[i] = _mulc(v[i], m)


# --------------------------------------------------------------------------
# GF multiplication by a constant with GFNI, where the CPU has it.
#
# gf2p8affineqb multiplies 64 bytes by an 8x8 bit matrix in one instruction;
# multiplication by a constant c is such a matrix for any polynomial (ISA-L uses
# it the same way). LLVM never emits it from plain code, so an intrinsic issues
# it on one 64-byte block; the loops around stay in numba. 3-4x faster than the
# bit-serial Horner above, which remains the fallback.


def _gfni_usable() -> bool:
    if os.environ.get("VSTORE_NO_GFNI"):
        return False
    if numba.config.CPU_NAME not in (None, "host"):
        return False  # compiling for another CPU (e.g. a portable cache)
    try:
        features = llvm_binding.get_host_cpu_features()
        return bool(features.get("gfni")) and bool(features.get("avx512bw"))
    except Exception:  # noqa: BLE001 - no feature list: use the portable kernels
        return False


HAVE_GFNI = _gfni_usable()

_V64 = ir.VectorType(ir.IntType(8), 64)


def _affine(builder: ir.IRBuilder, x: ir.Value, matrix: ir.Value) -> ir.Value:
    fnty = ir.FunctionType(_V64, [_V64, _V64, ir.IntType(8)])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.vgf2p8affineqb.512")
    v8 = ir.VectorType(ir.IntType(64), 8)
    vec = builder.insert_element(ir.Constant(v8, ir.Undefined), matrix, ir.Constant(ir.IntType(32), 0))
    vec = builder.shuffle_vector(
        vec, ir.Constant(v8, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8)
    )
    return builder.call(fn, [x, builder.bitcast(vec, _V64), ir.Constant(ir.IntType(8), 0)])


def _block(context, builder, aty, aval, idx):  # noqa: ANN001, ANN202 - numba codegen
    arr = context.make_array(aty)(context, builder, aval)
    return builder.bitcast(builder.gep(arr.data, [idx]), _V64.as_pointer())


def _u8_arrays(*tys: types.Type) -> bool:
    return all(isinstance(t, types.Array) and t.dtype == types.uint8 and t.ndim == 1 for t in tys)


@intrinsic
def _gfni_combine64(typingctx, dx, dy, i, ma, mb):  # noqa: ANN001, ANN202
    # dx, dy[i:i+64] = Ma*dy ^ Mb*dx, dy ^ that   (see _combine_portable)
    if not _u8_arrays(dx, dy):
        return None

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        px = _block(context, builder, sig.args[0], args[0], args[2])
        py = _block(context, builder, sig.args[1], args[1], args[2])
        a = builder.load(py, align=1)
        x = builder.xor(_affine(builder, a, args[3]), _affine(builder, builder.load(px, align=1), args[4]))
        builder.store(x, px, align=1)
        builder.store(builder.xor(a, x), py, align=1)
        return context.get_dummy_value()

    return types.void(dx, dy, i, ma, mb), codegen


@intrinsic
def _gfni_mul64(typingctx, v, i, m):  # noqa: ANN001, ANN202
    # v[i:i+64] = M*v
    if not _u8_arrays(v):
        return None

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        pv = _block(context, builder, sig.args[0], args[0], args[1])
        builder.store(_affine(builder, builder.load(pv, align=1), args[2]), pv, align=1)
        return context.get_dummy_value()

    return types.void(v, i, m), codegen


@intrinsic
def _gfni_rmw64(typingctx, p, q, old, new, i, m):  # noqa: ANN001, ANN202
    # delta = old ^ new over [i, i+64): p ^= delta, q ^= M*delta
    if not _u8_arrays(p, q, old, new):
        return None

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        pp, pq, po, pn = (_block(context, builder, sig.args[j], args[j], args[4]) for j in range(4))
        delta = builder.xor(builder.load(po, align=1), builder.load(pn, align=1))
        builder.store(builder.xor(builder.load(pp, align=1), delta), pp, align=1)
        qv = builder.xor(builder.load(pq, align=1), _affine(builder, delta, args[5]))
        builder.store(qv, pq, align=1)
        return context.get_dummy_value()

    return types.void(p, q, old, new, i, m), codegen


@numba.njit(**_JIT)
def _combine_gfni(ca, cb, ma, mb, dx, dy):
    n = dx.shape[0]
    e = n - n % 64
    for i in range(0, e, 64):
        _gfni_combine64(dx, dy, i, ma, mb)
    for i in range(e, n):  # tail: byte tables
        a = dy[i]
        x = _MUL[ca, a] ^ _MUL[cb, dx[i]]
        dx[i] = x
        dy[i] = a ^ x


@numba.njit(**_JIT)
def _mul_inplace_gfni(c, m, v):
    n = v.shape[0]
    e = n - n % 64
    for i in range(0, e, 64):
        _gfni_mul64(v, i, m)
    for i in range(e, n):
        v[i] = _MUL[c, v[i]]


@numba.njit(**_JIT)
def _rmw_pq_gfni(p, q, old, new, c, m):
    n = p.shape[0]
    e = n - n % 64
    for i in range(0, e, 64):
        _gfni_rmw64(p, q, old, new, i, m)
    for i in range(e, n):
        delta = old[i] ^ new[i]
        p[i] ^= delta
        q[i] ^= _MUL[c, delta]


@functools.cache
def _affine_matrix(c: int) -> np.uint64:
    """The gf2p8affineqb matrix of multiplication by c: byte 7-i is output bit i's row."""
    m = 0
    for i in range(8):
        row = 0
        for k in range(8):
            if (int(_GF_MUL[c, 1 << k]) >> i) & 1:
                row |= 1 << k
        m |= row << (8 * (7 - i))
    return np.uint64(m)


def _combine(ca: int, cb: int, dx: np.ndarray, dy: np.ndarray) -> None:
    if HAVE_GFNI:
        _combine_gfni(ca, cb, _affine_matrix(ca), _affine_matrix(cb), dx, dy)
    else:
        _combine_portable(ca, cb, dx, dy)


def _mul_inplace(c: int, v: np.ndarray) -> None:
    if HAVE_GFNI:
        _mul_inplace_gfni(c, _affine_matrix(c), v)
    else:
        _mul_inplace_portable(c, v)


def _rmw_pq(p: np.ndarray, q: np.ndarray, old: np.ndarray, new: np.ndarray, c: int) -> None:
    if HAVE_GFNI:
        _rmw_pq_gfni(p, q, old, new, c, _affine_matrix(c))
    else:
        _rmw_pq_portable(p, q, old, new, c)


# --------------------------------------------------------------------------
# Public API (signatures and semantics of vstore.raid.reference).


_U8 = np.dtype(np.uint8)


def _data(data: np.ndarray) -> np.ndarray:
    # The (k, n) stripe as a uint8 array with contiguous rows (copied only if needed).
    if data.dtype != _U8:
        raise TypeError(f"RAID kernels work on uint8 arrays, got {data.dtype}")
    if data.ndim != 2:
        raise ValueError(f"data must be 2-D (k, n), got shape {data.shape}")
    return data if _rows_contiguous(data) else np.ascontiguousarray(data)


def _rows_contiguous(data: np.ndarray) -> bool:
    # Rows need not be adjacent (a (k, n) view of a wider stripe buffer is
    # common): numba compiles such arrays as layout 'A' and LLVM versions the
    # loop on the row stride, as fast as C order. Only strided bytes within
    # a row are worth a copy.
    return data.flags.c_contiguous or data.shape[1] <= 1 or data.strides[1] == 1


def _vec(a: np.ndarray, n: int, what: str) -> np.ndarray:
    # A 1-D uint8 operand of exactly n bytes, contiguous. The kernels do not
    # bounds-check (for speed), so a wrong length must never reach them.
    if a.dtype != _U8:
        raise TypeError(f"RAID kernels work on uint8 arrays, got {a.dtype} for {what}")
    if a.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {a.shape}")
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _ready(buf: np.ndarray, n: int) -> bool:
    # True when the kernel may write straight into buf (the common case, kept cheap:
    # at 64 KiB chunks the Python around a kernel call is a tenth of its time).
    if (buf.dtype is not _U8 and buf.dtype != _U8) or buf.shape != (n,):
        raise ValueError(f"output must be uint8 of shape ({n},), got {buf.dtype} {buf.shape}")
    flags = buf.flags
    return flags.c_contiguous and flags.writeable


def xor_parity(data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """P = XOR of the k rows of data (k, n). Also recovers one lost member of raid5."""
    d = data if data.dtype is _U8 and data.flags.c_contiguous else _data(data)
    k, n = d.shape if d.ndim == 2 else _data(d).shape
    dst = out if out is not None and _ready(out, n) else np.empty(n, dtype=np.uint8)
    if k == 0:
        dst[:] = 0
    else:
        (_XOR.get(k) or _kernel_for("xor", k))(d, dst)
    if out is not None and dst is not out:
        out[:] = dst
        return out
    return dst


def pq_syndrome(
    data: np.ndarray, p_out: np.ndarray | None = None, q_out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(P, Q) of the k data rows."""
    d = data if data.dtype is _U8 and data.flags.c_contiguous else _data(data)
    k, n = d.shape if d.ndim == 2 else _data(d).shape
    p = p_out if p_out is not None and _ready(p_out, n) else np.empty(n, dtype=np.uint8)
    q = q_out if q_out is not None and _ready(q_out, n) else np.empty(n, dtype=np.uint8)
    if k == 0:
        p[:] = 0
        q[:] = 0
    else:
        (_PQ.get(k) or _kernel_for("pq", k))(d, p, q)
    if p_out is not None and p is not p_out:
        p_out[:] = p
        p = p_out
    if q_out is not None and q is not q_out:
        q_out[:] = q
        q = q_out
    return p, q


_zero_row = np.zeros(1 << 16, dtype=np.uint8)


def _zeros(n: int) -> np.ndarray:
    # A shared all-zero row standing in for lost rows; kernels only read it.
    global _zero_row
    if _zero_row.shape[0] < n:
        _zero_row = np.zeros(n, dtype=np.uint8)
    return _zero_row[:n]


def _stripe(data: np.ndarray, lost: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    # (the stripe with contiguous rows, whether that is a copy to write back)
    if data.dtype != _U8:
        raise TypeError(f"RAID kernels work on uint8 arrays, got {data.dtype}")
    if data.ndim != 2:
        raise ValueError(f"data must be 2-D (k, n), got shape {data.shape}")
    if not data.flags.writeable:
        raise ValueError("recovery writes the lost rows in place: data must be writeable")
    k = data.shape[0]
    for j in lost:
        if not 0 <= j < k:
            raise IndexError(f"row {j} out of range for {k} data rows")
    if _rows_contiguous(data):
        return data, False
    return np.ascontiguousarray(data), True


def recover_data2(data: np.ndarray, p: np.ndarray, q: np.ndarray, x: int, y: int) -> None:
    """Rebuild lost data rows x and y (x != y) of data in place from the rest, P and Q."""
    if x == y:
        raise ValueError("recover_data2 needs two different rows")
    if x > y:
        x, y = y, x
    d, copied = _stripe(data, (x, y))
    k, n = d.shape
    p, q = _vec(p, n, "p"), _vec(q, n, "q")
    gyx = gf_pow2(y - x)
    denom = gf_inv(gyx ^ 1)
    ca = int(_GF_MUL[gyx, denom])
    cb = int(_GF_MUL[gf_pow2(-x), denom])
    # The survivors' syndromes land in the lost rows (P^Pxy in y, Q^Qxy in x),
    # then are combined there in place.
    _kernel_for("syn", k)(d, x, y, _zeros(n), p, q)
    _combine(ca, cb, d[x], d[y])
    if copied:
        data[x] = d[x]
        data[y] = d[y]


def recover_data_p(data: np.ndarray, q: np.ndarray, x: int) -> None:
    """Rebuild lost data row x in place from the other rows and Q (P is lost too)."""
    d, copied = _stripe(data, (x,))
    k, n = d.shape
    _kernel_for("synq", k)(d, x, _zeros(n), _vec(q, n, "q"))
    _mul_inplace(gf_pow2(-x), d[x])
    if copied:
        data[x] = d[x]


def recover_data_q(data: np.ndarray, p: np.ndarray, x: int) -> None:
    """Rebuild lost data row x in place from the other rows and P (Q is lost too)."""
    d, copied = _stripe(data, (x,))
    k, n = d.shape
    _kernel_for("recq", k)(d, x, _zeros(n), _vec(p, n, "p"))
    if copied:
        data[x] = d[x]


def _inplace(a: np.ndarray, n: int, what: str) -> tuple[np.ndarray, bool]:
    # A parity operand updated in place: (flat contiguous view or scratch copy, copied?).
    if a.dtype != _U8 or a.size != n:
        raise ValueError(f"{what} must be uint8 with {n} bytes, got {a.dtype} {a.shape}")
    if a.flags.c_contiguous and a.flags.writeable:
        return a.reshape(-1), False
    return np.ascontiguousarray(a).reshape(-1), True


def _flat(a: np.ndarray, n: int, what: str) -> np.ndarray:
    return _vec(np.asarray(a).reshape(-1), n, what)


def rmw_p(p: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
    """Partial-stripe update of P in place: P ^= old ^ new."""
    n = p.size
    pd, copied = _inplace(p, n, "p")
    _xor3_inplace(pd, _flat(old, n, "old"), _flat(new, n, "new"))
    if copied:
        p[...] = pd.reshape(p.shape)


def rmw_pq(p: np.ndarray, q: np.ndarray, old: np.ndarray, new: np.ndarray, j: int) -> None:
    """Partial-stripe update of P and Q in place for data row j changing from old to new."""
    n = p.size
    (pd, p_copied), (qd, q_copied) = _inplace(p, n, "p"), _inplace(q, n, "q")
    _rmw_pq(pd, qd, _flat(old, n, "old"), _flat(new, n, "new"), gf_pow2(j))
    if p_copied:
        p[...] = pd.reshape(p.shape)
    if q_copied:
        q[...] = qd.reshape(q.shape)


def gf_mul_const(c: int, v: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Multiply every byte of v by the constant c (fast twin of the reference's)."""
    v = np.asarray(v)
    if v.dtype != _U8:
        raise TypeError(f"RAID kernels work on uint8 arrays, got {v.dtype}")
    result = np.array(v, dtype=np.uint8, order="C", copy=True)
    _mul_inplace(int(c) & 0xFF, result.reshape(-1))
    if out is None:
        return result
    out[...] = result
    return out


def locate_pq_error(pd: np.ndarray, qd: np.ndarray, k: int) -> int | str | None:
    """Which member of a raid6 row a P/Q mismatch points to: "P", "Q", a data index, or None.

    The reference's answer (as md's raid6check), from logarithms instead of a
    trial per data index: one data chunk z is wrong exactly when pd and qd are
    nonzero in the same bytes and ``log(qd) - log(pd)`` is z in all of them.
    """
    pd, qd = np.asarray(pd), np.asarray(qd)
    p_bad, q_bad = bool(pd.any()), bool(qd.any())
    if p_bad != q_bad:
        return "P" if p_bad else "Q"
    if not p_bad:
        return None
    nz = pd != 0
    if not np.array_equal(nz, qd != 0):
        return None
    z = (_GF_LOG[qd[nz]] - _GF_LOG[pd[nz]]) % 255
    if np.all(z == z[0]) and int(z[0]) < k:
        return int(z[0])
    return None


def precompile(ks: Iterable[int] = range(1, 17)) -> None:
    """Compile (or load from numba's cache) every kernel for these k, ahead of first use."""
    one = np.zeros(8, dtype=np.uint8)
    for k in ks:
        data = np.zeros((k, 8), dtype=np.uint8)
        xor_parity(data)
        pq_syndrome(data)
        recover_data_p(data, one, 0)
        recover_data_q(data, one, 0)
        if k >= 2:
            recover_data2(data, one, one, 0, 1)
    rmw_pq(one, one.copy(), one, one, 0)
    rmw_p(one, one, one)
    gf_mul_const(1, one)
