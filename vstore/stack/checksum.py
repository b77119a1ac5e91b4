"""Block checksums on a member: ``ChecksumDevice(window)`` keeps a CRC32C of every 4 KiB block.

A pool made with ``vstore create --checksums`` puts this layer between each member's
data window (``OffsetDevice``) and the RAID layout, so every block a layout keeps on a
member — data, parity and mirror copies alike — carries a checksum on that member, and
a block that comes back wrong is known to be wrong whatever the member's storage said.

The format, on each member's data window of ``W`` bytes (``split_window``)::

    [0, B*4096)            B data blocks: what the layout sees (``size``)
    [B*4096, +S)           the checksum area: one little-endian uint32 per data block,
                           block i's at B*4096 + 4*i; S = 4*B rounded up to 4 KiB

``B`` is the largest count for which both fit. Each entry is ``CRC32C(block) XOR
CRC32C(4096 zero bytes)``, so a block of zeros has the entry 0 and a new, sparse (or
zeroed) member is consistent as it is. ``UNKNOWN`` (0xFFFFFFFF) marks a discarded
block, whose bytes the member may or may not have kept: it is not verified until it is
written again. The checksum area costs 1/1024 of the member.

Reads verify: a block whose CRC32C disagrees with its entry raises ``ChecksumError``
naming it (the layout then heals it from redundancy: ``RaidLayout.heal``).
Writes store the block and its entry together: the entry in the cache at once, the
data and the entry's page written concurrently (a page write holds the page's lock,
so the last one carries every earlier entry). A crash can leave a block and its entry
disagreeing; the pool's journal or write-intent bitmap covers that: a journal replay
rewrites its blocks through this layer (entries recomputed), a bitmap resync
recomputes the entries of its dirty rows (``rechecksum``) before it trusts them.

Entries are cached per 4 KiB page (1024 entries, 4 MiB of data), at most
``CACHE_PAGES`` pages; a page is read from the member at its first use.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import trio

from vstore.crc import BLOCK, block_sums, crc32c
from vstore.errors import OutOfRangeError, VstoreError
from vstore.io.aio import run_all
from vstore.stack.device import BlockDevice, Buffer, FilterDevice, as_u8

if TYPE_CHECKING:
    from vstore.io.op import Op

ZERO = crc32c(bytes(BLOCK))  # the CRC32C of a block of zeros: its entry is 0
UNKNOWN = 0xFFFFFFFF  # a discarded block: not verified until written again
PAGE_ENTRIES = BLOCK // 4
CACHE_PAGES = int(os.environ.get("VSTORE_CHECKSUM_CACHE_PAGES", "") or 16384)  # 64 MiB: 64 GiB of data


class ChecksumError(VstoreError):
    """Blocks of a member whose bytes disagree with their checksums: ``bad`` lists their offsets."""

    def __init__(self, bad: list[int], detail: str = "") -> None:
        self.bad = bad
        where = ", ".join(str(b) for b in bad[:4]) + (" ..." if len(bad) > 4 else "")
        super().__init__(f"checksum mismatch in {len(bad)} block(s) at {where}{detail}")


def split_window(window: int) -> tuple[int, int]:
    """(data blocks, checksum-area bytes) of a member data window of ``window`` bytes."""
    blocks = window // (BLOCK + 4)
    while blocks > 0:
        area = -(-blocks * 4 // BLOCK) * BLOCK
        if blocks * BLOCK + area <= window:
            return blocks, area
        blocks -= 1
    return 0, 0


def data_bytes(window: int) -> int:
    """How much of a member data window the layout gets with checksums on."""
    return split_window(window)[0] * BLOCK


def entries_of(buf: np.ndarray) -> np.ndarray:
    """The checksum entries of the whole blocks of a buffer (CRC32C XOR the zero block's)."""
    sums = block_sums(buf)
    np.bitwise_xor(sums, np.uint32(ZERO), out=sums)
    return sums


class ChecksumDevice(FilterDevice):
    """A member data window with a CRC32C per 4 KiB block, verified on every read."""

    def __init__(self, inner: BlockDevice, *, close_inner: bool = True) -> None:
        super().__init__(inner)
        blocks, area = split_window(inner.size)
        if blocks == 0:
            raise OutOfRangeError(f"a {inner.size}-byte window has no room for checksummed blocks")
        if BLOCK % inner.block_size:
            raise OutOfRangeError(f"member block size {inner.block_size} does not divide {BLOCK}")
        self.blocks = blocks
        self.size = blocks * BLOCK
        self.block_size = BLOCK
        self.area_offset = blocks * BLOCK
        self.area_bytes = area
        self.close_inner = close_inner
        self._pages: OrderedDict[int, np.ndarray] = OrderedDict()
        self._loading: dict[int, trio.Event] = {}
        self._locks: dict[int, trio.Lock] = {}
        self._busy: dict[int, int] = {}
        self.stats = {"verified_blocks": 0, "mismatches": 0, "page_reads": 0, "page_writes": 0}

    # --- the entry cache ----------------------------------------------------------------

    async def _load(self, p0: int, p1: int) -> None:
        """Have pages [p0, p1) in the cache (read from the member those that are not)."""
        while True:
            missing = [p for p in range(p0, p1) if p not in self._pages]
            if not missing:
                return
            waiting = [self._loading[p] for p in missing if p in self._loading]
            if waiting:
                await waiting[0].wait()
                continue
            lo, hi = missing[0], missing[-1] + 1
            ev = trio.Event()
            for p in range(lo, hi):
                if p not in self._pages:
                    self._loading.setdefault(p, ev)
            try:
                at = self.area_offset + lo * BLOCK
                n = min(hi * BLOCK, self.area_bytes) - lo * BLOCK
                raw = as_u8(await self.inner.read(at, n)).view("<u4").copy()
                self.stats["page_reads"] += hi - lo
                for p in range(lo, hi):
                    if p not in self._pages and self._loading.get(p) is ev:
                        page = np.zeros(PAGE_ENTRIES, dtype=np.uint32)
                        got = raw[(p - lo) * PAGE_ENTRIES : (p - lo + 1) * PAGE_ENTRIES]
                        page[: len(got)] = got
                        self._pages[p] = page
            finally:
                for p in range(lo, hi):
                    if self._loading.get(p) is ev:
                        del self._loading[p]
                ev.set()
            self._evict()

    def _evict(self) -> None:
        while len(self._pages) > CACHE_PAGES:
            for p in self._pages:
                if not self._busy.get(p) and not (p in self._locks and self._locks[p].locked()):
                    del self._pages[p]
                    break
            else:
                return

    def _entries(self, first: int, count: int) -> np.ndarray:
        """The cached entries of blocks [first, first+count) (their pages loaded)."""
        out = np.empty(count, dtype=np.uint32)
        b = first
        while b < first + count:
            p, e = divmod(b, PAGE_ENTRIES)
            n = min(PAGE_ENTRIES - e, first + count - b)
            page = self._pages[p]
            self._pages.move_to_end(p)
            out[b - first : b - first + n] = page[e : e + n]
            b += n
        return out

    async def _store(self, first: int, entries: np.ndarray) -> None:
        """Put entries for blocks [first, ...) in the cache and write their pages to the member."""
        count = len(entries)
        p0, p1 = first // PAGE_ENTRIES, (first + count - 1) // PAGE_ENTRIES + 1
        for p in range(p0, p1):
            self._busy[p] = self._busy.get(p, 0) + 1
        try:
            await self._load(p0, p1)
            b = first
            while b < first + count:
                p, e = divmod(b, PAGE_ENTRIES)
                n = min(PAGE_ENTRIES - e, first + count - b)
                self._pages[p][e : e + n] = entries[b - first : b - first + n]
                b += n
            for p in range(p0, p1):
                await self._write_page(p, first, count)
        finally:
            for p in range(p0, p1):
                self._busy[p] -= 1
                if not self._busy[p]:
                    del self._busy[p]

    async def _write_page(self, p: int, first: int, count: int) -> None:
        """Write the part of page p holding blocks [first, first+count), whole member blocks."""
        lock = self._locks.get(p)
        if lock is None:
            lock = self._locks[p] = trio.Lock()
        async with lock:
            bs = self.inner.block_size
            a = max(first, p * PAGE_ENTRIES) - p * PAGE_ENTRIES
            b = min(first + count, (p + 1) * PAGE_ENTRIES) - p * PAGE_ENTRIES
            lo = (a * 4) // bs * bs
            hi = min(-(-(b * 4) // bs) * bs, self.area_bytes - p * BLOCK)
            page = self._pages[p].view(np.uint8)
            await self.inner.write(self.area_offset + p * BLOCK + lo, page[lo:hi].copy())
            self.stats["page_writes"] += 1
        if not lock.locked() and not lock.statistics().tasks_waiting:
            self._locks.pop(p, None)

    # --- verification -------------------------------------------------------------------

    def _aligned(self, offset: int, length: int) -> None:
        self.check(offset, length)
        if offset % BLOCK or length % BLOCK:
            raise OutOfRangeError(f"checksummed I/O at {offset}+{length} is not in whole {BLOCK}-byte blocks")

    async def _bad_blocks(self, offset: int, views: list[np.ndarray]) -> list[int]:
        """Offsets of the blocks of views (consecutive bytes at offset) that fail their checksum."""
        length = sum(len(v) for v in views)
        first, count = offset // BLOCK, length // BLOCK
        await self._load(first // PAGE_ENTRIES, (first + count - 1) // PAGE_ENTRIES + 1)
        want = self._entries(first, count)
        if len(views) == 1 or all(len(v) % BLOCK == 0 for v in views):
            got = np.concatenate([entries_of(as_u8(v)) for v in views]) if len(views) > 1 \
                else entries_of(as_u8(views[0]))
        else:
            got = entries_of(np.concatenate([as_u8(v) for v in views]))
        self.stats["verified_blocks"] += count
        diff = (got != want) & (want != np.uint32(UNKNOWN))
        if not diff.any():
            return []
        self.stats["mismatches"] += int(diff.sum())
        return [offset + int(i) * BLOCK for i in np.flatnonzero(diff)]

    async def check_blocks(self, offset: int, length: int) -> tuple[np.ndarray, list[int]]:
        """Read a range without raising: (its bytes as stored, offsets of blocks failing their checksum)."""
        self._aligned(offset, length)
        buf = np.empty(length, dtype=np.uint8)
        await self.inner.readv_into(offset, [buf])
        return buf, await self._bad_blocks(offset, [buf])

    async def rechecksum(self, offset: int, length: int) -> None:
        """Make the entries of a range agree with its bytes (a resync trusting the data after a crash)."""
        self._aligned(offset, length)
        if length:
            buf = as_u8(await self.inner.read(offset, length))
            await self._store(offset // BLOCK, entries_of(buf))

    # --- BlockDevice --------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read and verify; ChecksumError names the blocks that fail."""
        buf = np.empty(length, dtype=np.uint8)
        await self.readv_into(offset, [buf])
        return buf

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Read into the views and verify; ChecksumError names the blocks that fail."""
        length = sum(len(v) for v in views)
        self._aligned(offset, length)
        if not length:
            return
        first, count = offset // BLOCK, length // BLOCK
        p0, p1 = first // PAGE_ENTRIES, (first + count - 1) // PAGE_ENTRIES + 1
        if all(p in self._pages for p in range(p0, p1)):
            await self.inner.readv_into(offset, views)
        else:  # the entries' pages and the data at once
            await run_all([lambda: self.inner.readv_into(offset, views), lambda: self._load(p0, p1)])
        bad = await self._bad_blocks(offset, views)
        if bad:
            raise ChecksumError(bad)

    async def write(self, offset: int, data: Buffer) -> None:
        """Write whole blocks and their checksums."""
        await self.writev(offset, [as_u8(data)])

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Write the views (whole blocks) and their checksums."""
        length = sum(len(v) for v in views)
        self._aligned(offset, length)
        if not length:
            return
        if all(len(v) % BLOCK == 0 for v in views):
            entries = np.concatenate([entries_of(as_u8(v)) for v in views]) if len(views) > 1 \
                else entries_of(as_u8(views[0]))
        else:
            entries = entries_of(np.concatenate([as_u8(v) for v in views]))
        await run_all([lambda: self.inner.writev(offset, views),
                       lambda: self._store(offset // BLOCK, entries)])

    async def discard(self, offset: int, length: int) -> None:
        """Discard the whole blocks of the range; their checksums become UNKNOWN until rewritten."""
        self.check(offset, length)
        first = -(-offset // BLOCK)
        last = (offset + length) // BLOCK
        if last <= first:
            return
        await self._store(first, np.full(last - first, UNKNOWN, dtype=np.uint32))
        await self.inner.discard(first * BLOCK, (last - first) * BLOCK)

    def prepare_io(self, is_write: bool, offset: int, views: list[np.ndarray]) -> Op | None:
        """None: every block passes through the checksums."""
        return None

    async def aclose(self) -> None:
        """Close the window below, unless built with close_inner=False."""
        if self.close_inner:
            await self.inner.aclose()

    def forget_range(self, offset: int, length: int) -> None:
        """Forward to the window."""
        self.inner.forget_range(offset, length)

    def __repr__(self) -> str:
        return f"<ChecksumDevice {self.inner!r} {self.blocks} blocks>"


async def zero_area(window: BlockDevice) -> None:
    """Write zeros over a window's checksum area (a member that held other bytes before)."""
    blocks, area = split_window(window.size)
    zeros = np.zeros(min(area, 1 << 20), dtype=np.uint8)
    pos = blocks * BLOCK
    end = pos + area
    while pos < end:
        n = min(len(zeros), end - pos)
        await window.write(pos, zeros[:n])
        pos += n


def data_window(dev: BlockDevice, offset: int, size: int, checksums: bool) -> BlockDevice:
    """A member's data window as the layout sees it: the bytes, or the checksummed blocks of them."""
    from vstore.stack.offset import OffsetDevice

    window = OffsetDevice(dev, offset, size)
    return ChecksumDevice(window) if checksums else window
