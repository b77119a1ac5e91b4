"""An iovec: one run of consecutive bytes spread over several buffers, sliced without copying.

The network backends' vectored I/O (``readv_into``/``writev``) turns the
caller's views into an ``IoVec`` of flat memoryviews and then treats it much
like one memoryview: slicing it at command or RPC boundaries, receiving into
its pieces and sending from them (``sendmsg``/``recvmsg_into`` take lists of
buffers). Views that are strided numpy slices cannot be handed to a socket:
``read_targets`` gives each a contiguous bounce buffer (copied back by
``finish_reads``) and ``write_sources`` a contiguous copy; every other view is
used in place.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from vstore.stack.device import Buffer, as_u8


class IoVec:
    """Consecutive bytes held by a list of flat memoryviews (its pieces), in order."""

    __slots__ = ("pieces", "nbytes", "_ends")

    def __init__(self, pieces: Iterable[memoryview]) -> None:
        self.pieces: list[memoryview] = [p for p in pieces if p.nbytes]
        self._ends = list(itertools.accumulate(p.nbytes for p in self.pieces))
        self.nbytes = self._ends[-1] if self._ends else 0

    def __len__(self) -> int:
        return self.nbytes

    def __repr__(self) -> str:
        return f"<IoVec {self.nbytes} bytes in {len(self.pieces)} pieces>"

    def __getitem__(self, key: slice) -> IoVec:
        if not isinstance(key, slice):
            raise TypeError("an IoVec is sliced, not indexed")
        start, stop, step = key.indices(self.nbytes)
        if step != 1:
            raise ValueError("an IoVec slice must be contiguous")
        if stop <= start:
            return IoVec([])
        ends, pieces = self._ends, self.pieces
        i = bisect.bisect_right(ends, start)  # the piece holding byte start
        j = bisect.bisect_left(ends, stop)  # the piece holding byte stop - 1
        first = ends[i] - pieces[i].nbytes
        if i == j:
            return IoVec([pieces[i][start - first : stop - first]])
        last = ends[j] - pieces[j].nbytes
        return IoVec([pieces[i][start - first :], *pieces[i + 1 : j], pieces[j][: stop - last]])

    def __setitem__(self, key: slice, data: Buffer) -> None:
        """Copy data (exactly as long as the slice) into the slice's bytes."""
        target = self[key]
        src = memoryview(as_u8(data))
        if src.nbytes != target.nbytes:
            raise ValueError(f"cannot copy {src.nbytes} bytes into {target.nbytes}")
        pos = 0
        for p in target.pieces:
            p[:] = src[pos : pos + p.nbytes]
            pos += p.nbytes

    def segments(self, start: int, stop: int, size: int) -> Iterator[list[memoryview]]:
        """The pieces of bytes [start, stop) cut into consecutive segments of size bytes (the last may be shorter).

        One walk over the pieces: cheaper than a slice per segment when there are many (PDUs).
        """
        ends, pieces = self._ends, self.pieces
        i = bisect.bisect_right(ends, start)
        pos = start
        while pos < stop:
            end = min(pos + size, stop)
            seg = []
            while pos < end:
                p = pieces[i]
                first = ends[i] - p.nbytes
                a, b = pos - first, min(end, ends[i]) - first
                seg.append(p if a == 0 and b == p.nbytes else p[a:b])
                pos += b - a
                if pos == ends[i]:
                    i += 1
            yield seg

    def flat(self) -> memoryview | IoVec:
        """The one memoryview when there is a single piece (the fast paths take it), else self."""
        if len(self.pieces) == 1:
            return self.pieces[0]
        return self if self.pieces else memoryview(b"")

    def gather_into(self, out: np.ndarray) -> None:
        """Copy the bytes, in order, into the start of a uint8 array."""
        pos = 0
        for p in self.pieces:
            out[pos : pos + p.nbytes] = np.frombuffer(p, dtype=np.uint8)
            pos += p.nbytes


def total_bytes(views: Sequence[Buffer]) -> int:
    """How many bytes the views hold together."""
    return sum(v.nbytes if isinstance(v, np.ndarray) else memoryview(v).nbytes for v in views)


def pieces_of(buf: memoryview | IoVec) -> list[memoryview]:
    """The buffers that hold a memoryview's or an IoVec's bytes, in order."""
    return buf.pieces if isinstance(buf, IoVec) else [buf]


Bounce = tuple[np.ndarray, np.ndarray]  # (the caller's strided view, its contiguous stand-in)


def read_targets(views: Sequence[Buffer]) -> tuple[IoVec, list[Bounce]]:
    """Writable flat memoryviews for the views; a strided view gets a bounce buffer to copy back."""
    pieces: list[memoryview] = []
    bounces: list[Bounce] = []
    for v in views:
        if isinstance(v, np.ndarray):
            if not v.flags.writeable:
                raise ValueError("readv_into needs writable views")
            if not v.flags.c_contiguous:
                tmp = np.empty(v.nbytes, dtype=np.uint8)
                bounces.append((v, tmp))
                pieces.append(memoryview(tmp))
                continue
        m = memoryview(as_u8(v))
        if m.readonly:
            raise ValueError("readv_into needs writable views")
        pieces.append(m)
    return IoVec(pieces), bounces


def finish_reads(bounces: list[Bounce]) -> None:
    """Copy what landed in the bounce buffers into the strided views they stand for."""
    for view, tmp in bounces:
        view[...] = tmp.view(view.dtype).reshape(view.shape)


def write_sources(views: Sequence[Buffer]) -> IoVec:
    """Flat memoryviews of the views' bytes (a strided view is copied, every other one used in place)."""
    pieces = []
    for v in views:
        if isinstance(v, np.ndarray) and not v.flags.c_contiguous:
            v = np.ascontiguousarray(v)
        pieces.append(memoryview(as_u8(v)))
    return IoVec(pieces)
