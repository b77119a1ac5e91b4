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

The toolkit the operations share (``Operation``, ``RateLimiter``, ``sweep``, the
``PoolView`` of a pool they work on) is ``vstore.ops.toolkit``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from vstore.errors import ConfigError, NotFoundError, PoolBusyError, VstoreError
from vstore.ops import move, rebuild, reshape
from vstore.ops.toolkit import Operation, PoolView, Progress

log = logging.getLogger("vstore.ops.lifecycle")


class Lifecycle:
    """A pool's lifecycle operations: at most one at a time, in the background or in the caller."""

    def __init__(self, pool: PoolView) -> None:
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
        if self.pool.meta.get("reshape") and kind != "reshape":
            raise ConfigError(f"pool {self.pool.name!r} is being reshaped: let it finish first "
                              "(vstore resume resumes an interrupted one)")
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
        try:
            if reshape.interrupted(self.pool) is not None:
                reshape.start_resume(self.pool)
            elif rebuild.interrupted(self.pool) is not None:
                rebuild.start_resume(self.pool)
            elif self.pending_spares or rebuild.failed_members(self.pool):
                rebuild.start_spare_takeover(self.pool)  # (gives up an interrupted move first)
            elif move.interrupted(self.pool) is not None:
                move.start_resume(self.pool)
        except VstoreError as e:
            log.error("pool %s: cannot resume: %s", self.pool.name, e)

    def reattach(self) -> None:
        """At open for writing: an interrupted move's member has its writes recorded again (vstore.ops.move)."""
        move.track_interrupted(self.pool)

    def interrupted(self) -> dict[str, Any] | None:
        """The recorded rebuild or move that no task runs now (what `vstore resume` resumes), or None."""
        return rebuild.interrupted(self.pool) or move.interrupted(self.pool) or reshape.interrupted(self.pool)

    async def resume(self, speed: dict[str, Any] | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
        """Resume the interrupted rebuild or move in this task."""
        if self.interrupted() is None:
            raise NotFoundError(f"pool {self.pool.name!r} has no interrupted rebuild or move")
        if reshape.interrupted(self.pool) is not None:
            return await reshape.resume(self.pool, speed=speed, progress=progress)
        if move.interrupted(self.pool) is not None and rebuild.interrupted(self.pool) is None:
            return await move.resume(self.pool, speed=speed, progress=progress)
        return await rebuild.resume(self.pool, speed=speed, progress=progress)

    def start_resume(self, speed: dict[str, Any] | None = None) -> Operation:
        """Resume the interrupted rebuild or move in the background."""
        if self.interrupted() is None:
            raise NotFoundError(f"pool {self.pool.name!r} has no interrupted rebuild or move")
        if reshape.interrupted(self.pool) is not None:
            return reshape.start_resume(self.pool, speed=speed)
        if move.interrupted(self.pool) is not None and rebuild.interrupted(self.pool) is None:
            return move.start_resume(self.pool, speed=speed)
        return rebuild.start_resume(self.pool, speed=speed)

    # --- failures and spares -----------------------------------------------------------------

    def member_failed(self, index: int) -> None:
        """A member failed: a spare takes its place (in the background when resident, else at settle)."""
        if index not in self.pending_spares:
            self.pending_spares.append(index)
        if self.resident and self.nursery is not None and not self.pool.read_only:
            if self.pool.meta.get("spares") and (self.current is None):
                try:
                    rebuild.start_spare_takeover(self.pool)
                except VstoreError as e:
                    log.error("pool %s: spare takeover: %s", self.pool.name, e)

    async def settle(self, progress_factory: Callable[[str], Any] | None = None) -> list[dict[str, Any]]:
        """Before a command closes the pool: rebuild failed members onto spares, to completion."""
        if self.pool.read_only or not self.pool.meta.get("spares"):
            return []
        return await rebuild.take_spares(self.pool, progress_factory)

    # --- status and commands -----------------------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        """The `operation` entry of status: the running one, else an interrupted one, else the last."""
        if self.current is not None:
            return self.current.status()
        stored = self.interrupted()
        if stored is not None:
            out = {k: v for k, v in stored.items() if k != "dirty"}
            if stored.get("kind") == "move":  # regions written since they were copied: copied again
                out["regions_to_recopy"] = sum(int(c) for _, c in stored.get("dirty") or [])
            return {**out, "state": "interrupted"}
        scrub = self.pool.meta.get("scrub")
        if scrub and scrub.get("state") == "running":
            return {"kind": "scrub", "state": "interrupted", "cursor": scrub.get("cursor")}
        if self.last is not None:
            return {k: v for k, v in self.last.items() if k not in ("mismatches", "found")}
        return None
