"""iscsi:// members: a LUN on an iSCSI target, reached by vstore's own trio initiator.

URI: ``iscsi://[USER[%SECRET]@]HOST[:PORT]/TARGET-IQN/LUN[?key=value...]``.
CHAP secrets come from the URI or from a credentials file (``credentials_file=``
option or ``$VSTORE_ISCSI_CREDENTIALS``) readable only by its owner, one entry a
line: ``[TARGET-IQN|*] USER SECRET`` (the target column may be left out).

Options (keyword arguments of ``open_uri``, or URI query parameters):
``queue_depth`` (32), ``timeout`` (30: a command unanswered this long means
the connection is dead; it and the others in flight are reissued),
``recovery_timeout`` (how long to keep reconnecting after a dropped connection
before failing I/O, 20), ``header_digest``/``data_digest`` (``none``,
``crc32c``, ``crc32c-none``, ``none-crc32c``: what to propose; default
``none-crc32c``, i.e. CRC32C only when the target insists), ``max_recv``
(our MaxRecvDataSegmentLength, default 1 MiB), ``max_transfer`` (bytes per READ command;
default MaxBurstLength), ``max_write`` (bytes per WRITE command; default
MaxBurstLength, so each needs at most one R2T), ``login_timeout``,
``initiator_name``, ``credentials_file``, ``nursery`` (if given, the device's
background reader, ``run_background``, runs there until ``aclose``).
``recovery_timeout=0`` fails I/O at once on a lost connection (for multipath);
the next command or ``probe()`` still tries one reconnect.

The layers: ``pdu`` (sans-IO codec), ``scsi`` (CDBs, sense, VPD), ``connection``
(sans-IO connection: login, negotiation, CHAP, the CmdSN window, tasks),
``session`` (its trio driver over a ``vstore.io.stream.Stream``); this module
turns a session into a BlockDevice with reconnection and retries.

The device needs no task of its own: the tasks waiting for the target receive
for each other (see ``session``). ``run_background`` (started by whoever owns the
device, in its nursery) keeps receiving while nothing else is, so the target's
NOP-In pings of an idle connection are answered.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import trio

from backends.iscsi import scsi
from backends.iscsi.errors import ConnectionLostError, DigestError, ScsiError
from backends.iscsi.session import (
    Completion,
    Credentials,
    Options,
    Session,
    discovery_targets,
    new_isid,
)
from vstore.errors import (
    AuthError,
    ConfigError,
    DeviceTimeoutError,
    MemberIOError,
    NotFoundError,
    OutOfRangeError,
    ProtocolError,
    VstoreError,
)
from vstore.io.aio import run_all
from vstore.io.ordering import RangeOrder
from vstore.stack.device import Buffer, DeviceBase, as_u8
from vstore.stack.iovec import IoVec, finish_reads, read_targets, write_sources
from vstore.uri import Backend, MemberURI, parse_uri

__all__ = ["BACKEND", "IscsiDevice", "ScsiError", "discover", "open_uri", "default_initiator_name"]

log = logging.getLogger("vstore.iscsi")

DEFAULT_PORT = 3260
CREDENTIALS_ENV = "VSTORE_ISCSI_CREDENTIALS"
_UA_RETRIES = 16
_DIGEST_RETRIES = 3


def default_initiator_name() -> str:
    """``iqn.2026-11.org.vstore:`` + this host's name (lower-cased, IQN-safe)."""
    host = re.sub(r"[^a-z0-9.\-]", "-", socket.gethostname().lower()) or "localhost"
    return f"iqn.2026-11.org.vstore:{host}"


def _digest_offer(value: Any, default: str) -> str:
    if value is None:
        return default
    v = str(value).strip().lower().replace("_", "-")
    table = {
        "none": "None",
        "crc32c": "CRC32C",
        "crc32c-none": "CRC32C,None",
        "crc32c,none": "CRC32C,None",
        "none-crc32c": "None,CRC32C",
        "none,crc32c": "None,CRC32C",
        "true": "CRC32C",
        "false": "None",
    }
    if v not in table:
        raise ConfigError(f"bad digest setting {value!r} (none, crc32c, crc32c-none, none-crc32c)")
    return table[v]


def _number(opts: dict, key: str, default: float, kind=float) -> Any:
    v = opts.get(key)
    if v is None:
        return default
    try:
        n = kind(v)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad iSCSI option {key}={v!r}") from e
    if n < 0:
        raise ConfigError(f"iSCSI option {key} must not be negative")
    return n


def read_credentials_file(path: str, target: str | None, user: str | None) -> Credentials | None:
    """The CHAP entry for a target (and user, if given) from an owner-only credentials file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"cannot read iSCSI credentials file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"iSCSI credentials file {path} is not a regular file")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"iSCSI credentials file {path} must be owned by you and readable only by you "
            f"(mode is {stat.S_IMODE(st.st_mode):o}; run chmod 600 {path})"
        )
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"cannot read iSCSI credentials file {path}") from None
    exact: list[tuple[str, str]] = []
    wild: list[tuple[str, str]] = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) == 2:
            wild.append((fields[0], fields[1]))
        elif len(fields) == 3:
            (exact if fields[0] == target else wild if fields[0] == "*" else []).append(
                (fields[1], fields[2])
            )
        else:
            # Never echo the line: it may hold a secret.
            raise ConfigError(f"iSCSI credentials file {path} line {n}: expected [TARGET] USER SECRET")
    for u, secret in exact + wild:
        if user is None or u == user:
            return Credentials(u, secret.encode("utf-8"))
    return None


def resolve_credentials(
    user: str | None, password: str | None, target: str | None, opts: dict
) -> Credentials | None:
    """CHAP credentials from the URI user info, else the credentials file (option or env)."""
    if user is not None and password is not None:
        return Credentials(user, password.encode("utf-8"))
    path = opts.get("credentials_file") or os.environ.get(CREDENTIALS_ENV)
    if path:
        creds = read_credentials_file(str(path), target, user)
        if creds is not None:
            return creds
    if user is not None:
        raise ConfigError(
            f"no CHAP secret for iSCSI user {user!r}: put it in the URI (USER%SECRET) "
            f"or a credentials file (credentials_file= or ${CREDENTIALS_ENV})"
        )
    return None


def _options(opts: dict) -> Options:
    o = Options(initiator_name=str(opts.get("initiator_name") or default_initiator_name()))
    o.header_digest = _digest_offer(opts.get("header_digest"), o.header_digest)
    o.data_digest = _digest_offer(opts.get("data_digest"), o.data_digest)
    o.max_recv = int(_number(opts, "max_recv", o.max_recv, int))
    if o.max_recv < 512 or o.max_recv % 4 or o.max_recv > (1 << 24) - 1:
        raise ConfigError("max_recv must be a multiple of 4 between 512 and 16777212")
    o.max_burst = int(_number(opts, "max_burst", o.max_burst, int))
    o.command_timeout = float(_number(opts, "timeout", o.command_timeout))
    if o.command_timeout <= 0:
        raise ConfigError("timeout must be positive")
    o.login_timeout = float(_number(opts, "login_timeout", min(o.login_timeout, o.command_timeout)))
    return o


class IscsiDevice(DeviceBase):
    """One LUN of an iSCSI target as a BlockDevice (one session, many commands in flight)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        target: str,
        lun: int,
        options: Options,
        credentials: Credentials | None,
        queue_depth: int = 32,
        timeout: float = 30.0,
        recovery_timeout: float = 20.0,
        max_transfer: int = 0,
        max_write: int = 0,
        name: str = "",
    ) -> None:
        self.host = host
        self.port = port
        self.target = target
        self.lun = lun
        self.options = options
        self._credentials = credentials
        self.queue_depth = queue_depth
        self.timeout = timeout
        self.recovery_timeout = recovery_timeout
        self.max_transfer = max_transfer
        self.max_write = max_write
        self.name = name or f"iscsi://{host}:{port}/{target}/{lun}"
        self.isid = new_isid()  # kept across reconnects: a new login reinstates the session
        self.size = 0
        self.block_size = 512
        self.vendor = self.product = ""
        self.serial: str | None = None
        self.designators: list[scsi.Designator] = []
        self._identity = ""
        self._session: Session | None = None
        self._reconnect_lock = trio.Lock()
        self._slots = trio.Semaphore(queue_depth)
        self._background: trio.CancelScope | None = None
        self._session_changed = trio.Event()
        self._closed = False
        self._writes = RangeOrder()  # byte ranges of writes in flight
        self._unmap_blocks = 0  # blocks per UNMAP command; 0: discards are not sent (see discard)
        self.stats = {"reconnects": 0, "reissued": 0, "unit_attention": 0, "busy": 0, "digest_errors": 0}

    def __repr__(self) -> str:
        return f"<IscsiDevice {self.name} size={self.size}>"

    # ------------------------------------------------------------ lifetime

    async def run_background(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """Receive on the current session while idle (answers the target's pings) until closed or cancelled."""
        if self._background is not None:
            raise VstoreError(f"internal: the background reader of {self.name} is already running")
        try:
            with trio.CancelScope() as scope:
                self._background = scope
                task_status.started()
                while not self._closed:
                    s = self._session
                    changed = self._session_changed
                    if s is not None and s.alive:
                        try:
                            await s.serve()
                        except Exception:  # a bug here must not take the owner (a pool's mount) down
                            log.exception("iSCSI device %s: background reader failed", self.name)
                            s.abort(ConnectionLostError("the background reader failed"))
                    else:
                        await changed.wait()  # the next I/O reconnects
        finally:
            self._background = None

    async def _login(self) -> Session:
        if self._closed:
            raise MemberIOError(f"{self.name} is closed")
        s = Session(self.host, self.port, self.target, self.options, isid=self.isid,
                    credentials=self._credentials)
        await s.connect()
        if self._closed:  # aclose() ran meanwhile
            s.close()
            raise MemberIOError(f"{self.name} is closed")
        self._session_changed.set()
        self._session_changed = trio.Event()
        return s

    async def _open(self, nursery: trio.Nursery | None, *, inspect_lun: bool = True) -> None:
        try:
            self._session = await self._login()
            if inspect_lun:
                await self._inspect()
            if nursery is not None:
                await nursery.start(self.run_background)
        except BaseException:
            await self.aclose()
            raise

    async def _inspect(self) -> None:
        std = await self.inquiry()
        if std.peripheral_qualifier != 0:
            raise NotFoundError(f"{self.name}: target {self.target} has no LUN {self.lun}")
        if std.device_type != 0:
            kind = scsi.DEVICE_TYPE_NAMES.get(std.device_type, f"type 0x{std.device_type:02x}")
            raise ConfigError(f"{self.name}: LUN {self.lun} is a {kind}, not a disk")
        self.vendor, self.product = std.vendor, std.product
        await self._execute(scsi.test_unit_ready(), what="TEST UNIT READY")
        cap = await self.read_capacity()
        self.size, self.block_size = cap.size, cap.block_size
        self._unmap_blocks = await self._unmap_limit(cap)
        try:
            self.serial = scsi.parse_vpd_serial(await self._inquiry_page(0x80))
        except (ScsiError, ProtocolError):
            self.serial = None
        try:
            self.designators = scsi.parse_vpd_device_id(await self._inquiry_page(0x83))
        except (ScsiError, ProtocolError):
            self.designators = []
        ident = scsi.lun_identity(self.designators, self.serial)
        # Without any id the best we can say is "this target's LUN n" (still per target).
        self._identity = f"iscsi:{ident}" if ident else f"iscsi:{self.target}/{self.lun}"

    async def _unmap_limit(self, cap: scsi.Capacity) -> int:
        """Blocks per UNMAP: only a thin LU whose unmapped blocks read as zeros (LBPME, LBPRZ) gets any."""
        if not (cap.lbpme and cap.lbprz):
            return 0
        try:
            limits = scsi.parse_vpd_block_limits(await self._inquiry_page(0xB0))
        except (ScsiError, ProtocolError):
            return 0
        if not limits.max_unmap_descriptors:
            return 0
        return min(limits.max_unmap_blocks, (1 << 30) // cap.block_size)  # at most 1 GiB a command

    async def aclose(self) -> None:
        """Log out and stop the background reader."""
        if self._closed:
            return
        self._closed = True
        s = self._session
        # Shielded so a cancelled caller still logs out; every wait in here is bounded.
        with trio.CancelScope(shield=True):
            if s is not None and s.alive:
                with trio.move_on_after(3):
                    await s.logout()
            if s is not None:
                s.close()
            if self._background is not None:
                self._background.cancel()
            self._session_changed.set()

    # ------------------------------------------------------------ commands

    async def _session_for_io(self, deadline: float) -> Session:
        while True:
            s = self._session
            if s is not None and s.refresh():
                return s
            if self._closed:
                raise MemberIOError(f"{self.name} is closed")
            async with self._reconnect_lock:
                s = self._session
                if s is not None and s.alive:
                    return s
                await self._reconnect(deadline)

    async def _reconnect(self, deadline: float) -> None:
        delay = 0.05
        last: BaseException | None = None
        while True:
            if self._closed:
                raise MemberIOError(f"{self.name} is closed")
            # At least one attempt even past the deadline (recovery_timeout=0 must
            # still let probe() bring a path back); each is bounded by login_timeout.
            try:
                self._session = await self._login()
                self.stats["reconnects"] += 1
                log.info("iSCSI %s: reconnected", self.name)
                return
            except (AuthError, NotFoundError):
                raise
            except MemberIOError as e:
                last = e
            if trio.current_time() + delay >= deadline:
                raise MemberIOError(
                    f"{self.name}: connection lost and not re-established within "
                    f"{self.recovery_timeout:g} s" + (f" ({last})" if last else "")
                )
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _execute(
        self, cdb: bytes, *, read_buf=None, write_buf=None, lun: int | None = None,
        what: str = "command", exact: bool = False,
    ) -> Completion:
        """Run a command with reissue on connection loss, UA/BUSY retries and sense → ScsiError."""
        lun = self.lun if lun is None else lun
        first_failure: float | None = None
        ua = digest = 0
        busy_delay = 0.001
        busy_deadline = trio.current_time() + self.timeout
        try:
            self._slots.acquire_nowait()  # no scheduler trip when a slot is free
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            while True:
                start = first_failure if first_failure is not None else trio.current_time()
                try:
                    sess = await self._session_for_io(start + self.recovery_timeout)
                    # The session's watchdog fails every command on it after
                    # command_timeout without an answer (DeviceTimeoutError).
                    c = await sess.command(lun, cdb, read_buf=read_buf, write_buf=write_buf)
                except (ConnectionLostError, DeviceTimeoutError, ProtocolError) as e:
                    now = trio.current_time()
                    if first_failure is None:
                        first_failure = now
                    if self._closed or now - first_failure >= self.recovery_timeout:
                        raise type(e)(f"{self.name}: {what} failed: {e}") from e
                    self.stats["reissued"] += 1
                    continue
                if c.digest_error:
                    digest += 1
                    self.stats["digest_errors"] += 1
                    if digest > _DIGEST_RETRIES:
                        raise DigestError(f"{self.name}: {what}: data digest errors on {digest} tries")
                    continue
                st = c.status
                if st == scsi.GOOD or st == scsi.CONDITION_MET:
                    if exact and c.received != len(read_buf):
                        # Never hand back a buffer with a stretch the target did not fill.
                        raise ProtocolError(
                            f"{self.name}: {what} returned {c.received} of {len(read_buf)} bytes"
                        )
                    return c
                sense = c.sense
                if st == scsi.CHECK_CONDITION and sense is not None and sense.key == scsi.UNIT_ATTENTION:
                    ua += 1
                    self.stats["unit_attention"] += 1
                    if ua <= _UA_RETRIES:
                        continue
                if st in (scsi.BUSY, scsi.TASK_SET_FULL) and trio.current_time() < busy_deadline:
                    self.stats["busy"] += 1
                    await trio.sleep(busy_delay)
                    busy_delay = min(busy_delay * 2, 0.25)
                    continue
                name = scsi.STATUS_NAMES.get(st, f"status 0x{st:02x}")
                detail = f": {sense.describe()}" if sense is not None else ""
                raise ScsiError(
                    f"{self.name}: {what} ended with {name}{detail}",
                    status=st,
                    sense_key=sense.key if sense else None,
                    asc=sense.asc if sense else None,
                    ascq=sense.ascq if sense else None,
                )
        finally:
            self._slots.release()

    async def _data_in(self, cdb: bytes, alloc: int, *, lun: int | None = None, what: str) -> bytes:
        buf = bytearray(alloc)
        c = await self._execute(cdb, read_buf=memoryview(buf), lun=lun, what=what)
        return bytes(buf[: c.received])

    async def inquiry(self, *, lun: int | None = None) -> scsi.StandardInquiry:
        """Standard INQUIRY data."""
        return scsi.parse_standard_inquiry(
            await self._data_in(scsi.inquiry(None, 96), 96, lun=lun, what="INQUIRY")
        )

    async def _inquiry_page(self, page: int, *, lun: int | None = None) -> bytes:
        return await self._data_in(scsi.inquiry(page, 1024), 1024, lun=lun, what=f"INQUIRY VPD 0x{page:02x}")

    async def read_capacity(self, *, lun: int | None = None) -> scsi.Capacity:
        """READ CAPACITY(16)."""
        return scsi.parse_read_capacity_16(
            await self._data_in(scsi.read_capacity_16(32), 32, lun=lun, what="READ CAPACITY(16)")
        )

    async def report_luns(self) -> list[int]:
        """REPORT LUNS (on the session's LUN address, normally 0)."""
        return scsi.parse_report_luns(await self._data_in(scsi.report_luns(16384), 16384, what="REPORT LUNS"))

    # ------------------------------------------------------------ BlockDevice

    def _check_io(self, offset: int, length: int) -> None:
        self.check(offset, length)
        if offset % self.block_size or length % self.block_size:
            raise OutOfRangeError(
                f"{self.name}: I/O at offset {offset} length {length} is not a multiple of "
                f"the LUN's {self.block_size}-byte blocks"
            )

    def _chunk(self, write: bool) -> int:
        # Writes: one MaxBurstLength per command, so each needs at most one R2T.
        # Reads are not bound by it (it limits Data-In sequences, not commands), but
        # the same size measured best: several commands of one request are in flight
        # together (batched, so cheap for us), and tgtd spends about half the CPU per
        # byte on 256 KiB commands that it does on 1 MiB ones.
        s = self._session
        burst = s.params.max_burst if s is not None else 262144
        size = (self.max_write if write else self.max_transfer) or burst
        return max(self.block_size, size - size % self.block_size)

    async def _run_chunks(self, jobs: list[tuple]) -> None:
        """Run (cdb, read_buf, write_buf, what, exact) commands concurrently; raise the first error."""
        if len(jobs) == 1:
            cdb, rb, wb, what, exact = jobs[0]
            await self._execute(cdb, read_buf=rb, write_buf=wb, what=what, exact=exact)
            return
        # Fast path: this task submits every command and serves their R2Ts itself
        # (no task per command). Whatever does not end GOOD goes the slow way.
        jobs = await self._batch(jobs)
        if not jobs:
            return
        # Callers get one VstoreError, never an ExceptionGroup. Siblings of a failed
        # chunk run to their own end (bounded by the timeouts): cancelling a write
        # mid-transfer would cost the whole connection.
        await run_all([
            lambda cdb=cdb, rb=rb, wb=wb, what=what, exact=exact: self._execute(
                cdb, read_buf=rb, write_buf=wb, what=what, exact=exact)
            for cdb, rb, wb, what, exact in jobs
        ], catch=VstoreError)

    async def _batch(self, jobs: list[tuple]) -> list[tuple]:
        """Submit all jobs on the current session at once; return the ones to redo one by one."""
        s = self._session
        if s is None or not s.refresh():
            return jobs
        # All queue slots or none: taking them one by one could deadlock two batches.
        got = 0
        try:
            for _ in jobs:
                self._slots.acquire_nowait()
                got += 1
        except trio.WouldBlock:
            for _ in range(got):
                self._slots.release()
            return jobs
        tasks = []
        try:
            try:
                for cdb, rb, wb, _what, _exact in jobs:
                    tasks.append(await s.submit(self.lun, cdb, read_buf=rb, write_buf=wb))
            except MemberIOError:
                if s.alive:
                    raise
                # The session died: its tasks have failed, the rest was never sent.
            except BaseException:
                if any(t.write_buf is not None and not t.done for t in tasks):
                    s.abort(ConnectionLostError("a write was abandoned mid-transfer"))
                for t in tasks:  # reads sent so far: their data must not land in the caller's buffers
                    t.abandoned = True
                raise
            if tasks:
                try:
                    await s.finish(tasks)
                except MemberIOError:
                    if s.alive:
                        raise
                    # A send failed and aborted the session: every task has its error.
        finally:
            for _ in range(got):
                self._slots.release()
        redo = list(jobs[len(tasks):])
        for job, t in zip(jobs, tasks, strict=False):
            c = t.completion
            if t.error is None and c is not None and not c.digest_error and c.status == scsi.GOOD:
                rb, exact = job[1], job[4]
                if not exact or c.received == len(rb):
                    continue
            if c is not None and c.digest_error:
                self.stats["digest_errors"] += 1
            if isinstance(t.error, (ConnectionLostError, DeviceTimeoutError, ProtocolError)):
                if self.recovery_timeout <= 0:
                    raise type(t.error)(f"{self.name}: {job[3]} failed: {t.error}") from t.error
                self.stats["reissued"] += 1
            redo.append(job)
        return redo

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read length bytes at offset (both multiples of the block size)."""
        self._check_io(offset, length)
        buf = np.empty(length, dtype=np.uint8)
        if length:
            await self._read_span(offset, memoryview(buf))
        return buf

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Read consecutive blocks at offset straight into the views (Data-In lands in them)."""
        dest, bounces = read_targets(views)
        self._check_io(offset, dest.nbytes)
        if dest.nbytes:
            await self._read_span(offset, dest)
            finish_reads(bounces)

    async def _read_span(self, offset: int, dest: memoryview | IoVec) -> None:
        # One READ(16) per max_transfer bytes, each filling its slice of dest.
        length = len(dest)
        step = self._chunk(False)
        bs = self.block_size
        await self._run_chunks([
            (scsi.read_16((offset + p) // bs, min(step, length - p) // bs),
             _flat(dest[p : p + min(step, length - p)]), None, "READ(16)", True)
            for p in range(0, length, step)
        ])

    async def write(self, offset: int, data: Buffer) -> None:
        """Write the bytes at offset (offset and length multiples of the block size)."""
        arr = as_u8(data)
        length = len(arr)
        self._check_io(offset, length)
        if not length:
            return
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        await self._write_span(offset, memoryview(arr))

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Write the views as consecutive blocks at offset (Data-Out sent from them, never joined)."""
        src = write_sources(views)
        self._check_io(offset, src.nbytes)
        if src.nbytes:
            await self._write_span(offset, src)

    async def _write_span(self, offset: int, mv: memoryview | IoVec) -> None:
        # One WRITE(16) per max_write bytes; never overlapping another write in flight.
        length = len(mv)
        step = self._chunk(True)
        bs = self.block_size
        end = offset + length
        # tgt completes SIMPLE tasks in any order: overlapping writes must not be in flight together.
        async with self._writes.hold(offset, end):
            await self._run_chunks([
                (scsi.write_16((offset + p) // bs, min(step, length - p) // bs),
                 None, _flat(mv[p : p + min(step, length - p)]), "WRITE(16)", False)
                for p in range(0, length, step)
            ])

    async def flush(self) -> None:
        """Wait for in-flight writes, then SYNCHRONIZE CACHE: everything acknowledged is stable."""
        # Only the writes in flight now: later ones are not covered by this flush.
        await self._writes.settle()
        blocks = self.size // self.block_size
        cdb = scsi.synchronize_cache_10() if blocks < (1 << 32) else scsi.synchronize_cache_16()
        await self._execute(cdb, what="SYNCHRONIZE CACHE")

    async def discard(self, offset: int, length: int) -> None:
        """UNMAP the whole blocks of the range on a thin LU that reads them back as zeros; else nothing.

        Advisory, like every discard: a LU that is not thin (or whose unmapped blocks
        could read as anything) is sent nothing, so its blocks keep their bytes.
        """
        self.check(offset, length)
        bs = self.block_size
        start, end = -(-offset // bs) * bs, (offset + length) // bs * bs
        if not self._unmap_blocks or end <= start:
            return
        step = self._unmap_blocks * bs
        async with self._writes.hold(start, end):  # ordered against overlapping writes in flight
            for p in range(start, end, step):
                params = scsi.unmap_parameters([(p // bs, min(step, end - p) // bs)])
                await self._execute(scsi.unmap(len(params)), write_buf=memoryview(params), what="UNMAP")

    # --- SCSI-3 persistent reservations (the storage side of a lease's fence) ----------------

    async def _pr_out(self, action: int, key: int, sa_key: int = 0) -> None:
        params = scsi.pr_out_parameters(key, sa_key)
        await self._execute(scsi.persistent_reserve_out(action, scsi.PR_WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                                                        len(params)),
                            write_buf=memoryview(params), what="PERSISTENT RESERVE OUT")

    async def pr_register(self, key: int) -> None:
        """Register this I_T nexus with key (REGISTER AND IGNORE EXISTING KEY)."""
        await self._pr_out(scsi.PR_REGISTER_AND_IGNORE, 0, key)

    async def pr_keys(self) -> list[int]:
        """The registered reservation keys (READ KEYS)."""
        data = await self._data_in(scsi.persistent_reserve_in(scsi.PR_READ_KEYS), 1024, what="READ KEYS")
        return scsi.parse_pr_keys(data)

    async def pr_holder(self) -> int | None:
        """The key holding the reservation, or None (READ RESERVATION)."""
        data = await self._data_in(scsi.persistent_reserve_in(scsi.PR_READ_RESERVATION), 1024,
                                   what="READ RESERVATION")
        res = scsi.parse_pr_reservation(data)
        return res[0] if res else None

    async def pr_reserve(self, key: int) -> None:
        """Reserve the LU, Write Exclusive - Registrants Only, for key."""
        await self._pr_out(scsi.PR_RESERVE, key)

    async def pr_preempt(self, key: int, victim: int) -> None:
        """Remove victim's registrations (and take its reservation, if it held it)."""
        await self._pr_out(scsi.PR_PREEMPT, key, victim)

    async def pr_clear(self, key: int) -> None:
        """Drop every registration and the reservation (key must be registered)."""
        await self._pr_out(scsi.PR_CLEAR, key)

    def identity(self) -> str:
        """Equal for two paths exactly when they reach the same LU (VPD 0x83 ids, 0x80 serial)."""
        return self._identity

    async def probe(self, timeout: float | None = None) -> None:
        """Liveness check (TEST UNIT READY, reconnecting if needed); raises MemberIOError on failure."""
        limit = timeout if timeout is not None else min(self.timeout, 10.0)
        try:
            with trio.fail_after(limit):
                await self._execute(scsi.test_unit_ready(), what="TEST UNIT READY")
        except trio.TooSlowError:
            raise DeviceTimeoutError(f"{self.name}: no answer to TEST UNIT READY within {limit:g} s") from None

    async def ping(self) -> None:
        """NOP-Out ping on the current session (no reconnect); raises MemberIOError on failure."""
        s = self._session
        if s is None or not s.alive:
            raise ConnectionLostError(f"{self.name}: not connected")
        with trio.move_on_after(min(self.timeout, 10.0)) as cs:
            await s.ping()
        if cs.cancelled_caught:
            s.abort(DeviceTimeoutError(f"{self.name}: NOP-Out ping not answered"))
            raise DeviceTimeoutError(f"{self.name}: NOP-Out ping not answered")

    @property
    def session(self) -> Session | None:
        """The current session (for status displays and tests)."""
        return self._session


def _flat(buf: memoryview | IoVec) -> memoryview | IoVec:
    """A command's slice of the transfer: a plain memoryview whenever it lies in one buffer."""
    return buf.flat() if isinstance(buf, IoVec) else buf


def _device(host: str, port: int, target: str, lun: int, opts: dict, creds, name: str) -> IscsiDevice:
    qd = int(_number(opts, "queue_depth", 32, int))
    if qd < 1:
        raise ConfigError("queue_depth must be at least 1")
    return IscsiDevice(
        host=host, port=port, target=target, lun=lun, options=_options(opts), credentials=creds,
        queue_depth=qd, timeout=float(_number(opts, "timeout", 30.0)),
        recovery_timeout=float(_number(opts, "recovery_timeout", 20.0)),
        max_transfer=int(_number(opts, "max_transfer", 0, int)),
        max_write=int(_number(opts, "max_write", 0, int)), name=name,
    )


async def open_uri(uri: MemberURI | str, *, create_size: int | None = None, **opts: Any) -> IscsiDevice:
    """Open iscsi://HOST[:PORT]/IQN/LUN as a BlockDevice (LUNs are never created)."""
    if isinstance(uri, str):
        uri = parse_uri(uri)
    target, lun_text = uri.path.strip("/").split("/")
    merged = {**uri.params, **opts}
    nursery = merged.pop("nursery", None)
    creds = resolve_credentials(uri.user, uri.password, target, merged)
    port = uri.port or DEFAULT_PORT
    dev = _device(uri.host, port, target, int(lun_text), merged, creds,
                  f"iscsi://{uri.host}:{port}/{target}/{int(lun_text)}")
    await dev._open(nursery)
    if create_size is not None and dev.size < create_size:
        size = dev.size
        await dev.aclose()
        raise ConfigError(
            f"{dev.name} holds {size} bytes, less than the {create_size} requested "
            "(iSCSI LUNs cannot be created or grown by vstore)"
        )
    return dev


def _check_uri(uri: MemberURI) -> None:
    comps = uri.path.strip("/").split("/")
    if not uri.host or len(comps) != 2 or not comps[1].isdigit():
        raise ConfigError(
            f"iSCSI URI needs host, target IQN and LUN number: {uri.redacted()!r} "
            "(iscsi://HOST[:PORT]/IQN/LUN)"
        )


BACKEND = Backend(
    "iscsi", open_uri,
    frozenset({"initiator_name", "header_digest", "data_digest", "max_recv", "max_burst", "timeout",
               "login_timeout", "queue_depth", "recovery_timeout", "max_transfer", "max_write",
               "credentials_file"}),
    _check_uri,
)


def _parse_portal(portal_uri: str) -> tuple[str, int, str | None, str | None]:
    text = portal_uri.strip()
    if "://" not in text:
        text = "iscsi://" + text
    parts = urlsplit(text)
    if parts.scheme.lower() != "iscsi" or not parts.hostname:
        raise ConfigError(f"not an iSCSI portal: {portal_uri!r} (iscsi://HOST[:PORT])")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ConfigError(f"bad port in {portal_uri!r}") from None
    user = password = None
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        sep = "%" if "%" in userinfo else (":" if ":" in userinfo else None)
        if sep:
            u, p = userinfo.split(sep, 1)
            user, password = unquote(u), unquote(p)
        else:
            user = unquote(userinfo)
    return parts.hostname, port, user, password


async def discover(portal_uri: str, **opts: Any) -> list[dict]:
    """Targets behind a portal with their LUNs and sizes (SendTargets, then log in to each)."""
    host, port, user, password = _parse_portal(portal_uri)
    options = _options(opts)
    creds = resolve_credentials(user, password, None, opts)
    found = await discovery_targets(host, port, options, creds)
    out: list[dict] = []
    for name, addresses in found:
        entry: dict[str, Any] = {"target": name, "portal": f"{host}:{port}", "addresses": addresses, "luns": []}
        out.append(entry)
        tcreds = resolve_credentials(user, password, name, opts)
        dev = _device(host, port, name, 0, {**opts, "recovery_timeout": 0}, tcreds,
                      f"iscsi://{host}:{port}/{name}/0")
        try:
            await dev._open(None, inspect_lun=False)
        except MemberIOError as e:
            entry["error"] = str(e)
            continue
        except NotFoundError as e:
            entry["error"] = str(e)
            continue
        try:
            for lun in await dev.report_luns():
                info: dict[str, Any] = {"lun": lun, "uri": f"iscsi://{host}:{port}/{name}/{lun}"}
                try:
                    std = await dev.inquiry(lun=lun)
                    info["type"] = scsi.DEVICE_TYPE_NAMES.get(std.device_type, f"0x{std.device_type:02x}")
                    info["vendor"], info["product"] = std.vendor, std.product
                    if std.device_type == 0:
                        cap = await dev.read_capacity(lun=lun)
                        info["size"], info["block_size"] = cap.size, cap.block_size
                except ScsiError as e:
                    info["error"] = str(e)
                entry["luns"].append(info)
        except MemberIOError as e:
            entry["error"] = str(e)
        finally:
            await dev.aclose()
    return out
