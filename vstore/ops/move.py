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
the switch. Levels without redundancy (linear, raid0) move the same way. A move
interrupted by a restart starts again (the old member stays in use meanwhile).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import trio

from vstore.consistency.metadata import BITMAP_OFFSET, DATA_OFFSET, Superblock, write_superblock
from vstore.errors import ConfigError, VstoreError
from vstore.ops.join import check_index, open_new_member
from vstore.ops.toolkit import Operation, PoolView, Progress, RateLimiter, speed_of, sweep
from vstore.sizes import format_size
from vstore.stack.device import BlockDevice, Buffer, FilterDevice, read_into, write_from
from vstore.stack.offset import OffsetDevice

log = logging.getLogger("vstore.ops.move")

REGION = 1 << 20  # dirty-tracking and copy granularity
MAX_ROUNDS = 8  # pre-copy rounds before the final pause, at most
FINAL_BYTES = 8 << 20  # pause once a round leaves no more than this to copy
WINDOW = 4  # regions copied concurrently


class MoveWatch:
    """Marks the regions of one member that updates wrote; holds updates back while paused."""

    def __init__(self, index: int, region: int = REGION) -> None:
        self.index = index
        self.region = region
        self.dirty: set[int] = set()
        self.inflight = 0
        self.paused = False
        self._resumed = trio.Event()
        self._drained: trio.Event | None = None
        self.writes_seen = 0

    async def before(self, writes: Sequence[tuple[int, int, Any]]) -> None:
        """An update is about to write its members: wait while paused."""
        while self.paused:
            await self._resumed.wait()
        self.inflight += 1

    def after(self, writes: Sequence[tuple[int, int, Any]]) -> None:
        """An update's member writes finished: mark what it wrote to the moving member."""
        self.inflight -= 1
        for m, off, buf in writes:
            if m == self.index and len(buf):
                self.writes_seen += 1
                self.dirty.update(range(off // self.region, (off + len(buf) - 1) // self.region + 1))
        if self.inflight == 0 and self._drained is not None:
            self._drained.set()

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


async def _copy_region(src: BlockDevice, dst: BlockDevice, region: int, size: int) -> int:
    off = region * REGION
    n = min(REGION, size - off)
    if n <= 0:
        return 0
    await dst.write(off, await src.read(off, n))
    return n


async def move_member(pool: PoolView, op: Operation, index: int, uri: str, *, size: int | None,
                      force: bool, speed: dict[str, Any] | None) -> dict[str, Any]:
    """Copy healthy member index to uri in pre-copy rounds, pause briefly, switch, release the old."""
    check_index(pool, index)
    layout = pool.layout
    m = pool.members[index]
    if m.state != "active" or layout is None or index in layout.failed:
        raise ConfigError(f"member {index} of pool {pool.name!r} is {m.state}: only a healthy member "
                          "can be moved (use vstore replace to rebuild a failed one)")
    if layout.write_watch is not None:
        raise ConfigError(f"pool {pool.name!r} is already moving a member")
    paths, dev = await open_new_member(pool, uri, size=size, force=force, need=m.data_size)
    size_bytes = m.data_size
    new_data = OffsetDevice(dev, DATA_OFFSET, size_bytes)
    old_data = CountingDevice(layout.members[index])
    layout.swap_member(index, old_data)
    watch = MoveWatch(index)
    layout.write_watch = watch
    switched = False
    t0 = time.monotonic()
    rounds: list[int] = []
    op.detail.update({"member": index, "uri": ",".join(p.redacted() for p in paths), "round": 0})
    lo, hi = speed_of(speed)
    limiter = RateLimiter(layout, lo, hi)
    total = size_bytes
    op.progress(0, total)

    async def copy(r: int) -> None:
        await _copy_region(old_data, new_data, r, size_bytes)

    try:
        todo = list(range(-(-size_bytes // REGION)))
        for rnd in range(MAX_ROUNDS):
            op.detail["round"] = rnd
            rounds.append(len(todo))
            total += 0 if rnd == 0 else len(todo) * REGION
            op.progress(op.done, total)
            await sweep(todo, copy, unit_bytes=REGION, op=op, limiter=limiter, checkpoint=_noop,
                        window=WINDOW)
            todo = watch.take()
            if len(todo) * REGION <= FINAL_BYTES:
                break
        # The final pause: nothing writes the member while the rest is copied and it switches.
        paused_at = time.monotonic()
        await watch.pause()
        try:
            # What the last round left, and what was written since.
            todo = sorted(set(todo) | set(watch.take()))
            rounds.append(len(todo))
            for r in todo:
                await copy(r)
            # The write-intent bitmap lives between the metadata and the data: take it along.
            await dev.write(BITMAP_OFFSET, await m.dev.read(BITMAP_OFFSET, DATA_OFFSET - BITMAP_OFFSET))
            new_uuid = str(uuid.uuid4())
            sb = Superblock(pool.meta["pool_uuid"], new_uuid, index, len(pool.members), pool.level,
                            pool.meta["chunk"], DATA_OFFSET, size_bytes, int(pool.meta["generation"]))
            await write_superblock(dev, sb)
            await dev.flush()
            old_dev = m.dev
            layout.swap_member(index, new_data)
            m.uuid, m.paths, m.dev, m.data_dev, m.scan = new_uuid, paths, dev, new_data, None
            switched = True
            await pool.commit()
            pool.record["members"][index] = [p.text for p in paths]
            pool.home.write_pool(pool.name, pool.record)
        finally:
            pause = time.monotonic() - paused_at
            layout.write_watch = None
            watch.resume()
    except BaseException:
        if not switched:
            layout.write_watch = None
            layout.swap_member(index, old_data.dev)
            with trio.CancelScope(shield=True):
                await dev.aclose()
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
            "copied": op.done, "rounds": rounds, "pause_seconds": round(pause, 4),
            "seconds": round(seconds, 3), "size": format_size(size_bytes)}


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
    return pool.lifecycle.start(
        "move", lambda op: move_member(pool, op, index, uri, size=size, force=force, speed=speed),
        member=index)
