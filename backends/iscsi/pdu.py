"""iSCSI PDU codec (RFC 7143), sans-IO: pure functions over bytes, no sockets.

A PDU on the wire is the 48-byte basic header segment (BHS), additional header
segments (AHS), an optional CRC32C header digest, the data segment padded to 4
bytes, and an optional CRC32C data digest (only when there is data). Encoders
return the BHS as ``bytes``; ``frame`` adds digests and padding around a data
segment and returns a list of buffers for a scatter-gather send, so payloads are
never copied. ``PDUDecoder`` is an incremental decoder in the style of h11:
``feed`` bytes, ``next_pdu`` returns a PDU or ``None`` when it needs more.
Anything that does not parse raises ``vstore.errors.ProtocolError``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import crc32c as _crc32c

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


def crc32c(data, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of a buffer, chaining from a previous value (hardware accelerated)."""
    return _crc32c.crc32c(data, crc)


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
    """A whole received PDU."""

    header: Header
    ahs: bytes = b""
    data: bytes = b""
    data_digest_ok: bool = True

    @property
    def opcode(self) -> int:
        """The opcode."""
        return self.header.opcode


class PDUDecoder:
    """Incremental PDU decoder: feed() bytes, next_pdu() -> PDU or None (needs more data).

    A header digest mismatch raises ProtocolError (the header cannot be trusted);
    a data digest mismatch is reported in ``PDU.data_digest_ok`` so the caller can
    fail or retry just that command.
    """

    def __init__(
        self,
        *,
        header_digest_on: bool = False,
        data_digest_on: bool = False,
        max_data_length: int = MAX_SEGMENT,
        from_target: bool = True,
    ) -> None:
        self.header_digest_on = header_digest_on
        self.data_digest_on = data_digest_on
        self.max_data_length = max_data_length
        self.from_target = from_target
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data) -> None:
        """Add received bytes."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as PDUs."""
        return len(self._buf) - self._pos

    def next_pdu(self) -> PDU | None:
        """The next complete PDU, or None if more bytes are needed."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < BHS_SIZE:
            return None
        h = parse_header(
            memoryview(buf)[pos : pos + BHS_SIZE],
            max_data_length=self.max_data_length,
            from_target=self.from_target,
        )
        after_hdr, dlen, pad, dd = wire_layout(h, self.header_digest_on, self.data_digest_on)
        total = BHS_SIZE + after_hdr + dlen + pad + dd
        if len(buf) - pos < total:
            return None
        p = pos + BHS_SIZE
        ahs = bytes(buf[p : p + h.ahs_length])
        p += h.ahs_length
        if self.header_digest_on:
            check_header_digest(memoryview(buf)[pos : pos + BHS_SIZE + h.ahs_length], buf[p : p + 4])
            p += 4
        data = bytes(buf[p : p + dlen])
        ok = True
        if dd:
            ok = data_digest_ok(data, pad, buf[p + dlen + pad : p + dlen + pad + 4])
        self._pos = pos + total
        return PDU(h, ahs, data, ok)

    def end_of_stream(self) -> None:
        """Declare the stream closed; ProtocolError if a PDU was cut short."""
        if self.buffered:
            raise ProtocolError(f"connection closed inside a PDU ({self.buffered} bytes pending)")
