"""raid1: an n-way mirror; every member holds the whole array at the same offsets.

Reads go to the healthy mirror with the fewest requests in flight (ties taken
in turn), and a large read is split across the mirrors so that they all work.
Writes go to every healthy mirror, under per-chunk locks so that two
concurrent writes to the same chunk land in the same order on every mirror.

After an unclean shutdown the chunks of the write-intent bitmap's dirty regions
are resynced (``resync_row``: the first healthy mirror copied to the others, as
md does); a read of a chunk not resynced yet resyncs it first, so two reads of
one block never return different data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vstore.raid.base import BlockCorrupt, MemberFailed, RaidLayout


class Raid1Layout(RaidLayout):
    """Mirror over n >= 2 members; survives n - 1 failed members."""

    level = "raid1"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows = min(m.size for m in self.members) // self.chunk
        self.size = self.rows * self.chunk
        self._turn = 0

    def pick_mirror(self) -> int:
        """The healthy member to read from: fewest in flight, ties taken in turn."""
        live = self.healthy()
        self._turn += 1
        best = min(self.inflight[i] for i in live)
        ties = [i for i in live if self.inflight[i] == best]
        return ties[self._turn % len(ties)]

    async def _read(self, offset: int, length: int) -> np.ndarray:
        if self.resync is not None:
            await self.sync_rows(self.chunks_of(offset, length))
        live = self.healthy()
        parts = min(len(live), length // self.chunk)
        out = np.empty(length, dtype=np.uint8)
        if parts <= 1:
            await self._read_pieces([(self.pick_mirror(), offset, length, 0)], out)
            return out
        # Split at chunk boundaries into one part per mirror, the least busy mirror first.
        step = -(-length // parts)
        step = -(-step // self.chunk) * self.chunk
        first = live.index(self.pick_mirror())
        pieces = [(live[(first + p) % len(live)], offset + at, min(step, length - at), at)
                  for p, at in enumerate(range(0, length, step))]
        await self._read_pieces(pieces, out)
        return out

    async def _member_bytes(self, i: int, offset: int, length: int) -> np.ndarray:
        out = np.zeros(length, dtype=np.uint8)
        end = min(offset + length, self.size)
        if end > offset:
            # The least busy copy first; one whose blocks fail their checksums: the next.
            others = sorted((m for m in self.healthy() if m != i), key=lambda m: self.inflight[m])
            async with self.locked(self.chunks_of(offset, end - offset)):
                await self.sync_rows(self.chunks_of(offset, end - offset))
                for k, src in enumerate(others):
                    try:
                        out[: end - offset] = await self.read_member(src, offset, end - offset)
                        break
                    except BlockCorrupt:
                        if k == len(others) - 1:
                            raise
        return out

    async def resync_row(self, row: int, trusted: frozenset[int] | set[int] = frozenset()) -> None:
        """Copy chunk ``row`` of the first healthy mirror to the others (and to one being rebuilt)."""
        while True:
            self.require_usable()
            src = self.healthy()[0]
            try:
                data = await self.read_member(src, row * self.chunk, self.chunk)
            except MemberFailed:
                continue
            break
        # An update like any other: a move's watcher sees it (the member may be being copied).
        await self.submit_member_writes([(i, row * self.chunk, data) for i in range(self.n) if i != src])

    def chunks_of(self, offset: int, length: int) -> range:
        """Chunk indexes a range touches (the keys of its locks)."""
        return range(offset // self.chunk, (offset + length - 1) // self.chunk + 1)

    async def _write(self, offset: int, buf: np.ndarray) -> None:
        # Longer than a journal record holds: several updates, in order.
        for off, n in self.update_spans(offset, len(buf), self.n):
            part = buf[off - offset : off - offset + n]
            async with self.locked(self.chunks_of(off, n)):
                # Every member: the submit skips failed ones but not one being rebuilt.
                await self.submit_member_writes([(i, off, part) for i in range(self.n)])

    async def discard(self, offset: int, length: int) -> None:
        """Pass the discard through to every healthy mirror."""
        self.check(offset, length)
        if length:
            async with self.locked(self.chunks_of(offset, length)):
                await self._discard_members([(i, offset, length) for i in range(self.n)])
