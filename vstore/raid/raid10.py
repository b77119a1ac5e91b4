"""raid10: md's near layout with 2 copies, any n >= 2 (odd n allowed).

Device chunk position ``d`` is member ``d mod n``, row ``d // n`` (row-major
across the members); logical chunk ``c`` has its copies at positions ``2c``
and ``2c + 1``. Reads go to the copy whose member has fewer requests in flight;
writes go to both copies under a per-chunk lock.

After an unclean shutdown each chunk in the write-intent bitmap's dirty regions
gets its first healthy copy written over the other (``resync_row``, per member
row); a read of a chunk not resynced yet resyncs it first, so two reads of one
block never return different data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from vstore.raid import geometry
from vstore.raid.base import MemberFailed, RaidLayout, run_all


class Raid10Layout(RaidLayout):
    """Striped mirrors over n >= 2 members; survives one failure per copy pair."""

    level = "raid10"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows = min(m.size for m in self.members) // self.chunk
        self.chunks = self.n * self.rows // 2
        self.size = self.chunks * self.chunk
        self._turn = 0

    def copies(self, c: int) -> list[tuple[int, int]]:
        """(member, member offset of the chunk) of both copies of logical chunk c."""
        return [(m, row * self.chunk) for m, row in geometry.raid10_copies(c, self.n)]

    def pick_copy(self, c: int) -> tuple[int, int]:
        """The healthy copy to read from: fewer in flight, ties taken in turn."""
        gone = self.unreadable()
        live = [x for x in self.copies(c) if x[0] not in gone]
        if len(live) == 2 and self.inflight[live[0][0]] == self.inflight[live[1][0]]:
            self._turn += 1
            return live[self._turn % 2]
        return min(live, key=lambda x: self.inflight[x[0]])

    async def _read(self, offset: int, length: int) -> np.ndarray:
        chunks = list(geometry.split_chunks(offset, length, self.chunk))
        if self.resync is not None:
            await self.sync_keys(c for c, _, _, _ in chunks)
        out = np.empty(length, dtype=np.uint8)
        if len(chunks) == 1:
            c, start, n, at = chunks[0]
            m, base = self.pick_copy(c)
            await self._read_pieces([(m, base + start, n, at)], out)
            return out
        # The first half of the chunks from one copy, the second half from the other:
        # every member works, and each member's chunks stay consecutive (one I/O each).
        half = len(chunks) // 2
        pieces = []
        gone = self.unreadable()
        for idx, (c, start, n, at) in enumerate(chunks):
            copies = self.copies(c)
            m, base = copies[idx >= half]
            if m in gone:
                m, base = copies[idx < half]
            pieces.append((m, base + start, n, at))
        await self._read_pieces(pieces, out)
        return out

    async def _member_bytes(self, i: int, offset: int, length: int) -> np.ndarray:
        out = np.zeros(length, dtype=np.uint8)

        async def one(row: int, start: int, n: int, at: int) -> None:
            d = row * self.n + i  # device-chunk position of this piece
            c = d // 2
            if c >= self.chunks:
                return  # an unused position: zeros
            other = d ^ 1  # the other copy of chunk c
            async with self.locked([c]):
                await self.sync_keys([c])
                out[at : at + n] = await self.read_member(
                    other % self.n, (other // self.n) * self.chunk + start, n
                )

        await run_all([lambda p=p: one(*p) for p in geometry.split_chunks(offset, length, self.chunk)])
        return out

    def resync_keys(self, row: int) -> list[int]:
        """The logical chunks with a copy in member row ``row``."""
        lo = row * self.n // 2
        hi = min((row * self.n + self.n - 1) // 2 + 1, self.chunks)
        return list(range(lo, hi))

    def rows_of_keys(self, keys: Iterable[int]) -> set[int]:
        """The member rows holding a copy of these logical chunks."""
        return {d // self.n for c in keys for d in (2 * c, 2 * c + 1)}

    async def resync_row(self, row: int, trusted: frozenset[int] | set[int] = frozenset()) -> None:
        """For each chunk with a copy in member row ``row``: its first healthy copy over the other."""
        await self.resync_chunks(self.resync_keys(row))

    async def resync_chunks(self, chunks: Iterable[int]) -> None:
        """For each of these logical chunks: its first healthy copy over the other (the caller holds them)."""
        for c in chunks:
            while True:
                self.require_usable()
                copies = self.copies(c)
                live = [x for x in copies if x[0] not in self.failed]
                if not live:
                    break  # both copies gone: require_usable raised already, unless rebuilding
                src = live[0]
                try:
                    data = await self.read_member(src[0], src[1], self.chunk)
                except MemberFailed:
                    continue
                # An update like any other: a move's watcher sees it.
                await self.submit_member_writes([(m, off, data) for m, off in copies if (m, off) != src])
                break

    async def _write(self, offset: int, buf: np.ndarray) -> None:
        # Longer than a journal record holds: several updates, in order.
        for off, length in self.update_spans(offset, len(buf), 2):
            at0 = off - offset
            pieces = list(geometry.split_chunks(off, length, self.chunk))
            writes = [
                (m, base + start, buf[at0 + at : at0 + at + n])
                for c, start, n, at in pieces
                for m, base in self.copies(c)
            ]
            async with self.locked([p[0] for p in pieces]):
                await self.submit_member_writes(writes)

    async def discard(self, offset: int, length: int) -> None:
        """Pass the discard through to both copies."""
        self.check(offset, length)
        pieces = list(geometry.split_chunks(offset, length, self.chunk))
        async with self.locked([p[0] for p in pieces]):
            await self._discard_members(
                [(m, base + start, n) for c, start, n, _ in pieces for m, base in self.copies(c)]
            )
