"""The layout of a pool being reshaped: the old and the new geometry over the same members, by a cursor.

``ReshapeLayout`` holds the layout of the first ``n_old`` members (the old
geometry) and the layout of all members (the new one). Logical chunks below
``done`` are served by the new geometry, the rest by the old; ``committed`` is
the cursor on record in the pool metadata (``vstore.raid.reshape`` says why the
two differ and what the copy may overwrite). Every request holds the member rows
its chunks lie in, in both geometries (raid10: the rows of both copies of each
chunk; ``row_keys``: the keys of the base
``locked``, as a resync's), so a copy step, which holds the rows it reads and
writes, never interleaves with a request on them, and a resync of a row excludes
every request on it whatever geometry serves it.

A write into ``[committed, done)`` lands in the new geometry, which a crash
would forget (the copy restarts at ``committed`` and reads the old one), so the
next ``flush`` puts the cursor on record (``on_checkpoint``) after the member
flush: md blocks such writes until its superblock is updated.

The journal or write-intent bitmap and a pending resync are shared with both
inner layouts. After a crash a dirty row is resynced by the geometry that owns it
on record (``resync_row``): the new one below the committed cursor, the old one
where its chunks are still at or above it; the rows between (copied past the
checkpoint) are skipped, as the resumed copy writes them again. raid10 with an
odd member count has rows holding chunks on both sides of the cursor: there each
chunk is resynced in the geometry owning it (``Raid10Layout.resync_chunks``).
``vstore.ops.reshape`` drives the copy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import numpy as np

from vstore.errors import ConfigError
from vstore.raid import geometry
from vstore.raid.base import OnMemberFailed, RaidLayout
from vstore.raid.reshape import Shape
from vstore.stack.device import BlockDevice

ONLINE_LEVELS = ("raid0", "raid5", "raid6", "raid10")


class ReshapeLayout(RaidLayout):
    """Two geometries of one level over the same members, the boundary at a logical chunk cursor."""

    def __init__(self, members: Sequence[BlockDevice], chunk: int, *, level: str, n_old: int,
                 committed: int, old: RaidLayout | None = None, failed: Iterable[int] = frozenset(),
                 on_member_failed: OnMemberFailed | None = None) -> None:
        from vstore.raid import make_layout

        if level not in ONLINE_LEVELS:
            raise ConfigError(f"a {level} pool cannot be reshaped online yet")
        self.level = level
        super().__init__(members, chunk, failed, on_member_failed)
        if not 0 < n_old < self.n:
            raise ConfigError(f"a reshape from {n_old} onto {self.n} members")
        self.n_old = n_old
        # The old geometry may be the pool's layout until now (its locks and counters go on).
        if old is None and level == "raid5" and n_old == 2:  # a raid1 converted (vstore.ops.reshape)
            from vstore.raid.raid5 import ConvertedRaid5Layout

            old = ConvertedRaid5Layout(list(members[:n_old]), chunk)
        self.old = old if old is not None else make_layout(level, list(members[:n_old]), chunk)
        self.new = make_layout(level, list(members), chunk)
        for inner in (self.old, self.new):
            inner.failed = self.failed  # one failed set: a member failing fails it in both
            inner.on_member_failed = on_member_failed
        self.journal, self.resync = self._journal, self._resync  # (set before the inner layouts were)
        # Which logical chunks each member row holds in each geometry (raid10: n/2 per row, a
        # pair of copies straddling two rows when n is odd).
        self.shape_old, self.shape_new = Shape(level, n_old), Shape(level, self.n)
        self.rows = self.new.rows
        self.row_bytes = self.new.row_bytes
        self.total = self.old.size // chunk  # logical chunks to move
        self.size = self.old.size  # grows when the reshape is finished
        self.committed = committed
        self.done = committed
        self.finished = False
        self.window_written = False  # a write landed in [committed, done): the next flush commits
        self.on_checkpoint: Callable[[int], Awaitable[Any]] | None = None  # commit this cursor

    # --- shared with the inner layouts ---------------------------------------------------------

    @property
    def journal(self) -> Any:
        """The journal or write-intent bitmap (both geometries' updates go through it)."""
        return self._journal

    @journal.setter
    def journal(self, value: Any) -> None:
        self._journal = value
        for inner in (getattr(self, "old", None), getattr(self, "new", None)):
            if inner is not None:
                inner.journal = value

    @property
    def resync(self) -> Any:
        """A pending resync (rows synced before anything trusts them), in either geometry."""
        return self._resync

    @resync.setter
    def resync(self, value: Any) -> None:
        self._resync = value
        for inner in (getattr(self, "old", None), getattr(self, "new", None)):
            if inner is not None:
                inner.resync = value

    # --- where a logical range lives ----------------------------------------------------------

    def row_keys(self, c0: int, c1: int) -> list[int]:
        """The member rows holding logical chunks [c0, c1) in either geometry (the lock keys)."""
        if c1 <= c0:
            return []
        rows: set[int] = set()
        for shape in (self.shape_new, self.shape_old):
            rows |= set(range(_first_row(shape, c0), _first_row(shape, c1 - 1, last=True) + 1))
        return sorted(rows)

    @property
    def state(self) -> str:
        """'clean', 'degraded' or 'failed': the failed members must leave both geometries whole."""
        if not self.failed:
            return "clean"
        old_failed = {i for i in self.failed if i < self.n_old}
        if self.finished:
            return self.new.state
        ok = (geometry.survives(self.level, self.n, self.failed)
              and geometry.survives(self.level, self.n_old, old_failed))
        return "degraded" if ok else "failed"

    def chunk_keys(self, offset: int, length: int) -> list[int]:
        """The lock keys of a logical byte range: the member rows of its chunks, both geometries."""
        return self.row_keys(offset // self.chunk, (offset + max(length, 1) - 1) // self.chunk + 1)

    def resync_keys(self, row: int) -> list[int]:
        """A resync of a member row holds that row (every request on its chunks holds it too)."""
        return [row]

    async def resync_row(self, row: int, trusted: frozenset[int] | set[int] = frozenset()) -> None:
        """Resync member row ``row`` in the geometry that owns it on record (nothing between the two)."""
        if not self.finished and self.level == "raid10":
            # With an odd member count a row holds chunks on both sides of the cursor: each chunk
            # in the geometry owning it (new below the cursor, where the copy wrote both copies;
            # old at or past it, whose old copies reshape_safe leaves intact).
            await self.new.resync_chunks([c for c in self.new.resync_keys(row) if c < self.committed])
            await self.old.resync_chunks([c for c in self.old.resync_keys(row) if c >= self.committed])
        elif self.finished or self.shape_new.row_chunks(row).stop <= self.committed:
            await self.new.resync_row(row, trusted)
        elif self.shape_old.row_chunks(row).stop > self.committed:  # an old row holding chunks at or past it
            await self.old.resync_row(row, trusted)

    def split(self, offset: int, length: int) -> list[tuple[RaidLayout, int, int, int]]:
        """(layout, offset, length, request offset) pieces of a logical range, by the cursor."""
        if self.finished:
            return [(self.new, offset, length, 0)]
        edge = self.done * self.chunk
        out = []
        if offset < edge:
            n = min(length, edge - offset)
            out.append((self.new, offset, n, 0))
        if offset + length > edge:
            start = max(offset, edge)
            out.append((self.old, start, offset + length - start, start - offset))
        return out

    # --- I/O ---------------------------------------------------------------------------------

    async def _read(self, offset: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.uint8)
        async with self.locked(self.chunk_keys(offset, length)):
            for dev, off, n, at in self.split(offset, length):
                out[at : at + n] = np.asarray(await dev.read(off, n))
        return out

    async def _write(self, offset: int, buf: np.ndarray) -> None:
        async with self.locked(self.chunk_keys(offset, len(buf))):
            for dev, off, n, at in self.split(offset, len(buf)):
                if dev is self.new and not self.finished and off + n > self.committed * self.chunk:
                    self.window_written = True
                await dev.write(off, buf[at : at + n])

    async def discard(self, offset: int, length: int) -> None:
        """Pass the discard to the geometry holding each part."""
        self.check(offset, length)
        async with self.locked(self.chunk_keys(offset, length)):
            for dev, off, n, _ in self.split(offset, length):
                if dev is self.new and not self.finished and off + n > self.committed * self.chunk:
                    self.window_written = True
                await dev.discard(off, n)

    async def flush(self) -> None:
        """Flush the members; a write since the last checkpoint beyond it puts the cursor on record."""
        target = self.done  # copied before the flush: durable after it
        await super().flush()
        if self.window_written and self.on_checkpoint is not None:
            await self.on_checkpoint(target)

    async def flush_members(self) -> None:
        """Flush the members only (what a checkpoint does before it commits)."""
        await super().flush()

    # --- the copy (vstore.ops.reshape) --------------------------------------------------------

    def advance(self, done: int) -> None:
        """The new geometry holds the chunks below done (copied under their locks)."""
        self.done = max(self.done, done)

    def checkpointed(self, cursor: int) -> None:
        """The metadata records cursor (after a member flush)."""
        self.committed = cursor
        if self.committed >= self.done:
            self.window_written = False

    def finish(self) -> None:
        """Every chunk is in the new geometry: serve the new size."""
        self.finished = True
        self.done = self.committed = self.total
        self.window_written = False
        self.size = self.new.size


def _first_row(shape: Shape, c: int, *, last: bool = False) -> int:
    """The member row of chunk c's first copy or data (``last``: of its last copy, raid10's second)."""
    if shape.level == "raid10":
        return (2 * c + (1 if last else 0)) // shape.n
    return c // shape.k
