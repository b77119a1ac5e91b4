"""A window onto a device: ``OffsetDevice(dev, offset, size)`` exposes ``[offset, offset+size)``.

The pool uses it to hide the superblock area at the start of each member from
the RAID layout, as md's v1.2 metadata sits before the data offset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vstore.errors import ConfigError
from vstore.stack.device import BlockDevice, Buffer, FilterDevice, as_u8

if TYPE_CHECKING:
    from vstore.io.op import Op


class OffsetDevice(FilterDevice):
    """A BlockDevice over the bytes [offset, offset + size) of another device."""

    def __init__(
        self, dev: BlockDevice, offset: int, size: int | None = None, *, close_inner: bool = True
    ) -> None:
        if size is None:
            size = dev.size - offset
        if offset < 0 or size <= 0 or offset + size > dev.size:
            raise ConfigError(
                f"window at {offset} of {size} bytes does not fit a device of {dev.size} bytes"
            )
        if offset % dev.block_size or size % dev.block_size:
            raise ConfigError(f"window at {offset} of {size} bytes is not aligned to {dev.block_size}")
        super().__init__(dev)
        self.offset = offset
        self.size = size
        self.close_inner = close_inner

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read from the window."""
        self.check(offset, length)
        return await self.inner.read(self.offset + offset, length)

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Scatter-read from the window straight into the views."""
        self.check(offset, sum(len(v) for v in views))
        await self.inner.readv_into(self.offset + offset, views)

    def prepare_io(self, is_write: bool, offset: int, views: list[np.ndarray]) -> Op | None:
        """The inner device's I/O-engine op for this window's range (None if it has none)."""
        self.check(offset, sum(len(v) for v in views))
        return self.inner.prepare_io(is_write, self.offset + offset, views)

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Gather-write the views into the window."""
        self.check(offset, sum(len(v) for v in views))
        await self.inner.writev(self.offset + offset, views)

    async def write(self, offset: int, data: Buffer) -> None:
        """Write into the window."""
        buf = as_u8(data)
        self.check(offset, len(buf))
        await self.inner.write(self.offset + offset, buf)

    async def discard(self, offset: int, length: int) -> None:
        """Discard inside the window."""
        self.check(offset, length)
        await self.inner.discard(self.offset + offset, length)

    async def aclose(self) -> None:
        """Close the underlying device too, unless built with close_inner=False."""
        if self.close_inner:
            await self.inner.aclose()

    def forget_range(self, offset: int, length: int) -> None:
        """Forget inside the window."""
        self.inner.forget_range(self.offset + offset, length)

    def identity(self) -> str:
        """The underlying device's identity (when it has one) and the window."""
        base = self.inner.identity() or f"dev:{id(self.inner)}"
        return f"{base}@{self.offset}+{self.size}"

    def __repr__(self) -> str:
        return f"<OffsetDevice {self.inner!r} [{self.offset}, +{self.size})>"
