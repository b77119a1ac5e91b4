"""raid0: chunks striped round-robin, no redundancy.

Logical chunk ``c`` is on member ``c mod n`` in row ``c // n`` (member offset
``(c // n) * chunk``). Members are used up to the smallest member's size
rounded down to a chunk multiple.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vstore.raid import geometry
from vstore.raid.base import RaidLayout


class Raid0Layout(RaidLayout):
    """Striping over n >= 1 members; any failed member fails the layout."""

    level = "raid0"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows = min(m.size for m in self.members) // self.chunk
        self.size = self.rows * self.n * self.chunk

    def pieces(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(member, member offset, length, request offset) pieces of a logical range."""
        out = []
        for c, start, n, at in geometry.split_chunks(offset, length, self.chunk):
            m, row = geometry.raid0_locate(c, self.n)
            out.append((m, row * self.chunk + start, n, at))
        return out

    async def _read(self, offset: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.uint8)
        await self._read_pieces(self.pieces(offset, length), out)
        return out

    async def _write(self, offset: int, buf: np.ndarray) -> None:
        await self.submit_member_writes(
            [(m, off, buf[at : at + n]) for m, off, n, at in self.pieces(offset, len(buf))]
        )

    async def discard(self, offset: int, length: int) -> None:
        """Pass the discard through to the members."""
        self.check(offset, length)
        # Merge each member's pieces: a long range is contiguous on every member.
        ranges: list[list[int]] = []
        last: dict[int, list[int]] = {}
        for m, off, n, _ in self.pieces(offset, length):
            run = last.get(m)
            if run is not None and run[1] + run[2] == off:
                run[2] += n
            else:
                last[m] = [m, off, n]
                ranges.append(last[m])
        await self._discard_members([(m, off, n) for m, off, n in ranges])
