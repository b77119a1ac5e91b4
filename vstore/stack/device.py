"""The one interface every layer implements: an async block device.

Reads return 1-D ``numpy.uint8`` arrays (possibly views into a larger buffer, so
callers must not keep them across a later write to the same device). Writes take
any buffer: bytes, bytearray, memoryview or a uint8 array; ``as_u8`` views it
without copying.

The vectored pair ``readv_into(offset, views)`` / ``writev(offset, views)`` moves
consecutive device bytes straight between the device and a list of caller
buffers (the pieces of one request that land on one member), so a layer above
never has to gather or scatter through a copy. ``DeviceBase`` implements both
over ``read``/``write``; devices that can do better (local files, memory,
multipath, iSCSI, NFS) override them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from vstore.errors import OutOfRangeError

Buffer = bytes | bytearray | memoryview | np.ndarray


@runtime_checkable
class BlockDevice(Protocol):
    """An async block device: the face of every backend and every layer."""

    size: int
    block_size: int

    async def read(self, offset: int, length: int) -> np.ndarray: ...

    async def write(self, offset: int, data: Buffer) -> None: ...

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None: ...

    async def writev(self, offset: int, views: list[np.ndarray]) -> None: ...

    async def flush(self) -> None: ...

    async def discard(self, offset: int, length: int) -> None: ...

    async def aclose(self) -> None: ...


def as_u8(data: Buffer) -> np.ndarray:
    """View a buffer as a 1-D uint8 array without copying."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            data = data.view(np.uint8)
        return data.reshape(-1)
    return np.frombuffer(data, dtype=np.uint8)


def check_range(dev: BlockDevice, offset: int, length: int, *, aligned: bool = False) -> None:
    """Raise OutOfRangeError unless [offset, offset+length) lies inside the device."""
    if offset < 0 or length < 0 or offset + length > dev.size:
        raise OutOfRangeError(
            f"I/O at offset {offset} length {length} is outside the device (size {dev.size})"
        )
    if aligned and (offset % dev.block_size or length % dev.block_size):
        raise OutOfRangeError(
            f"I/O at offset {offset} length {length} is not aligned to {dev.block_size} bytes"
        )


class DeviceBase:
    """Helpers shared by concrete devices: size bookkeeping and range checks."""

    size: int = 0
    block_size: int = 512

    def check(self, offset: int, length: int) -> None:
        """Raise OutOfRangeError unless the range lies inside this device."""
        check_range(self, offset, length)

    async def discard(self, offset: int, length: int) -> None:
        """Discard is advisory; the default does nothing."""
        self.check(offset, length)

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Read consecutive bytes at offset into the views (the default: one read, then a copy)."""
        total = sum(len(v) for v in views)
        self.check(offset, total)
        _scatter(as_u8(await self.read(offset, total)), views)  # type: ignore[attr-defined]

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Write the views as consecutive bytes at offset (the default: gathered, then one write)."""
        await self.write(offset, _gather(views))  # type: ignore[attr-defined]

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


async def read_into(dev: BlockDevice, offset: int, views: list[np.ndarray]) -> None:
    """Read consecutive bytes at offset into the views (scatter), copying as little as the device allows."""
    fn = getattr(dev, "readv_into", None)
    if fn is not None:
        await fn(offset, views)
        return
    _scatter(as_u8(await dev.read(offset, sum(len(v) for v in views))), views)


async def write_from(dev: BlockDevice, offset: int, views: list[np.ndarray]) -> None:
    """Write the views as consecutive bytes at offset (gather), copying as little as the device allows."""
    fn = getattr(dev, "writev", None)
    if fn is not None:
        await fn(offset, views)
    else:
        await dev.write(offset, _gather(views))


def _scatter(data: np.ndarray, views: list[np.ndarray]) -> None:
    """Copy consecutive bytes out into the views."""
    pos = 0
    for v in views:
        v[:] = data[pos : pos + len(v)]
        pos += len(v)


def _gather(views: list[np.ndarray]) -> Buffer:
    """The views as one buffer (the view itself when there is one, no copy)."""
    if len(views) == 1:
        return views[0]
    return np.concatenate([as_u8(v) for v in views]) if views else b""
