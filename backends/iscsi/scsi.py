"""SCSI command set pieces the initiator needs (SPC-4, SBC-3): CDBs, sense, VPD, capacity.

Pure functions over bytes, like the PDU codec.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vstore.errors import ProtocolError

# SCSI status bytes.
GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28
ACA_ACTIVE = 0x30
TASK_ABORTED = 0x40

STATUS_NAMES = {
    GOOD: "GOOD",
    CHECK_CONDITION: "CHECK CONDITION",
    CONDITION_MET: "CONDITION MET",
    BUSY: "BUSY",
    RESERVATION_CONFLICT: "RESERVATION CONFLICT",
    TASK_SET_FULL: "TASK SET FULL",
    ACA_ACTIVE: "ACA ACTIVE",
    TASK_ABORTED: "TASK ABORTED",
}

# Sense keys.
NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
ABORTED_COMMAND = 0xB

SENSE_KEY_NAMES = {
    0x0: "NO SENSE",
    0x1: "RECOVERED ERROR",
    0x2: "NOT READY",
    0x3: "MEDIUM ERROR",
    0x4: "HARDWARE ERROR",
    0x5: "ILLEGAL REQUEST",
    0x6: "UNIT ATTENTION",
    0x7: "DATA PROTECT",
    0x8: "BLANK CHECK",
    0x9: "VENDOR SPECIFIC",
    0xA: "COPY ABORTED",
    0xB: "ABORTED COMMAND",
    0xD: "VOLUME OVERFLOW",
    0xE: "MISCOMPARE",
}

# The additional sense codes a user is likely to meet with a disk LUN.
ASC_NAMES = {
    (0x04, 0x00): "logical unit not ready, cause not reportable",
    (0x04, 0x01): "logical unit is in process of becoming ready",
    (0x04, 0x02): "logical unit not ready, initializing command required",
    (0x0C, 0x00): "write error",
    (0x11, 0x00): "unrecovered read error",
    (0x1A, 0x00): "parameter list length error",
    (0x20, 0x00): "invalid command operation code",
    (0x21, 0x00): "logical block address out of range",
    (0x24, 0x00): "invalid field in CDB",
    (0x25, 0x00): "logical unit not supported",
    (0x26, 0x00): "invalid field in parameter list",
    (0x27, 0x00): "write protected",
    (0x28, 0x00): "not ready to ready change, medium may have changed",
    (0x29, 0x00): "power on, reset, or bus device reset occurred",
    (0x29, 0x01): "power on occurred",
    (0x29, 0x07): "I_T nexus loss occurred",
    (0x2A, 0x01): "mode parameters changed",
    (0x2A, 0x09): "capacity data has changed",
    (0x3A, 0x00): "medium not present",
    (0x3F, 0x0E): "reported LUNs data has changed",
    (0x44, 0x00): "internal target failure",
}

OP_TEST_UNIT_READY = 0x00
OP_INQUIRY = 0x12
OP_SYNCHRONIZE_CACHE_10 = 0x35
OP_READ_16 = 0x88
OP_WRITE_16 = 0x8A
OP_SYNCHRONIZE_CACHE_16 = 0x91
OP_SERVICE_ACTION_IN_16 = 0x9E
SA_READ_CAPACITY_16 = 0x10
OP_REPORT_LUNS = 0xA0
OP_UNMAP = 0x42

DEVICE_TYPE_NAMES = {0x00: "disk", 0x05: "cdrom", 0x0C: "controller", 0x1F: "unknown"}


# ---------------------------------------------------------------- CDBs


def test_unit_ready() -> bytes:
    """TEST UNIT READY."""
    return bytes(6)


def inquiry(page: int | None = None, alloc: int = 255) -> bytes:
    """INQUIRY (standard data, or the VPD page given)."""
    evpd = 0 if page is None else 1
    return struct.pack(">BBBHB", OP_INQUIRY, evpd, page or 0, alloc, 0)


def read_capacity_16(alloc: int = 32) -> bytes:
    """READ CAPACITY(16)."""
    return struct.pack(">BBQIBB", OP_SERVICE_ACTION_IN_16, SA_READ_CAPACITY_16, 0, alloc, 0, 0)


def read_16(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """READ(16)."""
    return struct.pack(">BBQIBB", OP_READ_16, 0x08 if fua else 0, lba, blocks, 0, 0)


def write_16(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """WRITE(16)."""
    return struct.pack(">BBQIBB", OP_WRITE_16, 0x08 if fua else 0, lba, blocks, 0, 0)


def synchronize_cache_10(lba: int = 0, blocks: int = 0) -> bytes:
    """SYNCHRONIZE CACHE(10) without IMMED (blocks 0 = to the end of the medium)."""
    return struct.pack(">BBIBHB", OP_SYNCHRONIZE_CACHE_10, 0, lba, 0, blocks, 0)


def synchronize_cache_16(lba: int = 0, blocks: int = 0) -> bytes:
    """SYNCHRONIZE CACHE(16) without IMMED."""
    return struct.pack(">BBQIBB", OP_SYNCHRONIZE_CACHE_16, 0, lba, blocks, 0, 0)


def unmap(param_len: int) -> bytes:
    """UNMAP(10): its parameter list (``unmap_parameters``) of param_len bytes follows as Data-Out."""
    return struct.pack(">BBIBHB", OP_UNMAP, 0, 0, 0, param_len, 0)


def unmap_parameters(extents: list[tuple[int, int]]) -> bytes:
    """UNMAP parameter list: one 16-byte block descriptor (LBA, number of blocks) per extent."""
    descriptors = b"".join(struct.pack(">QI4x", lba, blocks) for lba, blocks in extents)
    return struct.pack(">HH4x", 6 + len(descriptors), len(descriptors)) + descriptors


OP_PERSISTENT_RESERVE_IN = 0x5E
OP_PERSISTENT_RESERVE_OUT = 0x5F
PR_READ_KEYS = 0x00
PR_READ_RESERVATION = 0x01
PR_RESERVE = 0x01
PR_CLEAR = 0x03
PR_PREEMPT = 0x04
PR_REGISTER_AND_IGNORE = 0x06
PR_WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x05


def persistent_reserve_in(action: int, alloc: int = 1024) -> bytes:
    """PERSISTENT RESERVE IN (READ KEYS or READ RESERVATION)."""
    return struct.pack(">BB5xHB", OP_PERSISTENT_RESERVE_IN, action, alloc, 0)


def persistent_reserve_out(action: int, pr_type: int = 0, param_len: int = 24) -> bytes:
    """PERSISTENT RESERVE OUT (scope LU); its 24-byte parameter list follows as Data-Out."""
    return struct.pack(">BBB2xIB", OP_PERSISTENT_RESERVE_OUT, action, pr_type & 0x0F, param_len, 0)


def pr_out_parameters(key: int, sa_key: int = 0) -> bytes:
    """The basic PERSISTENT RESERVE OUT parameter list: reservation key, service action key."""
    return struct.pack(">QQ8x", key, sa_key)


def parse_pr_keys(data) -> list[int]:
    """READ KEYS: the registered reservation keys."""
    raw = bytes(data)
    if len(raw) < 8:
        raise ValueError("READ KEYS reply too short")
    n = struct.unpack_from(">I", raw, 4)[0]
    return [struct.unpack_from(">Q", raw, 8 + i)[0] for i in range(0, min(n, len(raw) - 8) // 8 * 8, 8)]


def parse_pr_reservation(data) -> tuple[int, int] | None:
    """READ RESERVATION: (holder's key, type), or None when there is no reservation."""
    raw = bytes(data)
    if len(raw) < 8:
        raise ValueError("READ RESERVATION reply too short")
    if struct.unpack_from(">I", raw, 4)[0] < 16 or len(raw) < 24:
        return None
    return struct.unpack_from(">Q", raw, 8)[0], raw[21] & 0x0F


def report_luns(alloc: int = 4096) -> bytes:
    """REPORT LUNS (select report 0: all)."""
    return struct.pack(">BBBBBBIBB", OP_REPORT_LUNS, 0, 0, 0, 0, 0, alloc, 0, 0)


# ---------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class Sense:
    """Decoded sense data."""

    key: int
    asc: int
    ascq: int

    def describe(self) -> str:
        """Sense key and ASC/ASCQ in words, e.g. 'ILLEGAL REQUEST, ASC/ASCQ 0x24/0x00 (invalid field in CDB)'."""
        key = SENSE_KEY_NAMES.get(self.key, f"sense key 0x{self.key:x}")
        what = ASC_NAMES.get((self.asc, self.ascq))
        text = f"{key}, ASC/ASCQ 0x{self.asc:02x}/0x{self.ascq:02x}"
        return f"{text} ({what})" if what else text


def parse_sense(data) -> Sense | None:
    """Sense data (fixed 0x70/0x71 or descriptor 0x72/0x73 format) or None when absent."""
    data = bytes(data)
    if not data:
        return None
    code = data[0] & 0x7F
    if code in (0x70, 0x71):
        if len(data) < 3:
            raise ProtocolError("fixed-format sense data too short")
        key = data[2] & 0x0F
        asc = data[12] if len(data) > 12 else 0
        ascq = data[13] if len(data) > 13 else 0
        return Sense(key, asc, ascq)
    if code in (0x72, 0x73):
        if len(data) < 4:
            raise ProtocolError("descriptor-format sense data too short")
        return Sense(data[1] & 0x0F, data[2], data[3])
    raise ProtocolError(f"unknown sense data response code 0x{code:02x}")


def parse_response_sense(segment) -> Sense | None:
    """Sense from a SCSI Response data segment (2-byte SenseLength, then sense bytes)."""
    segment = bytes(segment)
    if len(segment) < 2:
        return None
    n = struct.unpack_from(">H", segment)[0]
    if n == 0:
        return None
    if 2 + n > len(segment):
        raise ProtocolError(f"SCSI Response sense length {n} exceeds its data segment")
    return parse_sense(segment[2 : 2 + n])


@dataclass(frozen=True, slots=True)
class Capacity:
    """READ CAPACITY(16) result."""

    blocks: int
    block_size: int
    lbpme: bool = False  # logical block provisioning management: the LU is thin (UNMAP frees blocks)
    lbprz: bool = False  # unmapped blocks read as zeros

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return self.blocks * self.block_size


def parse_read_capacity_16(data) -> Capacity:
    """Decode READ CAPACITY(16) parameter data."""
    data = bytes(data)
    if len(data) < 12:
        raise ProtocolError(f"READ CAPACITY(16) data too short ({len(data)} bytes)")
    last_lba, block_len = struct.unpack_from(">QI", data)
    if block_len == 0 or block_len & (block_len - 1) or block_len > (1 << 20):
        raise ProtocolError(f"READ CAPACITY(16) reports an unusable block length {block_len}")
    flags = data[14] if len(data) > 14 else 0
    return Capacity(last_lba + 1, block_len, bool(flags & 0x80), bool(flags & 0x40))


@dataclass(frozen=True, slots=True)
class StandardInquiry:
    """The parts of standard INQUIRY data we use."""

    peripheral_qualifier: int
    device_type: int
    vendor: str
    product: str
    revision: str


def parse_standard_inquiry(data) -> StandardInquiry:
    """Decode standard INQUIRY data."""
    data = bytes(data)
    if len(data) < 36:
        raise ProtocolError(f"INQUIRY data too short ({len(data)} bytes)")

    def text(a: int, b: int) -> str:
        return data[a:b].decode("ascii", "replace").strip()

    return StandardInquiry(data[0] >> 5, data[0] & 0x1F, text(8, 16), text(16, 32), text(32, 36))


def _vpd_payload(data, page: int) -> bytes:
    data = bytes(data)
    if len(data) < 4:
        raise ProtocolError(f"VPD page 0x{page:02x} too short")
    if data[1] != page:
        raise ProtocolError(f"asked for VPD page 0x{page:02x}, got 0x{data[1]:02x}")
    n = struct.unpack_from(">H", data, 2)[0]
    if 4 + n > len(data):
        raise ProtocolError(f"VPD page 0x{page:02x} length {n} exceeds the data returned")
    return data[4 : 4 + n]


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """The UNMAP limits of VPD page 0xB0 (0: UNMAP not supported; 0xFFFFFFFF: no limit)."""

    max_unmap_blocks: int
    max_unmap_descriptors: int


def parse_vpd_block_limits(data) -> BlockLimits:
    """UNMAP limits from VPD page 0xB0 (Block Limits); a page too short to hold them has none."""
    payload = _vpd_payload(data, 0xB0)
    if len(payload) < 24:
        return BlockLimits(0, 0)
    return BlockLimits(*struct.unpack_from(">II", payload, 16))


def parse_vpd_serial(data) -> str:
    """Unit serial number from VPD page 0x80."""
    return _vpd_payload(data, 0x80).decode("ascii", "replace").strip(" \0")


@dataclass(frozen=True, slots=True)
class Designator:
    """One designation descriptor of VPD page 0x83."""

    code_set: int  # 1 binary, 2 ASCII, 3 UTF-8
    association: int  # 0 logical unit, 1 target port, 2 target device
    type: int  # 1 T10 vendor, 2 EUI-64, 3 NAA, 8 SCSI name string, ...
    value: bytes

    def text(self) -> str:
        """The designator as text (hex for binary ones)."""
        if self.code_set in (2, 3):
            return self.value.decode("utf-8", "replace").strip(" \0")
        return self.value.hex()


def parse_vpd_device_id(data) -> list[Designator]:
    """Designation descriptors from VPD page 0x83."""
    body = _vpd_payload(data, 0x83)
    out = []
    p = 0
    while p + 4 <= len(body):
        code_set = body[p] & 0x0F
        assoc = (body[p + 1] >> 4) & 3
        dtype = body[p + 1] & 0x0F
        n = body[p + 3]
        if p + 4 + n > len(body):
            raise ProtocolError("VPD 0x83 designator runs past the page")
        out.append(Designator(code_set, assoc, dtype, body[p + 4 : p + 4 + n]))
        p += 4 + n
    return out


def lun_identity(designators: list[Designator], serial: str | None) -> str | None:
    """A stable identity for a logical unit: its NAA (then EUI-64, name, T10) id, else serial."""
    # Both parts when both exist: a target whose ids are derived from its tid/lun
    # numbers (tgt's defaults) is less likely to collide on the pair.
    parts = []
    lu = [d for d in designators if d.association == 0]
    prefixes = {3: "naa", 2: "eui", 8: "name", 1: "t10"}
    for wanted in prefixes:  # preference order: NAA, EUI-64, SCSI name string, T10 vendor id
        found = [d for d in lu if d.type == wanted and d.value]
        if found:
            parts.append(f"{prefixes[wanted]}:{found[0].text()}")
            break
    if serial:
        parts.append(f"serial:{serial}")
    return "/".join(parts) or None


def parse_report_luns(data) -> list[int]:
    """LUN numbers from REPORT LUNS parameter data."""
    from backends.iscsi.pdu import decode_lun

    data = bytes(data)
    if len(data) < 8:
        raise ProtocolError("REPORT LUNS data too short")
    n = struct.unpack_from(">I", data)[0]
    entries = data[8 : 8 + n]
    return [decode_lun(entries[i : i + 8]) for i in range(0, len(entries) - 7, 8)]
