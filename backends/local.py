"""file:// members: a regular file (created sparse on request) or a block device.

I/O runs in the threads of ``vstore.io.threads`` with ``os.preadv``/``os.pwritev``
straight into and out of numpy buffers; ``flush`` is ``fdatasync``. A layout that
moves data on many members at once takes ``prepare_io`` ops and submits them as
one batch. ``file:///PATH?direct=1`` adds an O_DIRECT descriptor for aligned
I/O (the page cache bypassed, as QEMU's ``cache=none``; unaligned caller memory
goes through an aligned bounce buffer, unaligned ranges through the page cache).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct

import numpy as np
import trio

from vstore.errors import ConfigError, ExistsError, MemberIOError, NotFoundError
from vstore.io import op as io_op
from vstore.io import threads as io_threads
from vstore.io.buffers import aligned_empty
from vstore.stack.device import Buffer, DeviceBase, as_u8
from vstore.uri import Backend, MemberURI

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268

_LIMITER = trio.CapacityLimiter(16)  # rare calls outside the I/O engine (hole punching)
# Requests up to this size are done on the trio thread when the bytes are in memory
# anyway (see io_threads.run_now): tmpfs members always, other files' reads when
# they hit the page cache.
INLINE_BYTES = 64 * 1024
DIRECT_ALIGN = 4096  # offsets, lengths and memory of O_DIRECT I/O (safe for 512e and 4Kn disks)
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6


def _fs_magic(fd: int) -> int:
    """f_type of statfs(2) on the file's filesystem (0 when it cannot be had)."""
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first field
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fstatfs(fd, buf) != 0:
        return 0
    return int.from_bytes(buf.raw[:8], "little")


def _nowait_reads(fd: int) -> bool:
    """True when preadv2(RWF_NOWAIT) works on this file (EAGAIN instead of waiting for a disk)."""
    try:
        os.preadv(fd, [bytearray(512)], 0, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return True
    except (OSError, AttributeError):
        return False


class LocalDevice(DeviceBase):
    """A block device over a local file descriptor."""

    def __init__(self, path: str, fd: int, size: int, block_size: int, direct_fd: int = -1) -> None:
        self.path = path
        self.fd = fd
        # ?direct=1: a second descriptor with O_DIRECT for aligned I/O (bypassing the page
        # cache, as QEMU's cache=none); the buffered one serves what is not aligned.
        self.direct_fd = direct_fd
        self.created = False  # this open created the file (a failed create removes it again)
        self.size = size
        self.block_size = block_size
        st = os.fstat(fd)
        self._ident = f"file:{st.st_dev}:{st.st_ino}"
        self._is_blockdev = stat.S_ISBLK(st.st_mode)
        # How small requests may skip the I/O threads: always (in memory), reads only
        # with RWF_NOWAIT, or never (a block device: reads may wait for the disk).
        in_memory = not self._is_blockdev and _fs_magic(fd) in (TMPFS_MAGIC, RAMFS_MAGIC)
        self._inline = "all" if in_memory else ("nowait-reads" if _nowait_reads(fd) else "")
        if direct_fd >= 0:
            self._inline = ""

    def identity(self) -> str:
        """Device and inode: equal for two paths exactly when they name the same storage."""
        return self._ident

    def prepare_io(self, is_write: bool, offset: int, views: list[np.ndarray]) -> io_op.Op:
        """A range-checked engine op moving views at offset, for callers that batch ops of many members."""
        if self.direct_fd >= 0:
            direct = self._prepare_direct(is_write, offset, views)
            if direct is not None:
                return direct
        scatter = None
        if not is_write and not all(as_u8(v).flags.c_contiguous for v in views):
            # A strided destination cannot take a readv: read into one buffer, then copy out.
            scatter = [as_u8(v) for v in views]
            views = [np.empty(sum(len(v) for v in scatter), dtype=np.uint8)]
        mv = io_op.views_of(views)
        op = io_op.Op(io_op.WRITE if is_write else io_op.READ, self.fd, offset, mv, self.path)
        op.scatter = scatter
        self.check(offset, op.length)
        if is_write and not self._is_blockdev:
            op.min_size = self.size
        if op.length <= INLINE_BYTES and self._inline:
            if self._inline == "all":
                io_threads.run_now(op)
            elif not is_write:
                io_threads.run_now(op, nowait=True)
        return op

    def _prepare_direct(self, is_write: bool, offset: int, views: list[np.ndarray]) -> io_op.Op | None:
        """An O_DIRECT op, through an aligned bounce buffer when the caller's memory is not aligned."""
        a = DIRECT_ALIGN
        length = sum(len(v) for v in views)
        self.check(offset, length)
        if offset % a or length % a or not length:
            return None  # the buffered descriptor takes it (Linux keeps the two coherent)
        kind = io_op.WRITE if is_write else io_op.READ
        bufs = [as_u8(v) for v in views]
        if all(b.flags.c_contiguous and b.ctypes.data % a == 0 and len(b) % a == 0 for b in bufs):
            op = io_op.Op(kind, self.direct_fd, offset, io_op.views_of(bufs), self.path)
            op.min_size = self.size if is_write and not self._is_blockdev else 0
            return op
        bounce = aligned_empty(length, a)
        if is_write:
            pos = 0
            for b in bufs:
                bounce[pos : pos + len(b)] = b
                pos += len(b)
        op = io_op.Op(kind, self.direct_fd, offset, [memoryview(bounce)], self.path)
        if not is_write:
            op.scatter = bufs
        elif not self._is_blockdev:
            op.min_size = self.size
        return op

    async def _run(self, op: io_op.Op) -> None:
        if (op.length or op.kind == io_op.SYNC) and not op.finished:
            await io_threads.run((op,))
        msg = op.failure()
        if msg is not None:
            raise MemberIOError(msg)

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read length bytes at offset."""
        self.check(offset, length)
        buf = np.empty(length, dtype=np.uint8)
        await self._run(self.prepare_io(False, offset, [buf]))
        return buf

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Scatter-read consecutive bytes at offset straight into the views (no copy)."""
        await self._run(self.prepare_io(False, offset, views))

    async def write(self, offset: int, data: Buffer) -> None:
        """Write the bytes at offset."""
        await self._run(self.prepare_io(True, offset, [as_u8(data)]))

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Gather-write the views as consecutive bytes at offset (one pwritev, no copy)."""
        await self._run(self.prepare_io(True, offset, [as_u8(v) for v in views]))

    async def flush(self) -> None:
        """fdatasync: every write that returned is on stable storage."""
        # Not through the I/O threads: a disk's flush can take milliseconds, and they
        # are few (as many as cores) to keep the data copies fast.
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

    async def remove_created(self) -> None:
        """Unlink the file this open created (a failed create leaves nothing behind)."""
        if self.created:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def aclose(self) -> None:
        """Close the file descriptors."""
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1
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


def _create_sized(path: str, size: int, flags: int) -> int:
    """Create path with its size already set (a file of another name, linked in once sized).

    A process killed half way leaves no empty file at path to refuse the next try
    ("empty member"), only a stray ``.vstore-new-PID`` file beside it.
    """
    tmp = f"{path}.vstore-new-{os.getpid()}"
    fd = os.open(tmp, flags | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        try:
            os.link(tmp, path)  # FileExistsError when path appeared meanwhile
        except FileExistsError:
            raise
        except OSError:  # no hard links on this filesystem: create in place
            os.close(fd)
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return fd


def _open_sync(path: str, create_size: int | None, block_size: int, direct: bool = False) -> LocalDevice:
    flags = os.O_RDWR | os.O_CLOEXEC
    created = False
    if create_size is not None and not os.path.exists(path):
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise NotFoundError(f"{path}: directory {parent} does not exist")
        if create_size <= 0 or create_size % block_size:
            raise ConfigError(f"{path}: size must be a positive multiple of {block_size}")
        created = True
    try:
        fd = _create_sized(path, create_size, flags) if created else os.open(path, flags, 0o600)
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
            size = st.st_size
        else:
            raise ConfigError(f"{path}: not a regular file or block device")
        size -= size % block_size
        if size <= 0:
            raise ConfigError(f"{path}: empty member (size {size})")
        direct_fd = -1
        if direct:
            try:
                direct_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
            except OSError as e:
                raise ConfigError(f"{path}: direct=1 but O_DIRECT is refused here: {e.strerror}") from e
        dev = LocalDevice(path, fd, size, block_size, direct_fd)
        dev.created = created
        return dev
    except OSError as e:
        os.close(fd)
        if e.errno == errno.ENOTTY:
            raise ConfigError(f"{path}: cannot size device") from e
        raise MemberIOError(f"{path}: {e.strerror}") from e
    except BaseException:
        os.close(fd)
        raise


async def open_uri(uri: MemberURI, *, create_size: int | None = None, **opts) -> LocalDevice:
    """Open file:///PATH (creating it sparse when missing and create_size is given)."""
    block_size = int(uri.params.get("block_size", 512))
    direct_text = uri.params.get("direct", "0").lower()
    if direct_text not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ConfigError(f"{uri.path}: direct={direct_text!r} is not a yes/no value (direct=1)")
    direct = direct_text in ("1", "true", "yes", "on")
    return await trio.to_thread.run_sync(_open_sync, uri.path, create_size, block_size, direct)


def _check_uri(uri: MemberURI) -> None:
    if uri.host not in ("", "localhost") or not uri.path.startswith("/"):
        raise ConfigError(f"file URI needs an absolute path: {uri.redacted()!r} (file:///abs/path)")


BACKEND = Backend("file", open_uri, frozenset({"block_size", "direct"}), _check_uri)
