"""What the long operations (rebuild, move, scrub) share: the pool as they see it, pacing, progress.

``PoolView`` names exactly what the operations use of a pool (``vstore.pool.pool.Pool``
has it all; the operations never import it, as ``vstore.ops`` sits below
``vstore.pool``). ``Operation`` is one running operation as ``vstore status``
shows it; ``sweep`` runs work over ascending units, paced by a ``RateLimiter``
and checkpointed; ``speed_of`` reads a request's speed limits.

Pacing follows md's sync_speed_min/max: never faster than ``speed_max``; while
foreground I/O is seen, no faster than ``speed_min``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import trio

from vstore.consistency.metadata import MemberScan
from vstore.sizes import format_size
from vstore.stack.device import BlockDevice
from vstore.uri import MemberURI

Progress = Callable[[int, int], None]

DEFAULT_SPEED_MIN = 16 << 20  # bytes/s kept up even while foreground I/O runs
DEFAULT_SPEED_MAX = 0  # 0: unlimited when the pool is otherwise idle
CHECKPOINT_BYTES = 64 << 20  # the cursor is committed to the metadata this often
CHECKPOINT_SECONDS = 10.0  # ... or this often, whichever comes first
CHECKPOINT_PARTS = 16  # ... and at least this many times over the whole operation


# --------------------------------------------------------------------------- the pool, as ops see it


class MemberView(Protocol):
    """One member of an open pool (``vstore.pool.pool.Member``)."""

    index: int
    uuid: str
    paths: list[MemberURI]
    state: str  # active | rebuilding | failed | missing | bad | stale
    data_size: int
    dev: BlockDevice | None
    data_dev: BlockDevice | None
    error: str | None
    scan: MemberScan | None

    @property
    def uri_text(self) -> str:
        """All paths, redacted, comma-separated."""
        ...


class HomeView(Protocol):
    """The config directory: where the pool record (member URIs with secrets) is kept."""

    def write_pool(self, name: str, record: dict[str, Any]) -> Any:
        """Store the pool record."""
        ...


class Runner(Protocol):
    """The pool's operation runner (``vstore.ops.lifecycle.Lifecycle``), as the operations use it."""

    current: Operation | None
    resident: bool
    pending_spares: list[int]

    def check_idle(self) -> None:
        """Raise PoolBusyError when an operation is running."""
        ...

    async def run(self, kind: str, fn: Callable[[Operation], Awaitable[dict[str, Any]]],
                  progress: Progress | None = None, **detail: Any) -> dict[str, Any]:
        """Run an operation to completion in this task."""
        ...

    def start(self, kind: str, fn: Callable[[Operation], Awaitable[dict[str, Any]]],
              **detail: Any) -> Operation:
        """Start an operation in the background."""
        ...


class ConsistencyView(Protocol):
    """The pool's crash-consistency machinery (``vstore.pool.consistency.Consistency``), as ops use it."""

    bitmap: Any  # the write-intent bitmap, or None (a journal, or a level without redundancy)

    async def wait_resynced(self) -> None:
        """Return once no resync runs (rows may be computed from the members again)."""
        ...


class PoolView(Protocol):
    """What rebuild, move, scrub and the lifecycle use of a pool (``vstore.pool.pool.Pool``)."""

    name: str
    meta: dict[str, Any]  # the pool metadata: "operation", "scrub", "spares", "zeroed", ...
    record: dict[str, Any]  # the pool record (member and spare URIs, with secrets)
    layout: Any  # a RaidLayout (vstore.raid.base), None once too many members failed
    data_dev: BlockDevice | None
    read_only: bool
    recovered_from: dict[str, Any] | None
    home: HomeView
    lifecycle: Runner
    consistency: ConsistencyView

    @property
    def members(self) -> Sequence[MemberView]:
        """The members, by index."""
        ...

    @property
    def level(self) -> str:
        """RAID level."""
        ...

    @property
    def state(self) -> str:
        """clean, degraded or failed."""
        ...

    @property
    def extent_size(self) -> int:
        """Bytes per extent."""
        ...

    def used_extents(self) -> set[int]:
        """Extents allocated to some volume."""
        ...

    def degraded_message(self, failed: set[int]) -> str:
        """Why the pool cannot serve data with these members failed."""
        ...

    async def commit(self) -> None:
        """Write a new generation of the metadata to every active member, durably."""
        ...

    def status(self) -> dict[str, Any]:
        """What `vstore status --json` shows."""
        ...


# --------------------------------------------------------------------------- pacing and progress


class RateLimiter:
    """Paces background work: at most speed_max, and at most speed_min while foreground I/O runs."""

    def __init__(self, layout: Any, speed_min: int = DEFAULT_SPEED_MIN,
                 speed_max: int = DEFAULT_SPEED_MAX) -> None:
        self.layout = layout
        self.speed_min = max(0, int(speed_min or 0))
        self.speed_max = max(0, int(speed_max or 0))
        self._t0 = time.monotonic()
        self._bytes = 0
        self._io_seen = self._io()

    def _io(self) -> int:
        return self.layout.io_count if self.layout is not None else 0

    def _busy(self) -> bool:
        io = self._io()
        busy = io != self._io_seen
        self._io_seen = io
        return busy

    async def pace(self, nbytes: int) -> None:
        """Account for nbytes of work about to be done; sleep as long as the limits want."""
        now = time.monotonic()
        if now - self._t0 > 1.0:  # a sliding one-second window
            self._t0, self._bytes = now, 0
        self._bytes += nbytes
        limit = self.speed_max
        if self.speed_min and self._busy() and (not limit or self.speed_min < limit):
            limit = self.speed_min
        if limit:
            ahead = self._bytes / limit - (time.monotonic() - self._t0)
            if ahead > 0:
                await trio.sleep(min(ahead, 1.0))


class Operation:
    """The state of one running operation, as `vstore status` shows it."""

    def __init__(self, kind: str, total: int, **detail: Any) -> None:
        self.kind = kind
        self.total = total
        self.done = 0
        self.detail = detail
        self.state = "running"
        self.error: str | None = None
        self.started = time.time()
        self._t0 = time.monotonic()
        self.base = 0  # bytes already done before this run (a resumed operation)
        self.finished = trio.Event()
        self.result: dict[str, Any] | None = None
        self.cancel_scope: trio.CancelScope | None = None
        self.cursor = 0  # the lowest unit not yet done (what a checkpoint records)

    def progress(self, done: int, total: int | None = None) -> None:
        """Record progress (bytes done of total)."""
        self.done = done
        if total is not None:
            self.total = total

    def status(self) -> dict[str, Any]:
        """The `operation` entry of status."""
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        rate = max(self.done - self.base, 0) / elapsed
        st: dict[str, Any] = {"kind": self.kind, "state": self.state, **self.detail,
                              "done": self.done, "total": self.total,
                              "percent": round(100.0 * self.done / self.total, 1) if self.total else 100.0,
                              "rate": f"{format_size(int(rate))}/s"}
        if self.state == "running" and rate > 0 and self.total > self.done:
            st["eta_seconds"] = int((self.total - self.done) / rate)
        if self.error:
            st["error"] = self.error
        return st


def speed_of(speed: dict[str, Any] | None) -> tuple[int, int]:
    """(speed_min, speed_max) from a request's speed dict (defaults where absent)."""
    speed = speed or {}
    lo = speed.get("min")
    hi = speed.get("max")
    return (DEFAULT_SPEED_MIN if lo is None else int(lo), DEFAULT_SPEED_MAX if hi is None else int(hi))


async def sweep(units: list[int], work: Callable[[int], Awaitable[None]], *, unit_bytes: int,
                op: Operation, limiter: RateLimiter, checkpoint: Callable[[int], Awaitable[None]],
                window: int = 16) -> None:
    """Run work(unit) over ascending units, window at a time, paced; checkpoint the cursor.

    The cursor handed to ``checkpoint`` is the lowest unit not yet finished, so a
    resumed sweep never skips one; it is called every CHECKPOINT_BYTES (or every
    1/CHECKPOINT_PARTS of the operation's total, when that is less) or
    CHECKPOINT_SECONDS, and once at the end.
    """
    pending = list(units)
    finished: set[int] = set()
    sem = trio.Semaphore(window)
    done = op.done
    total = op.total
    since, last = 0, time.monotonic()
    every = CHECKPOINT_BYTES
    if total:
        every = min(every, max(unit_bytes, total // CHECKPOINT_PARTS))
    op.cursor = units[0] if units else 0

    def cursor() -> int:
        return pending[0] if pending else (units[-1] + 1 if units else 0)

    async def one(u: int) -> None:
        nonlocal done
        try:
            await work(u)
        finally:
            sem.release()
        finished.add(u)
        done += unit_bytes
        op.progress(done, total)
        while pending and pending[0] in finished:
            finished.discard(pending.pop(0))
        op.cursor = cursor()

    async with trio.open_nursery() as nursery:
        for u in units:
            await limiter.pace(unit_bytes)
            await sem.acquire()
            nursery.start_soon(one, u)
            since += unit_bytes
            if since >= every or time.monotonic() - last > CHECKPOINT_SECONDS:
                since, last = 0, time.monotonic()
                await checkpoint(cursor())
    await checkpoint(cursor())
