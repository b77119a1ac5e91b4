"""The update log a layout is given: the pool's journal or bitmap (or neither), swappable while live.

A layout sends every update through ``commit`` / ``applied`` and every member
flush through ``before_flush`` / ``after_flush`` of its ``UpdateLog``. This one
forwards them to the pool's current backend (a ``Journal``, a ``WriteIntentBitmap``
or nothing) and lets the pool change that backend on a live pool:

- ``hold()`` holds new updates back at ``commit`` and waits until every update
  already let through has been written in place (``applied``); the pool then
  flushes the members, commits its metadata and sets ``backend``; leaving
  ``hold()`` lets the waiting updates go on through the new backend.
- When the journal device fails under a commit (``Journal.broken``), ``on_failure``
  is called (the pool switches to its bitmap) and the update is sent again
  through whatever backend the pool chose, so no caller sees the journal's error.

Tickets and flush marks remember the backend that issued them, so an update or
flush under way across a switch finishes with the backend it began with.

A layout sizes its updates by ``max_update_bytes`` when a request begins. A
request that began before a journal was attached may bring an update larger than
the new journal takes; with ``row_unit`` set (parity layouts: member offsets
``[r * chunk, (r + 1) * chunk)`` are row r on every member) such an update is
logged as several records of whole rows, each row all old or all new after a crash.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from vstore.consistency.journal import Journal, JournalError
from vstore.stack.device import as_u8

MemberWrite = tuple[int, int, Any]
OnFailure = Callable[[Any, BaseException], Awaitable[None]]


class SwitchableLog:
    """An ``UpdateLog`` (``vstore.raid.base``) that forwards to a backend the pool may swap."""

    def __init__(self, backend: Any = None, on_failure: OnFailure | None = None,
                 row_unit: int | None = None) -> None:
        self.backend = backend
        self.on_failure = on_failure
        self.row_unit = row_unit
        # A limit announced before a switch to a journal: updates planned from then on fit it.
        self.next_limit: int | None = None
        self._gate: trio.Event | None = None  # set while updates are held back
        self._inflight = 0
        self._idle = trio.Event()
        self._idle.set()

    # --- what the layout reads ------------------------------------------------------------

    @property
    def logs_parity(self) -> bool:
        """True under a journal (it logs whole updates), False under a bitmap or nothing."""
        return bool(self.backend is not None and self.backend.logs_parity)

    @property
    def stats(self) -> dict[str, int]:
        """The backend's counters."""
        return self.backend.stats if self.backend is not None else {}

    @property
    def max_update_bytes(self) -> int | None:
        """The largest update the backend (and a journal about to take over) accepts."""
        limits = [x for x in (self.backend.max_update_bytes if self.backend is not None else None,
                              self.next_limit) if x]
        return min(limits) if limits else None

    # --- updates --------------------------------------------------------------------------

    async def commit(self, writes: Sequence[MemberWrite]) -> tuple[Any, Any]:
        """Let the update through the backend (waiting while a switch holds updates back)."""
        while True:
            while self._gate is not None:
                await self._gate.wait()
            backend = self.backend
            self._enter()
            if backend is None:
                return None, None
            try:
                pieces = self._pieces(backend, writes)
                if pieces is None:
                    return backend, await backend.commit(writes)
                return backend, _Split(await backend.commit_all(pieces))
            except JournalError as e:
                self._leave()
                if getattr(backend, "broken", None) is None or self.on_failure is None:
                    raise
                await self.on_failure(backend, e)
                if self.backend is backend:
                    raise
            except BaseException:
                self._leave()
                raise

    def applied(self, ticket: tuple[Any, Any]) -> None:
        """The update's member writes are done."""
        backend, inner = ticket
        try:
            if backend is not None:
                for t in inner if isinstance(inner, _Split) else [inner]:
                    backend.applied(t)
        finally:
            self._leave()

    def _pieces(self, backend: Any, writes: Sequence[MemberWrite]) -> list[list[MemberWrite]] | None:
        """An update too big for the journal as pieces of whole rows (None: it fits as it is)."""
        unit = self.row_unit
        limit = backend.max_update_bytes if isinstance(backend, Journal) else None
        if not unit or not limit or sum(len(as_u8(w[2])) for w in writes) <= limit:
            return None
        rows: dict[int, list[MemberWrite]] = {}
        for m, off, buf in writes:
            data = as_u8(buf)
            at = 0
            while at < len(data):
                row = (off + at) // unit
                n = min(len(data) - at, (row + 1) * unit - (off + at))
                rows.setdefault(row, []).append((m, off + at, data[at : at + n]))
                at += n
        pieces: list[list[MemberWrite]] = []
        size = 0
        for row in sorted(rows):
            part = rows[row]
            n = sum(len(w[2]) for w in part)
            if pieces and size + n <= limit:
                pieces[-1] += part
                size += n
            else:
                pieces.append(list(part))
                size = n
        return pieces

    def _enter(self) -> None:
        if self._inflight == 0:
            self._idle = trio.Event()
        self._inflight += 1

    def _leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    @property
    def inflight(self) -> int:
        """Updates let through whose member writes have not finished."""
        return self._inflight

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Hold new updates back and wait for those under way; let them go on when leaving."""
        while self._gate is not None:  # one switch at a time
            await self._gate.wait()
        gate = self._gate = trio.Event()
        try:
            await self._idle.wait()
            yield
        finally:
            self._gate = None
            gate.set()

    # --- flushes --------------------------------------------------------------------------

    def before_flush(self) -> tuple[Any, Any]:
        """The backend's mark, with the backend."""
        backend = self.backend
        return backend, backend.before_flush() if backend is not None else None

    async def after_flush(self, mark: tuple[Any, Any]) -> None:
        """The backend's lazy checkpoint or bit clearing; a journal that fails here is switched off."""
        backend, inner = mark
        if backend is None or backend is not self.backend:
            return  # a flush across a switch: the old backend has nothing more to do
        try:
            await backend.after_flush(inner)
        except JournalError as e:
            # The members were flushed all the same; only the journal's checkpoint failed.
            if getattr(backend, "broken", None) is None or self.on_failure is None:
                raise
            if self._gate is None:
                await self.on_failure(backend, e)


class _Split(list):
    """The tickets of an update logged as several records."""
