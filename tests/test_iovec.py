"""IoVec: slicing, filling and gathering a byte run spread over several buffers, against one flat array."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vstore.stack.iovec import (
    IoVec,
    finish_reads,
    pieces_of,
    read_targets,
    total_bytes,
    write_sources,
)


def _split(data: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    out, pos = [], 0
    for n in sizes:
        out.append(data[pos : pos + n])
        pos += n
    return out


@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.data())
def test_slices_match_a_flat_array(sizes, data):
    flat = np.arange(sum(sizes), dtype=np.uint64).astype(np.uint8)
    iov = IoVec(memoryview(v) for v in _split(flat, sizes))
    assert len(iov) == iov.nbytes == len(flat)
    assert all(p.nbytes for p in iov.pieces)  # empty buffers are dropped
    a = data.draw(st.integers(0, len(flat)))
    b = data.draw(st.integers(a, len(flat)))
    part = iov[a:b]
    got = b"".join(bytes(p) for p in pieces_of(part.flat()))
    assert got == flat[a:b].tobytes()
    out = np.zeros(b - a, np.uint8)
    part.gather_into(out)
    assert np.array_equal(out, flat[a:b])
    # Writing through a slice lands in the underlying buffers.
    new = np.full(b - a, 0xEE, np.uint8)
    iov[a:b] = new
    expect = np.arange(sum(sizes), dtype=np.uint64).astype(np.uint8)
    expect[a:b] = 0xEE
    assert np.array_equal(flat, expect)


@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.integers(1, 50), st.data())
def test_segments_walk_like_slices(sizes, size, data):
    flat = np.arange(sum(sizes), dtype=np.uint64).astype(np.uint8)
    iov = IoVec(memoryview(v) for v in _split(flat, sizes))
    a = data.draw(st.integers(0, len(flat)))
    b = data.draw(st.integers(a, len(flat)))
    segs = list(iov.segments(a, b, size))
    want = [flat[p : min(p + size, b)].tobytes() for p in range(a, b, size)]
    assert [b"".join(bytes(p) for p in seg) for seg in segs] == want
    assert all(p.nbytes for seg in segs for p in seg)


def test_bad_slices_and_lengths():
    iov = IoVec([memoryview(bytearray(4)), memoryview(bytearray(4))])
    with pytest.raises(TypeError):
        iov[1]  # noqa: B018
    with pytest.raises(ValueError):
        iov[::2]  # noqa: B018
    with pytest.raises(ValueError):
        iov[0:4] = b"abc"
    assert iov[5:5].nbytes == 0 and iov[7:3].nbytes == 0
    assert isinstance(iov[1:3].flat(), memoryview) and isinstance(iov[3:6].flat(), IoVec)


def test_strided_views_use_bounce_buffers():
    base = np.zeros(64, np.uint8)
    strided = base[::2]  # 32 bytes, not contiguous
    plain = np.zeros(16, np.uint8)
    dest, bounces = read_targets([plain, strided])
    assert dest.nbytes == 48 and len(bounces) == 1 and total_bytes([plain, strided]) == 48
    dest[0:48] = np.arange(48, dtype=np.uint8)
    assert np.array_equal(plain, np.arange(16))  # a contiguous view is filled in place
    assert not strided.any()
    finish_reads(bounces)
    assert np.array_equal(strided, np.arange(16, 48)) and not base[1::2].any()
    src = write_sources([plain, strided, b"xy"])
    assert b"".join(bytes(p) for p in src.pieces) == bytes(range(48)) + b"xy"
    with pytest.raises(ValueError, match="writable"):
        ro = np.zeros(8, np.uint8)
        ro.flags.writeable = False
        read_targets([ro])
