"""Long member-lifecycle operations of a pool: one at a time, paced, checkpointed, visible in status.

A pool holds one ``Lifecycle``. It runs the operations of ``vstore.ops.rebuild``
(rebuild onto a replacement or a hot spare), ``vstore.ops.move`` (online migration of
a healthy member) and ``vstore.ops.scrub`` (verify and repair), one at a time:
``start`` runs one in the background (in the mount process, which owns the pool
for as long as it is mounted), ``run`` runs one to completion in the caller (a
command that opened the pool itself). Progress is in ``status()`` (the
``operation`` entry of ``vstore status`` and of the mount's status file), and the
operation's cursor is checkpointed in the pool metadata so that it resumes after
a restart.

Pacing follows md's sync_speed_min/max: never faster than ``speed_max``; while
foreground I/O is seen, no faster than ``speed_min``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from vstore.errors import ConfigError, PoolBusyError, VstoreError
from vstore.sizes import format_size

if TYPE_CHECKING:
    from vstore.pool.pool import Pool

log = logging.getLogger("vstore.ops.lifecycle")

Progress = Callable[[int, int], None]

DEFAULT_SPEED_MIN = 16 << 20  # bytes/s kept up even while foreground I/O runs
DEFAULT_SPEED_MAX = 0  # 0: unlimited when the pool is otherwise idle
CHECKPOINT_BYTES = 64 << 20  # the cursor is committed to the metadata this often
CHECKPOINT_SECONDS = 10.0  # ... or this often, whichever comes first


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
        return int(getattr(self.layout, "io_count", 0))

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


class Lifecycle:
    """A pool's lifecycle operations: at most one at a time, in the background or in the caller."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        # True in the mount process: failures take spares and interrupted operations resume
        # in the background there; a command that opened the pool runs them itself.
        self.resident = False
        self.nursery: trio.Nursery | None = None
        self.current: Operation | None = None
        self.last: dict[str, Any] | None = None
        self.pending_spares: list[int] = []

    # --- running operations ----------------------------------------------------------------

    def check_idle(self) -> None:
        """Raise PoolBusyError when an operation is running."""
        if self.current is not None and self.current.state == "running":
            cur = self.current
            raise PoolBusyError(f"pool {self.pool.name!r} is busy: {cur.kind} running "
                                f"({cur.status()['percent']}%); wait for it or stop it first")

    def _claim(self, kind: str, total: int, **detail: Any) -> Operation:
        self.check_idle()
        op = Operation(kind, total, **detail)
        self.current = op
        return op

    async def run(self, kind: str, fn: Callable[[Operation], Awaitable[dict[str, Any]]],
                  progress: Progress | None = None, **detail: Any) -> dict[str, Any]:
        """Run an operation to completion in this task; its result, or its error raised."""
        op = self._claim(kind, 0, **detail)
        return await self._execute(op, fn, progress)

    async def _execute(self, op: Operation, fn: Callable[[Operation], Awaitable[dict[str, Any]]],
                       progress: Progress | None) -> dict[str, Any]:
        if progress is not None:
            inner = op.progress

            def both(done: int, total: int | None = None) -> None:
                inner(done, total)
                progress(done, op.total)

            op.progress = both  # type: ignore[method-assign]
        try:
            with trio.CancelScope() as scope:
                op.cancel_scope = scope
                result = await fn(op)
                op.state = "done"
                op.result = result
                self.last = {**result, **op.status()}
                return result
            op.state = "stopped"
            self.last = op.status()
            raise VstoreError(f"{op.kind} stopped")
        except trio.Cancelled:
            op.state = "stopped"
            self.last = op.status()
            raise
        except BaseException as e:
            op.state, op.error = "failed", str(e) if isinstance(e, VstoreError) else repr(e)
            self.last = op.status()
            raise
        finally:
            op.finished.set()
            if self.current is op:
                self.current = None

    def start(self, kind: str, fn: Callable[[Operation], Awaitable[dict[str, Any]]],
              **detail: Any) -> Operation:
        """Start an operation in the background (the mount process's nursery)."""
        if self.nursery is None:
            raise ConfigError("internal: no background nursery to run an operation in")
        op = self._claim(kind, 0, **detail)

        async def task() -> None:
            try:
                await self._execute(op, fn, None)
            except VstoreError as e:
                log.error("pool %s: %s failed: %s", self.pool.name, kind, e)
            except Exception:  # a bug must not take the mount down
                log.exception("pool %s: %s failed", self.pool.name, kind)
            # A member that failed meanwhile takes a spare now.
            if self.pending_spares and self.pool.meta.get("spares") and self.current is None:
                self.member_failed(self.pending_spares[0])

        self.nursery.start_soon(task)
        return op

    async def stop(self) -> bool:
        """Stop the running operation and wait until it has (cursor checkpointed); False when none runs."""
        op = self.current
        if op is None or op.cancel_scope is None:
            return False
        op.cancel_scope.cancel()
        # Return once it has stopped, so a status right after shows it interrupted.
        with trio.move_on_after(60):
            await op.finished.wait()
        return True

    async def run_background(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """Own the nursery that background operations run in; resume interrupted ones when resident."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                task_status.started()
                if self.resident and not self.pool.read_only:
                    self._resume_in_background()
                await trio.sleep_forever()
            finally:
                self.nursery = None

    def _resume_in_background(self) -> None:
        from vstore.ops import rebuild

        try:
            if rebuild.interrupted(self.pool) is not None:
                rebuild.start_resume(self.pool)
            elif self.pending_spares or rebuild.failed_members(self.pool):
                rebuild.start_spare_takeover(self.pool)
        except VstoreError as e:
            log.error("pool %s: cannot resume: %s", self.pool.name, e)

    # --- failures and spares -----------------------------------------------------------------

    def member_failed(self, index: int) -> None:
        """A member failed: a spare takes its place (in the background when resident, else at settle)."""
        if index not in self.pending_spares:
            self.pending_spares.append(index)
        if self.resident and self.nursery is not None and not self.pool.read_only:
            from vstore.ops import rebuild

            if self.pool.meta.get("spares") and (self.current is None):
                try:
                    rebuild.start_spare_takeover(self.pool)
                except VstoreError as e:
                    log.error("pool %s: spare takeover: %s", self.pool.name, e)

    async def settle(self, progress_factory: Callable[[str], Any] | None = None) -> list[dict[str, Any]]:
        """Before a command closes the pool: rebuild failed members onto spares, to completion."""
        from vstore.ops import rebuild

        if self.pool.read_only or not self.pool.meta.get("spares"):
            return []
        return await rebuild.take_spares(self.pool, progress_factory)

    # --- status and commands -----------------------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        """The `operation` entry of status: the running one, else an interrupted one, else the last."""
        if self.current is not None:
            return self.current.status()
        from vstore.ops import rebuild

        stored = rebuild.interrupted(self.pool)
        if stored is not None:
            return {**stored, "state": "interrupted"}
        scrub = self.pool.meta.get("scrub")
        if scrub and scrub.get("state") == "running":
            return {"kind": "scrub", "state": "interrupted", "cursor": scrub.get("cursor")}
        if self.last is not None:
            return {k: v for k, v in self.last.items() if k not in ("mismatches", "found")}
        return None


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
    resumed sweep never skips one; it is called every CHECKPOINT_BYTES or
    CHECKPOINT_SECONDS and once at the end.
    """
    pending = list(units)
    finished: set[int] = set()
    sem = trio.Semaphore(window)
    done = op.done
    total = op.total
    since, last = 0, time.monotonic()
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
            if since >= CHECKPOINT_BYTES or time.monotonic() - last > CHECKPOINT_SECONDS:
                since, last = 0, time.monotonic()
                await checkpoint(cursor())
    await checkpoint(cursor())
