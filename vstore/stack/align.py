"""Byte-granular I/O over a device whose members need whole blocks (iSCSI LUNs).

Volumes accept writes at any offset and length (a FUSE file does), and a RAID
layout maps a byte range straight onto member ranges with the same alignment.
An iSCSI LUN only takes whole 512- or 4096-byte blocks, so the pool puts this
layer on top of the layout: aligned requests pass straight through (the
vectored pair too); an unaligned write reads its edge blocks, merges, and
writes whole blocks.

Two unaligned writes that touch different bytes of one block would otherwise
lose one another's bytes (both read the old block); a lock per edge block
orders them. Overlapping concurrent writes have no defined order anyway.
"""

from __future__ import annotations

import numpy as np

from vstore.io.ordering import RangeOrder
from vstore.stack.device import BlockDevice, Buffer, DeviceBase, FilterDevice, as_u8
from vstore.stack.iovec import total_bytes


class AlignedDevice(FilterDevice):
    """Accepts any offset and length; issues only block-aligned I/O below."""

    def __init__(self, inner: BlockDevice, block: int | None = None) -> None:
        super().__init__(inner)
        self.block = block or inner.block_size
        self._locks = RangeOrder()  # edge blocks (indices) of merged writes under way

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        b = self.block
        return offset - offset % b, -(-(offset + length) // b) * b

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read any range (a whole-block read below, sliced)."""
        self.check(offset, length)
        start, end = self._span(offset, length)
        if (start, end) == (offset, offset + length):
            return await self.inner.read(offset, length)
        data = await self.inner.read(start, end - start)
        return data[offset - start : offset - start + length]

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Read into the views: straight below for whole blocks, else through read (sliced)."""
        n = total_bytes(views)
        self.check(offset, n)
        if self._span(offset, n) == (offset, offset + n):
            await self.inner.readv_into(offset, views)
        else:
            await DeviceBase.readv_into(self, offset, views)

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Write the views: straight below for whole blocks, else gathered and merged as write does."""
        n = total_bytes(views)
        self.check(offset, n)
        if not n:
            return
        if self._span(offset, n) == (offset, offset + n):
            await self.inner.writev(offset, views)
        else:
            await DeviceBase.writev(self, offset, views)

    async def write(self, offset: int, data: Buffer) -> None:
        """Write any range; unaligned edges are read, merged and written as whole blocks."""
        buf = as_u8(data)
        self.check(offset, len(buf))
        if not len(buf):
            return
        start, end = self._span(offset, len(buf))
        if (start, end) == (offset, offset + len(buf)):
            await self.inner.write(offset, buf)
            return
        b = self.block
        edges = {start // b, (end - 1) // b}
        async with self._locks.hold_keys(edges):
            merged = np.empty(end - start, dtype=np.uint8)
            if offset != start:
                merged[:b] = await self.inner.read(start, b)
            if offset + len(buf) != end and (end - b > start or offset == start):
                merged[-b:] = await self.inner.read(end - b, b)
            merged[offset - start : offset - start + len(buf)] = buf
            await self.inner.write(start, merged)

    async def discard(self, offset: int, length: int) -> None:
        """Discard the whole blocks inside the range (discard is advisory)."""
        self.check(offset, length)
        b = self.block
        start = -(-offset // b) * b
        end = (offset + length) // b * b
        if end > start:
            await self.inner.discard(start, end - start)

    async def aclose(self) -> None:
        """The pool closes the layout itself."""
