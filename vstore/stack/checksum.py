"""Block checksums on a member: ``ChecksumDevice(window)`` keeps a CRC32C of every 4 KiB block.

A pool made with ``vstore create --checksums`` puts this layer between each member's
data window (``OffsetDevice``) and the RAID layout, so every block a layout keeps on a
member — data, parity and mirror copies alike — carries a checksum on that member, and
a block that comes back wrong is known to be wrong whatever the member's storage said.

The format, on each member's data window of ``W`` bytes (``split_window``)::

    [0, B*4096)            B data blocks: what the layout sees (``size``)
    [B*4096, +S)           the checksum area: 4 KiB pages of 1023 little-endian uint32
                           entries (block i's is entry i mod 1023 of page i // 1023)
                           and, last, the page's own CRC; S = ceil(B / 1023) pages

``B`` is the largest count for which both fit. Each entry is ``CRC32C(block) XOR
CRC32C(4096 zero bytes)``, so a block of zeros has the entry 0; a page's CRC is
``CRC32C(its 1023 entries) XOR CRC32C(4092 zero bytes)``, so a new, sparse member is
consistent as it is. ``UNKNOWN`` (0xFFFFFFFF) marks a block whose bytes vstore cannot
vouch for: discarded (the member may or may not have kept them), or on a member that
held other bytes before the pool (``create --force``); it reads as zeros (what a
discard promises, the same on every copy) until it is written again. A page that
fails its own CRC is read once more (a flipped read must not make healthy blocks look
corrupt); still bad, its blocks are ``UNVERIFIED`` (0xFFFFFFFE: read as stored) until
rewritten. The checksum area costs 1/1023 of the member.

Reads verify: a block whose CRC32C disagrees with its entry raises ``ChecksumError``
naming it (the layout then heals it from redundancy: ``RaidLayout.heal``).

Entries are cached per 4 KiB page (1024 entries, 4 MiB of data), at most
``CACHE_PAGES`` pages; a page is read from the member at its first use. A write
computes its blocks' entries into the cache and writes only the data; the changed
pages are written back by the next ``flush`` (before the member's own flush, so a
flush that returns has made data and checksums durable), or earlier once
``DIRTY_PAGES`` are waiting. Between flushes a crash can leave blocks and their
entries disagreeing, which is what the pool's crash consistency already covers:
every block written since the last flush is in a region of the write-intent bitmap,
whose resync recomputes its rows' entries before trusting them (``rechecksum``), or
in the journal, whose replay writes it again through this layer. The crash state
machine (tests/test_crash_consistency.py) checks that no block is then taken for
corrupt and that skipping the recompute is caught.

The layout batches member I/O through ``prepare_io``: this layer hands on the
window's engine op when the pages are cached (a write's entries computed and cached
first); the layout verifies a read's bytes when the op is done (``verify``).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import trio

from vstore.crc import BLOCK, block_sums, block_sums_of, crc32c
from vstore.errors import OutOfRangeError, VstoreError
from vstore.io.aio import run_all
from vstore.stack.device import BlockDevice, Buffer, FilterDevice, as_u8

if TYPE_CHECKING:
    from vstore.io.op import Op

log = logging.getLogger("vstore.stack.checksum")

ZERO = crc32c(bytes(BLOCK))  # the CRC32C of a block of zeros: its entry is 0
UNKNOWN = 0xFFFFFFFF  # a block vstore cannot vouch for (discarded, old bytes): reads as zeros
UNVERIFIED = 0xFFFFFFFE  # a block whose checksum page rotted: read as stored, unverified, until rewritten
MAX_ENTRY = 0xFFFFFFFD  # a CRC landing on a marker is stored as this (a 1-in-2^31 weaker check, no marker)
PAGE_ENTRIES = BLOCK // 4 - 1  # entries per 4 KiB checksum page; its last word is the page's own CRC
ZERO_PAGE = crc32c(bytes(4 * PAGE_ENTRIES))
CACHE_PAGES = int(os.environ.get("VSTORE_CHECKSUM_CACHE_PAGES", "") or 16384)  # 64 MiB: 64 GiB of data
DIRTY_PAGES = 1024  # changed pages (4 GiB of data) that make a writer write them back before a flush


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
        area = -(-blocks // PAGE_ENTRIES) * BLOCK
        if blocks * BLOCK + area <= window:
            return blocks, area
        blocks -= 1
    return 0, 0


def page_crc(page: np.ndarray) -> int:
    """The stored CRC of a checksum page's entries (0 for a page of zeros, as a sparse member holds)."""
    return crc32c(page[:PAGE_ENTRIES].tobytes()) ^ ZERO_PAGE


def data_bytes(window: int) -> int:
    """How much of a member data window the layout gets with checksums on."""
    return split_window(window)[0] * BLOCK


def entries_of(buf: np.ndarray) -> np.ndarray:
    """The checksum entries of the whole blocks of a buffer (CRC32C XOR the zero block's)."""
    return _clamp(block_sums(buf, xor=ZERO))


def _clamp(entries: np.ndarray) -> np.ndarray:
    """A real entry never takes a marker's value (UNVERIFIED, UNKNOWN): those two map to MAX_ENTRY."""
    np.minimum(entries, np.uint32(MAX_ENTRY), out=entries)
    return entries


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
        self._dirty: set[int] = set()  # pages changed since last written to the member
        self._version: dict[int, int] = {}  # changes per page (a write-back clears only what it wrote)
        self._writing = trio.Lock()
        # Whether the window hands out I/O-engine ops (a local file): then reads are checksummed
        # in the I/O threads (Op.after); else (memory, network) the layout checksums a request
        # whole at once (RaidLayout._read_pieces). None until the first op is asked for.
        self.engine: bool | None = None
        # Whether any UNKNOWN entry was ever seen (cached or set): reads then zero those blocks.
        self.has_unknown = False
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
                        page = raw[(p - lo) * (PAGE_ENTRIES + 1) : (p - lo + 1) * (PAGE_ENTRIES + 1)].copy()
                        if int(page[PAGE_ENTRIES]) != page_crc(page):
                            page = await self._bad_page(p, at + (p - lo) * BLOCK)
                        if not self.has_unknown and (page[:PAGE_ENTRIES] == UNKNOWN).any():
                            self.has_unknown = True
                        self._pages[p] = page
            finally:
                for p in range(lo, hi):
                    if self._loading.get(p) is ev:
                        del self._loading[p]
                ev.set()
            self._evict()

    async def _bad_page(self, p: int, at: int) -> np.ndarray:
        """Checksum page p failed its own CRC: read it once more; still bad, its blocks go unverified.

        A flipped read of the page must not make healthy blocks look corrupt (and be
        "repaired", or counted against the member); a page corrupt on the member loses
        the verification of its blocks until they are written again (it is rewritten,
        valid, by the next flush).
        """
        page = as_u8(await self.inner.read(at, BLOCK)).view("<u4").copy()
        self.stats["page_rereads"] = self.stats.get("page_rereads", 0) + 1
        if int(page[PAGE_ENTRIES]) == page_crc(page):
            return page
        log.warning("%r: checksum page %d fails its own CRC: its %d blocks are not verified until "
                    "written again", self, p, PAGE_ENTRIES)
        self.stats["bad_pages"] = self.stats.get("bad_pages", 0) + 1
        page = np.full(PAGE_ENTRIES + 1, UNVERIFIED, dtype=np.uint32)
        self._version[p] = self._version.get(p, 0) + 1
        self._dirty.add(p)
        return page

    def _evict(self) -> None:
        """Drop the least recently used clean pages beyond CACHE_PAGES."""
        if len(self._pages) <= CACHE_PAGES:
            return
        for p in [p for p in self._pages if p not in self._dirty][: len(self._pages) - CACHE_PAGES]:
            del self._pages[p]

    def _cached(self, first: int, count: int) -> bool:
        """Whether the pages of blocks [first, first+count) are all in the cache."""
        pages = self._pages
        return all(p in pages for p in range(first // PAGE_ENTRIES, (first + count - 1) // PAGE_ENTRIES + 1))

    def _entries(self, first: int, count: int) -> np.ndarray:
        """The cached entries of blocks [first, first+count) (their pages loaded)."""
        p, e = divmod(first, PAGE_ENTRIES)
        if e + count <= PAGE_ENTRIES:
            return self._pages[p][e : e + count]
        out = np.empty(count, dtype=np.uint32)
        b = first
        while b < first + count:
            p, e = divmod(b, PAGE_ENTRIES)
            n = min(PAGE_ENTRIES - e, first + count - b)
            out[b - first : b - first + n] = self._pages[p][e : e + n]
            b += n
        return out

    async def entries(self, first: int, count: int) -> np.ndarray:
        """The entries of blocks [first, first+count) (loaded when not cached)."""
        if not self._cached(first, count):
            await self._load(first // PAGE_ENTRIES, (first + count - 1) // PAGE_ENTRIES + 1)
        return self._entries(first, count)

    def _set(self, first: int, entries: np.ndarray) -> None:
        """Put entries for blocks [first, ...) in the cache (pages loaded), to be written back."""
        if not self.has_unknown and (entries == UNKNOWN).any():
            self.has_unknown = True
        b, count = first, len(entries)
        while b < first + count:
            p, e = divmod(b, PAGE_ENTRIES)
            n = min(PAGE_ENTRIES - e, first + count - b)
            self._pages[p][e : e + n] = entries[b - first : b - first + n]
            self._version[p] = self._version.get(p, 0) + 1
            self._dirty.add(p)
            b += n

    async def _store(self, first: int, entries: np.ndarray) -> None:
        """Entries for blocks [first, ...): cached now, on the member by the next flush."""
        await self._load(first // PAGE_ENTRIES, (first + len(entries) - 1) // PAGE_ENTRIES + 1)
        self._set(first, entries)
        if len(self._dirty) > DIRTY_PAGES:
            await self.write_back()

    async def write_back(self) -> None:
        """Write every page changed since it was last written (not flushed: ``flush`` does both)."""
        async with self._writing:  # one write-back at a time: an older copy never lands last
            if not self._dirty:
                return
            pages = sorted(self._dirty)
            seen = {p: self._version.get(p, 0) for p in pages}
            runs: list[list[int]] = []
            for p in pages:
                if runs and runs[-1][-1] == p - 1:
                    runs[-1].append(p)
                else:
                    runs.append([p])
            for run in runs:
                for p in run:
                    page = self._pages[p]
                    page[PAGE_ENTRIES] = page_crc(page)
                buf = np.concatenate([self._pages[p] for p in run]).view(np.uint8)
                n = min(len(buf), self.area_bytes - run[0] * BLOCK)
                await self.inner.write(self.area_offset + run[0] * BLOCK, buf[:n])
                self.stats["page_writes"] += len(run)
            for p in pages:
                if self._version.get(p, 0) == seen[p]:
                    self._dirty.discard(p)
            self._evict()

    # --- verification -------------------------------------------------------------------

    def _aligned(self, offset: int, length: int) -> None:
        self.check(offset, length)
        if offset % BLOCK or length % BLOCK:
            raise OutOfRangeError(f"checksummed I/O at {offset}+{length} is not in whole {BLOCK}-byte blocks")

    @staticmethod
    def entries_of_views(views: list[np.ndarray]) -> np.ndarray:
        """``entries_of`` the consecutive bytes of views, as one array."""
        if all(v.ndim == 1 and v.dtype == np.uint8 and not len(v) & (BLOCK - 1) for v in views):
            return _clamp(block_sums_of(views, ZERO))
        return entries_of(np.concatenate([as_u8(v) for v in views]))

    async def verify(self, offset: int, views: list[np.ndarray]) -> list[int]:
        """Offsets of the blocks of views (consecutive bytes read at offset) failing their checksums."""
        return await self.compare(offset, self.entries_of_views(views))

    async def compare(self, offset: int, got: np.ndarray) -> list[int]:
        """Offsets of the blocks at offset whose entries (``entries_of`` their bytes as read) are wrong."""
        first, count = offset // BLOCK, len(got)
        if not self._cached(first, count):
            await self._load(first // PAGE_ENTRIES, (first + count - 1) // PAGE_ENTRIES + 1)
        want = self._entries(first, count)
        self.stats["verified_blocks"] += count
        diff = got != want
        if not diff.any():
            return []
        diff &= want < np.uint32(UNVERIFIED)  # neither UNKNOWN nor UNVERIFIED
        if not diff.any():
            return []
        self.stats["mismatches"] += int(diff.sum())
        return [offset + int(i) * BLOCK for i in np.flatnonzero(diff)]

    async def check_blocks(self, offset: int, length: int) -> tuple[np.ndarray, list[int]]:
        """Read a range without raising: (its bytes, UNKNOWN blocks as zeros; offsets of blocks failing)."""
        self._aligned(offset, length)
        buf = np.empty(length, dtype=np.uint8)
        await self.inner.readv_into(offset, [buf])
        bad = await self.verify(offset, [buf])
        self.zero_unknown(offset, [buf])
        return buf, bad

    def zero_unknown(self, offset: int, views: list[np.ndarray]) -> None:
        """Zero the blocks of views (consecutive bytes read at offset, entries cached) whose entry is UNKNOWN.

        A block vstore cannot vouch for (discarded, or from before the pool) reads as
        zeros, whatever the member kept or returns: what a discard promises, and the
        same on every copy.
        """
        if not self.has_unknown:
            return
        length = sum(len(v) for v in views)
        first = offset // BLOCK
        mask = self._entries(first, length // BLOCK) == UNKNOWN
        if not mask.any():
            return
        for i in np.flatnonzero(mask).tolist():
            a, b, pos = i * BLOCK, (i + 1) * BLOCK, 0
            for v in views:
                lo, hi = max(a, pos), min(b, pos + len(v))
                if lo < hi:
                    v[lo - pos : hi - pos] = 0
                pos += len(v)

    async def rechecksum(self, offset: int, length: int) -> None:
        """Make the entries of a range agree with its bytes (a resync trusting the data after a crash).

        An UNKNOWN block stays UNKNOWN (it reads as zeros; its bytes are not blessed).
        """
        self._aligned(offset, length)
        if length:
            buf = as_u8(await self.inner.read(offset, length))
            first = offset // BLOCK
            fresh = entries_of(buf)
            old = await self.entries(first, len(fresh))
            fresh[old == UNKNOWN] = UNKNOWN
            await self._store(first, fresh)

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
        if self._cached(first, count):
            await self.inner.readv_into(offset, views)
        else:  # the entries' pages and the data at once
            p0, p1 = first // PAGE_ENTRIES, (first + count - 1) // PAGE_ENTRIES + 1
            await run_all([lambda: self.inner.readv_into(offset, views), lambda: self._load(p0, p1)])
        bad = await self.verify(offset, views)
        if bad:
            raise ChecksumError(bad)
        self.zero_unknown(offset, views)

    async def write(self, offset: int, data: Buffer) -> None:
        """Write whole blocks (their checksums on the member by the next flush)."""
        await self.writev(offset, [as_u8(data)])

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Write the views (whole blocks); their checksums are on the member by the next flush."""
        length = sum(len(v) for v in views)
        self._aligned(offset, length)
        if not length:
            return
        await self._store(offset // BLOCK, self.entries_of_views(views))
        await self.inner.writev(offset, views)

    async def flush(self) -> None:
        """Write the changed checksum pages, then flush the member: data and checksums are durable."""
        await self.write_back()
        await self.inner.flush()

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
        """The window's engine op, when the entries' pages are cached (else None: the methods load them).

        The CRCs of the bytes moved are taken where the op completes (``Op.after``: an
        I/O thread beside the trio thread) into ``op.result``; the caller then compares a
        read's (``compare``) or stores a write's (``written``), as ``RaidLayout`` does.
        """
        length = sum(len(v) for v in views)
        if offset % BLOCK or length % BLOCK or not length:
            return None
        first, count = offset // BLOCK, length // BLOCK
        if not self._cached(first, count) or (is_write and len(self._dirty) > DIRTY_PAGES):
            return None
        op = self.inner.prepare_io(is_write, offset, views)
        if op is None:
            self.engine = False
        elif op.finished:  # done already (memory, or a small I/O inline): checksum it here
            self.engine = op.fd >= 0
            op.result = self.entries_of_views(views)
        else:
            self.engine = True
            op.after = lambda op, views=views: setattr(op, "result", self.entries_of_views(views))
        return op

    async def written(self, offset: int, entries: np.ndarray) -> None:
        """A write done through ``prepare_io``'s op: its blocks' entries (``op.result``) go in the cache.

        The caller holds the blocks against other writers until then (the layout's row
        locks), so a read that sees the new bytes before their entries is checked again
        under the lock and finds them in agreement.
        """
        await self._store(offset // BLOCK, entries)

    async def aclose(self) -> None:
        """Close the window below, unless built with close_inner=False."""
        if self.close_inner:
            await self.inner.aclose()

    def forget_range(self, offset: int, length: int) -> None:
        """Forward to the window."""
        self.inner.forget_range(offset, length)

    def __repr__(self) -> str:
        return f"<ChecksumDevice {self.inner!r} {self.blocks} blocks>"


async def unknown_area(window: BlockDevice) -> None:
    """Mark every block of a window unverified (its checksum area filled with UNKNOWN pages).

    For a member that held other bytes before the pool (``create --force``): its blocks
    are not what a checksum of zeros says until the pool writes them.
    """
    blocks, area = split_window(window.size)
    page = np.full(PAGE_ENTRIES + 1, UNKNOWN, dtype=np.uint32)
    page[PAGE_ENTRIES] = page_crc(page)
    pages = np.tile(page.view(np.uint8), min(area // BLOCK, 256))
    pos = blocks * BLOCK
    end = pos + area
    while pos < end:
        n = min(len(pages), end - pos)
        await window.write(pos, pages[:n])
        pos += n


def data_window(dev: BlockDevice, offset: int, size: int, checksums: bool) -> BlockDevice:
    """A member's data window as the layout sees it: the bytes, or the checksummed blocks of them."""
    from vstore.stack.offset import OffsetDevice

    window = OffsetDevice(dev, offset, size)
    return ChecksumDevice(window) if checksums else window
