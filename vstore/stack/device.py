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

Capabilities are part of the interface too, each with a default in ``DeviceBase``
(so callers call them, never probe for them): ``identity()`` (None: cannot tell),
``remove_created()`` (nothing created, nothing to remove),
``prepare_io(...)`` (None: no I/O-engine op, use the methods), ``probe(timeout)``
(reads the first block), ``forget_range(offset, length)`` (nothing cached),
``created`` (False) and ``timeout`` (0: the device enforces no command timeout).

``FilterDevice(inner)`` is the base of pass-through layers (offset window, block
alignment, fault injection, crash recording): it forwards everything to ``inner``
and a subclass overrides only what it changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import trio

from vstore.errors import OutOfRangeError

if TYPE_CHECKING:
    from vstore.io.op import Op

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

    # --- capabilities: every device has them (DeviceBase gives the defaults) ---------------

    created: bool
    """True when opening this device created its storage (a failed create removes it again)."""

    timeout: float
    """Seconds after which the device itself gives up on a command (0: it never does)."""

    def identity(self) -> str | None:
        """Equal for two devices exactly when they reach the same storage (None: cannot tell)."""
        ...

    async def remove_created(self) -> None:
        """Remove the storage this open created (``created``), after aclose: a failed create
        leaves nothing behind. Never raises."""
        ...

    def prepare_io(self, is_write: bool, offset: int, views: list[np.ndarray]) -> Op | None:
        """An I/O-engine op moving the views at offset, for a caller that batches the ops of many
        devices (None: the device has none; use readv_into/writev)."""
        ...

    async def probe(self, timeout: float | None = None) -> None:
        """Check the device answers (a multipath path being reinstated); raise MemberIOError if not."""
        ...

    def forget_range(self, offset: int, length: int) -> None:
        """Another path to the same storage wrote [offset, offset+length): drop any older bytes of
        ours that would be laid over it (NFS's uncommitted writes)."""
        ...

    async def run_background(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """The device's background work (multipath's path checker, iSCSI answering the target's
        pings while idle) until cancelled or closed; its owner starts it in a nursery."""
        ...

    def take_unstable(self) -> list[Any]:
        """Hand over the writes acknowledged but not yet proven stable that this device keeps to
        resend (NFS's UNSTABLE writes), forgetting them: a path that died passes them on."""
        ...

    def adopt_unstable(self, writes: list[Any]) -> None:
        """Take over another path's unstable writes to the same storage: the next flush proves
        them stable (or resends them). Only a device of the same kind can."""
        ...


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
    """Helpers shared by concrete devices: size bookkeeping, range checks and the capabilities' defaults."""

    size: int = 0
    block_size: int = 512
    created: bool = False
    timeout: float = 0.0

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

    def identity(self) -> str | None:
        """None: this device cannot tell which storage it reaches."""
        return None

    def prepare_io(self, is_write: bool, offset: int, views: list[np.ndarray]) -> Op | None:
        """None: no I/O-engine op here; the I/O goes through readv_into/writev."""
        return None

    async def remove_created(self) -> None:
        """Nothing was created by this open (``created`` is False): nothing to remove."""

    async def probe(self, timeout: float | None = None) -> None:
        """Read the first block (the caller bounds the time)."""
        await self.read(0, self.block_size)  # type: ignore[attr-defined]

    def forget_range(self, offset: int, length: int) -> None:
        """Nothing is kept here that another path's write could make stale."""

    async def run_background(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """No background work: started, and done."""
        task_status.started()

    def take_unstable(self) -> list[Any]:
        """Nothing kept: what this device acknowledged, its storage holds (a flush makes it stable)."""
        return []

    def adopt_unstable(self, writes: list[Any]) -> None:
        """Refuse writes of another kind of device (none are ever handed to one of this kind)."""
        if writes:
            raise TypeError(f"{type(self).__name__} cannot take over another device's unstable writes")

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()  # type: ignore[attr-defined]


# The methods that move data: a filter overriding none of them passes the bytes through as
# they are, so it may hand on its inner device's I/O-engine ops and probe.
_DATA_METHODS = ("read", "write", "readv_into", "writev")


class FilterDevice(DeviceBase):
    """A pass-through layer: forwards everything to ``inner``; a subclass overrides what it changes.

    ``size``/``block_size`` are the inner device's (a subclass may narrow them),
    ``identity`` and ``forget_range`` always forward. ``prepare_io`` and ``probe``
    forward only while the subclass leaves read/write/readv_into/writev alone: once
    it changes the data path, ``prepare_io`` is None (the I/O must go through its
    methods) and ``probe`` reads through it. ``created`` and ``timeout`` keep
    DeviceBase's defaults (the inner device's file, and its command timeout, are not
    this layer's).
    """

    _passes_data = True

    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner
        self.size = inner.size
        self.block_size = inner.block_size

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._passes_data = all(getattr(cls, m) is getattr(FilterDevice, m) for m in _DATA_METHODS)

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read below."""
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: Buffer) -> None:
        """Write below."""
        await self.inner.write(offset, data)

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Read into the views below."""
        await self.inner.readv_into(offset, views)

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Write the views below."""
        await self.inner.writev(offset, views)

    async def flush(self) -> None:
        """Flush below."""
        await self.inner.flush()

    async def discard(self, offset: int, length: int) -> None:
        """Discard below."""
        await self.inner.discard(offset, length)

    async def aclose(self) -> None:
        """Close the device below."""
        await self.inner.aclose()

    def identity(self) -> str | None:
        """The inner device's identity."""
        return self.inner.identity()

    def prepare_io(self, is_write: bool, offset: int, views: list[np.ndarray]) -> Op | None:
        """The inner device's op while this layer passes data through unchanged (else None)."""
        if not self._passes_data:
            return None
        return self.inner.prepare_io(is_write, offset, views)

    async def probe(self, timeout: float | None = None) -> None:
        """The inner device's probe while this layer passes data through unchanged (else a read)."""
        if self._passes_data:
            await self.inner.probe(timeout)
        else:
            await super().probe(timeout)

    def forget_range(self, offset: int, length: int) -> None:
        """Forward to the inner device."""
        self.inner.forget_range(offset, length)

    async def run_background(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """The inner device's background work."""
        await self.inner.run_background(task_status=task_status)

    def take_unstable(self) -> list[Any]:
        """The inner device's."""
        return self.inner.take_unstable()

    def adopt_unstable(self, writes: list[Any]) -> None:
        """Handed to the inner device."""
        self.inner.adopt_unstable(writes)


async def read_into(dev: BlockDevice, offset: int, views: list[np.ndarray]) -> None:
    """``dev.readv_into(offset, views)`` (every device has it; DeviceBase's reads, then scatters)."""
    await dev.readv_into(offset, views)


async def write_from(dev: BlockDevice, offset: int, views: list[np.ndarray]) -> None:
    """``dev.writev(offset, views)`` (every device has it; DeviceBase's gathers, then writes)."""
    await dev.writev(offset, views)


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
