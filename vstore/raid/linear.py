"""linear: the members concatenated in order, each with its own size.

Logical offset ``x`` lies on the first member ``i`` with
``x < size0 + ... + size_i``, at ``x - (size0 + ... + size_(i-1))``. Each
member's size is rounded down to the layout's block size (the largest member
block size). No redundancy: one failed member fails the layout.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

from vstore.raid.base import RaidLayout


class LinearLayout(RaidLayout):
    """Concatenation of members of any sizes."""

    level = "linear"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.member_sizes = [m.size - m.size % self.block_size for m in self.members]
        self.starts = [0]
        for s in self.member_sizes:
            self.starts.append(self.starts[-1] + s)
        self.size = self.starts[-1]

    def pieces(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(member, member offset, length, request offset) pieces of a logical range."""
        out = []
        pos, end = offset, offset + length
        i = bisect.bisect_right(self.starts, pos) - 1
        while pos < end:
            while self.starts[i + 1] <= pos:  # skip empty members
                i += 1
            n = min(end, self.starts[i + 1]) - pos
            out.append((i, pos - self.starts[i], n, pos - offset))
            pos += n
        return out

    async def _read(self, offset: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.uint8)
        await self._read_pieces(self.pieces(offset, length), out)
        return out

    async def _write(self, offset: int, buf: np.ndarray) -> None:
        await self.submit_member_writes(
            [(i, off, buf[at : at + n]) for i, off, n, at in self.pieces(offset, len(buf))]
        )

    async def discard(self, offset: int, length: int) -> None:
        """Pass the discard through to the members."""
        self.check(offset, length)
        await self._discard_members([p[:3] for p in self.pieces(offset, length)])
