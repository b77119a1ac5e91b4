"""Slow, obvious numpy reference implementations of the RAID kernels.

GF(2^8) with polynomial 0x11d and generator {02}, as Linux md and ISA-L:
P = D0 ^ D1 ^ ... ^ Dk-1,  Q = g^0*D0 ^ g^1*D1 ^ ... ^ g^(k-1)*Dk-1.
Every fast kernel in ``vstore.raid.kernels`` has the same signature as its
twin here and is tested against it.
"""

from __future__ import annotations

import numpy as np

POLY = 0x11D


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    exp = np.zeros(512, dtype=np.uint8)
    log = np.zeros(256, dtype=np.int32)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= POLY
    exp[255:510] = exp[0:255]
    mul = np.zeros((256, 256), dtype=np.uint8)
    for a in range(1, 256):
        for b in range(1, 256):
            mul[a, b] = exp[log[a] + log[b]]
    return exp, log, mul


GF_EXP, GF_LOG, GF_MUL = _tables()


def gf_pow2(e: int) -> int:
    """g^e for the generator g = {02} (e may be negative)."""
    return int(GF_EXP[e % 255])


def gf_inv(a: int) -> int:
    """Multiplicative inverse in GF(2^8)."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return int(GF_EXP[(255 - GF_LOG[a]) % 255])


def gf_mul_const(c: int, v: np.ndarray) -> np.ndarray:
    """Multiply every byte of v by the constant c."""
    return GF_MUL[c][v]


def xor_parity(data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """P = XOR of the k rows of data (k, n). Also recovers one lost member of raid5."""
    p = np.bitwise_xor.reduce(data, axis=0)
    if out is None:
        return p
    out[:] = p
    return out


def pq_syndrome(
    data: np.ndarray, p_out: np.ndarray | None = None, q_out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(P, Q) of the k data rows."""
    k, n = data.shape
    p = np.zeros(n, dtype=np.uint8)
    q = np.zeros(n, dtype=np.uint8)
    for j in range(k):
        p ^= data[j]
        q ^= gf_mul_const(gf_pow2(j), data[j])
    if p_out is not None:
        p_out[:] = p
        p = p_out
    if q_out is not None:
        q_out[:] = q
        q = q_out
    return p, q


def recover_data2(data: np.ndarray, p: np.ndarray, q: np.ndarray, x: int, y: int) -> None:
    """Rebuild lost data rows x and y (x != y) of data in place from the rest, P and Q."""
    if x > y:
        x, y = y, x
    k, n = data.shape
    pxy = p.copy()
    qxy = q.copy()
    for j in range(k):
        if j in (x, y):
            continue
        pxy ^= data[j]
        qxy ^= gf_mul_const(gf_pow2(j), data[j])
    # Dx*g^x ^ Dy*g^y = qxy ; Dx ^ Dy = pxy
    gyx = gf_pow2(y - x)
    denom = gf_inv(gyx ^ 1)
    a = GF_MUL[gyx, denom]
    b = GF_MUL[gf_pow2(-x), denom]
    dx = gf_mul_const(int(a), pxy) ^ gf_mul_const(int(b), qxy)
    data[x] = dx
    data[y] = pxy ^ dx


def recover_data_p(data: np.ndarray, q: np.ndarray, x: int) -> None:
    """Rebuild lost data row x in place from the other rows and Q (P is lost too)."""
    k, n = data.shape
    qx = q.copy()
    for j in range(k):
        if j != x:
            qx ^= gf_mul_const(gf_pow2(j), data[j])
    data[x] = gf_mul_const(gf_pow2(-x), qx)


def recover_data_q(data: np.ndarray, p: np.ndarray, x: int) -> None:
    """Rebuild lost data row x in place from the other rows and P (Q is lost too)."""
    k, n = data.shape
    d = p.copy()
    for j in range(k):
        if j != x:
            d ^= data[j]
    data[x] = d


def rmw_p(p: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
    """Partial-stripe update of P in place: P ^= old ^ new."""
    p ^= old ^ new


def rmw_pq(p: np.ndarray, q: np.ndarray, old: np.ndarray, new: np.ndarray, j: int) -> None:
    """Partial-stripe update of P and Q in place for data row j changing from old to new."""
    delta = old ^ new
    p ^= delta
    q ^= gf_mul_const(gf_pow2(j), delta)


def locate_pq_error(pd: np.ndarray, qd: np.ndarray, k: int) -> int | str | None:
    """Which member of a raid6 row a P/Q mismatch points to: "P", "Q", a data index, or None.

    ``pd = P ^ P'`` and ``qd = Q ^ Q'`` compare the stored parity with the parity
    recomputed from the k data chunks as read. Only P differs: P is wrong; only Q:
    Q is wrong; one data chunk z off by e gives ``pd = e`` and ``qd = g^z * e``.
    No difference, or any other pattern: None (not known).
    """
    p_bad, q_bad = bool(pd.any()), bool(qd.any())
    if p_bad != q_bad:
        return "P" if p_bad else "Q"
    if not p_bad:
        return None
    for z in range(k):
        if np.array_equal(gf_mul_const(gf_pow2(z), pd), qd):
            return z
    return None
