"""Write-intent bitmap and resync: crash consistency for redundant pools without a journal.

As md's bitmap: the data area of every member is cut into regions (``region``
bytes of member space, a whole number of stripe rows); before the first write to
a region its bit is set on every member and flushed, and only then is the region
written. Bits are cleared lazily, once a member flush has made the region's
writes durable and the region has stayed idle for a further flush. After an
unclean shutdown the pool ORs the bitmaps of its members and resyncs every row of
a dirty region (``Resync``): parity recomputed from the data (raid5/raid6), the
first healthy copy written over the others (raid1/raid10). As md, the pool serves
at once and the resync runs in the background: the dirty regions stay marked on
the members (``pinned``) until their rows are resynced and flushed, so a second
crash resyncs them again, and whatever would trust a row's redundancy before the
resync reaches it (a degraded read, a read-modify-write, a rebuild, a scrub, a
mirror read) resyncs that row first (``RaidLayout.sync_rows``).

Where it lives on each member (see ``vstore.consistency.metadata``): ``BITMAP_OFFSET`` (the
64 KiB between metadata slot 1 and the data), a 4 KiB header (magic, pool UUID,
region size, bit count, CRC32C) then the bits, one per region, LSB first.

A resync only restores consistency: it cannot tell which of data and parity was
written last, so it trusts the data. On an array already degraded when it
crashed, a row whose update was interrupted may have lost the content of its
failed member (the RAID "write hole"); only the journal (``vstore.consistency.journal``)
closes that.
"""

from __future__ import annotations

import inspect
import logging
import struct
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import trio

from vstore.consistency.metadata import BITMAP_OFFSET, BITMAP_SIZE
from vstore.crc import crc32c
from vstore.errors import ConfigError, MemberIOError
from vstore.io.aio import run_all
from vstore.stack.device import BlockDevice

log = logging.getLogger("vstore.consistency.bitmap")

MAGIC = b"VSTBITMP"
HEADER_SIZE = 4096
PAGE = 4096
CAPACITY_BITS = (BITMAP_SIZE - HEADER_SIZE) * 8
DEFAULT_REGION = 1 << 20
# Each first write to a region waits for a bit write + flush on every member, so big
# members get big regions (md's internal bitmap uses 64 MiB): about 256 per member,
# between DEFAULT_REGION and MAX_AUTO_REGION unless the bitmap's capacity needs more.
REGIONS_PER_MEMBER = 256
MAX_AUTO_REGION = 64 << 20
RESYNC_PARALLEL = 8

_HDR = struct.Struct("<8sI16sQQ")  # magic, version, pool uuid, region bytes, bit count; then CRC32C

MemberWrite = tuple[int, int, Any]
ActiveDevices = Callable[[], list[tuple[int, BlockDevice]]]
OnError = Callable[[int, BaseException], Any]


def choose_region(data_size: int, chunk: int, minimum: int = DEFAULT_REGION) -> int:
    """Region size for a member's data area: a chunk multiple, about 256 regions, capped."""
    target = 1 << max(0, (data_size // REGIONS_PER_MEMBER - 1).bit_length())
    minimum = max(minimum, min(target, MAX_AUTO_REGION))
    region = max(chunk, -(-minimum // chunk) * chunk)
    while -(-data_size // region) > CAPACITY_BITS:
        region *= 2
    return region


def pack_header(pool_uuid: str, region: int, nbits: int) -> bytes:
    """The bitmap header block."""
    body = _HDR.pack(MAGIC, 1, uuid.UUID(pool_uuid).bytes, region, nbits)
    return (body + struct.pack("<I", crc32c(body))).ljust(HEADER_SIZE, b"\0")


def unpack_header(raw: bytes) -> tuple[str, int, int] | None:
    """(pool uuid, region, bit count) of a valid header, else None."""
    body = bytes(raw[: _HDR.size])
    if len(raw) < _HDR.size + 4 or body[:8] != MAGIC:
        return None
    if struct.unpack_from("<I", raw, _HDR.size)[0] != crc32c(body):
        return None
    _, version, pool_u, region, nbits = _HDR.unpack(body)
    if version != 1 or region <= 0 or nbits > CAPACITY_BITS:
        return None
    return str(uuid.UUID(bytes=pool_u)), region, nbits


class WriteIntentBitmap:
    """The dirty-region bitmap of a parity pool, kept on every active member."""

    logs_parity = False  # only regions are marked: after a crash their parity is recomputed
    max_update_bytes = None  # any update size

    def __init__(self, pool_uuid: str, data_size: int, region: int, active: ActiveDevices,
                 on_error: OnError | None = None) -> None:
        self.pool_uuid = pool_uuid
        self.region = region
        self.nbits = -(-data_size // region)
        self.active = active
        self.on_error = on_error
        self.bits = np.zeros((BITMAP_SIZE - HEADER_SIZE), dtype=np.uint8)
        self._durable: set[int] = set()  # regions whose bit is set on the members
        self.pinned: set[int] = set()  # dirty regions awaiting their resync: never cleared meanwhile
        self._inflight: dict[int, int] = {}
        self._done_epoch: dict[int, int] = {}
        self._epoch = 0
        self._lock = trio.Lock()
        self.stats = {"sets": 0, "clears": 0}
        # False while a member has failed but the pool metadata does not say so yet: a
        # crash then brings it back stale, and only a resync of its regions mends parity.
        self.checkpoint_allowed: Callable[[], bool] = lambda: True
        # Called before an update goes out: the pool puts member failures on record first.
        self.before_commit: Callable[[], Any] | None = None

    # --- reading and resetting ------------------------------------------------------------

    async def load_dirty(self) -> set[int] | None:
        """The regions marked dirty on any active member; None when no member holds a valid bitmap."""
        found = False
        dirty: set[int] = set()
        for _, dev in self.active():
            try:
                raw = as_bytes(await dev.read(BITMAP_OFFSET, BITMAP_SIZE))
            except MemberIOError:
                continue
            hdr = unpack_header(raw[:HEADER_SIZE])
            if hdr is None or hdr[0] != self.pool_uuid:
                continue
            _, region, nbits = hdr
            found = True
            bits = np.unpackbits(np.frombuffer(raw, np.uint8, offset=HEADER_SIZE), bitorder="little")
            for b in np.flatnonzero(bits[:nbits]):
                # A bitmap written with another region size: map its regions onto ours.
                lo = int(b) * region // self.region
                hi = (-(-(int(b) + 1) * region // self.region))
                dirty.update(range(lo, min(hi, self.nbits)))
        return dirty if found else None

    async def reset(self, keep: Iterable[int] = ()) -> None:
        """Write the bitmap (and its header) to every active member, durably: clear but ``keep``.

        The regions kept (awaiting a resync) stay set and pinned until ``unpin``.
        """
        keep = {r for r in keep if 0 <= r < self.nbits}
        self.bits[:] = 0
        for r in keep:
            self.bits[r // 8] |= np.uint8(1 << (r % 8))
        self._durable = set(keep)
        self.pinned = set(keep)
        image = pack_header(self.pool_uuid, self.region, self.nbits) + self.bits.tobytes()
        await self._on_members(lambda dev: dev.write(BITMAP_OFFSET, image), flush=True)

    async def grow(self, data_size: int) -> None:
        """Cover a larger member data area (a pool that grew): more bits, the header rewritten durably."""
        nbits = -(-data_size // self.region)
        if nbits > CAPACITY_BITS:
            raise ConfigError(f"the write-intent bitmap holds {CAPACITY_BITS} regions of {self.region} "
                              f"bytes: a member data area of {data_size} bytes needs {nbits}")
        if nbits <= self.nbits:
            return
        async with self._lock:
            self.nbits = nbits
            header = pack_header(self.pool_uuid, self.region, self.nbits)
            await self._on_members(lambda dev: dev.write(BITMAP_OFFSET, header), flush=True)

    async def mark(self, regions: Iterable[int]) -> None:
        """Set and pin these regions' bits on the members, durably (a resync is about to start)."""
        regions = {r for r in regions if 0 <= r < self.nbits}
        await self._set_durably(regions)
        self.pinned |= regions

    async def _set_durably(self, regions: set[int]) -> None:
        """Set the bits of the regions not yet set on the members, and flush them there."""
        async with self._lock:
            new = regions - self._durable
            if new:
                await self._write_bits(new, True)
                self._durable |= new
                self.stats["sets"] += len(new)

    def unpin(self, region: int) -> None:
        """The region is resynced and flushed: its bit may be cleared like any idle region's."""
        self.pinned.discard(region)
        self._done_epoch[region] = self._epoch

    async def settle(self) -> None:
        """After a final flush (a clean close): clear every bit but those pinned and those in use."""
        async with self._lock:
            idle = {r for r in self._durable if r not in self.pinned and r not in self._inflight}
            if idle:
                self._durable -= idle
                await self._write_bits(idle, False)
                self.stats["clears"] += len(idle)

    async def _on_members(self, fn: Callable[[BlockDevice], Any], *, flush: bool) -> None:
        active = list(self.active())

        async def one(dev: BlockDevice) -> None:
            await fn(dev)
            if flush:
                await dev.flush()

        async def failed(k: int, e: BaseException) -> None:
            i = active[k][0]
            log.error("write-intent bitmap on member %d: %s", i, e)
            if self.on_error is not None:
                res = self.on_error(i, e)
                if inspect.isawaitable(res):
                    await res

        await run_all([lambda d=dev: one(d) for _, dev in active], catch=MemberIOError,
                      on_error=failed)

    # --- the write path (the layout calls these around every update) ------------------------

    def regions_of(self, writes: Sequence[MemberWrite]) -> set[int]:
        """The regions an update's member writes touch."""
        out: set[int] = set()
        for _, off, buf in writes:
            n = len(buf)
            if n:
                out.update(range(off // self.region, (off + n - 1) // self.region + 1))
        return out

    async def commit(self, writes: Sequence[MemberWrite]) -> set[int]:
        """Make sure the update's regions are marked dirty on the members; returns the ticket."""
        if self.before_commit is not None:
            await self.before_commit()
        regions = self.regions_of(writes)
        for r in regions:
            self._inflight[r] = self._inflight.get(r, 0) + 1
        try:
            if not regions <= self._durable:
                await self._set_durably(regions)
        except BaseException:
            self.applied(regions)
            raise
        return regions

    def applied(self, ticket: set[int]) -> None:
        """The update's member writes have completed."""
        for r in ticket:
            left = self._inflight.get(r, 0) - 1
            if left <= 0:
                self._inflight.pop(r, None)
            else:
                self._inflight[r] = left
            self._done_epoch[r] = self._epoch

    async def _write_bits(self, regions: set[int], value: bool) -> None:
        pages = set()
        for r in regions:
            byte, bit = divmod(r, 8)
            if value:
                self.bits[byte] |= np.uint8(1 << bit)
            else:
                self.bits[byte] &= np.uint8(~(1 << bit) & 0xFF)
            pages.add(byte // PAGE)
        for p in sorted(pages):
            page = self.bits[p * PAGE : (p + 1) * PAGE].copy()
            off = BITMAP_OFFSET + HEADER_SIZE + p * PAGE
            # Setting must be durable before the data write; clearing may stay lazy.
            await self._on_members(lambda dev, off=off, page=page: dev.write(off, page), flush=value)

    def before_flush(self) -> int:
        """A member flush begins: writes completed so far will be durable after it."""
        mark = self._epoch
        self._epoch += 1
        return mark

    async def after_flush(self, mark: int) -> None:
        """Clear the bits of regions idle since the flush before this one."""
        idle = {r for r in self._durable
                if r not in self._inflight and r not in self.pinned and self._done_epoch.get(r, -1) < mark}
        if not idle or self._lock.locked() or not self.checkpoint_allowed():
            return
        async with self._lock:
            idle = {r for r in idle if r not in self._inflight and r not in self.pinned}
            self._durable -= idle
            await self._write_bits(idle, False)
            self.stats["clears"] += len(idle)

    def status(self) -> dict[str, Any]:
        """What `vstore status` shows about the bitmap."""
        return {"region": self.region, "regions": self.nbits, "dirty": len(self._durable), **self.stats}

    async def mark_all(self) -> None:
        """Mark every region dirty on every active member, durably (what a lost journal protected)."""
        await self.reset(keep=range(self.nbits))


def as_bytes(buf: Any) -> bytes:
    """Bytes of a buffer."""
    return bytes(buf)


# ---------------------------------------------------------------------------- resync


def rows_of_regions(regions: Iterable[int], region: int, chunk: int, rows: int) -> list[int]:
    """The stripe rows inside the given regions (member offsets ``row * chunk``)."""
    per = max(1, region // chunk)
    out: list[int] = []
    for r in sorted(set(regions)):
        out.extend(range(r * per, min((r + 1) * per, rows)))
    return out


class Resync:
    """The resync of a pool's dirty regions after an unclean shutdown, row by row, while it serves.

    Rows are member rows (member offset ``row * chunk``). A region stays pending
    (and pinned in the bitmap) until every row of it is resynced and the members
    flushed. ``run`` works through the regions not yet claimed (several callers may
    share the work: the background task and one that needs the resync finished);
    the layout calls ``pending``/``sync_row`` for rows it is about to trust
    (``RaidLayout.resync``). ``trusted(row)`` names members being rebuilt whose
    content in that row is good (below the rebuild's cursor).
    """

    def __init__(self, layout: Any, bitmap: WriteIntentBitmap, regions: Iterable[int],
                 trusted: Callable[[int], frozenset[int]] | None = None) -> None:
        self.layout = layout
        self.bitmap = bitmap
        self.per = max(1, bitmap.region // layout.chunk)
        rows = int(layout.rows)
        self.todo = {r for r in regions if r * self.per < rows}
        self.queue = sorted(self.todo)  # regions nobody has claimed yet
        self.synced: set[int] = set()  # rows of pending regions resynced ahead of their region
        self.total = sum(min((r + 1) * self.per, rows) - r * self.per for r in self.todo)
        self.done = 0
        self.trusted = trusted or (lambda row: frozenset())
        self.finished = trio.Event()
        self._changed = trio.Event()
        if not self.todo:
            self.finished.set()

    def add(self, regions: Iterable[int]) -> None:
        """Resync these regions too."""
        rows = int(self.layout.rows)
        new = {r for r in regions if r not in self.todo and r * self.per < rows}
        for r in sorted(new):
            self.todo.add(r)
            self.queue.append(r)
            self.total += len(self.rows_of(r))
        if new:
            self.queue.sort()
            self._wake()

    def rows_of(self, region: int) -> range:
        """The member rows of a region."""
        return range(region * self.per, min((region + 1) * self.per, int(self.layout.rows)))

    def pending(self, row: int) -> bool:
        """Whether the row still awaits its resync."""
        return row // self.per in self.todo and row not in self.synced

    async def sync_row(self, row: int) -> None:
        """Resync the row now, under its lock (already held by the caller or not)."""
        layout = self.layout
        async with layout.locked(layout.resync_keys(row)):
            if not self.pending(row):
                return
            # A row's resync, once begun, finishes: its parity or copies are rewritten whole.
            with trio.CancelScope(shield=True):
                # Checksums first (a crash may have torn a block from its checksum), then
                # parity or copies from the data they now vouch for.
                await layout.rechecksum_row(row, self.trusted(row))
                await layout.resync_row(row, self.trusted(row))
            self.synced.add(row)
            self.done += 1

    async def run(self, pace: Callable[[int], Any] | None = None) -> None:
        """Resync the regions nobody has claimed; then wait for those others are resyncing."""
        layout = self.layout
        limiter = trio.CapacityLimiter(RESYNC_PARALLEL)
        unit = int(layout.row_bytes or layout.chunk)
        while self.todo:
            if not self.queue:
                # Every region left is someone else's (perhaps paced slowly): help with their
                # rows at full speed, then wait for them to flush and finish.
                changed = self._changed
                for r in sorted(self.todo):
                    for row in self.rows_of(r):
                        if self.pending(row):
                            await self.sync_row(row)
                if not changed.is_set():
                    await changed.wait()
                continue
            region = self.queue.pop(0)
            try:
                rows = [r for r in self.rows_of(region) if self.pending(r)]

                async def one(row: int) -> None:
                    async with limiter:
                        if pace is not None:
                            res = pace(unit)
                            if inspect.isawaitable(res):
                                await res
                        await self.sync_row(row)

                for at in range(0, len(rows), 256):
                    await run_all([lambda r=row: one(r) for row in rows[at : at + 256]])
                await layout.flush()  # durable before the region may be cleared
            except BaseException:
                if region in self.todo:
                    self.queue.insert(0, region)  # left for whoever runs next
                    self._wake()
                raise
            self.todo.discard(region)
            self.synced.difference_update(self.rows_of(region))
            self.bitmap.unpin(region)
            self._wake()
        self.finished.set()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def status(self) -> dict[str, Any]:
        """Progress: rows to resync and done."""
        return {"rows": self.total, "done": min(self.done, self.total), "regions_left": len(self.todo)}
