"""The one way vstore orders overlapping work: ranges of an address space held shared or exclusive, first come first served.

A RAID layout holds the rows (or chunks) of an update, the aligned layer the edge
blocks of a merged write, multipath and iSCSI the byte ranges of writes in
flight. Every holder enters with its spans; it waits only for EARLIER entries
that overlap it and are not both shared, so waits form no circle and a stream
of readers cannot starve a writer. An uncontended hold takes no trip through
the scheduler.

A task that already holds a span may enter it again (a rebuild holds a row
while the layout's own read of that row locks it): it does not wait for itself,
nor for later entries that are waiting for it.

A *fence* is an entry no task holds: it keeps later exclusive entries off its
span until it is lifted or its deadline passes (multipath fences the range of a
write that failed on a path, whose copy might still land there).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import trio

Span = tuple[int, int]


class Entry:
    """One holder's spans in a RangeOrder."""

    __slots__ = ("spans", "shared", "seq", "task", "granted", "done", "finished", "deadline")

    def __init__(self, spans: list[Span], shared: bool, seq: int, task: object | None) -> None:
        self.spans = spans
        self.shared = shared
        self.seq = seq
        self.task = task
        self.granted = False
        self.done: trio.Event | None = None  # made when somebody first waits for this entry
        self.finished = False
        self.deadline = float("inf")  # fences only

    def conflicts(self, other: Entry) -> bool:
        """Whether the two overlap and are not both shared."""
        if self.shared and other.shared:
            return False
        for a, b in self.spans:
            for c, d in other.spans:
                if a < d and c < b:
                    return True
        return False


def spans_of_keys(keys: Iterable[int]) -> list[Span]:
    """Integer keys (rows, chunks, blocks) as sorted spans of consecutive keys."""
    spans: list[Span] = []
    for k in sorted(set(keys)):
        if spans and spans[-1][1] == k:
            spans[-1] = (spans[-1][0], k + 1)
        else:
            spans.append((k, k + 1))
    return spans


class RangeOrder:
    """Orders entries over spans of one address space: exclusive against anything overlapping, shared among shared."""

    def __init__(self) -> None:
        self._active: list[Entry] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._active)

    # --- the parts --------------------------------------------------------------------

    def enter(self, spans: list[Span], *, shared: bool = False, before: Entry | None = None
              ) -> Entry:
        """Register an entry now (its place in line); ``wait`` then until it may go ahead."""
        if before is not None:
            seq = before.seq  # a fence takes the place of the entry it stands for
        else:
            self._seq += 1
            seq = self._seq
        task = None if before is not None else trio.lowlevel.current_task()
        entry = Entry(spans, shared, seq, task)
        self._active.append(entry)
        return entry

    def blocker(self, entry: Entry) -> Entry | None:
        """The earliest entry this one must still wait for (None: it may go ahead)."""
        mine: list[Entry] | None = None
        first: Entry | None = None
        for other in self._active:
            if other.seq >= entry.seq or other.finished:
                continue  # later ones (and a fence's origin, which shares its place) wait for us
            if not entry.conflicts(other):
                continue
            if other.task is not None and other.task is entry.task:
                continue  # re-entered by its holder
            if entry.task is not None and not other.granted and other.task is not None:
                if mine is None:
                    mine = [e for e in self._active if e.task is entry.task and e.granted]
                if any(m.seq < other.seq and m.conflicts(other) for m in mine):
                    continue  # it waits for us: waiting for it would never end
            if first is None or other.seq < first.seq:
                first = other
        return first

    async def wait(self, entry: Entry) -> None:
        """Wait until every earlier conflicting entry has left (or, for a fence, expired)."""
        while True:
            other = self.blocker(entry)
            if other is None:
                entry.granted = True
                return
            if other.done is None:
                other.done = trio.Event()
            if other.task is None:  # a fence: it holds until lifted or its deadline
                with trio.move_on_at(other.deadline):
                    await other.done.wait()
                if not other.finished:
                    self.leave(other)
            else:
                await other.done.wait()

    def leave(self, entry: Entry) -> None:
        """Remove the entry and wake whoever waits for it."""
        if entry.finished:
            return
        entry.finished = True
        self._active.remove(entry)
        if entry.done is not None:
            entry.done.set()

    # --- the usual forms --------------------------------------------------------------

    async def acquire(self, spans: list[Span], *, shared: bool = False) -> Entry:
        """Enter and wait; the caller must ``leave`` the entry (also when cancelled after)."""
        entry = self.enter(spans, shared=shared)
        if self.blocker(entry) is None:
            entry.granted = True  # no trip through the scheduler when nobody is in the way
            return entry
        try:
            await self.wait(entry)
        except BaseException:
            self.leave(entry)
            raise
        return entry

    @asynccontextmanager
    async def hold(self, start: int, end: int, *, shared: bool = False) -> AsyncIterator[Entry]:
        """Hold [start, end) for the body."""
        entry = await self.acquire([(start, end)], shared=shared)
        try:
            yield entry
        finally:
            self.leave(entry)

    @asynccontextmanager
    async def hold_keys(self, keys: Iterable[int], *, shared: bool = False
                        ) -> AsyncIterator[Entry]:
        """Hold these integer keys (each key k is the span [k, k+1)) for the body."""
        entry = await self.acquire(spans_of_keys(keys), shared=shared)
        try:
            yield entry
        finally:
            self.leave(entry)

    def fence(self, start: int, end: int, deadline: float, *, behind: Entry) -> Entry:
        """Keep later exclusive entries off [start, end) until lifted or the trio time deadline."""
        entry = self.enter([(start, end)], shared=True, before=behind)
        entry.deadline = deadline
        entry.granted = True
        return entry

    async def settle(self) -> None:
        """Wait until every entry present now (fences apart) has left."""
        for entry in [e for e in self._active if e.task is not None]:
            if not entry.finished:
                if entry.done is None:
                    entry.done = trio.Event()
                await entry.done.wait()
