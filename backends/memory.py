"""memory:// members: RAM-backed block devices for tests and benchmarks.

Devices with the same name in one process share their bytes, so a test can
"reopen" a memory member and see what was written (like a disk that stays).
"""

from __future__ import annotations

import numpy as np

from vstore.errors import ConfigError, NotFoundError
from vstore.io import op as io_op
from vstore.sizes import parse_size
from vstore.stack.device import Buffer, DeviceBase, as_u8
from vstore.uri import Backend, MemberURI

_STORES: dict[str, np.ndarray] = {}


class MemoryDevice(DeviceBase):
    """A block device whose bytes live in a numpy array."""

    def __init__(self, store: np.ndarray, block_size: int = 512, name: str = "") -> None:
        self.store = store
        self.size = len(store)
        self.block_size = block_size
        self.name = name
        self.closed = False

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Return a copy of the bytes (a copy, so later writes do not change it)."""
        self.check(offset, length)
        return self.store[offset : offset + length].copy()

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Copy consecutive bytes straight into the views (one copy)."""
        self.check(offset, sum(len(v) for v in views))
        for v in views:
            v[:] = self.store[offset : offset + len(v)]
            offset += len(v)

    def prepare_io(self, is_write: bool, offset: int, views: list[np.ndarray]) -> io_op.Op | None:
        """Move the bytes at once and hand back a finished op (layouts batch member I/O as ops).

        A subclass that changes read/write (a test device that yields or refuses)
        gets None: its I/O goes through its own methods.
        """
        if type(self).read is not MemoryDevice.read or type(self).write is not MemoryDevice.write:
            return None
        self.check(offset, sum(len(v) for v in views))
        for v in views:
            n = len(v)
            if is_write:
                self.store[offset : offset + n] = as_u8(v)
            else:
                v[:] = self.store[offset : offset + n]
            offset += n
        return io_op.Op.completed(self.name)

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Store consecutive bytes from the views (one copy)."""
        self.check(offset, sum(len(v) for v in views))
        for v in views:
            v = as_u8(v)
            self.store[offset : offset + len(v)] = v
            offset += len(v)

    async def write(self, offset: int, data: Buffer) -> None:
        """Store the bytes."""
        buf = as_u8(data)
        self.check(offset, len(buf))
        self.store[offset : offset + len(buf)] = buf

    async def flush(self) -> None:
        """Memory is as durable as it gets."""

    async def discard(self, offset: int, length: int) -> None:
        """Discarded ranges read back as zeros."""
        self.check(offset, length)
        self.store[offset : offset + length] = 0

    async def aclose(self) -> None:
        """Nothing to release; the store stays for a later reopen."""
        self.closed = True

    def identity(self) -> str:
        """A string that is equal for two devices exactly when they share storage."""
        return f"memory:{id(self.store)}"


def forget(name: str | None = None) -> None:
    """Drop one named memory store (or all of them)."""
    if name is None:
        _STORES.clear()
    else:
        _STORES.pop(name, None)


async def open_uri(uri: MemberURI, *, create_size: int | None = None, **opts) -> MemoryDevice:
    """Open memory://NAME?size=SIZE, creating the store on first use."""
    params = uri.params
    block_size = int(params.get("block_size", 512))
    store = _STORES.get(uri.host)
    if store is None:
        size_text = params.get("size")
        size = parse_size(size_text) if size_text else create_size
        if size is None:
            raise NotFoundError(f"memory member {uri.host!r} does not exist and has no size")
        if size <= 0 or size % block_size:
            raise ConfigError(f"memory member size must be a positive multiple of {block_size}")
        store = _STORES[uri.host] = np.zeros(size, dtype=np.uint8)
    return MemoryDevice(store, block_size, uri.host)


def _check_uri(uri: MemberURI) -> None:
    if not uri.host:
        raise ConfigError(f"memory URI needs a name: {uri.redacted()!r} (memory://NAME?size=1G)")


BACKEND = Backend("memory", open_uri, frozenset({"size", "block_size"}), _check_uri)
