"""file:// members: a regular file (created sparse on request) or a block device.

I/O runs in worker threads (``trio.to_thread``) with ``os.preadv``/``os.pwritev``
straight into and out of numpy buffers; ``flush`` is ``fdatasync``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

import numpy as np
import trio

from vstore.device import Buffer, DeviceBase, as_u8
from vstore.errors import ConfigError, ExistsError, MemberIOError, NotFoundError

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268

# Many I/Os in flight per file: each batch waits in its own worker thread.
_LIMITER = trio.CapacityLimiter(64)
_IOV_MAX = 1024


class _Request:
    """One read or write waiting in a device's plug."""

    __slots__ = ("is_write", "offset", "bufs", "length", "done", "error")

    def __init__(self, is_write: bool, offset: int, bufs: list[np.ndarray]) -> None:
        self.is_write = is_write
        self.offset = offset
        self.bufs = bufs
        self.length = sum(len(b) for b in bufs)
        self.done = trio.Event()
        self.error: OSError | None = None


class LocalDevice(DeviceBase):
    """A block device over a local file descriptor."""

    def __init__(self, path: str, fd: int, size: int, block_size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.block_size = block_size
        st = os.fstat(fd)
        self._ident = f"file:{st.st_dev}:{st.st_ino}"
        self._queue: list[_Request] = []
        self._plugged = False
        self._is_blockdev = stat.S_ISBLK(st.st_mode)

    def identity(self) -> str:
        """Device and inode: equal for two paths exactly when they name the same storage."""
        return self._ident

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read length bytes at offset."""
        self.check(offset, length)
        buf = np.empty(length, dtype=np.uint8)
        if length:
            await self._submit(_Request(False, offset, [buf]))
        return buf

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Scatter-read consecutive bytes at offset straight into the views (no copy)."""
        req = _Request(False, offset, views)
        self.check(offset, req.length)
        if req.length:
            await self._submit(req)

    async def write(self, offset: int, data: Buffer) -> None:
        """Write the bytes at offset."""
        buf = as_u8(data)
        self.check(offset, len(buf))
        if not len(buf):
            return
        if not buf.flags.c_contiguous:
            buf = np.ascontiguousarray(buf)
        await self._submit(_Request(True, offset, [buf]))

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Gather-write the views as consecutive bytes at offset (one pwritev, no copy)."""
        bufs = [as_u8(v) for v in views]
        bufs = [b if b.flags.c_contiguous else np.ascontiguousarray(b) for b in bufs if len(b)]
        req = _Request(True, offset, bufs)
        self.check(offset, req.length)
        if req.length:
            await self._submit(req)

    async def _submit(self, req: _Request) -> None:
        # Plugging, as the kernel's block layer does: requests issued in the same
        # scheduler tick (a RAID layout fans one request out into many chunk-sized
        # member I/Os) are gathered, adjacent ones merged into one preadv/pwritev
        # with an iovec per piece, and the whole batch runs in ONE worker-thread
        # call. A thread hand-off costs far more than copying 64 KiB.
        self._queue.append(req)
        if self._plugged:
            await req.done.wait()
        else:
            self._plugged = True
            # Shielded: once plugged, this task owes the whole batch its I/O.
            await trio.lowlevel.cancel_shielded_checkpoint()
            batch, self._queue, self._plugged = self._queue, [], False
            await trio.to_thread.run_sync(self._run_batch, batch, limiter=_LIMITER)
            for r in batch:
                r.done.set()
        if req.error is not None:
            op = "write" if req.is_write else "read"
            raise MemberIOError(f"{self.path}: {op} at {req.offset}: {req.error.strerror}")

    def _run_batch(self, batch: list[_Request]) -> None:
        batch.sort(key=lambda r: (r.is_write, r.offset))
        i = 0
        while i < len(batch):
            j = i + 1
            end = batch[i].offset + batch[i].length
            while (j < len(batch) and j - i < _IOV_MAX and batch[j].is_write == batch[i].is_write
                   and batch[j].offset == end):
                end += batch[j].length
                j += 1
            run = batch[i:j]
            try:
                self._do_run(run)
            except OSError as e:
                for r in run:
                    r.error = e
            i = j

    def _do_run(self, run: list[_Request]) -> None:
        views = [memoryview(b) for r in run for b in r.bufs if len(b)]
        offset = run[0].offset
        total = sum(len(v) for v in views)
        done = 0
        while done < total:
            # Skip the iovecs already transferred by a short read/write.
            skip, k = done, 0
            while skip >= len(views[k]):
                skip -= len(views[k])
                k += 1
            iov = [views[k][skip:], *views[k + 1 : k + _IOV_MAX]]
            if run[0].is_write:
                n = os.pwritev(self.fd, iov, offset + done)
            else:
                n = os.preadv(self.fd, iov, offset + done)
                if n == 0:  # past the end of a file that shrank under us: zeros
                    for v in iov:
                        v[:] = b"\0" * len(v)
                    return
            done += n

    async def flush(self) -> None:
        """fdatasync: every write that returned is on stable storage."""
        try:
            await trio.to_thread.run_sync(os.fdatasync, self.fd, limiter=_LIMITER)
        except OSError as e:
            raise MemberIOError(f"{self.path}: flush: {e.strerror}") from e

    async def discard(self, offset: int, length: int) -> None:
        """Punch a hole in a regular file (reads back as zeros); ignored on devices."""
        self.check(offset, length)
        if self._is_blockdev or not length:
            return
        try:
            await trio.to_thread.run_sync(_punch_hole, self.fd, offset, length, limiter=_LIMITER)
        except OSError:
            # Filesystems without hole punching: write zeros so the contract holds.
            await self.write(offset, np.zeros(length, dtype=np.uint8))

    async def aclose(self) -> None:
        """Close the file descriptor."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _punch_hole(fd: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    falloc_fl_keep_size, falloc_fl_punch_hole = 0x01, 0x02
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, falloc_fl_keep_size | falloc_fl_punch_hole, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open_sync(path: str, create_size: int | None, block_size: int) -> LocalDevice:
    flags = os.O_RDWR | os.O_CLOEXEC
    created = False
    if create_size is not None and not os.path.exists(path):
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise NotFoundError(f"{path}: directory {parent} does not exist")
        if create_size <= 0 or create_size % block_size:
            raise ConfigError(f"{path}: size must be a positive multiple of {block_size}")
        flags |= os.O_CREAT | os.O_EXCL
        created = True
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError as e:
        raise NotFoundError(f"{path}: no such file (give --size to create it)") from e
    except FileExistsError as e:
        raise ExistsError(f"{path}: already exists") from e
    except OSError as e:
        raise MemberIOError(f"{path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
            block_size = max(block_size, struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0])
        elif stat.S_ISREG(st.st_mode):
            if created:
                os.ftruncate(fd, create_size)
            size = os.fstat(fd).st_size
        else:
            raise ConfigError(f"{path}: not a regular file or block device")
        size -= size % block_size
        if size <= 0:
            raise ConfigError(f"{path}: empty member (size {size})")
        return LocalDevice(path, fd, size, block_size)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.ENOTTY:
            raise ConfigError(f"{path}: cannot size device") from e
        raise MemberIOError(f"{path}: {e.strerror}") from e
    except BaseException:
        os.close(fd)
        raise


async def open_uri(uri, *, create_size: int | None = None, **opts) -> LocalDevice:
    """Open file:///PATH (creating it sparse when missing and create_size is given)."""
    block_size = int(uri.params.get("block_size", 512))
    return await trio.to_thread.run_sync(_open_sync, uri.path, create_size, block_size)
