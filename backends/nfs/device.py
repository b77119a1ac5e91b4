"""NfsDevice: one file on an NFSv3 export as a BlockDevice, and opening it from a URI.

Writes go UNSTABLE and are remembered (a copy of each range, with the write
verifier the server returned) until a COMMIT proves them stable: ``flush()``
sends COMMIT, and when its verifier differs from a range's (the server
restarted and may have lost its cache), that range is written again and
COMMIT repeated. The remembered ranges are bounded in memory: past half the
bound a writer commits early, at the bound writers wait for that commit, and a
single write bigger than half the bound goes FILE_SYNC and is not remembered.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import trio

from vstore.errors import ConfigError, MemberIOError, ProtocolError
from vstore.io.aio import run_all
from vstore.stack.device import Buffer, DeviceBase, as_u8
from vstore.stack.iovec import IoVec, finish_reads, read_targets, write_sources
from vstore.uri import MemberURI

from . import nfs3
from .client import RpcClient
from .nfs3 import NfsError, NfsJukeboxError, NfsNotFoundError
from .rpc import auth_sys

MAX_TRANSFER = 1 << 20  # clamp rtmax/wtmax: Ganesha offers 64 MiB
MIN_TRANSFER = 4096
DEFAULT_CACHE = 64 << 20


@dataclass(slots=True)
class _Range:
    """An uncommitted range: its data, the verifier of the WRITE that sent it, and its order."""

    start: int
    data: np.ndarray
    verf: bytes
    seq: int
    base: np.ndarray | None = None  # the pooled buffer data fills, when it fills one whole

    @property
    def end(self) -> int:
        return self.start + len(self.data)


class UncommittedRanges:
    """Non-overlapping ranges written UNSTABLE and not yet proven stable; newest data wins."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._by_start: dict[int, _Range] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self):
        return iter([self._by_start[s] for s in self._starts])

    def _drop(self, r: _Range) -> None:
        i = bisect.bisect_left(self._starts, r.start)
        del self._starts[i]
        del self._by_start[r.start]
        self.nbytes -= len(r.data)

    def _put(self, r: _Range) -> None:
        bisect.insort(self._starts, r.start)
        self._by_start[r.start] = r
        self.nbytes += len(r.data)

    def add(self, start: int, data: np.ndarray, verf: bytes, seq: int,
            base: np.ndarray | None = None) -> None:
        """Record data written at start; older overlapping ranges are trimmed away."""
        self.forget(start, start + len(data))
        self._put(_Range(start, data, verf, seq, base))

    def forget(self, start: int, end: int) -> None:
        """Drop [start, end) from every range (newer bytes went to the server another way)."""
        for r in self.overlapping(start, end):
            self._drop(r)
            if r.start < start:
                self._put(_Range(r.start, r.data[: start - r.start], r.verf, r.seq))
            if r.end > end:
                self._put(_Range(end, r.data[end - r.start :], r.verf, r.seq))

    def overlapping(self, start: int, end: int) -> list[_Range]:
        """The ranges that overlap [start, end)."""
        starts = self._starts
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        out = []
        while i < len(starts) and starts[i] < end:
            r = self._by_start[starts[i]]
            if r.end > start:
                out.append(r)
            i += 1
        return out

    def discard(self, r: _Range) -> None:
        """Forget a range (it is stable), if it is still recorded."""
        if self._by_start.get(r.start) is r:
            self._drop(r)

    def holds(self, r: _Range) -> bool:
        """Whether r is still recorded as it is."""
        return self._by_start.get(r.start) is r


class BufferPool:
    """Reused buffers of one size for the copies of uncommitted data.

    Fresh memory costs a page fault per 4 KiB on first touch, which made the copy
    several times slower than the memcpy itself.
    """

    def __init__(self, size: int, max_free: int) -> None:
        self.size = size
        self.max_free = max_free
        self._free: list[np.ndarray] = []

    def get(self, n: int) -> np.ndarray:
        """A buffer of n bytes (a pooled one when n is the pool's size)."""
        if n == self.size and self._free:
            return self._free.pop()
        return np.empty(n, dtype=np.uint8)

    def put(self, buf: np.ndarray) -> None:
        """Give back a buffer that nothing refers to any more."""
        if len(buf) == self.size and len(self._free) < self.max_free:
            self._free.append(buf)


class NfsDevice(DeviceBase):
    """A regular file on an NFSv3 server as a block device."""

    def __init__(self, client: RpcClient, fh: bytes, attrs: nfs3.Fattr3, fsinfo: nfs3.FsInfo,
                 label: str, *, cache_bytes: int = DEFAULT_CACHE, rsize: int | None = None,
                 wsize: int | None = None, jukebox_timeout: float = 60.0) -> None:
        self._nfs = client
        self.fh = fh
        self.label = label
        self.block_size = 512
        self.size = attrs.size - attrs.size % self.block_size
        self.fsid, self.fileid = attrs.fsid, attrs.fileid
        # Explicit transfer sizes override FSINFO (tests use them to provoke short WRITEs).
        self.rsize = _transfer_size(rsize or fsinfo.rtmax)
        self.wsize = _transfer_size(wsize or fsinfo.wtmax)
        self._jukebox_timeout = jukebox_timeout
        self._cache = UncommittedRanges()
        self._cache_limit = cache_bytes
        self._pool = BufferPool(self.wsize, cache_bytes // self.wsize)
        self._seq = 0
        self._bytes_since_commit = 0  # written UNSTABLE since the last COMMIT was sent
        self._commit_lock = trio.Lock()
        self._commit_done = trio.Event()  # set (and replaced) each time a commit round ends
        self._gate_closed = False  # writers wait while uncommitted ranges are resent
        self._gate_open = trio.Event()
        self._writes_in_flight = 0
        self._drained = trio.Event()
        self.stats = {"commits": 0, "resent_ranges": 0, "short_writes": 0, "verifier_changes": 0}

    # ---- identity and liveness (multipath) --------------------------------------------

    def identity(self) -> str:
        """fsid, fileid and file handle: equal for two paths exactly when they reach the same file."""
        return f"nfs:{self.fsid:x}:{self.fileid:x}:{self.fh.hex()}"

    async def probe(self, timeout: float | None = None) -> None:
        """GETATTR on the file: raises MemberIOError unless the path works and the file is there."""
        u, _ = await self._nfs.call(nfs3.GETATTR, nfs3.fh_args(self.fh), timeout=timeout)
        nfs3.decode_getattr(u, f"{self.label}: GETATTR")

    # ---- calls with JUKEBOX retry ------------------------------------------------------

    async def _call(self, proc: int, args: list, decode, what: str):
        """Call and decode, asking again (new XID) while the server answers JUKEBOX."""

        async def attempt():
            u, _ = await self._nfs.call(proc, args)
            return decode(u, f"{self.label}: {what}")

        return await self._jukebox_retry(attempt)

    async def _jukebox_retry(self, attempt):
        delay = 0.05
        deadline = None
        while True:
            try:
                return await attempt()
            except NfsJukeboxError:
                # The server is busy (e.g. recalling a file from slow storage): ask again later
                # with a new XID, since the duplicate-request cache may hold the JUKEBOX reply.
                now = trio.current_time()
                if deadline is None:
                    deadline = now + self._jukebox_timeout
                if now + delay > deadline:
                    raise
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # ---- read -------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read length bytes at offset (large requests split at rsize, issued concurrently)."""
        self.check(offset, length)
        out = np.empty(length, dtype=np.uint8)
        await self._read_span(memoryview(out), offset)
        return out

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Read consecutive bytes at offset straight into the views (READ replies land in them)."""
        dest, bounces = read_targets(views)
        self.check(offset, dest.nbytes)
        await self._read_span(dest, offset)
        finish_reads(bounces)

    async def _read_span(self, dest: memoryview | IoVec, offset: int) -> None:
        length = dest.nbytes
        step = self.rsize
        if length <= step:
            if length:
                await self._read_into(_flat(dest), offset)
        else:
            await run_all([partial(self._read_into, _flat(dest[pos : pos + step]), offset + pos)
                           for pos in range(0, length, step)])
        # Acknowledged but uncommitted writes win over what the server returned: after a
        # restart it may have lost them until flush() resends them, and a reader (a RAID
        # read-modify-write) must still see its own writes.
        if len(self._cache):
            end = offset + length
            for r in self._cache.overlapping(offset, end):
                a, b = max(r.start, offset), min(r.end, end)
                dest[a - offset : b - offset] = r.data[a - r.start : b - r.start]

    def forget_range(self, offset: int, length: int) -> None:
        """Another path to this file wrote [offset, offset+length): our older uncommitted bytes
        there must no longer be laid over what the server returns (nor be resent)."""
        if len(self._cache):
            self._cache.forget(offset, offset + length)

    def take_unstable(self) -> list[Any]:
        """Our UNSTABLE writes not yet proven stable (with their write verifiers), forgotten here."""
        out = [(r.start, r.data, r.verf) for r in self._cache]
        for r in list(self._cache):
            self._cache.discard(r)
        self._bytes_since_commit = 0
        return out

    def adopt_unstable(self, writes: list[Any]) -> None:
        """Another path's UNSTABLE writes to this file: our next flush COMMITs them, or resends them
        when the verifier they were written under is no longer the server's."""
        for start, data, verf in writes:
            self._seq += 1
            self._cache.add(start, data, verf, self._seq)
            self._bytes_since_commit += len(data)

    async def _read_into(self, dest: memoryview | IoVec, offset: int) -> None:
        done = 0
        want = dest.nbytes
        while done < want:
            part = dest[done:]
            n = part.nbytes
            args = [nfs3.read_args(self.fh, offset + done, n)]
            got, eof = await self._jukebox_retry(partial(
                self._nfs.call_read, nfs3.READ, args, part, f"{self.label}: READ at {offset + done}"))
            done += got
            if done < want and (eof or got == 0):
                # The file ended inside the device (truncated behind our back): those bytes
                # are gone, not zeros — an error of this member, served from redundancy.
                raise MemberIOError(f"{self.label}: short read at {offset}: the file ended after "
                                    f"{done} of {want} bytes")

    # ---- write ------------------------------------------------------------------------

    async def write(self, offset: int, data: Buffer) -> None:
        """Write data at offset: UNSTABLE and remembered until COMMIT proves it stable."""
        buf = as_u8(data)
        self.check(offset, len(buf))
        if not len(buf):
            return
        # Bytes cannot change, so they need no copy to be resent later.
        await self._write_span(offset, buf, keep=isinstance(data, bytes))

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Write the views as consecutive bytes at offset: each WRITE is built from them, never joined."""
        src = write_sources(views)
        self.check(offset, src.nbytes)
        if src.nbytes:
            await self._write_span(offset, src, keep=False)

    async def _write_span(self, offset: int, buf: np.ndarray | IoVec, *, keep: bool) -> None:
        """The write path shared by write and writev; keep: buf never changes (no copy to remember it)."""
        length = len(buf)
        cached = length <= self._cache_limit // 2
        if cached:
            while self._cache.nbytes + length > self._cache_limit:
                if self._commit_lock.locked():
                    # A COMMIT is on its way: wait for it rather than queue another.
                    await self._commit_done.wait()
                else:
                    await self._commit_round()
        elif isinstance(buf, np.ndarray) and not buf.flags.c_contiguous:
            buf = np.ascontiguousarray(buf)
        step = self.wsize
        pieces = []
        for pos in range(0, length, step):
            piece = buf[pos : pos + step]
            base = None
            if cached and not keep:
                # The copy is what makes a resend possible after the caller reuses its
                # buffer; it is also where the pieces of a writev are gathered.
                base = self._pool.get(len(piece))
                if isinstance(piece, IoVec):
                    piece.gather_into(base)
                else:
                    base[:] = piece
                piece = base
            pieces.append((piece, offset + pos, base))
        while self._gate_closed:
            await self._gate_open.wait()
        self._writes_in_flight += 1
        try:
            stable = nfs3.UNSTABLE if cached else nfs3.FILE_SYNC
            if len(pieces) == 1:
                await self._write_range(pieces[0][0], pieces[0][1], stable, pieces[0][2])
            else:
                await run_all([partial(self._write_range, piece, pos, stable, base)
                               for piece, pos, base in pieces])
        finally:
            self._writes_in_flight -= 1
            if not self._writes_in_flight:
                self._drained.set()
        if (cached and self._bytes_since_commit >= self._cache_limit // 2
                and not self._commit_lock.locked()):
            # Commit early, in this writer only, while the others go on writing.
            await self._commit_round()

    async def _write_range(self, buf: np.ndarray | IoVec, offset: int, stable: int,
                           base: np.ndarray | None = None) -> None:
        # buf is an IoVec only for FILE_SYNC writes (UNSTABLE ones are remembered as copies).
        done = 0
        while done < len(buf):
            part = buf[done:]
            n = len(part)
            head = nfs3.write_args_head(self.fh, offset + done, n, stable)
            data = part.pieces if isinstance(part, IoVec) else [memoryview(part)]
            r = await self._call(nfs3.WRITE, [head, *data, nfs3.write_padding(n)],
                                 nfs3.decode_write, f"WRITE at {offset + done}")
            if r.count > n or (r.count == 0 and n):
                raise ProtocolError(f"{self.label}: WRITE of {n} bytes answered count {r.count}")
            if r.count < n:
                self.stats["short_writes"] += 1
            if r.committed == nfs3.UNSTABLE:
                if stable != nfs3.UNSTABLE:
                    raise ProtocolError(f"{self.label}: stable WRITE answered UNSTABLE")
                self._seq += 1
                whole = base is not None and done == 0 and r.count == len(buf)
                self._cache.add(offset + done, part[: r.count], r.verf, self._seq,
                                base if whole else None)
                self._bytes_since_commit += r.count
            done += r.count

    # ---- flush ------------------------------------------------------------------------

    async def flush(self) -> None:
        """COMMIT; rewrite whatever a server restart may have lost; return when all is stable."""
        await self._commit_round()

    async def _commit(self) -> bytes:
        self.stats["commits"] += 1
        return await self._call(nfs3.COMMIT, [nfs3.commit_args(self.fh)], nfs3.decode_commit,
                                "COMMIT")

    async def _commit_round(self) -> None:
        async with self._commit_lock:
            try:
                await self._commit_until_stable()
            finally:
                self._commit_done.set()
                self._commit_done = trio.Event()

    async def _commit_until_stable(self) -> None:
        for _ in range(10):
            if not len(self._cache):
                return
            covered = self._seq  # ranges written before the COMMIT is sent
            self._bytes_since_commit = 0
            verf = await self._commit()
            stale = []
            for r in self._cache:
                if r.seq > covered:
                    continue
                if r.verf == verf:
                    self._cache.discard(r)
                    if r.base is not None:
                        self._pool.put(r.base)
                else:
                    stale.append(r)
            if not stale:
                return
            # The server restarted since these were written: its cache may be gone.
            self.stats["verifier_changes"] += 1
            await self._resend(stale)
        raise NfsError(f"{self.label}: COMMIT verifier kept changing; data may not be stable")

    async def _resend(self, ranges: list[_Range]) -> None:
        # Hold new writes back and let running ones finish, so that no resent (older)
        # data can land after newer data for the same bytes.
        self._gate_closed = True
        try:
            while self._writes_in_flight:
                self._drained = trio.Event()
                await self._drained.wait()
            ranges = [r for r in ranges if self._cache.holds(r)]
            self.stats["resent_ranges"] += len(ranges)
            # Rewriting replaces r in the cache; if it fails, r stays remembered.
            await run_all([partial(self._write_range, r.data, r.start, nfs3.UNSTABLE, r.base)
                           for r in ranges])
        finally:
            self._gate_closed = False
            self._gate_open.set()
            self._gate_open = trio.Event()

    async def discard(self, offset: int, length: int) -> None:
        """NFSv3 has no hole punching: discard is a no-op."""
        self.check(offset, length)

    async def aclose(self) -> None:
        """Close the connection (call flush() first for durability)."""
        await self._nfs.aclose()


def _flat(buf: memoryview | IoVec) -> memoryview | IoVec:
    """One READ's slice of the destination: a plain memoryview whenever it lies in one buffer."""
    return buf.flat() if isinstance(buf, IoVec) else buf


def _transfer_size(maxsize: int) -> int:
    n = min(maxsize or MAX_TRANSFER, MAX_TRANSFER)
    n -= n % MIN_TRANSFER
    return max(n, MIN_TRANSFER)


# ---- opening ---------------------------------------------------------------------------


def _int_param(params: dict[str, Any], key: str, default: int | None) -> int | None:
    v = params.get(key)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"NFS URI parameter {key}={v!r} is not an integer") from e


def _float_param(params: dict[str, Any], key: str, default: float) -> float:
    v = params.get(key)
    if v is None or v == "":
        return default
    try:
        return float(v)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"NFS URI parameter {key}={v!r} is not a number") from e


async def _getport(host: str, prog: int, vers: int, cred: bytes, timeout: float) -> int:
    pm = RpcClient(host, nfs3.PMAP_PORT, nfs3.PMAP_PROG, nfs3.PMAP_VERS, cred=cred,
                   timeout=timeout, retrans=1, label=f"rpcbind {host}:111")
    try:
        await pm.connect()
        u, _ = await pm.call(nfs3.PMAPPROC_GETPORT, nfs3.getport_args(prog, vers))
        port = nfs3.decode_getport(u)
    finally:
        await pm.aclose()
    if not port:
        raise NfsError(f"rpcbind on {host}: program {prog} version {vers} over TCP is not registered")
    return port


def _longest_export(path: str, exports: list[str]) -> str | None:
    comps = [c for c in path.split("/") if c]
    best: str | None = None
    best_len = -1
    for e in exports:
        ecomps = [c for c in e.split("/") if c]
        # The file itself must lie below the export, so an export must leave >= 1 component.
        if len(ecomps) < len(comps) and comps[: len(ecomps)] == ecomps and len(ecomps) > best_len:
            best, best_len = e, len(ecomps)
    return best


async def open_uri(uri: MemberURI, *, create_size: int | None = None, **opts: Any) -> NfsDevice:
    """Open (or create, with create_size) the file an nfs:// URI names."""
    params: dict[str, Any] = dict(uri.params)
    params.update(opts)
    host = uri.host
    label = f"nfs://{host}{uri.path}"
    nfsport = _int_param(params, "nfsport", uri.port)
    mountport = _int_param(params, "mountport", None)
    uid = _int_param(params, "uid", os.getuid())
    gid = _int_param(params, "gid", os.getgid())
    depth = _int_param(params, "depth", 32)
    retrans = _int_param(params, "retrans", 2)
    timeout = _float_param(params, "timeout", 10.0)
    cache_bytes = _int_param(params, "cache_bytes", DEFAULT_CACHE)
    if cache_bytes is None or cache_bytes < 2 * MAX_TRANSFER:
        raise ConfigError(f"{label}: cache_bytes must be at least {2 * MAX_TRANSFER}")
    if not depth or depth < 1 or retrans is None or retrans < 0 or timeout <= 0:
        raise ConfigError(f"{label}: depth, retrans and timeout must be positive")
    if create_size is not None and (create_size <= 0 or create_size % 512):
        raise ConfigError(f"{label}: size must be a positive multiple of 512")
    cred = auth_sys(uid, gid, (gid,), machine=os.uname().nodename)

    if not nfsport:
        nfsport = await _getport(host, nfs3.NFS_PROG, nfs3.NFS_VERS, cred, timeout)
    if not mountport:
        mountport = await _getport(host, nfs3.MOUNT_PROG, nfs3.MOUNT_VERS, cred, timeout)

    mnt = RpcClient(host, mountport, nfs3.MOUNT_PROG, nfs3.MOUNT_VERS, cred=cred,
                    timeout=timeout, retrans=retrans, label=f"mountd {host}:{mountport}")
    try:
        await mnt.connect()
        u, _ = await mnt.call(nfs3.MOUNTPROC_EXPORT)
        exports = nfs3.decode_export(u)
        export = _longest_export(uri.path, exports)
        if export is None:
            raise NfsNotFoundError(
                f"{label}: no export of {host} contains this path "
                f"(exports: {', '.join(exports) or 'none'})", 2)
        u, _ = await mnt.call(nfs3.MOUNTPROC_MNT, nfs3.mnt_args(export))
        root_fh, _flavors = nfs3.decode_mnt(u, f"{label}: MNT {export}")
    finally:
        await mnt.aclose()

    nfs = RpcClient(host, nfsport, nfs3.NFS_PROG, nfs3.NFS_VERS, cred=cred, depth=depth,
                    timeout=timeout, retrans=retrans, label=f"nfs {host}:{nfsport}")
    try:
        await nfs.connect()
        return await _open_file(nfs, root_fh, uri.path, export, label, create_size,
                                cache_bytes=cache_bytes, rsize=_int_param(params, "rsize", None),
                                wsize=_int_param(params, "wsize", None))
    except BaseException:
        await nfs.aclose()
        raise


async def _call(nfs: RpcClient, proc: int, args: bytes, decode, what: str):
    delay = 0.05
    for _ in range(40):
        u, _ = await nfs.call(proc, args)
        try:
            return decode(u, what)
        except NfsJukeboxError:
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)
    return decode(u, what)


async def _open_file(nfs: RpcClient, root_fh: bytes, path: str, export: str, label: str,
                     create_size: int | None, **devopts: Any) -> NfsDevice:
    rest = [c for c in path.split("/") if c][len([c for c in export.split("/") if c]):]
    fh = root_fh
    where = export.rstrip("/")
    for name in rest[:-1]:
        where += "/" + name
        fh, _ = await _call(nfs, nfs3.LOOKUP, nfs3.lookup_args(fh, name), nfs3.decode_lookup,
                            f"{label}: LOOKUP {where}")
    dir_fh, name = fh, rest[-1]
    try:
        fh, _ = await _call(nfs, nfs3.LOOKUP, nfs3.lookup_args(dir_fh, name), nfs3.decode_lookup,
                            f"{label}: LOOKUP")
    except NfsNotFoundError as e:
        if create_size is None:
            raise NfsNotFoundError(f"{label}: no such file (NFS3ERR_NOENT; give a size to create it)",
                                   e.status) from e
        new_fh, _ = await _call(nfs, nfs3.CREATE, nfs3.create_args(dir_fh, name, 0o600),
                                nfs3.decode_create, f"{label}: CREATE")
        if new_fh is None:
            new_fh, _ = await _call(nfs, nfs3.LOOKUP, nfs3.lookup_args(dir_fh, name),
                                    nfs3.decode_lookup, f"{label}: LOOKUP")
        fh = new_fh
        await _call(nfs, nfs3.SETATTR, nfs3.setattr_size_args(fh, create_size),
                    nfs3.decode_setattr, f"{label}: SETATTR size")
    attrs = await _call(nfs, nfs3.GETATTR, nfs3.fh_args(fh), nfs3.decode_getattr,
                        f"{label}: GETATTR")
    if attrs.type != nfs3.NF3REG:
        raise ConfigError(f"{label}: not a regular file (NFS type {attrs.type})")
    fsinfo = await _call(nfs, nfs3.FSINFO, nfs3.fh_args(fh), nfs3.decode_fsinfo,
                         f"{label}: FSINFO")
    return NfsDevice(nfs, fh, attrs, fsinfo, label, **devopts)
