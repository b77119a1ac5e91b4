"""`vstore move`: migrate a healthy member to a new device while the pool stays in use (like pvmove).

Pre-copy: a watcher on the layout's member writes (``RaidLayout.write_watch``)
marks the regions of the member that foreground updates change, after each
update has reached the member. Round 0 copies the whole member; each further
round copies what was marked meanwhile, until little is left. Then a short
pause: new updates wait, those in flight finish, the last marked regions are
copied, the new device gets the member's superblock (a new member UUID, the same
index) and takes the member's place in the layout, the metadata is committed,
and updates resume. The old device is released only then: its superblock is
wiped and it is closed once the reads still in flight on it have finished.

Redundancy is never reduced: the old member serves reads and takes writes until
the switch. Levels without redundancy (linear, raid0) move the same way.

A move is checkpointed and resumable like a rebuild. At its start the new device
gets a superblock marking it as the pool's pending move target (index
``MOVE_INDEX``: ``vstore create`` refuses it, as it refuses a spare, unless
forced), the pool record keeps its paths (with any secrets) under ``"move"``, and
the metadata (``meta["operation"]``) keeps the move: member, target (redacted),
the round-0 cursor (regions below it were copied and flushed to the target) and
the regions that may differ between the two devices (``dirty``). That set is
kept on record ahead of the writes: a write to a region below the recorded
cursor waits until its region is on record (once per region and move), and a
checkpoint records every region marked below its new cursor. So after any
restart, clean or not — with a journal replay or a resync of the old member in
between — every region below the cursor that is not on record holds the same
bytes on both devices. While the move is interrupted, the watcher stays on the
member (from the pool's open, ``track_interrupted``), so writes go on being
recorded. Resuming (``vstore resume``, or the mount by itself) reopens the target,
copies from the cursor, then copies the recorded regions again in the next rounds.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import trio

from vstore.consistency.metadata import (
    BITMAP_OFFSET,
    DATA_OFFSET,
    Superblock,
    scan_member,
    write_superblock,
)
from vstore.errors import ConfigError, NotFoundError, VstoreError
from vstore.ops.join import MOVE_INDEX, check_index, open_new_member
from vstore.ops.toolkit import Operation, PoolView, Progress, RateLimiter, speed_of, sweep
from vstore.sizes import format_size
from vstore.stack.checksum import ChecksumDevice
from vstore.stack.device import BlockDevice, Buffer, FilterDevice, read_into, write_from
from vstore.stack.members import open_member
from vstore.stack.offset import OffsetDevice
from vstore.stack.volume import list_to_runs, runs_to_list
from vstore.uri import MemberURI, split_paths

log = logging.getLogger("vstore.ops.move")

REGION = 1 << 20  # dirty-tracking and copy granularity
MAX_ROUNDS = 8  # pre-copy rounds before the final pause, at most
FINAL_BYTES = 8 << 20  # pause once a round leaves no more than this to copy
WINDOW = 4  # regions copied concurrently

Persist = Callable[[int, set[int]], Awaitable[None]]


class MoveWatch:
    """Marks the regions of one member that updates write; keeps them on record; holds updates while paused.

    ``limit`` is the recorded cursor: a write to a region below it is held until the
    region is in ``recorded`` (the set in the metadata), so a crash never leaves a region
    that differs between the two devices off the record.
    """

    def __init__(self, index: int, region: int | None = None, *, persist: Persist | None = None,
                 cursor: int = 0, recorded: set[int] | None = None) -> None:
        self.index = index
        self.region = region or REGION
        self.dirty: set[int] = set(recorded or ())
        self.inflight = 0
        self.paused = False
        self._resumed = trio.Event()
        self._drained: trio.Event | None = None
        self.writes_seen = 0
        self.persist = persist
        self.limit = cursor
        self.recorded: set[int] = set(recorded or ())
        self._requested: set[int] = set()
        self._active: Counter[int] = Counter()  # regions of updates under way
        self._record_lock = trio.Lock()

    def _regions(self, writes: Sequence[tuple[int, int, Any]]) -> set[int]:
        out: set[int] = set()
        for m, off, buf in writes:
            if m == self.index and len(buf):
                out.update(range(off // self.region, (off + len(buf) - 1) // self.region + 1))
        return out

    async def before(self, writes: Sequence[tuple[int, int, Any]]) -> None:
        """An update is about to write its members: wait while paused, and until its regions are on record."""
        regions = self._regions(writes)
        while True:
            while self.paused:
                await self._resumed.wait()
            need = {r for r in regions if r < self.limit} - self.recorded
            if not need or self.persist is None:
                break
            self._requested |= need
            await self.sync()
        self.inflight += 1
        self._active.update(regions)

    def after(self, writes: Sequence[tuple[int, int, Any]]) -> None:
        """An update's member writes finished: mark what it wrote to the moving member."""
        self.inflight -= 1
        regions = self._regions(writes)
        self._active.subtract(regions)
        self._active += Counter()  # drop the zero counts
        if regions:
            self.writes_seen += 1
            self.dirty |= regions
        if self.inflight == 0 and self._drained is not None:
            self._drained.set()

    async def sync(self) -> None:
        """Put the regions asked for (and the cursor) on record, in one metadata commit."""
        async with self._record_lock:
            if self._requested <= self.recorded or self.persist is None:
                return
            want = self.recorded | self._requested
            await self.persist(self.limit, want)
            self.recorded = want

    async def advance(self, cursor: int) -> None:
        """A checkpoint: regions below cursor are copied (and flushed); record cursor and the marks below it."""
        self.limit = max(self.limit, cursor)
        self._requested |= {r for r in self.dirty | set(self._active) if r < self.limit}
        if self.persist is None:
            return
        async with self._record_lock:
            want = self.recorded | self._requested
            await self.persist(self.limit, want)
            self.recorded = want

    def take(self) -> list[int]:
        """The regions marked since the last take (and clear them)."""
        out = sorted(self.dirty)
        self.dirty.clear()
        return out

    async def pause(self) -> None:
        """Hold new updates back and wait for those in flight to finish."""
        self.paused = True
        self._resumed = trio.Event()
        while self.inflight:
            self._drained = trio.Event()
            await self._drained.wait()
        self._drained = None

    def resume(self) -> None:
        """Let updates through again."""
        self.paused = False
        self._resumed.set()


class CountingDevice(FilterDevice):
    """Passes I/O through to a device, counting requests in flight (to close it only when idle)."""

    def __init__(self, dev: BlockDevice) -> None:
        super().__init__(dev)
        self.dev = dev
        self.inflight = 0
        self.idle = trio.Event()
        self.idle.set()

    async def _call(self, fn: Any, *args: Any) -> Any:
        self.inflight += 1
        self.idle = trio.Event() if self.inflight == 1 else self.idle
        try:
            return await fn(*args)
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read through."""
        return await self._call(self.dev.read, offset, length)

    async def write(self, offset: int, data: Buffer) -> None:
        """Write through."""
        await self._call(self.dev.write, offset, data)

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Read into the views through."""
        await self._call(read_into, self.dev, offset, views)

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Write the views through."""
        await self._call(write_from, self.dev, offset, views)

    async def flush(self) -> None:
        """Flush through."""
        await self._call(self.dev.flush)

    async def discard(self, offset: int, length: int) -> None:
        """Discard through."""
        await self._call(self.dev.discard, offset, length)

    async def aclose(self) -> None:
        """Close the device below."""
        await self.dev.aclose()


def _put_window(layout: Any, index: int, cks: ChecksumDevice | None, window: BlockDevice) -> None:
    """Put a window in member index's place: under its ChecksumDevice when it has one."""
    if cks is not None:
        cks.inner = window
    else:
        layout.swap_member(index, window)


def _area_regions(cks: ChecksumDevice | None) -> set[int]:
    """The copy regions holding a checksummed member's checksum area (none without checksums)."""
    if cks is None:
        return set()
    return set(range(cks.area_offset // REGION, -(-(cks.area_offset + cks.area_bytes) // REGION)))


async def _copy_region(src: BlockDevice, dst: BlockDevice, region: int, size: int) -> int:
    off = region * REGION
    n = min(REGION, size - off)
    if n <= 0:
        return 0
    await dst.write(off, await src.read(off, n))
    return n


def interrupted(pool: PoolView) -> dict[str, Any] | None:
    """The recorded move of the metadata when none runs now (to resume), else None."""
    rec = pool.meta.get("operation")
    cur = pool.lifecycle.current
    if not rec or rec.get("kind") != "move" or (cur is not None and cur.kind == "move"):
        return None
    return dict(rec)


def _regions_of(pool: PoolView, index: int) -> int:
    return -(-pool.members[index].data_size // REGION)


def _watch_for(pool: PoolView, index: int) -> MoveWatch:
    """The watcher of member index's move: the one on the layout, or a new one from the record."""
    layout = pool.layout
    watch = layout.write_watch
    if isinstance(watch, MoveWatch) and watch.index == index:
        return watch
    if watch is not None:
        raise ConfigError(f"pool {pool.name!r} is already moving a member")
    rec = pool.meta.get("operation") or {}
    cursor, recorded = 0, set()
    if rec.get("kind") == "move" and rec.get("member") == index:
        cursor, recorded = int(rec.get("cursor", 0)), set(runs_to_list(rec.get("dirty") or []))

    async def persist(cursor: int, regions: set[int]) -> None:
        current = pool.meta.get("operation") or {}
        if current.get("kind") != "move" or current.get("member") != index:
            return  # the move is over (switched or given up): nothing to record
        pool.meta["operation"] = {**current, "cursor": cursor, "dirty": list_to_runs(sorted(regions))}
        await pool.commit()

    watch = MoveWatch(index, persist=persist, cursor=cursor, recorded=recorded)
    layout.write_watch = watch
    return watch


def track_interrupted(pool: PoolView) -> None:
    """At open: an interrupted move's member goes on having its writes recorded until it resumes."""
    rec = interrupted(pool)
    if rec is None or pool.read_only or pool.layout is None:
        return
    index = int(rec["member"])
    if not 0 <= index < len(pool.members) or pool.members[index].state != "active":
        return  # resuming gives it up
    _watch_for(pool, index)


async def give_up(pool: PoolView, index: int, why: str) -> None:
    """Forget the recorded move (the old member stays); wipe the target's pending-move superblock."""
    layout = pool.layout
    if layout is not None and isinstance(layout.write_watch, MoveWatch):
        layout.write_watch = None
    rec = pool.meta.get("operation") or {}
    if rec.get("kind") == "move":
        pool.meta["operation"] = None
        try:
            await pool.commit()
        except VstoreError as e:
            log.warning("pool %s: recording the end of the move: %s", pool.name, e)
            return
        texts = pool.record.pop("move", None)
        pool.home.write_pool(pool.name, pool.record)
        if texts:
            try:
                dev = await open_member(split_paths(",".join(texts)), None)
                try:
                    sb = (await scan_member(dev)).superblock
                    if sb is not None and sb.index == MOVE_INDEX and sb.member_uuid == rec.get("uuid"):
                        await dev.write(0, bytes(4096))
                        await dev.flush()
                finally:
                    await dev.aclose()
            except VstoreError as e:
                log.warning("pool %s: wiping the target of the given-up move: %s", pool.name, e)
    log.error("pool %s: the move of member %d is given up: %s", pool.name, index, why)


async def _begin(pool: PoolView, index: int, uri: str, size: int | None, force: bool
                 ) -> tuple[list[MemberURI], BlockDevice, str]:
    """Open the new device, mark it as the pending target, put the move on record."""
    m = pool.members[index]
    paths, dev = await open_new_member(pool, uri, size=size, force=force, need=m.data_size)
    new_uuid = str(uuid.uuid4())
    try:
        sb = Superblock(pool.meta["pool_uuid"], new_uuid, MOVE_INDEX, MOVE_INDEX + 1, pool.level,
                        pool.meta["chunk"], DATA_OFFSET, m.data_size, 0)
        await write_superblock(dev, sb)
        await dev.flush()
        pool.meta["operation"] = {"kind": "move", "member": index, "uuid": new_uuid,
                                  "uri": ",".join(p.redacted() for p in paths), "cursor": 0,
                                  "regions": _regions_of(pool, index), "dirty": [],
                                  "started": int(time.time())}
        pool.record["move"] = [p.text for p in paths]
        await pool.commit()
        pool.home.write_pool(pool.name, pool.record)
    except BaseException:
        with trio.CancelScope(shield=True):
            await dev.aclose()
        raise
    return paths, dev, new_uuid


async def _reopen_target(pool: PoolView, index: int, rec: dict[str, Any]
                         ) -> tuple[list[MemberURI], BlockDevice, str]:
    """Open the recorded target of an interrupted move, checking it is the device the move began."""
    texts = pool.record.get("move") or str(rec.get("uri", "")).split(",")
    paths = split_paths(",".join(texts))
    dev = await open_member(paths, None)
    try:
        m = pool.members[index]
        sb = (await scan_member(dev)).superblock
        if sb is None or sb.pool_uuid != pool.meta["pool_uuid"] or sb.member_uuid != rec.get("uuid"):
            raise ConfigError(f"{paths[0].redacted()} no longer holds this move's superblock")
        if dev.size < DATA_OFFSET + m.data_size:
            raise ConfigError(f"{paths[0].redacted()} is too small now ({format_size(dev.size)})")
    except BaseException:
        with trio.CancelScope(shield=True):
            await dev.aclose()
        raise
    return paths, dev, str(rec["uuid"])


async def move_member(pool: PoolView, op: Operation, index: int, uri: str | None, *,
                      size: int | None = None, force: bool = False,
                      speed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy healthy member index to uri (None: resume the recorded move) in pre-copy rounds; switch."""
    check_index(pool, index)
    layout = pool.layout
    m = pool.members[index]
    resuming = uri is None
    if resuming:
        rec = pool.meta.get("operation") or {}
        if rec.get("kind") != "move" or rec.get("member") != index:
            raise NotFoundError(f"pool {pool.name!r} has no interrupted move of member {index}")
        if m.state != "active" or layout is None or index in layout.failed:
            await give_up(pool, index, f"member {index} is {m.state}")
            raise ConfigError(f"member {index} of pool {pool.name!r} is {m.state}: its move is given "
                              "up (use vstore replace to rebuild it)")
        # Rows still dirty from a crash are resynced first: the copy reads the old member.
        await pool.consistency.wait_resynced()
        try:
            paths, dev, new_uuid = await _reopen_target(pool, index, rec)
        except VstoreError as e:
            await give_up(pool, index, str(e))
            raise
    else:
        if m.state != "active" or layout is None or index in layout.failed:
            raise ConfigError(f"member {index} of pool {pool.name!r} is {m.state}: only a healthy member "
                              "can be moved (use vstore replace to rebuild a failed one)")
        if layout.write_watch is not None or interrupted(pool) is not None:
            raise ConfigError(f"pool {pool.name!r} is already moving a member"
                              + (": resume it first (vstore resume)" if interrupted(pool) else ""))
        paths, dev, new_uuid = await _begin(pool, index, uri, size, force)
    watch = _watch_for(pool, index)
    rec = pool.meta["operation"]
    start = min(int(rec.get("cursor", 0)), _regions_of(pool, index))
    size_bytes = m.data_size
    new_data = OffsetDevice(dev, DATA_OFFSET, size_bytes)
    # With block checksums the layout's member stays the same ChecksumDevice (its entry cache
    # holds for the copy too): the move swaps the window under it, and copies the raw window,
    # checksum area included.
    cks = layout.members[index] if isinstance(layout.members[index], ChecksumDevice) else None
    old_data = CountingDevice(cks.inner if cks is not None else layout.members[index])
    _put_window(layout, index, cks, old_data)
    switched = False
    t0 = time.monotonic()
    rounds: list[int] = []
    op.detail.update({"member": index, "uri": ",".join(p.redacted() for p in paths), "round": 0})
    if resuming:
        op.detail["resumed_at_region"] = start
    lo, hi = speed_of(speed)
    limiter = RateLimiter(layout, lo, hi)
    total = size_bytes
    op.base = start * REGION
    op.progress(op.base, total)

    async def copy(r: int) -> None:
        await _copy_region(old_data, new_data, r, size_bytes)

    async def checkpoint(cursor: int) -> None:
        await new_data.flush()  # what is below the cursor is on the new device for good
        await watch.advance(cursor)

    try:
        todo = list(range(start, _regions_of(pool, index)))
        for rnd in range(MAX_ROUNDS):
            op.detail["round"] = rnd
            rounds.append(len(todo))
            total += 0 if rnd == 0 else len(todo) * REGION
            op.progress(op.done, total)
            await sweep(todo, copy, unit_bytes=REGION, op=op, limiter=limiter,
                        checkpoint=checkpoint if rnd == 0 else _noop, window=WINDOW)
            if rnd == 0:
                await checkpoint(_regions_of(pool, index))  # round 0 done: every write is recorded now
            todo = watch.take()
            if len(todo) * REGION <= FINAL_BYTES:
                break
        # The final pause: nothing writes the member while the rest is copied and it switches.
        paused_at = time.monotonic()
        await watch.pause()
        try:
            # What the last round left, and what was written since (and the checksum area,
            # whose writes the watch does not see: small, copied whole while nothing writes).
            todo = sorted(set(todo) | set(watch.take()) | _area_regions(cks))
            rounds.append(len(todo))
            for r in todo:
                await copy(r)
            # The write-intent bitmap lives between the metadata and the data: take it along.
            await dev.write(BITMAP_OFFSET, await m.dev.read(BITMAP_OFFSET, DATA_OFFSET - BITMAP_OFFSET))
            sb = Superblock(pool.meta["pool_uuid"], new_uuid, index, len(pool.members), pool.level,
                            pool.meta["chunk"], DATA_OFFSET, size_bytes, int(pool.meta["generation"]))
            await write_superblock(dev, sb)
            await dev.flush()
            old_dev = m.dev
            _put_window(layout, index, cks, new_data)
            m.uuid, m.paths, m.dev, m.data_dev, m.scan = (new_uuid, paths, dev,
                                                          cks if cks is not None else new_data, None)
            switched = True
            pool.meta["operation"] = None
            await pool.commit()
            pool.record["members"][index] = [p.text for p in paths]
            pool.record.pop("move", None)
            pool.home.write_pool(pool.name, pool.record)
        finally:
            pause = time.monotonic() - paused_at
            if switched and layout.write_watch is watch:
                layout.write_watch = None
            watch.resume()
    except BaseException as exc:
        if not switched:
            _put_window(layout, index, cks, old_data.dev)
            with trio.CancelScope(shield=True):
                await dev.aclose()
                if not _stopped(exc):
                    # The target failed, or the member, or something else: the old member
                    # stays. (Stopped or shut down, the move stays on record and resumes;
                    # its watcher stays on the member meanwhile.)
                    await give_up(pool, index, str(exc) or type(exc).__name__)
        raise
    # Release the old member: no new request reaches it; wait for those in flight, then wipe.
    with trio.move_on_after(30):
        await old_data.idle.wait()
    try:
        await old_dev.write(0, bytes(4096))
        await old_dev.flush()
        await old_dev.aclose()
    except VstoreError as e:
        log.warning("releasing the old member %d: %s", index, e)
    seconds = time.monotonic() - t0
    log.info("pool %s: member %d moved to %s in %.1f s (rounds %s, pause %.3f s)", pool.name, index,
             m.uri_text, seconds, rounds, pause)
    return {"kind": "move", "member": index, "uri": m.uri_text, "bytes": size_bytes,
            "copied": op.done - op.base, "rounds": rounds, "pause_seconds": round(pause, 4),
            "seconds": round(seconds, 3), "size": format_size(size_bytes),
            "resumed_at_region": start if resuming else 0}


def _stopped(exc: BaseException) -> bool:
    """Whether exc is a cancellation alone (a stop, a shutdown), possibly grouped by nurseries."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return False


async def _noop(_: int) -> None:
    return None


async def move(pool: PoolView, index: int, uri: str, *, size: int | None = None, force: bool = False,
               speed: dict[str, Any] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Move member index to uri in this task."""
    return await pool.lifecycle.run(
        "move", lambda op: move_member(pool, op, index, uri, size=size, force=force, speed=speed),
        progress, member=index)


async def start_move(pool: PoolView, index: int, uri: str, *, size: int | None = None,
                     force: bool = False, speed: dict[str, Any] | None = None) -> Operation:
    """Move member index to uri in the background (the mount process)."""
    check_index(pool, index)
    m = pool.members[index]
    if m.state != "active":
        raise ConfigError(f"member {index} of pool {pool.name!r} is {m.state}: only a healthy member "
                          "can be moved (use vstore replace to rebuild a failed one)")
    if interrupted(pool) is not None:
        raise ConfigError(f"pool {pool.name!r} has an interrupted move of member "
                          f"{pool.meta['operation']['member']}: resume it first (vstore resume)")
    return pool.lifecycle.start(
        "move", lambda op: move_member(pool, op, index, uri, size=size, force=force, speed=speed),
        member=index)


async def resume(pool: PoolView, *, speed: dict[str, Any] | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Resume an interrupted move in this task."""
    rec = interrupted(pool)
    if rec is None:
        raise NotFoundError(f"pool {pool.name!r} has no interrupted move")
    index = int(rec["member"])
    return await pool.lifecycle.run("move", lambda op: move_member(pool, op, index, None, speed=speed),
                                    progress, member=index)


def start_resume(pool: PoolView, *, speed: dict[str, Any] | None = None) -> Operation:
    """Resume an interrupted move in the background."""
    rec = interrupted(pool)
    if rec is None:
        raise NotFoundError(f"pool {pool.name!r} has no interrupted move")
    index = int(rec["member"])
    return pool.lifecycle.start("move", lambda op: move_member(pool, op, index, None, speed=speed),
                                member=index)
