"""iSCSI PDU codec (RFC 7143), sans-IO: pure functions over bytes, no sockets.

A PDU on the wire is the 48-byte basic header segment (BHS), additional header
segments (AHS), an optional CRC32C header digest, the data segment padded to 4
bytes, and an optional CRC32C data digest (only when there is data). Encoders
return the BHS as ``bytes``; ``frame`` adds digests and padding around a data
segment and returns a list of buffers for a scatter-gather send, so payloads are
never copied. ``PDUReceiver`` is the incremental decoder: it says where the next
received bytes must go (a read-ahead buffer, or the caller's own buffers for a
data segment it was told to steer there) and hands on each whole PDU; the
initiator's connection (``backends.iscsi.connection``) runs on it. ``PDUDecoder``
wraps it in the style of h11: ``feed`` bytes, ``next_pdu`` returns a PDU or
``None`` when it needs more. Anything that does not parse raises
``vstore.errors.ProtocolError``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from vstore.crc import crc32c
from vstore.errors import ProtocolError

BHS_SIZE = 48
DIGEST_SIZE = 4
NO_TAG = 0xFFFFFFFF  # the reserved ITT/TTT value
# A data segment length is 24 bits; anything above this is rejected as garbage
# unless the caller allows more (it should pass its declared MaxRecvDataSegmentLength).
MAX_SEGMENT = (1 << 24) - 1

_ZERO_PAD = b"\0\0\0"


class Opcode(IntEnum):
    """PDU opcodes (low 6 bits of byte 0)."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT = 0x02
    LOGIN = 0x03
    TEXT = 0x04
    DATA_OUT = 0x05
    LOGOUT = 0x06
    SNACK = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC = 0x32
    REJECT = 0x3F


TARGET_OPCODES = frozenset(
    {
        Opcode.NOP_IN,
        Opcode.SCSI_RESPONSE,
        Opcode.TASK_MGMT_RESPONSE,
        Opcode.LOGIN_RESPONSE,
        Opcode.TEXT_RESPONSE,
        Opcode.DATA_IN,
        Opcode.LOGOUT_RESPONSE,
        Opcode.R2T,
        Opcode.ASYNC,
        Opcode.REJECT,
    }
)
INITIATOR_OPCODES = frozenset(
    {
        Opcode.NOP_OUT,
        Opcode.SCSI_COMMAND,
        Opcode.TASK_MGMT,
        Opcode.LOGIN,
        Opcode.TEXT,
        Opcode.DATA_OUT,
        Opcode.LOGOUT,
        Opcode.SNACK,
    }
)

# Byte 1 flags.
F_FINAL = 0x80
F_CONTINUE = 0x40  # Login / Text "C"
F_READ = 0x40  # SCSI Command "R"
F_WRITE = 0x20  # SCSI Command "W"
ATTR_SIMPLE = 1
F_DATA_ACK = 0x40  # Data-In "A"
F_OVERFLOW = 0x04  # Data-In / SCSI Response "O"
F_UNDERFLOW = 0x02  # Data-In / SCSI Response "U"
F_STATUS = 0x01  # Data-In "S"
F_LOGIN_TRANSIT = 0x80
I_BIT = 0x40

# Login stages.
STAGE_SECURITY = 0
STAGE_OPERATIONAL = 1
STAGE_FULL_FEATURE = 3

# Opcodes whose StatSN field is meaningful (advance ExpStatSN); Data-In only with S.
STATUS_OPCODES = frozenset(
    {
        Opcode.SCSI_RESPONSE,
        Opcode.TASK_MGMT_RESPONSE,
        Opcode.LOGIN_RESPONSE,
        Opcode.TEXT_RESPONSE,
        Opcode.LOGOUT_RESPONSE,
        Opcode.REJECT,
    }
)

_U32 = struct.Struct(">I")
_DIGEST = struct.Struct("<I")  # digests go on the wire least-significant byte first


def pad_length(n: int) -> int:
    """Bytes of zero padding after a data segment of n bytes."""
    return -n & 3


def data_digest(data, pad: int | None = None) -> bytes:
    """The 4-byte wire form of the data digest over data (a buffer or a list of them) plus padding."""
    if isinstance(data, list):
        if pad is None:
            pad = pad_length(sum(len(d) for d in data))
        crc = 0
        for d in data:
            crc = crc32c(d, crc)
    else:
        if pad is None:
            pad = pad_length(len(data))
        crc = crc32c(data)
    if pad:
        crc = crc32c(_ZERO_PAD[:pad], crc)
    return _DIGEST.pack(crc)


def header_digest(header) -> bytes:
    """The 4-byte wire form of the header digest over BHS plus AHS."""
    return _DIGEST.pack(crc32c(header))


def serial_gt(a: int, b: int) -> bool:
    """RFC 1982 serial-number a > b for 32-bit sequence numbers (CmdSN, StatSN)."""
    return a != b and ((a - b) & 0xFFFFFFFF) < 0x80000000


def serial_le(a: int, b: int) -> bool:
    """RFC 1982 serial-number a <= b."""
    return not serial_gt(a, b)


# ---------------------------------------------------------------- headers


@dataclass(slots=True)
class Header:
    """A decoded basic header segment; opcode-specific fields are properties over raw."""

    raw: bytes
    opcode: int
    immediate: bool
    flags: int
    ahs_length: int  # bytes (TotalAHSLength * 4)
    data_length: int
    itt: int

    def u32(self, offset: int) -> int:
        """The big-endian 32-bit field at a byte offset of the BHS."""
        return _U32.unpack_from(self.raw, offset)[0]

    @property
    def final(self) -> bool:
        """The F bit."""
        return bool(self.flags & F_FINAL)

    @property
    def ttt(self) -> int:
        """Target Transfer Tag (R2T, NOP-In, Data-In, Text Response)."""
        return self.u32(20)

    @property
    def lun_bytes(self) -> bytes:
        """The 8-byte LUN field."""
        return self.raw[8:16]

    @property
    def stat_sn(self) -> int:
        """StatSN of a target PDU."""
        return self.u32(24)

    @property
    def exp_cmd_sn(self) -> int:
        """ExpCmdSN of a target PDU."""
        return self.u32(28)

    @property
    def max_cmd_sn(self) -> int:
        """MaxCmdSN of a target PDU."""
        return self.u32(32)

    @property
    def data_sn(self) -> int:
        """DataSN (Data-In) or R2TSN (R2T)."""
        return self.u32(36)

    @property
    def buffer_offset(self) -> int:
        """BufferOffset of a Data-In or R2T."""
        return self.u32(40)

    @property
    def desired_length(self) -> int:
        """Desired Data Transfer Length of an R2T."""
        return self.u32(44)

    @property
    def residual(self) -> int:
        """Residual count of a SCSI Response or a Data-In with status."""
        return self.u32(44)

    @property
    def response(self) -> int:
        """iSCSI response byte of a SCSI Response (0 = command completed at target)."""
        return self.raw[2]

    @property
    def status(self) -> int:
        """SCSI status byte (SCSI Response, Data-In with S)."""
        return self.raw[3]

    @property
    def has_status(self) -> bool:
        """Whether this PDU's StatSN counts (it carries a status)."""
        if self.opcode == Opcode.DATA_IN:
            return bool(self.flags & F_STATUS)
        if self.opcode == Opcode.NOP_IN:
            return self.itt != NO_TAG  # an answer to our ping; a target ping is not
        return self.opcode in STATUS_OPCODES

    # Login Response fields.
    @property
    def transit(self) -> bool:
        """Login Response T bit."""
        return bool(self.flags & F_LOGIN_TRANSIT)

    @property
    def csg(self) -> int:
        """Login Response current stage."""
        return (self.flags >> 2) & 3

    @property
    def nsg(self) -> int:
        """Login Response next stage."""
        return self.flags & 3

    @property
    def tsih(self) -> int:
        """Login Response TSIH."""
        return struct.unpack_from(">H", self.raw, 14)[0]

    @property
    def status_class(self) -> int:
        """Login Response status class (0 success, 1 redirect, 2 initiator error, 3 target error)."""
        return self.raw[36]

    @property
    def status_detail(self) -> int:
        """Login Response status detail."""
        return self.raw[37]

    @property
    def reject_reason(self) -> int:
        """Reject reason code (byte 2)."""
        return self.raw[2]

    @property
    def async_event(self) -> int:
        """Async Message event code (byte 36)."""
        return self.raw[36]


def parse_header(bhs, *, max_data_length: int = MAX_SEGMENT, from_target: bool = True) -> Header:
    """Decode a 48-byte BHS, raising ProtocolError when it cannot be a valid PDU."""
    if len(bhs) < BHS_SIZE:
        raise ProtocolError(f"iSCSI header truncated: {len(bhs)} of {BHS_SIZE} bytes")
    raw = bytes(bhs[:BHS_SIZE])
    b0 = raw[0]
    if b0 & 0x80:
        raise ProtocolError(f"iSCSI header with reserved bit set in byte 0 (0x{b0:02x})")
    opcode = b0 & 0x3F
    allowed = TARGET_OPCODES if from_target else INITIATOR_OPCODES
    if opcode not in allowed:
        raise ProtocolError(f"unexpected iSCSI opcode 0x{opcode:02x}")
    immediate = bool(b0 & I_BIT)
    if from_target and immediate:
        raise ProtocolError(f"target PDU (opcode 0x{opcode:02x}) with the immediate bit set")
    ahs_length = raw[4] * 4
    data_length = (raw[5] << 16) | (raw[6] << 8) | raw[7]
    if data_length > max_data_length:
        raise ProtocolError(
            f"iSCSI data segment of {data_length} bytes exceeds the limit of {max_data_length}"
        )
    itt = _U32.unpack_from(raw, 16)[0]
    return Header(raw, opcode, immediate, raw[1], ahs_length, data_length, itt)


def check_header_digest(header_and_ahs, digest) -> None:
    """Raise ProtocolError if a received header digest does not match."""
    if _DIGEST.unpack(bytes(digest))[0] != crc32c(header_and_ahs):
        raise ProtocolError("iSCSI header digest mismatch")


def data_digest_ok(data, pad: int, digest) -> bool:
    """Whether a received data digest matches data plus its padding."""
    return bytes(digest) == data_digest(data, pad)


def wire_layout(h: Header, header_digest_on: bool, data_digest_on: bool) -> tuple[int, int, int, int]:
    """Byte counts after the BHS: (ahs+header digest, data, pad, data digest)."""
    hd = DIGEST_SIZE if header_digest_on else 0
    pad = pad_length(h.data_length)
    dd = DIGEST_SIZE if (data_digest_on and h.data_length) else 0
    return h.ahs_length + hd, h.data_length, pad, dd


# ---------------------------------------------------------------- encoders


def _bhs(
    opcode: int,
    flags: int,
    *,
    immediate: bool = False,
    data_length: int = 0,
    lun: bytes = bytes(8),
    itt: int = NO_TAG,
    f20: int = 0,
    f24: int = 0,
    f28: int = 0,
    f32: int = 0,
    f36: int = 0,
    f40: int = 0,
    f44: int = 0,
    b2: int = 0,
    b3: int = 0,
    ahs_words: int = 0,
) -> bytearray:
    if not 0 <= data_length <= MAX_SEGMENT:
        raise ValueError(f"data segment length {data_length} out of range")
    h = bytearray(BHS_SIZE)
    h[0] = opcode | (I_BIT if immediate else 0)
    h[1] = flags
    h[2] = b2
    h[3] = b3
    h[4] = ahs_words
    h[5:8] = data_length.to_bytes(3, "big")
    h[8:16] = lun
    struct.pack_into(">IIIIIIII", h, 16, itt, f20, f24, f28, f32, f36, f40, f44)
    return h


def encode_lun(lun: int) -> bytes:
    """The 8-byte LUN field (SAM single-level/flat addressing)."""
    if not 0 <= lun < 0x4000:
        raise ValueError(f"LUN {lun} out of range")
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    return bytes([0x40 | (lun >> 8), lun & 0xFF]) + bytes(6)


def decode_lun(field8: bytes) -> int:
    """A LUN number from an 8-byte LUN field (peripheral or flat addressing)."""
    method = field8[0] >> 6
    if method in (0, 1):
        return ((field8[0] & 0x3F) << 8) | field8[1]
    raise ProtocolError(f"unsupported LUN addressing method {method}")


def encode_login_request(
    *,
    isid: bytes,
    tsih: int,
    itt: int,
    cid: int,
    cmd_sn: int,
    exp_stat_sn: int,
    csg: int,
    nsg: int,
    transit: bool,
    data_length: int,
) -> bytes:
    """BHS of a Login Request (always immediate, as tgt requires)."""
    if len(isid) != 6:
        raise ValueError("ISID is 6 bytes")
    flags = (F_LOGIN_TRANSIT if transit else 0) | (csg << 2) | (nsg if transit else 0)
    h = _bhs(
        Opcode.LOGIN,
        flags,
        immediate=True,
        data_length=data_length,
        itt=itt,
        f20=cid << 16,
        f24=cmd_sn,
        f28=exp_stat_sn,
    )
    h[8:14] = isid
    struct.pack_into(">H", h, 14, tsih)
    return bytes(h)


def encode_text_request(
    *, itt: int, ttt: int, cmd_sn: int, exp_stat_sn: int, data_length: int, final: bool = True
) -> bytes:
    """BHS of an immediate Text Request."""
    return bytes(
        _bhs(
            Opcode.TEXT,
            F_FINAL if final else 0,
            immediate=True,
            data_length=data_length,
            itt=itt,
            f20=ttt,
            f24=cmd_sn,
            f28=exp_stat_sn,
        )
    )


def encode_scsi_command(
    *,
    lun: int,
    itt: int,
    cdb: bytes,
    expected_length: int,
    cmd_sn: int,
    exp_stat_sn: int,
    read: bool = False,
    write: bool = False,
    final: bool = True,
    data_length: int = 0,
    immediate: bool = False,
) -> bytes:
    """BHS of a SCSI Command (SIMPLE task attribute); F is clear when unsolicited Data-Out follows."""
    if len(cdb) > 16:
        raise ValueError("CDBs longer than 16 bytes need an AHS")
    flags = (F_FINAL if final else 0) | (F_READ if read else 0) | (F_WRITE if write else 0)
    h = _bhs(
        Opcode.SCSI_COMMAND,
        flags | ATTR_SIMPLE,
        immediate=immediate,
        data_length=data_length,
        lun=encode_lun(lun),
        itt=itt,
        f20=expected_length,
        f24=cmd_sn,
        f28=exp_stat_sn,
    )
    h[32 : 32 + len(cdb)] = cdb
    return bytes(h)


def encode_data_out(
    *,
    lun: int,
    itt: int,
    ttt: int,
    exp_stat_sn: int,
    data_sn: int,
    buffer_offset: int,
    data_length: int,
    final: bool,
) -> bytes:
    """BHS of a Data-Out PDU."""
    return bytes(
        _bhs(
            Opcode.DATA_OUT,
            F_FINAL if final else 0,
            data_length=data_length,
            lun=encode_lun(lun),
            itt=itt,
            f20=ttt,
            f28=exp_stat_sn,
            f36=data_sn,
            f40=buffer_offset,
        )
    )


def encode_nop_out(
    *,
    itt: int,
    ttt: int,
    cmd_sn: int,
    exp_stat_sn: int,
    lun: bytes = bytes(8),
    data_length: int = 0,
) -> bytes:
    """BHS of an immediate NOP-Out (a ping with a real ITT, or an answer with ITT 0xffffffff)."""
    return bytes(
        _bhs(
            Opcode.NOP_OUT,
            F_FINAL,
            immediate=True,
            data_length=data_length,
            lun=lun,
            itt=itt,
            f20=ttt,
            f24=cmd_sn,
            f28=exp_stat_sn,
        )
    )


def encode_logout_request(
    *, itt: int, cid: int, cmd_sn: int, exp_stat_sn: int, reason: int = 0
) -> bytes:
    """BHS of an immediate Logout Request (reason 0: close the session)."""
    return bytes(
        _bhs(
            Opcode.LOGOUT,
            F_FINAL | reason,
            immediate=True,
            itt=itt,
            f20=cid << 16,
            f24=cmd_sn,
            f28=exp_stat_sn,
        )
    )


def encode_target_pdu(
    opcode: int,
    *,
    flags: int = F_FINAL,
    itt: int = NO_TAG,
    ttt: int = NO_TAG,
    stat_sn: int = 0,
    exp_cmd_sn: int = 0,
    max_cmd_sn: int = 0,
    f36: int = 0,
    f40: int = 0,
    f44: int = 0,
    b2: int = 0,
    b3: int = 0,
    data_length: int = 0,
) -> bytes:
    """BHS of a target PDU (for tests and fakes; an initiator never sends these)."""
    return bytes(
        _bhs(
            opcode,
            flags,
            data_length=data_length,
            itt=itt,
            f20=ttt,
            f24=stat_sn,
            f28=exp_cmd_sn,
            f32=max_cmd_sn,
            f36=f36,
            f40=f40,
            f44=f44,
            b2=b2,
            b3=b3,
        )
    )


def frame(bhs: bytes, data=b"", *, header_digest_on: bool = False, data_digest_on: bool = False) -> list:
    """The buffers of a whole PDU: BHS, header digest, data, padding, data digest.

    The data segment may be one buffer or a list of buffers (gathered on the wire, never joined).
    """
    parts: list = [bhs]
    if header_digest_on:
        parts.append(header_digest(bhs))
    gathered = isinstance(data, list)
    n = sum(len(d) for d in data) if gathered else len(data)
    if n:
        if gathered:
            parts.extend(data)
        else:
            parts.append(data)
        pad = pad_length(n)
        if pad:
            parts.append(_ZERO_PAD[:pad])
        if data_digest_on:
            parts.append(data_digest(data, pad))
    return parts


def encode_pdu(bhs: bytes, data=b"", *, header_digest_on: bool = False, data_digest_on: bool = False) -> bytes:
    """A whole PDU as one bytes object (convenience for small PDUs and tests)."""
    return b"".join(
        bytes(p) for p in frame(bhs, data, header_digest_on=header_digest_on, data_digest_on=data_digest_on)
    )


# ---------------------------------------------------------------- text keys


def encode_text(pairs) -> bytes:
    """``key=value\\0`` text from a dict or a sequence of pairs."""
    items = pairs.items() if isinstance(pairs, dict) else pairs
    out = []
    for k, v in items:
        if not k or "=" in k or "\0" in k or "\0" in str(v):
            raise ValueError(f"bad iSCSI text key {k!r}")
        out.append(f"{k}={v}\0")
    return "".join(out).encode("utf-8")


def decode_text(data) -> list[tuple[str, str]]:
    """Pairs from ``key=value\\0`` text (order kept, keys may repeat), ProtocolError on garbage."""
    raw = bytes(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError("iSCSI text segment is not UTF-8") from e
    pairs = []
    for item in text.split("\0"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ProtocolError(f"malformed iSCSI text key {item[:64]!r}")
        pairs.append((key, value))
    return pairs


# ---------------------------------------------------------------- decoder


@dataclass(slots=True)
class PDU:
    """A whole received PDU.

    When the receiver's ``steer`` placed the data segment in the caller's buffers,
    ``data`` is empty and ``placed`` is True (``data_digest_ok`` still tells).
    """

    header: Header
    ahs: bytes = b""
    data: bytes = b""
    data_digest_ok: bool = True
    placed: bool = False

    @property
    def opcode(self) -> int:
        """The opcode."""
        return self.header.opcode


_RECV_BUF = 256 * 1024
_READ_AHEAD = 8192  # bytes asked for past what the current step needs (the next headers)
_DIRECT_MIN = 32 * 1024  # payload tails this big are received straight into their buffers
IOV_MAX = 512  # buffers handed out per receive (the kernel takes 1024 iovecs)

# A steer looks at a header whose data segment is about to arrive and may return
# the buffers it must land in (consecutive, as long as the segment together) and a
# ``wanted()`` that says whether they still want it (False: received and dropped).
Steer = Callable[[Header], "tuple[list[memoryview], Callable[[], bool]] | None"]

_HEADER, _DATA, _TAIL = range(3)


def fill(buffers: list[memoryview], data: memoryview) -> int:
    """Copy the head of data into the buffers in order; return how many bytes went in."""
    k = 0
    for b in buffers:
        m = min(len(b), len(data) - k)
        b[:m] = data[k : k + m]
        k += m
        if k == len(data):
            break
    return k


class PDUReceiver:
    """Incremental PDU framing that says where the next received bytes must go (sans-IO).

    ``buffers()`` is where to receive next, ``received(n)`` accounts for the bytes
    (or ``feed(data)`` copies them in); each whole PDU goes to ``on_pdu`` as soon as
    it is complete, before the next header is looked at (so a caller may switch the
    digests or the size limit between two PDUs). Headers and small segments are
    parsed out of a read-ahead buffer; a segment the ``steer`` claims is received
    into the caller's buffers, straight from the socket once the read-ahead bytes
    are used up and at least ``_DIRECT_MIN`` remain.

    A header digest mismatch raises ProtocolError (the header cannot be trusted);
    a data digest mismatch is reported in ``PDU.data_digest_ok``.
    """

    def __init__(
        self,
        on_pdu: Callable[[PDU], None],
        *,
        header_digest_on: bool = False,
        data_digest_on: bool = False,
        max_data_length: int = MAX_SEGMENT,
        from_target: bool = True,
        steer: Steer | None = None,
    ) -> None:
        self.on_pdu = on_pdu
        self.header_digest_on = header_digest_on
        self.data_digest_on = data_digest_on
        self.max_data_length = max_data_length
        self.from_target = from_target
        self.steer = steer
        self._buf = bytearray(_RECV_BUF)
        self._mv = memoryview(self._buf)
        self._lo = 0  # the read-ahead bytes not used yet are _buf[_lo:_hi]
        self._hi = 0
        self._state = _HEADER
        self._hdr: Header | None = None  # parsed, waiting for its AHS and digest
        self._need = BHS_SIZE  # bytes from _lo the header step needs
        self._cur: Header | None = None  # the header whose data segment is arriving
        self._ahs = b""
        self._pieces: list[memoryview] = []  # where the rest of the segment goes
        self._dest: list[memoryview] = []  # the whole segment's buffers (for its digest)
        self._segment: bytearray | None = None  # a segment nobody steered
        self._wanted: Callable[[], bool] | None = None
        self._left = 0
        self._tail = 0  # padding + data digest after the segment
        self._direct = False  # the last buffers() handed out segment buffers

    @property
    def buffered(self) -> int:
        """Read-ahead bytes received but not used yet."""
        return self._hi - self._lo

    @property
    def mid_pdu(self) -> bool:
        """Whether part of a PDU has been received."""
        return self._hi > self._lo or self._state != _HEADER or self._hdr is not None

    def end_of_stream(self) -> None:
        """The peer closed the stream; ProtocolError if it stopped inside a PDU."""
        if self.mid_pdu:
            raise ProtocolError(f"connection closed inside a PDU ({self.buffered} bytes pending)")

    def buffers(self) -> list[memoryview]:
        """Where the next received bytes must go (one or more buffers, filled in order; never empty)."""
        if self._state == _DATA and self._lo == self._hi and self._left >= _DIRECT_MIN and (
            self._wanted is None or self._wanted()
        ):
            self._direct = True
            pieces = self._pieces
            return pieces if len(pieces) <= IOV_MAX else pieces[:IOV_MAX]
        self._direct = False
        st = self._state
        need = self._need if st == _HEADER else self._left if st == _DATA else self._tail
        lo, hi, size = self._lo, self._hi, len(self._buf)
        if lo == hi:
            self._lo = self._hi = lo = hi = 0
        # Read ahead only a little: a big segment after this header is better received
        # straight into its destination than copied from here.
        stop = min(size, lo + max(need, _READ_AHEAD))
        if stop - hi < min(need, 512):
            # Too little room after the buffered bytes: move them to the front.
            k = hi - lo
            self._mv[:k] = self._mv[lo:hi]
            self._lo, self._hi = 0, k
            hi = k
            stop = min(size, max(need, _READ_AHEAD))
        return [self._mv[hi:stop]]

    def received(self, n: int) -> None:
        """Account for n bytes received into ``buffers()``; whole PDUs go to ``on_pdu``."""
        if self._direct:
            self._direct = False
            self._left -= n
            pieces = self._pieces
            while n:
                first = pieces[0]
                if n >= len(first):
                    n -= len(first)
                    pieces.pop(0)
                else:
                    pieces[0] = first[n:]
                    n = 0
            if self._left:
                return
            self._state = _TAIL
        else:
            self._hi += n
        self._process()

    def feed(self, data) -> None:
        """Copy received bytes in; whole PDUs go to ``on_pdu``."""
        mv = memoryview(data).cast("B")
        while len(mv):
            k = fill(self.buffers(), mv)
            mv = mv[k:]
            self.received(k)

    def _process(self) -> None:
        mv = self._mv
        while True:
            avail = self._hi - self._lo
            st = self._state
            if st == _HEADER:
                h = self._hdr
                if h is None:
                    if avail < BHS_SIZE:
                        break
                    lo = self._lo
                    h = parse_header(mv[lo : lo + BHS_SIZE], max_data_length=self.max_data_length,
                                     from_target=self.from_target)
                    self._hdr = h
                    self._need = BHS_SIZE + h.ahs_length + (DIGEST_SIZE if self.header_digest_on else 0)
                if avail < self._need:
                    break
                lo = self._lo
                end = lo + BHS_SIZE + h.ahs_length
                ahs = bytes(mv[lo + BHS_SIZE : end]) if h.ahs_length else b""
                if self.header_digest_on:
                    check_header_digest(mv[lo:end], mv[end : end + DIGEST_SIZE])
                self._lo = lo + self._need
                self._hdr = None
                self._need = BHS_SIZE
                n = h.data_length
                if not n:
                    self.on_pdu(PDU(h, ahs))
                else:
                    self._start_segment(h, ahs)
            elif st == _DATA:
                if not avail:
                    break
                k = min(avail, self._left)
                lo = self._lo
                if self._wanted is None or self._wanted():
                    src = mv[lo : lo + k]
                    pieces = self._pieces
                    pos = 0
                    while pos < k:
                        first = pieces[0]
                        m = min(len(first), k - pos)
                        first[:m] = src[pos : pos + m]
                        pos += m
                        if m == len(first):
                            pieces.pop(0)
                        else:
                            pieces[0] = first[m:]
                self._lo = lo + k
                self._left -= k
                if not self._left:
                    self._state = _TAIL
            else:
                if avail < self._tail:
                    break
                lo = self._lo
                h = self._cur
                pad = pad_length(h.data_length)
                digest = bytes(mv[lo + pad : lo + self._tail]) if self._tail > pad else None
                self._lo = lo + self._tail
                self._state = _HEADER
                self._end_segment(h, pad, digest)
            if self._lo == self._hi:
                self._lo = self._hi = 0

    def _start_segment(self, h: Header, ahs: bytes) -> None:
        plan = self.steer(h) if self.steer is not None else None
        if plan is None:
            seg = bytearray(h.data_length)
            self._segment = seg
            self._dest = [memoryview(seg)]
            self._wanted = None
        else:
            self._segment = None
            self._dest, self._wanted = plan
        self._pieces = [p for p in self._dest if len(p)]
        self._cur = h
        self._ahs = ahs
        self._left = h.data_length
        self._tail = pad_length(h.data_length) + (DIGEST_SIZE if self.data_digest_on else 0)
        self._state = _DATA

    def _end_segment(self, h: Header, pad: int, digest: bytes | None) -> None:
        ahs, self._ahs = self._ahs, b""
        self._cur = None
        if self._segment is not None:
            data = bytes(self._segment)
            self._segment = None
            ok = digest is None or data_digest_ok(data, pad, digest)
            self.on_pdu(PDU(h, ahs, data, ok))
            return
        dest, self._dest = self._dest, []
        wanted, self._wanted = self._wanted, None
        ok = digest is None or (wanted is not None and not wanted()) or data_digest_ok(dest, pad, digest)
        self.on_pdu(PDU(h, ahs, b"", ok, True))


class PDUDecoder:
    """Whole PDUs from bytes: feed() bytes, next_pdu() -> PDU or None (needs more data).

    A ``PDUReceiver`` with the data segments copied out (the form for tests and fake
    targets). A header digest mismatch raises ProtocolError; a data digest mismatch
    is reported in ``PDU.data_digest_ok`` so the caller can fail or retry just that command.
    """

    def __init__(
        self,
        *,
        header_digest_on: bool = False,
        data_digest_on: bool = False,
        max_data_length: int = MAX_SEGMENT,
        from_target: bool = True,
    ) -> None:
        self._ready: list[PDU] = []
        self._rx = PDUReceiver(self._ready.append, header_digest_on=header_digest_on,
                               data_digest_on=data_digest_on, max_data_length=max_data_length,
                               from_target=from_target)
        self._pending = bytearray()
        self._pos = 0
        self._error: ProtocolError | None = None  # found after PDUs not yet returned

    def feed(self, data) -> None:
        """Add received bytes."""
        if self._pos:
            del self._pending[: self._pos]
            self._pos = 0
        self._pending += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._pending) - self._pos + self._rx.buffered

    def next_pdu(self) -> PDU | None:
        """The next complete PDU, or None if more bytes are needed."""
        if not self._ready and self._error is not None:
            raise self._error
        while not self._ready and self._pos < len(self._pending):
            # Hand the receiver only what it asks for, so it stops at the PDU just completed.
            src = memoryview(self._pending)[self._pos :]
            k = 0
            for b in self._rx.buffers():
                m = min(len(b), len(src) - k)
                b[:m] = src[k : k + m]
                k += m
                if k == len(src):
                    break
            self._pos += k
            try:
                self._rx.received(k)
            except ProtocolError as e:
                if not self._ready:
                    raise
                self._error = e  # the PDUs before it first
        return self._ready.pop(0) if self._ready else None

    def end_of_stream(self) -> None:
        """Declare the stream closed; ProtocolError if a PDU was cut short."""
        if self._pos < len(self._pending) or self._rx.mid_pdu:
            raise ProtocolError(
                f"connection closed inside a PDU ({self.buffered} bytes pending)"
            )
