"""Check the bytes raid5 and raid6 leave in member FILES with independent oracles.

The pool is written through vstore, closed, and the member files are read back
with plain numpy. The geometry is applied by a mapping written here from the
documented layout (not vstore.raid.geometry), P is checked with XOR, Q with a
GF(2^8) implementation written here (not vstore.raid.reference), and both with
ISA-L's xor_gen / pq_gen through ctypes, on every CPU path this machine has.
"""

from __future__ import annotations

import numpy as np
import pytest

from vstore.raid import isal, make_layout
from vstore.uri import open_uri

CHUNK = 4096
ROWS = 10


# --- independent oracle: md left-symmetric placement -----------------------------------


def placement(level: str, n: int, row: int) -> tuple[list[int], int, int | None]:
    """(data members in chunk order, P member, Q member or None) of one stripe row."""
    p = n - 1 - row % n
    if level == "raid5":
        return [(p + 1 + j) % n for j in range(n - 1)], p, None
    return [(p + 2 + j) % n for j in range(n - 2)], p, (p + 1) % n


# --- independent oracle: GF(2^8), polynomial 0x11d, generator 2 -------------------------


def gf_times2(v: np.ndarray) -> np.ndarray:
    """Multiply every byte by {02}: shift left, reduce by 0x1d when the top bit fell off."""
    hi = (v & 0x80) != 0
    return ((v.astype(np.uint16) << 1) & 0xFF).astype(np.uint8) ^ np.where(hi, np.uint8(0x1D), np.uint8(0))


def q_syndrome(chunks: list[np.ndarray]) -> np.ndarray:
    """Q = sum 2^j * D_j by Horner's rule from the highest j down."""
    q = np.zeros_like(chunks[0])
    for d in reversed(chunks):
        q = gf_times2(q) ^ d
    return q


def test_gf_oracle_sanity():
    # 2^8 = 0x1d under 0x11d; Horner's Q of [a, b] is a ^ 2b.
    x = np.array([1], np.uint8)
    for _ in range(8):
        x = gf_times2(x)
    assert x[0] == 0x1D
    a, b = np.array([0x53], np.uint8), np.array([0xCA], np.uint8)
    assert q_syndrome([a, b])[0] == 0x53 ^ gf_times2(b)[0]


# --- independent oracle: ISA-L -----------------------------------------------------------


# vstore.raid.isal is a ctypes wrapper only (no vstore arithmetic): it copies
# buffers that break ISA-L's alignment contract, whose AVX2 path crashes on them.
# Every CPU path this machine can run is checked, not just the dispatched one.
ISAL_PATHS = isal.variants()


def isal_parity(chunks: list[np.ndarray], with_q: bool, path: str) -> list[np.ndarray]:
    """P (and Q) of the chunks computed by ISA-L's given CPU path."""
    data = np.stack(chunks)
    return list(isal.pq_gen(data, path)) if with_q else [isal.xor_gen(data, path)]


# --- the test ----------------------------------------------------------------------------


async def write_pool(tmp_path, level: str, n: int, seed: int, failed_at: int | None = None):
    """Create n file members, write a random image through the layout, close; return the model."""
    members = []
    for i in range(n):
        dev = await open_uri(f"file://{tmp_path}/m{i}.img", create_size=ROWS * CHUNK + 2048)
        members.append(dev)
    lay = make_layout(level, members, chunk=CHUNK)
    rng = np.random.default_rng(seed)
    model = np.zeros(lay.size, np.uint8)
    # Full stripes, partial stripes (both write strategies), odd sizes and offsets.
    await lay.write(0, model)
    ops = [(0, lay.size)] + [
        (int(o), int(ln))
        for o, ln in zip(rng.integers(0, lay.size - 1, 40), rng.integers(1, 3 * CHUNK, 40), strict=True)
    ]
    for k, (off, ln) in enumerate(ops):
        if failed_at is not None and k == len(ops) // 2:
            lay.fail_member(failed_at)
        ln = min(ln, lay.size - off)
        data = rng.integers(0, 256, ln, dtype=np.uint8)
        await lay.write(off, data)
        model[off : off + ln] = data
    await lay.flush()
    await lay.aclose()
    files = [np.fromfile(tmp_path / f"m{i}.img", dtype=np.uint8) for i in range(n)]
    return model, files


def row_chunks(files, level, n, row):
    dmem, pm, qm = placement(level, n, row)
    sl = slice(row * CHUNK, (row + 1) * CHUNK)
    data = [files[m][sl] for m in dmem]
    return data, files[pm][sl], (files[qm][sl] if qm is not None else None)


@pytest.mark.parametrize(("level", "n"), [("raid5", 3), ("raid5", 4), ("raid5", 5), ("raid6", 4), ("raid6", 5), ("raid6", 6)])
async def test_member_files_hold_data_and_parity(tmp_path, level, n):
    model, files = await write_pool(tmp_path, level, n, seed=n)
    k = n - (1 if level == "raid5" else 2)
    assert len(model) == ROWS * k * CHUNK
    for row in range(ROWS):
        data, p, q = row_chunks(files, level, n, row)
        for j, d in enumerate(data):
            c = row * k + j
            assert np.array_equal(d, model[c * CHUNK : (c + 1) * CHUNK]), f"row {row} chunk {j}"
        assert np.array_equal(p, np.bitwise_xor.reduce(np.stack(data))), f"P of row {row}"
        if q is not None:
            assert np.array_equal(q, q_syndrome(data)), f"Q of row {row}"
        for path in ISAL_PATHS:
            iso = isal_parity(data, q is not None, path)
            assert np.array_equal(p, iso[0]), f"ISA-L ({path}) P of row {row}"
            if q is not None:
                assert np.array_equal(q, iso[1]), f"ISA-L ({path}) Q of row {row}"
    # Nothing past the used rows was touched.
    for f in files:
        assert not f[ROWS * CHUNK :].any()


def test_isal_is_present():
    # The set-up installs libisal2; say so loudly if the second oracle is missing.
    assert isal.available(), "libisal.so.2 not found (Debian package libisal2)"
    assert "base" in ISAL_PATHS


@pytest.mark.parametrize(("level", "n", "victim"), [("raid5", 4, 1), ("raid6", 5, 3)])
async def test_degraded_writes_leave_reconstructible_members(tmp_path, level, n, victim):
    """Writes made after a member failed: the survivors' data and parity yield the model."""
    model, files = await write_pool(tmp_path, level, n, seed=11, failed_at=victim)
    k = n - (1 if level == "raid5" else 2)
    for row in range(ROWS):
        dmem, pm, qm = placement(level, n, row)
        sl = slice(row * CHUNK, (row + 1) * CHUNK)
        expect = [model[(row * k + j) * CHUNK : (row * k + j + 1) * CHUNK] for j in range(k)]
        for j, m in enumerate(dmem):
            if m != victim:
                assert np.array_equal(files[m][sl], expect[j])
        # Parity on surviving members matches the full logical data (incl. the lost chunk).
        if pm != victim:
            assert np.array_equal(files[pm][sl], np.bitwise_xor.reduce(np.stack(expect)))
        if qm is not None and qm != victim:
            assert np.array_equal(files[qm][sl], q_syndrome(expect))
