"""The FUSE filesystem of a mounted pool: one regular file per logical volume.

Layout of the mount::

    /VOLUME              one file per volume, sized exactly to it (mode 0600)
    /.vstore/status      JSON of target.status(), regenerated on every open (read-only)
    /.vstore/fuse-stats  JSON of this filesystem's request counters (request sizes)

Data path: a read returns the engine's buffer as a memoryview (no copy in
Python; the kernel copies it once into the caller's pages). A write arrives as
the ``bytes`` pyfuse3 copied out of /dev/fuse and is handed to the volume as is.
No data is cached here: writes go straight to the engine (the kernel's write
back cache is off), so nothing is buffered beyond the requests in flight.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import pyfuse3
import trio
from pyfuse3 import FUSEError

from vstore.errors import OutOfRangeError, ReadOnlyError, VstoreError
from vstore.io import threads as io_threads
from vstore.io.stats import HANDOFFS, LayerStats, now_ns
from vstore.stack.device import BlockDevice

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
META_DIR_INODE = ROOT_INODE + 1
STATUS_INODE = ROOT_INODE + 2
STATS_INODE = ROOT_INODE + 3
FIRST_VOLUME_INODE = 16

META_DIR = ".vstore"
STATUS_NAME = "status"
STATS_NAME = "fuse-stats"
STATFS_BLOCK = 4096

# fallocate(2) modes (linux/falloc.h); the kernel's FUSE passes on only these three.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
ZERO_PIECE = 1 << 20  # a punch reads and zeroes the range in pieces of this size
ZERO_BLOCK = 4096  # ... and writes zeros only over the blocks of a piece that are not zero already


class MountTarget(Protocol):
    """What the FUSE front end mounts: a pool (vstore.pool.pool.Pool satisfies it).

    The control socket's commands on it come from a registry (vstore.pool.commands).
    """

    name: str
    volumes: Mapping[str, BlockDevice]

    async def flush(self) -> None: ...

    def status(self) -> dict: ...

    def io_stats(self) -> dict:
        """Per-layer accounting below the FUSE handlers (``.vstore/fuse-stats`` → layers)."""
        ...

    async def run_background(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """Background work (path checkers, operations) for as long as the mount lasts."""
        ...

    async def aclose(self, clean: bool = True) -> None: ...


def status_json(target: MountTarget) -> bytes:
    """The bytes of .vstore/status: json.dumps(target.status())."""
    from vstore.pool.control import json_default

    return (json.dumps(target.status(), default=json_default, indent=2) + "\n").encode()


@dataclass
class RequestStats:
    """Counters of one kind of request: how many, how many bytes, which sizes arrive."""

    count: int = 0
    bytes: int = 0
    max_size: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # power-of-two bucket -> count

    def add(self, size: int) -> None:
        """Count one request of size bytes."""
        self.count += 1
        self.bytes += size
        if size > self.max_size:
            self.max_size = size
        bucket = 1 << max(size - 1, 0).bit_length()
        self.sizes[bucket] = self.sizes.get(bucket, 0) + 1

    def as_dict(self) -> dict:
        """JSON-able view; size buckets as 'up to N bytes'."""
        return {
            "count": self.count,
            "bytes": self.bytes,
            "max_size": self.max_size,
            "sizes": {str(k): v for k, v in sorted(self.sizes.items())},
        }


@dataclass
class _Handle:
    ino: int
    name: str  # volume name, or "" for a metadata file
    writable: bool
    dirty: bool = False
    content: bytes = b""  # snapshot of a metadata file


class _ErrorLog:
    """Log the first engine error of each kind (then every 10^k-th), never a storm.

    Keyed by operation and error class only, so that messages carrying offsets cannot
    grow the table or the log without bound.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def report(self, op: str, exc: BaseException, *, bug: bool) -> None:
        """Count one error; log it if it is the first of its kind (or the 10th, 100th, ...)."""
        key = (op, type(exc).__name__)
        n = self.counts.get(key, 0) + 1
        self.counts[key] = n
        if n == 1 or (n >= 10 and str(n).rstrip("0") == "1"):
            again = f" (seen {n} times)" if n > 1 else ""
            if bug:
                log.error("%s: internal error%s: %r", op, again, exc, exc_info=exc if n == 1 else None)
            else:
                log.error("%s: %s: %s%s", op, type(exc).__name__, exc, again)


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _only_vstore_errors(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_vstore_errors(e) for e in exc.exceptions)
    return isinstance(exc, VstoreError)


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _guard(fn: F) -> F:
    """Turn every engine error into an errno: the daemon must never die of one."""

    @functools.wraps(fn)
    async def wrapper(self: VolumeFS, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except Exception as exc:
            leaf = _first_leaf(exc)
            if isinstance(leaf, ReadOnlyError):
                raise FUSEError(errno.EROFS) from None
            vstore_only = _only_vstore_errors(exc)
            self.errors.report(fn.__name__, leaf if vstore_only else exc, bug=not vstore_only)
            raise FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class VolumeFS(pyfuse3.Operations):
    """pyfuse3 operations exposing each volume of a MountTarget as one regular file."""

    supports_dot_lookup = False
    enable_writeback_cache = False  # write-through: nothing dirty in the kernel, no reclaim loops
    enable_acl = False

    def __init__(
        self,
        target: MountTarget,
        *,
        read_only: bool = False,
        uid: int | None = None,
        gid: int | None = None,
        attr_timeout: float = 5.0,
    ) -> None:
        self.target = target
        self.read_only = read_only
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.attr_timeout = attr_timeout
        self.mount_time_ns = time.time_ns()
        self.errors = _ErrorLog()
        self.reads = RequestStats()
        self.writes = RequestStats()
        self.fallocates = RequestStats()  # fallocate(2) requests: punch (discard), zero, allocate
        self.layer = LayerStats()  # time from the handler into the volume and back
        self.flushes = 0
        self.write_generation = 0  # bumped by every write; compared by the periodic flusher
        self._ino_of: dict[str, int] = {}
        self._name_of: dict[int, str] = {}
        self._size_of: dict[int, int] = {}
        self._mtime_ns: dict[int, int] = {}
        self._next_ino = FIRST_VOLUME_INODE
        self._handles: dict[int, _Handle] = {}
        self._dir_listings: dict[int, list[tuple[bytes, int]]] = {}
        self._next_fh = 1

    # ---- names and inodes -------------------------------------------------

    def _volume_inode(self, name: str) -> int:
        """The inode of a volume name: stable while the volume exists."""
        ino = self._ino_of.get(name)
        if ino is None:
            ino = self._ino_of[name] = self._next_ino
            self._next_ino += 1
            self._name_of[ino] = name
        return ino

    def _volume(self, ino: int) -> tuple[str, BlockDevice]:
        name = self._name_of.get(ino)
        if name is None:
            raise FUSEError(errno.ENOENT)
        dev = self.target.volumes.get(name)
        if dev is None:
            raise FUSEError(errno.ENOENT)
        return name, dev

    def _entry(self, ino: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        entry.generation = 0
        entry.entry_timeout = self.attr_timeout
        entry.attr_timeout = self.attr_timeout
        entry.st_uid = self.uid
        entry.st_gid = self.gid
        entry.st_rdev = 0
        now = self.mount_time_ns
        entry.st_atime_ns = entry.st_ctime_ns = entry.st_mtime_ns = now
        if ino == ROOT_INODE or ino == META_DIR_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 3 if ino == ROOT_INODE else 2
            entry.st_size = 0
            entry.st_blksize = STATFS_BLOCK
            entry.st_blocks = 0
        elif ino == STATUS_INODE or ino == STATS_INODE:
            content = self._meta_content(ino)
            entry.st_mode = stat.S_IFREG | 0o444
            entry.st_nlink = 1
            entry.st_size = len(content)
            entry.st_blksize = STATFS_BLOCK
            entry.st_blocks = (len(content) + 511) // 512
            entry.attr_timeout = 0  # regenerated every time
            entry.st_mtime_ns = entry.st_ctime_ns = time.time_ns()
        else:
            _, dev = self._volume(ino)
            self._size_of[ino] = dev.size
            entry.st_mode = stat.S_IFREG | 0o600
            entry.st_nlink = 1
            entry.st_size = dev.size
            entry.st_blksize = max(int(dev.block_size), STATFS_BLOCK)
            entry.st_blocks = dev.size // 512
            entry.st_mtime_ns = entry.st_ctime_ns = self._mtime_ns.get(ino, now)
        return entry

    def _meta_content(self, ino: int) -> bytes:
        if ino == STATUS_INODE:
            return status_json(self.target)
        return (json.dumps(self.stats(), indent=2) + "\n").encode()

    def open_count(self, name: str) -> int:
        """How many open file handles this mount has on volume ``name``."""
        return sum(1 for h in self._handles.values() if h.name == name)

    def stats(self) -> dict:
        """Request counters of this mount (what request sizes actually arrive)."""
        out: dict[str, Any] = {
            "read": self.reads.as_dict(),
            "write": self.writes.as_dict(),
            "fallocate": self.fallocates.as_dict(),
            "flush": self.flushes,
            "open_handles": len(self._handles),
            "errors": sum(self.errors.counts.values()),
        }
        # Per-layer accounting: the FUSE handlers' time in the engine, then the layout's
        # (its own time, what it waited for, its member I/O), then the thread hand-offs.
        layers: dict[str, Any] = {"fuse_handler": self.layer.as_dict()}
        layers.update(self.target.io_stats())
        out["layers"] = layers
        requests = self.reads.count + self.writes.count
        handoffs = {"io_thread_wakeups": io_threads.handoffs(), **HANDOFFS}
        out["handoffs"] = handoffs
        out["handoffs_per_request"] = round(sum(handoffs.values()) / requests, 3) if requests else 0.0
        return out

    def _root_listing(self) -> list[tuple[bytes, int]]:
        names = [(META_DIR.encode(), META_DIR_INODE)]
        for name in sorted(self.target.volumes):
            if name == META_DIR:
                continue
            names.append((os.fsencode(name), self._volume_inode(name)))
        return names

    # ---- lookups and attributes -------------------------------------------

    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Find a volume file (or a .vstore entry) by name."""
        text = os.fsdecode(name)
        if parent_inode == ROOT_INODE:
            if text == META_DIR:
                return self._entry(META_DIR_INODE)
            if text in self.target.volumes:
                return self._entry(self._volume_inode(text))
        elif parent_inode == META_DIR_INODE:
            if text == STATUS_NAME:
                return self._entry(STATUS_INODE)
            if text == STATS_NAME:
                return self._entry(STATS_INODE)
        raise FUSEError(errno.ENOENT)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Attributes of a volume file, a directory or a metadata file."""
        return self._entry(inode)

    @_guard
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        """Accept truncate to the current size and time updates; refuse every other change."""
        current = self._entry(inode)
        if fields.update_size and attr.st_size != current.st_size:
            raise FUSEError(errno.EPERM)  # a volume's size is set by `vstore volume resize`
        if fields.update_mode and stat.S_IMODE(attr.st_mode) != stat.S_IMODE(current.st_mode):
            raise FUSEError(errno.EPERM)
        if fields.update_uid and attr.st_uid != current.st_uid:
            raise FUSEError(errno.EPERM)
        if fields.update_gid and attr.st_gid != current.st_gid:
            raise FUSEError(errno.EPERM)
        if fields.update_mtime and inode >= FIRST_VOLUME_INODE:
            self._mtime_ns[inode] = attr.st_mtime_ns
            current.st_mtime_ns = attr.st_mtime_ns
        return current

    async def forget(self, inode_list: Any) -> None:
        """Inodes live as long as their volume; nothing to forget."""

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """Total = the sum of the volume sizes; no free space (files never grow)."""
        total = sum(dev.size for dev in list(self.target.volumes.values()))
        st = pyfuse3.StatvfsData()
        st.f_bsize = STATFS_BLOCK
        st.f_frsize = STATFS_BLOCK
        st.f_blocks = total // STATFS_BLOCK
        st.f_bfree = 0
        st.f_bavail = 0
        st.f_files = len(self.target.volumes) + 4
        st.f_ffree = 0
        st.f_favail = 0
        st.f_namemax = 255
        return st

    # ---- directories --------------------------------------------------------

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Snapshot the listing so that offsets stay valid while volumes come and go."""
        if inode == ROOT_INODE:
            listing = self._root_listing()
        elif inode == META_DIR_INODE:
            listing = [(STATUS_NAME.encode(), STATUS_INODE), (STATS_NAME.encode(), STATS_INODE)]
        else:
            raise FUSEError(errno.ENOTDIR)
        fh = self._new_fh()
        self._dir_listings[fh] = listing
        return fh

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List from entry start_id on."""
        listing = self._dir_listings.get(fh, [])
        for index in range(start_id, len(listing)):
            name, ino = listing[index]
            try:
                entry = self._entry(ino)
            except FUSEError:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, name, entry, index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        """Drop the listing snapshot."""
        self._dir_listings.pop(fh, None)

    @_guard
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Flush the whole stack."""
        await self._flush_target()

    # ---- files --------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """Open a volume file (page cache on, so loop devices work) or a metadata snapshot."""
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if inode in (STATUS_INODE, STATS_INODE):
            if writable:
                raise FUSEError(errno.EACCES)
            fh = self._new_fh()
            self._handles[fh] = _Handle(inode, "", False, content=self._meta_content(inode))
            # direct_io: reads are answered from the snapshot whatever st_size said
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if inode in (ROOT_INODE, META_DIR_INODE):
            raise FUSEError(errno.EISDIR)
        name, dev = self._volume(inode)
        if writable and self.read_only:
            raise FUSEError(errno.EROFS)
        if flags & os.O_TRUNC and dev.size != 0:
            # libfuse asks for atomic O_TRUNC: the truncate arrives here, not in setattr
            raise FUSEError(errno.EPERM)
        fh = self._new_fh()
        self._handles[fh] = _Handle(inode, name, writable)
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=False)

    def _handle(self, fh: int) -> _Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise FUSEError(errno.EBADF)
        return handle

    def _device(self, handle: _Handle) -> BlockDevice:
        dev = self.target.volumes.get(handle.name)
        if dev is None or self._ino_of.get(handle.name) != handle.ino:
            raise FUSEError(errno.ENODEV)  # the volume was removed while open
        return dev

    @_guard
    async def read(self, fh: int, off: int, size: int) -> memoryview | bytes:
        """Read up to size bytes at off, clipped at the end of the volume."""
        handle = self._handle(fh)
        if not handle.name:
            return handle.content[off : off + size]
        dev = self._device(handle)
        self.reads.add(size)
        length = min(size, dev.size - off)
        if length <= 0:
            return b""
        t0 = now_ns()
        data = await dev.read(off, length)
        self.layer.read.add(length, now_ns() - t0)
        if isinstance(data, np.ndarray):
            if not data.flags.c_contiguous:
                data = np.ascontiguousarray(data)
            return memoryview(data).cast("B") if data.dtype != np.uint8 else memoryview(data)
        return data

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Write all of buf at off; a write reaching past the end fails whole (ENOSPC)."""
        handle = self._handle(fh)
        if not handle.name:
            raise FUSEError(errno.EBADF)
        if self.read_only:
            raise FUSEError(errno.EROFS)
        dev = self._device(handle)
        length = len(buf)
        self.writes.add(length)
        if off < 0 or off + length > dev.size:
            raise FUSEError(errno.ENOSPC)  # as a block device does: volumes never grow
        handle.dirty = True
        self.write_generation += 1
        t0 = now_ns()
        try:
            await dev.write(off, buf)
        except OutOfRangeError:
            raise FUSEError(errno.ENOSPC) from None  # the volume shrank under us
        finally:
            self.layer.write.add(length, now_ns() - t0)
        self._mtime_ns[handle.ino] = time.time_ns()
        return length

    @_guard
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2): PUNCH_HOLE frees member space and reads back zeros; ZERO_RANGE writes zeros.

        A punch (what a loop device sends for a discard, what ``fstrim`` ends in) first
        writes zeros over every block of the range that does not read as zeros already,
        then discards the range below: the discard frees space where the members can
        (holes in sparse file members) and is a no-op where they cannot (parity layouts,
        NFSv3), so the range reads as zeros whatever the layers below did with it and
        no stale byte ever comes back. Plain allocation succeeds inside the volume (its
        space is addressable already); a file never grows (ENOSPC, as for writes).
        """
        handle = self._handle(fh)
        if not handle.name:
            raise FUSEError(errno.EBADF)
        if self.read_only:
            raise FUSEError(errno.EROFS)
        if not handle.writable:
            raise FUSEError(errno.EBADF)
        dev = self._device(handle)
        if offset < 0 or length <= 0:
            raise FUSEError(errno.EINVAL)
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise FUSEError(errno.EOPNOTSUPP)
        punch, zero = bool(mode & FALLOC_FL_PUNCH_HOLE), bool(mode & FALLOC_FL_ZERO_RANGE)
        if (punch and zero) or (punch and not mode & FALLOC_FL_KEEP_SIZE):
            raise FUSEError(errno.EOPNOTSUPP)  # as fallocate(2) says; the VFS refuses these first
        end = offset + length
        if end > dev.size:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise FUSEError(errno.ENOSPC)  # the file would grow: volumes never do
            end = dev.size
        self.fallocates.add(length)
        if end <= offset or not (punch or zero):
            return
        handle.dirty = True
        self.write_generation += 1
        try:
            await self._zero(dev, offset, end, only_nonzero=punch)
            if punch:
                await self._discard(dev, offset, end)
        except OutOfRangeError:
            raise FUSEError(errno.ENOSPC) from None  # the volume shrank under us
        self._mtime_ns[handle.ino] = time.time_ns()

    async def _zero(self, dev: BlockDevice, offset: int, end: int, *, only_nonzero: bool) -> None:
        """Write zeros over [offset, end); with only_nonzero, only over blocks that are not zero yet."""
        zeros = np.zeros(min(ZERO_PIECE, end - offset), np.uint8)
        for start in range(offset, end, ZERO_PIECE):
            n = min(ZERO_PIECE, end - start)
            if not only_nonzero:
                await dev.write(start, zeros[:n])
                continue
            data = np.asarray(await dev.read(start, n), dtype=np.uint8)
            for a, b in _nonzero_runs(data, ZERO_BLOCK):
                await dev.write(start + a, zeros[: b - a])

    async def _discard(self, dev: BlockDevice, offset: int, end: int) -> None:
        """Discard below to free space; advisory (the range is zeros already), so an error is logged only."""
        try:
            await dev.discard(offset, end - offset)
        except VstoreError as e:
            self.errors.report("discard", e, bug=False)

    @_guard
    async def flush(self, fh: int) -> None:
        """close(): make this handle's writes durable (if it wrote anything)."""
        handle = self._handles.get(fh)
        if handle is not None and handle.dirty:
            handle.dirty = False
            try:
                await self._flush_target()
            except BaseException:
                handle.dirty = True
                raise

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        """fsync/fdatasync: flush the whole stack; durable on the members when this returns."""
        handle = self._handles.get(fh)
        if handle is not None:
            handle.dirty = False
        await self._flush_target()

    async def release(self, fh: int) -> None:
        """Forget the handle (its data was flushed by flush())."""
        self._handles.pop(fh, None)

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """Permissions are checked by the kernel (default_permissions)."""
        return True

    async def _flush_target(self) -> None:
        self.flushes += 1
        await self.target.flush()

    # Namespace changes: volumes are created and removed with `vstore volume ...`.
    async def create(self, *args: Any) -> Any:
        """Refused: volumes are created with `vstore volume create`."""
        raise FUSEError(errno.EPERM)

    async def mknod(self, *args: Any) -> Any:
        """Refused."""
        raise FUSEError(errno.EPERM)

    async def mkdir(self, *args: Any) -> Any:
        """Refused."""
        raise FUSEError(errno.EPERM)

    async def unlink(self, *args: Any) -> None:
        """Refused: volumes are removed with `vstore volume remove`."""
        raise FUSEError(errno.EPERM)

    async def rmdir(self, *args: Any) -> None:
        """Refused."""
        raise FUSEError(errno.EPERM)

    async def rename(self, *args: Any) -> None:
        """Refused."""
        raise FUSEError(errno.EPERM)

    async def symlink(self, *args: Any) -> Any:
        """Refused."""
        raise FUSEError(errno.EPERM)

    async def link(self, *args: Any) -> Any:
        """Refused."""
        raise FUSEError(errno.EPERM)

    # ---- live changes ---------------------------------------------------------

    async def refresh(self) -> None:
        """Tell the kernel about volumes removed or resized since it last asked."""
        current = self.target.volumes
        for name, ino in list(self._ino_of.items()):
            dev = current.get(name)
            if dev is None:
                del self._ino_of[name]
                self._name_of.pop(ino, None)
                self._size_of.pop(ino, None)
                await _notify(pyfuse3.invalidate_entry, ROOT_INODE, os.fsencode(name), ino)
            elif ino in self._size_of and self._size_of[ino] != dev.size:
                self._size_of[ino] = dev.size
                await _notify(pyfuse3.invalidate_inode, ino, False)


def _nonzero_runs(data: np.ndarray, block: int) -> list[tuple[int, int]]:
    """The [start, end) runs of data's block-sized pieces (the last may be short) that hold a non-zero byte."""
    full = len(data) // block * block
    flags = list(np.any(data[:full].reshape(-1, block), axis=1)) if full else []
    if full < len(data):
        flags.append(bool(np.any(data[full:])))
    runs: list[tuple[int, int]] = []
    for i, nonzero in enumerate(flags):
        if not nonzero:
            continue
        a, b = i * block, min((i + 1) * block, len(data))
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return runs


async def _notify(fn: Callable[..., None], *args: Any) -> None:
    """Run a blocking kernel notification off the trio thread (it may wait on our own requests)."""
    try:
        await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTCONN, errno.EBADF):
            log.warning("kernel notification %s%r failed: %s", fn.__name__, args, e)
