"""The write-ahead journal: every stripe update is logged, durably, before it touches a member.

It closes the RAID 5/6 "write hole": a crash in the middle of a stripe update can
leave data and parity disagreeing, so that a later member failure reconstructs
garbage for data nobody touched. With a journal, the member writes of one update
(data and parity, as ``(member, member offset, bytes)``) go first into a record in
a separate journal device, the journal is flushed, and only then are the members
written in place. After a crash, the records after the checkpoint are replayed
in order, so every update is either wholly on the members or wholly absent.

Journal device layout (offsets in bytes)::

    0        superblock slot A (4 KiB)   magic, pool UUID, journal UUID, geometry,
    4 KiB    superblock slot B (4 KiB)   epoch, tail (LSN + sequence), CRC32C
    64 KiB   the log: a circular area of ``log_size`` bytes

The two superblock slots are written alternately (the valid one with the higher
``sb_seq`` wins), so a torn superblock write never loses the tail. Positions in
the log are LSNs, byte counts that only grow; LSN ``x`` lives at log offset
``x mod log_size``. A record is a header, a table of member ranges and the
payload (the new bytes of those ranges, concatenated), padded to the journal's
block; a PAD record fills the end of the log when the next record would not fit.

Every record carries its own LSN, a sequence number and the journal's epoch (bumped
each time the pool is opened), and two CRC32Cs: one over the header and range
table (so a length is trusted only when it is intact) and one over the payload.
Recovery reads from the tail and replays every record while LSN, sequence, epoch
and both CRCs check out; it stops at the first record that does not — a torn or
corrupt record, or simply the end of the log — and never applies bytes from it.

Group commit: concurrent writers queue their updates; whoever takes the journal's
I/O lock writes every queued record in one device write and flushes once.
Checkpoint: once the members are flushed, records whose in-place writes finished
before the flush began are no longer needed; the tail moves past them, lazily on
pool flushes and at once when the log is full.

The codec (``encode_update``, ``encode_pad``, ``parse_header``, ``parse_payload``,
``LogScanner``, ``JournalSuperblock``) is sans-IO: it works on bytes alone.
"""

from __future__ import annotations

import logging
import struct
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from vstore.crc import crc32c
from vstore.errors import ConfigError, MemberIOError, MetadataError, VstoreError
from vstore.stack.device import BlockDevice, as_u8

log = logging.getLogger("vstore.consistency.journal")

SB_MAGIC = b"VSTJRNL1"
REC_MAGIC = b"VJR1"
FORMAT_VERSION = 1
SB_SLOT_SIZE = 4096
SB_OFFSETS = (0, 4096)
LOG_OFFSET = 64 << 10
DEFAULT_SIZE = 64 << 20
MIN_LOG_SIZE = 256 << 10

KIND_UPDATE = 1
KIND_PAD = 2

# magic, version, pool uuid, journal uuid, log offset, log size, block, sb_seq, epoch,
# tail lsn, tail seq; then CRC32C over everything before it.
_SB = struct.Struct("<8sI16s16sQQIQQQQ")
# magic, kind, flags, epoch, seq, lsn, n ranges, payload length, record length (padded),
# payload crc; then the header crc (over this header with hdr crc 0, and the range table).
_HDR = struct.Struct("<4sHHQQQIIII")
HDR_SIZE = _HDR.size + 4
_RANGE = struct.Struct("<IIQ")  # member, length, member offset

MemberWrite = tuple[int, int, Any]


class JournalError(VstoreError):
    """The journal device is missing, foreign, corrupt or failed; or a record cannot fit."""


class RecordError(Exception):
    """A record that does not parse: a torn write, corruption, or the end of the log."""


# ---------------------------------------------------------------------------- superblock


@dataclass
class JournalSuperblock:
    """The journal device's identity and its checkpoint (the tail of the log)."""

    pool_uuid: str
    journal_uuid: str
    log_size: int
    block: int = 512
    sb_seq: int = 0
    epoch: int = 0
    tail_lsn: int = 0
    tail_seq: int = 1
    log_offset: int = LOG_OFFSET

    def pack(self) -> bytes:
        """Serialize into one SB_SLOT_SIZE slot, with its CRC32C."""
        body = _SB.pack(SB_MAGIC, FORMAT_VERSION, uuid.UUID(self.pool_uuid).bytes,
                        uuid.UUID(self.journal_uuid).bytes, self.log_offset, self.log_size,
                        self.block, self.sb_seq, self.epoch, self.tail_lsn, self.tail_seq)
        return (body + struct.pack("<I", crc32c(body))).ljust(SB_SLOT_SIZE, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> JournalSuperblock:
        """Parse and verify one slot; MetadataError on any damage."""
        if len(raw) < _SB.size + 4:
            raise MetadataError("journal superblock truncated")
        body = bytes(raw[: _SB.size])
        (magic, version, pool_u, jr_u, log_off, log_size, block, sb_seq, epoch, tail_lsn,
         tail_seq) = _SB.unpack(body)
        if magic != SB_MAGIC:
            raise MetadataError("not a vstore journal (bad magic)")
        if struct.unpack_from("<I", raw, _SB.size)[0] != crc32c(body):
            raise MetadataError("journal superblock CRC32C mismatch")
        if version != FORMAT_VERSION:
            raise MetadataError(f"unsupported journal format version {version}")
        if block < 512 or block & (block - 1) or log_size < block or log_size % block:
            raise MetadataError("journal superblock geometry out of range")
        return cls(str(uuid.UUID(bytes=pool_u)), str(uuid.UUID(bytes=jr_u)), log_size, block,
                   sb_seq, epoch, tail_lsn, tail_seq, log_off)


def newest_superblock(slots: Sequence[bytes]) -> JournalSuperblock:
    """The valid slot with the highest sb_seq; MetadataError naming the damage when none is."""
    best: JournalSuperblock | None = None
    errors = []
    for raw in slots:
        try:
            sb = JournalSuperblock.unpack(raw)
        except (MetadataError, struct.error) as e:
            errors.append(str(e))
            continue
        if best is None or sb.sb_seq > best.sb_seq:
            best = sb
    if best is None:
        raise MetadataError("; ".join(dict.fromkeys(errors)))
    return best


# ---------------------------------------------------------------------------- records


@dataclass
class RecordHeader:
    """A parsed record header and range table."""

    kind: int
    epoch: int
    seq: int
    lsn: int
    ranges: list[tuple[int, int, int]]  # (member, member offset, length)
    payload_len: int
    rec_len: int
    payload_crc: int


@dataclass
class Record:
    """A complete, verified update record: the member writes of one stripe update."""

    seq: int
    lsn: int
    rec_len: int
    writes: list[tuple[int, int, np.ndarray]]


def record_size(nranges: int, payload_len: int, block: int) -> int:
    """Bytes a record takes in the log, padded to the block."""
    raw = HDR_SIZE + nranges * _RANGE.size + payload_len
    return -(-raw // block) * block


def _pack_header(kind: int, epoch: int, seq: int, lsn: int, ranges: Sequence[tuple[int, int, int]],
                 payload_len: int, rec_len: int, payload_crc: int) -> bytes:
    head = _HDR.pack(REC_MAGIC, kind, 0, epoch, seq, lsn, len(ranges), payload_len, rec_len,
                     payload_crc)
    table = b"".join(_RANGE.pack(m, n, off) for m, off, n in ranges)
    hcrc = crc32c(table, crc32c(head))
    return head + struct.pack("<I", hcrc) + table


def encode_update(epoch: int, seq: int, lsn: int, writes: Sequence[MemberWrite], block: int,
                  out: np.ndarray | None = None) -> np.ndarray:
    """One update record (header, range table, payload, zero padding) as a uint8 array.

    With ``out`` (at least the record's size) the record is built in place there.
    """
    bufs = [as_u8(buf) for _, _, buf in writes]
    ranges = [(int(m), int(off), len(b)) for (m, off, _), b in zip(writes, bufs, strict=True)]
    payload_len = sum(n for _, _, n in ranges)
    rec_len = record_size(len(ranges), payload_len, block)
    out = np.empty(rec_len, np.uint8) if out is None else out[:rec_len]
    pos = HDR_SIZE + len(ranges) * _RANGE.size
    pcrc = 0
    for b in bufs:
        dst = out[pos : pos + len(b)]
        dst[:] = b
        pcrc = crc32c(dst, pcrc)  # over the copy: contiguous, whatever the source was
        pos += len(b)
    out[pos:] = 0
    hdr = _pack_header(KIND_UPDATE, epoch, seq, lsn, ranges, payload_len, rec_len, pcrc)
    out[: len(hdr)] = np.frombuffer(hdr, np.uint8)
    return out


def encode_pad(epoch: int, lsn: int, length: int) -> bytes:
    """A PAD record of exactly length bytes (it fills the end of the log)."""
    if length < HDR_SIZE:
        raise ValueError(f"a pad record needs at least {HDR_SIZE} bytes")
    hdr = _pack_header(KIND_PAD, epoch, 0, lsn, [], 0, length, 0)
    return hdr + bytes(length - len(hdr))


def header_bytes_needed(first: bytes) -> int:
    """How many bytes from a record's start the header and range table take (from its first bytes)."""
    if len(first) < _HDR.size:
        raise RecordError("record header truncated")
    nranges = _HDR.unpack_from(first)[6]
    if nranges > 1 << 16:
        raise RecordError(f"implausible range count {nranges}")
    return HDR_SIZE + nranges * _RANGE.size


def parse_header(raw: bytes) -> RecordHeader:
    """Parse and verify a record's header and range table (RecordError says why not)."""
    if len(raw) < HDR_SIZE:
        raise RecordError("record header truncated")
    magic, kind, _flags, epoch, seq, lsn, nranges, payload_len, rec_len, pcrc = _HDR.unpack_from(raw)
    if magic != REC_MAGIC:
        raise RecordError("no record here (bad magic)")
    end = HDR_SIZE + nranges * _RANGE.size
    if nranges > 1 << 16 or len(raw) < end:
        raise RecordError("record range table truncated")
    (hcrc,) = struct.unpack_from("<I", raw, _HDR.size)
    table = bytes(raw[HDR_SIZE:end])
    if crc32c(table, crc32c(bytes(raw[: _HDR.size]))) != hcrc:
        raise RecordError("record header CRC32C mismatch")
    if kind not in (KIND_UPDATE, KIND_PAD):
        raise RecordError(f"unknown record kind {kind}")
    ranges = []
    total = 0
    for i in range(nranges):
        m, n, off = _RANGE.unpack_from(table, i * _RANGE.size)
        ranges.append((m, off, n))
        total += n
    if total != payload_len or rec_len < end + payload_len:
        raise RecordError("record lengths inconsistent")
    return RecordHeader(kind, epoch, seq, lsn, ranges, payload_len, rec_len, pcrc)


def parse_payload(hdr: RecordHeader, payload: bytes | np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """Verify a record's payload CRC and split it into its member writes."""
    buf = as_u8(payload)
    if len(buf) < hdr.payload_len:
        raise RecordError("record payload truncated")
    buf = buf[: hdr.payload_len]
    if crc32c(buf) != hdr.payload_crc:
        raise RecordError("record payload CRC32C mismatch")
    out = []
    pos = 0
    for m, off, n in hdr.ranges:
        out.append((m, off, buf[pos : pos + n]))
        pos += n
    return out


@dataclass
class ScanEnd:
    """Why a scan stopped: the LSN and sequence it reached, and the reason."""

    lsn: int
    seq: int
    reason: str
    torn: bool  # True: a record was there but damaged; False: the log simply ends


class LogScanner:
    """Sans-IO reader of the log from the tail: ask ``want()``, give bytes to ``feed()``.

    ``want()`` returns (lsn, length) of the bytes needed next (never crossing the
    end of the circular area); ``feed(raw)`` returns a Record, None (keep going:
    a pad, or more bytes are needed) or a ScanEnd (stop: nothing more to replay).
    """

    def __init__(self, sb: JournalSuperblock) -> None:
        self.sb = sb
        self.lsn = sb.tail_lsn
        self.seq = sb.tail_seq
        self.end: ScanEnd | None = None
        self._hdr: RecordHeader | None = None
        self._need = sb.block

    def _room(self) -> int:
        return self.sb.log_size - self.lsn % self.sb.log_size

    def want(self) -> tuple[int, int]:
        """(lsn, length) to read next."""
        return self.lsn, min(self._need, self._room())

    def _stop(self, reason: str, torn: bool) -> ScanEnd:
        self.end = ScanEnd(self.lsn, self.seq, reason, torn)
        return self.end

    def feed(self, raw: bytes | np.ndarray) -> Record | ScanEnd | None:
        """Consume the bytes asked for by want()."""
        if self.end is not None:
            return self.end
        raw = bytes(raw)
        if self.lsn - self.sb.tail_lsn >= self.sb.log_size:
            return self._stop("the whole log was scanned", False)
        if self._hdr is None:
            try:
                need = header_bytes_needed(raw)
            except RecordError as e:
                return self._stop(str(e), False)
            if need > self._room():
                return self._stop("record header runs past the end of the log", False)
            if len(raw) < need:
                self._need = -(-need // self.sb.block) * self.sb.block
                return None
            try:
                hdr = parse_header(raw)
            except RecordError as e:
                # A record whose magic is intact but whose header is not: torn or corrupt.
                return self._stop(str(e), raw[:4] == REC_MAGIC)
            if hdr.epoch != self.sb.epoch or hdr.lsn != self.lsn:
                return self._stop("end of the log (a record from an earlier pass)", False)
            if hdr.rec_len > self._room() or hdr.rec_len % self.sb.block:
                return self._stop("record length runs past the end of the log", True)
            if hdr.kind == KIND_PAD:
                if hdr.rec_len != self._room():
                    return self._stop("pad record does not reach the end of the log", True)
                self.lsn += hdr.rec_len
                self._need = self.sb.block
                return None
            if hdr.seq != self.seq:
                return self._stop(f"sequence {hdr.seq} where {self.seq} was expected", True)
            self._hdr = hdr
            self._need = hdr.rec_len
            if len(raw) < hdr.rec_len:
                return None
        hdr = self._hdr
        body_at = HDR_SIZE + len(hdr.ranges) * _RANGE.size
        if len(raw) < hdr.rec_len:
            return self._stop("record truncated", True)
        try:
            writes = parse_payload(hdr, raw[body_at : body_at + hdr.payload_len])
        except RecordError as e:
            return self._stop(f"{e} in record {hdr.seq}", True)
        rec = Record(hdr.seq, hdr.lsn, hdr.rec_len, writes)
        self._hdr = None
        self._need = self.sb.block
        self.lsn += hdr.rec_len
        self.seq += 1
        return rec


# ---------------------------------------------------------------------------- the journal


@dataclass
class _Request:
    writes: list[MemberWrite]
    seq: int = 0
    lsn: int = 0
    end_lsn: int = 0
    done: bool = False
    error: BaseException | None = None


@dataclass
class ReplayResult:
    """What a recovery did."""

    records: int = 0
    bytes: int = 0
    end_lsn: int = 0
    stopped: str = ""
    torn: bool = False
    members_written: set[int] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        """As shown by `vstore status`."""
        return {"records": self.records, "bytes": self.bytes, "stopped": self.stopped,
                "torn": self.torn}


FlushMembers = Callable[[], Awaitable[None]]
ApplyWrite = Callable[[int, int, np.ndarray], Awaitable[None]]


class Journal:
    """A pool's write-ahead journal on its own device (see the module docstring)."""

    # The layout logs parity even for members that are gone (see ParityLayout.plan_row_write).
    logs_parity = True

    def __init__(self, dev: BlockDevice, sb: JournalSuperblock, *, uri: str = "") -> None:
        self.dev = dev
        self.sb = sb
        self.uri = uri
        self.block = sb.block
        self.log_size = sb.log_size
        self.head_lsn = sb.tail_lsn
        self.head_seq = sb.tail_seq
        self.tail_lsn = sb.tail_lsn
        self.tail_seq = sb.tail_seq
        self.flush_members: FlushMembers | None = None
        # False while a member has failed but the pool metadata does not say so yet: the
        # log must keep the updates that member missed until its failure is on record.
        self.checkpoint_allowed: Callable[[], bool] = lambda: True
        # Called before an update is logged: the pool puts member failures on record first.
        self.before_commit: Callable[[], Awaitable[None]] | None = None
        self._queue: list[_Request] = []
        self._staging = np.empty(0, np.uint8)
        self._io_lock = trio.Lock()
        self._unapplied: dict[int, int] = {}  # seq -> its LSN, while its in-place writes run
        self._seq_lsn: dict[int, int] = {}
        self._applied_event = trio.Event()
        self._durable_lsn = sb.tail_lsn  # members hold everything before this LSN durably
        self._durable_seq = sb.tail_seq
        self.broken: BaseException | None = None
        self.stats = {"records": 0, "batches": 0, "flushes": 0, "checkpoints": 0,
                      "bytes": 0, "waits_full": 0}
        self.replayed: ReplayResult | None = None

    # --- creation and opening -------------------------------------------------------------

    @classmethod
    async def format(cls, dev: BlockDevice, pool_uuid: str, *, uri: str = "") -> Journal:
        """Write a fresh, empty journal onto dev for this pool."""
        block = max(512, dev.block_size)
        log_size = (dev.size - LOG_OFFSET) // block * block
        if log_size < MIN_LOG_SIZE:
            raise ConfigError(
                f"journal device {uri or dev!r} is too small: {dev.size} bytes, needs at least "
                f"{LOG_OFFSET + MIN_LOG_SIZE}")
        sb = JournalSuperblock(pool_uuid, str(uuid.uuid4()), log_size, block)
        try:
            # A stale log must never parse: wipe the first blocks of the area, then the slots.
            await dev.write(LOG_OFFSET, bytes(min(log_size, 64 << 10)))
            await dev.write(SB_OFFSETS[1], bytes(SB_SLOT_SIZE))
            await dev.write(SB_OFFSETS[0], sb.pack())
            await dev.flush()
        except MemberIOError as e:
            raise JournalError(f"cannot write the journal on {uri}: {e}") from e
        return cls(dev, sb, uri=uri)

    @classmethod
    async def open(cls, dev: BlockDevice, pool_uuid: str, journal_uuid: str | None = None, *,
                   uri: str = "") -> Journal:
        """Read the journal superblock from dev and check it belongs to this pool."""
        try:
            slots = [bytes(await dev.read(off, SB_SLOT_SIZE)) for off in SB_OFFSETS]
        except MemberIOError as e:
            raise JournalError(f"cannot read the journal superblock on {uri}: {e}") from e
        try:
            sb = newest_superblock(slots)
        except MetadataError as e:
            raise JournalError(f"journal {uri}: {e}") from e
        if sb.pool_uuid != pool_uuid or (journal_uuid and sb.journal_uuid != journal_uuid):
            raise JournalError(f"journal {uri} belongs to another pool or journal "
                               f"(pool {sb.pool_uuid}, journal {sb.journal_uuid})")
        if sb.log_offset + sb.log_size > dev.size:
            raise JournalError(f"journal {uri}: log runs past the end of the device")
        return cls(dev, sb, uri=uri)

    # --- superblock -----------------------------------------------------------------------

    async def _write_superblock(self, tail_lsn: int, tail_seq: int, epoch: int | None = None) -> None:
        sb = JournalSuperblock(self.sb.pool_uuid, self.sb.journal_uuid, self.log_size, self.block,
                               self.sb.sb_seq + 1, self.sb.epoch if epoch is None else epoch,
                               tail_lsn, tail_seq, self.sb.log_offset)
        await self._dev_io(self.dev.write(SB_OFFSETS[sb.sb_seq % 2], sb.pack()))
        await self._dev_io(self.dev.flush())
        self.sb = sb
        self.tail_lsn, self.tail_seq = tail_lsn, tail_seq

    async def _dev_io(self, aw: Awaitable[Any]) -> Any:
        try:
            return await aw
        except MemberIOError as e:
            self.broken = JournalError(f"journal device {self.uri} failed: {e}")
            raise self.broken from e

    # --- recovery -------------------------------------------------------------------------

    async def recover(self, apply: ApplyWrite, flush_members: FlushMembers) -> ReplayResult:
        """Replay every valid record after the checkpoint, in order; stop at the first bad one."""
        scanner = LogScanner(self.sb)
        result = ReplayResult()
        while True:
            lsn, length = scanner.want()
            raw = await self._dev_io(self.dev.read(self.sb.log_offset + lsn % self.log_size, length))
            got = scanner.feed(raw)
            if got is None:
                continue
            if isinstance(got, ScanEnd):
                break
            for m, off, buf in got.writes:
                await apply(m, off, buf)
                result.members_written.add(m)
                result.bytes += len(buf)
            result.records += 1
        end = scanner.end
        assert end is not None
        result.end_lsn, result.stopped, result.torn = end.lsn, end.reason, end.torn
        if end.torn:
            log.warning("journal %s: stopped at LSN %d (record %d): %s; %d record(s) before it "
                        "replayed, nothing of it applied", self.uri, end.lsn, end.seq, end.reason,
                        result.records)
        else:
            log.info("journal %s: replayed %d record(s), %d bytes; end of log at LSN %d (%s)",
                     self.uri, result.records, result.bytes, end.lsn, end.reason)
        if result.records:
            await flush_members()
        # The replayed records are on the members: start the log again after them. A new
        # epoch makes every record left beyond this point (torn or not) unreadable.
        await self._write_superblock(end.lsn, end.seq, self.sb.epoch + 1)
        self._reset_head()
        self.replayed = result
        return result

    async def start(self) -> None:
        """Begin a new epoch at the checkpoint (on every open for writing)."""
        await self._write_superblock(self.sb.tail_lsn, self.sb.tail_seq, self.sb.epoch + 1)
        self._reset_head()

    def _reset_head(self) -> None:
        self.head_lsn = self._durable_lsn = self.tail_lsn
        self.head_seq = self._durable_seq = self.tail_seq

    # --- commit ---------------------------------------------------------------------------

    def used(self) -> int:
        """Bytes of the log between the checkpoint and the head."""
        return self.head_lsn - self.tail_lsn

    async def commit(self, writes: Sequence[MemberWrite]) -> int:
        """Log one update durably (sharing a flush with concurrent callers); returns its ticket.

        The caller then writes the members in place and calls ``applied(ticket)``.
        """
        return (await self.commit_all([writes]))[0]

    async def commit_all(self, updates: Sequence[Sequence[MemberWrite]]) -> list[int]:
        """Log several records together, one after the other in the log; their tickets.

        (One update too big for a record, as pieces of whole rows: the log must hold
        them all at once, since none is applied before the last is logged.)
        """
        if self.broken is not None:
            raise self.broken
        if self.before_commit is not None:
            await self.before_commit()
        reqs = [_Request(list(writes)) for writes in updates]
        if len(reqs) > 1 and sum(self._size_of(r) for r in reqs) > self.log_size // 2:
            raise JournalError(f"journal {self.uri} ({self.log_size} bytes of log) cannot hold an update "
                               f"of {sum(self._size_of(r) for r in reqs)} bytes")
        self._queue.extend(reqs)  # together: one batch places them next to each other
        async with self._io_lock:
            if not reqs[-1].done:
                batch, self._queue = self._queue, []
                try:
                    await self._write_batch(batch)
                except BaseException as e:
                    err = e if isinstance(e, VstoreError) else JournalError(f"journal commit: {e!r}")
                    for r in batch:
                        if not r.done:
                            r.done, r.error = True, err
                    raise
        errors = [r.error for r in reqs if r.error is not None]
        if errors:
            for r in reqs:
                if r.error is None:
                    self.applied(r.seq)  # logged but never to be applied: let the log go on
            raise errors[0]
        return [r.seq for r in reqs]

    def applied(self, ticket: int) -> None:
        """The in-place writes of this ticket's update are done (or abandoned)."""
        if self._unapplied.pop(ticket, None) is not None:
            self._applied_event.set()
            self._applied_event = trio.Event()

    def _lowest_unapplied(self) -> tuple[int, int]:
        """(LSN, seq) before which every update has been written in place."""
        if not self._unapplied:
            return self.head_lsn, self.head_seq
        seq = min(self._unapplied)
        return self._unapplied[seq], seq

    def _layout_batch(self, batch: list[_Request], start: int) -> tuple[list[tuple[int, int]], int]:
        """Place requests from lsn start: the sizes of (pad or record) pieces, and the end LSN."""
        pieces: list[tuple[int, int]] = []  # (lsn, size); a request's record follows its pad
        lsn = start
        seq = self.head_seq
        for r in batch:
            size = self._size_of(r)
            room = self.log_size - lsn % self.log_size
            if size > room:
                pieces.append((lsn, -room))  # negative: a pad
                lsn += room
            pieces.append((lsn, size))
            r.seq, r.lsn = seq, lsn
            lsn += size
            r.end_lsn = lsn
            seq += 1
        return pieces, lsn

    def _encode(self, batch: list[_Request], pieces: list[tuple[int, int]]) -> list[tuple[int, np.ndarray]]:
        """Encode the placed batch into the staging buffer: one array per contiguous run."""
        total = sum(abs(n) for _, n in pieces)
        if len(self._staging) < total:
            self._staging = np.empty(max(total, 2 * len(self._staging)), np.uint8)
        runs: list[tuple[int, int, int]] = []  # lsn, staging start, length
        at = 0
        reqs = iter(batch)
        for lsn, n in pieces:
            if n < 0:
                self._staging[at : at - n] = np.frombuffer(encode_pad(self.sb.epoch, lsn, -n), np.uint8)
            else:
                r = next(reqs)
                encode_update(self.sb.epoch, r.seq, lsn, r.writes, self.block, self._staging[at : at + n])
            size = abs(n)
            if runs and runs[-1][0] + runs[-1][2] == lsn and lsn % self.log_size != 0:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + size)
            else:
                runs.append((lsn, at, size))
            at += size
        return [(lsn, self._staging[a : a + n]) for lsn, a, n in runs]

    async def _write_batch(self, batch: list[_Request]) -> None:
        for r in batch:
            if self._size_of(r) > self.log_size // 2:
                raise JournalError(
                    f"journal {self.uri} ({self.log_size} bytes of log) is too small for a stripe "
                    f"update of {self._size_of(r)} bytes; recreate the pool with a larger "
                    "--journal-size")
        while batch:
            # Take as many requests as fit in the free part of the log; make room if none does.
            take = len(batch)
            while True:
                pieces, end = self._layout_batch(batch[:take], self.head_lsn)
                if end - self.tail_lsn <= self.log_size:
                    break
                if take > 1:
                    take = max(1, take // 2)
                    continue
                await self._make_room(end - self.log_size)
            part, batch = batch[:take], batch[take:]
            # The staging buffer is reused (no fresh allocation per batch): it is free
            # again once these writes return, and only the I/O-lock holder uses it.
            for lsn, data in self._encode(part, pieces):
                await self._dev_io(self.dev.write(self.sb.log_offset + lsn % self.log_size, data))
            await self._dev_io(self.dev.flush())
            self.stats["flushes"] += 1
            self.stats["batches"] += 1
            for r in part:
                self._unapplied[r.seq] = r.lsn
                r.done = True
            self.stats["records"] += len(part)
            self.stats["bytes"] += end - self.head_lsn
            self.head_lsn, self.head_seq = end, self.head_seq + len(part)

    @property
    def max_update_bytes(self) -> int:
        """The largest member payload one update should carry (layouts split longer requests)."""
        return self.log_size // 4

    def _size_of(self, r: _Request) -> int:
        return record_size(len(r.writes), sum(len(as_u8(w[2])) for w in r.writes), self.block)

    async def _make_room(self, need_tail: int) -> None:
        """Checkpoint until the tail can reach need_tail (called with the I/O lock held)."""
        self.stats["waits_full"] += 1
        while self._durable_lsn < need_tail:
            target, _ = self._lowest_unapplied()
            if target < need_tail:
                # The oldest logged update is still being written in place: wait for it.
                await self._applied_event.wait()
                continue
            await self._flush_members_upto()
        await self._write_superblock(self._durable_lsn, self._durable_seq)
        self.stats["checkpoints"] += 1

    async def _flush_members_upto(self) -> None:
        lsn, seq = self._lowest_unapplied()
        if self.flush_members is None:
            raise JournalError("internal: journal has no member flush")
        await self.flush_members()
        if lsn > self._durable_lsn and self.checkpoint_allowed():
            self._durable_lsn, self._durable_seq = lsn, seq

    # --- flush notifications (from the layout) ----------------------------------------------

    def before_flush(self) -> tuple[int, int]:
        """Called as a member flush begins: what it will make durable."""
        return self._lowest_unapplied()

    async def after_flush(self, mark: tuple[int, int]) -> None:
        """Called after the members were flushed: a lazy checkpoint when the log is a quarter full."""
        if not self.checkpoint_allowed():
            return  # the pool records the failure after this flush; the next one counts
        if mark[0] > self._durable_lsn:
            self._durable_lsn, self._durable_seq = mark
        if (self._durable_lsn - self.tail_lsn > self.log_size // 4 and not self._io_lock.locked()
                and self.broken is None):
            async with self._io_lock:
                if self._durable_lsn > self.tail_lsn and self.broken is None:
                    await self._write_superblock(self._durable_lsn, self._durable_seq)
                    self.stats["checkpoints"] += 1

    async def checkpoint(self) -> bool:
        """Flush the members and move the tail past every update written in place; True if it moved."""
        if self.flush_members is None or self.broken is not None:
            return False
        await self.flush_members()  # the layout's flush reports the new durable point back
        async with self._io_lock:
            if self._durable_lsn <= self.tail_lsn or self.broken is not None:
                return False
            await self._write_superblock(self._durable_lsn, self._durable_seq)
            self.stats["checkpoints"] += 1
            return True

    async def close(self, clean: bool) -> None:
        """Checkpoint what the last member flush made durable (all, after a good one); close."""
        try:
            if clean and self.broken is None:
                async with self._io_lock:
                    if self._durable_lsn > self.tail_lsn:
                        await self._write_superblock(self._durable_lsn, self._durable_seq)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.dev.aclose()
                except MemberIOError as e:
                    log.warning("closing journal %s: %s", self.uri, e)

    async def retire(self, *, wipe: bool) -> None:
        """The pool no longer uses this journal: write nothing more to it, wipe its superblocks
        (so it is never taken for a live journal) unless it failed, and close it."""
        with trio.CancelScope(shield=True):
            async with self._io_lock:  # a checkpoint under way finishes first
                failed = self.broken is not None
                if not failed:
                    self.broken = JournalError(f"journal {self.uri} is no longer the pool's journal")
                if wipe and not failed:
                    try:
                        for off in SB_OFFSETS:
                            await self.dev.write(off, bytes(SB_SLOT_SIZE))
                        await self.dev.flush()
                    except MemberIOError as e:
                        log.warning("could not wipe the superblock of old journal %s: %s", self.uri, e)
            await self.close(clean=False)

    def status(self) -> dict[str, Any]:
        """What `vstore status` shows about the journal."""
        st: dict[str, Any] = {
            "mode": "journal", "uri": self.uri, "size": self.log_size, "used": self.used(),
            "seq": self.head_seq, "epoch": self.sb.epoch, "state": "failed" if self.broken else "active",
            **{k: v for k, v in self.stats.items() if k != "bytes"},
        }
        if self.replayed is not None:
            st["replayed"] = self.replayed.to_dict()
        return st
