"""On-member metadata: the superblock and the redundant pool-metadata slots.

Layout of every member (offsets in bytes)::

    0            superblock (4 KiB): identity, geometry, generation, CRC32C
    64 KiB       metadata slot 0  (header + JSON of the whole pool's metadata)
    1 MiB        metadata slot 1
    1984 KiB     write-intent bitmap (64 KiB, BITMAP_OFFSET; see vstore.consistency.bitmap)
    2 MiB        data (DATA_OFFSET) up to the member's size, rounded to the chunk

A metadata commit writes the new generation into slot ``generation % 2`` of every
healthy member, flushes, then rewrites the superblocks and flushes again; so a
crash at any point leaves at least one valid slot holding the previous or the new
generation. When a pool is opened, the highest valid generation found on any
member wins, and its member table (not the raw generations) decides which member
is active, failed or spare: a member marked failed is never trusted again
without a rebuild.
"""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import dataclass
from typing import Any

from vstore.crc import crc32c
from vstore.errors import MemberIOError, MetadataError, VstoreError
from vstore.stack.device import BlockDevice

SB_MAGIC = b"VSTORESB"
META_MAGIC = b"VSTMETA1"
FORMAT_VERSION = 1
SB_SIZE = 4096
SLOT_OFFSETS = (64 << 10, 1 << 20)
SLOT_SIZE = (1 << 20) - (64 << 10)
DATA_OFFSET = 2 << 20
# The 64 KiB between slot 1 and the data hold the write-intent bitmap (vstore.consistency.bitmap).
BITMAP_OFFSET = SLOT_OFFSETS[1] + SLOT_SIZE
BITMAP_SIZE = DATA_OFFSET - BITMAP_OFFSET

LEVEL_CODES = {"linear": 0, "raid0": 1, "raid1": 2, "raid5": 5, "raid6": 6, "raid10": 10}
LEVEL_NAMES = {v: k for k, v in LEVEL_CODES.items()}

# magic, version, sb_size, pool uuid, member uuid, index, n_members, level, chunk,
# data_offset, data_size, generation; then CRC32C over everything before it.
_SB = struct.Struct("<8sII16s16sIIIIQQQ")
_META_HDR = struct.Struct("<8sQQI")  # magic, generation, payload length, crc32c(payload)


@dataclass
class Superblock:
    """The fixed-size record at the start of every member."""

    pool_uuid: str
    member_uuid: str
    index: int
    n_members: int
    level: str
    chunk: int
    data_offset: int
    data_size: int
    generation: int
    version: int = FORMAT_VERSION

    def pack(self) -> bytes:
        """Serialize to SB_SIZE bytes with the CRC32C."""
        body = _SB.pack(
            SB_MAGIC, self.version, SB_SIZE, uuid.UUID(self.pool_uuid).bytes,
            uuid.UUID(self.member_uuid).bytes, self.index, self.n_members,
            LEVEL_CODES[self.level], self.chunk, self.data_offset, self.data_size,
            self.generation,
        )
        return (body + struct.pack("<I", crc32c(body))).ljust(SB_SIZE, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> Superblock:
        """Parse and verify a superblock, raising MetadataError on any damage."""
        if len(raw) < _SB.size + 4:
            raise MetadataError("superblock truncated")
        body = raw[: _SB.size]
        magic, version, sb_size, pool_u, mem_u, index, n, level, chunk, doff, dsize, gen = (
            _SB.unpack(body)
        )
        if magic != SB_MAGIC:
            raise MetadataError("no vstore superblock (bad magic)")
        (crc,) = struct.unpack_from("<I", raw, _SB.size)
        if crc != crc32c(body):
            raise MetadataError("superblock CRC32C mismatch (corrupt superblock)")
        if version != FORMAT_VERSION:
            raise MetadataError(f"unsupported superblock version {version}")
        if level not in LEVEL_NAMES or index >= n or doff != DATA_OFFSET or chunk == 0:
            raise MetadataError("superblock fields out of range")
        return cls(str(uuid.UUID(bytes=pool_u)), str(uuid.UUID(bytes=mem_u)), index, n,
                   LEVEL_NAMES[level], chunk, doff, dsize, gen, version)


def pack_slot(generation: int, meta: dict[str, Any]) -> bytes:
    """Serialize pool metadata into a slot image (header + JSON, padded to 4 KiB)."""
    payload = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    if len(payload) + _META_HDR.size > SLOT_SIZE:
        raise VstoreError(f"pool metadata too large ({len(payload)} bytes)")
    hdr = _META_HDR.pack(META_MAGIC, generation, len(payload), crc32c(payload))
    raw = hdr + payload
    return raw + b"\0" * (-len(raw) % 4096)


def unpack_slot(raw: bytes) -> tuple[int, dict[str, Any]]:
    """Parse a slot image, returning (generation, metadata) or raising MetadataError."""
    magic, gen, length, crc = _META_HDR.unpack_from(raw)
    if magic != META_MAGIC:
        raise MetadataError("empty metadata slot")
    if length > SLOT_SIZE - _META_HDR.size or _META_HDR.size + length > len(raw):
        raise MetadataError("metadata slot length out of range")
    payload = bytes(raw[_META_HDR.size : _META_HDR.size + length])
    if crc32c(payload) != crc:
        raise MetadataError("metadata slot CRC32C mismatch")
    try:
        meta = json.loads(payload)
    except ValueError as e:
        raise MetadataError(f"metadata slot is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("generation") != gen:
        raise MetadataError("metadata slot generation mismatch")
    return gen, meta


@dataclass
class MemberScan:
    """What was found on one member: its superblock and its newest valid metadata."""

    superblock: Superblock | None
    generation: int = -1
    meta: dict[str, Any] | None = None
    error: str | None = None


async def scan_member(dev: BlockDevice) -> MemberScan:
    """Read a member's superblock and both metadata slots; never raises for bad content."""
    try:
        if dev.size < DATA_OFFSET + 4096:
            return MemberScan(None, error=f"member too small ({dev.size} bytes)")
        raw = bytes(await dev.read(0, SB_SIZE))
    except MemberIOError as e:
        return MemberScan(None, error=f"cannot read superblock: {e}")
    try:
        sb = Superblock.unpack(raw)
    except MetadataError as e:
        return MemberScan(None, error=str(e))
    scan = MemberScan(sb)
    for off in SLOT_OFFSETS:
        try:
            hdr = bytes(await dev.read(off, 4096))
            _, _, length, _ = _META_HDR.unpack_from(hdr)
            if hdr[:8] != META_MAGIC or length > SLOT_SIZE - _META_HDR.size:
                continue
            total = _META_HDR.size + length
            total += -total % 4096
            raw_slot = hdr if total <= 4096 else bytes(await dev.read(off, total))
            gen, meta = unpack_slot(raw_slot)
        except (MetadataError, MemberIOError, struct.error):
            continue
        if meta.get("pool_uuid") != sb.pool_uuid:
            continue
        if gen > scan.generation:
            scan.generation, scan.meta = gen, meta
    if scan.meta is None:
        scan.error = "no valid pool metadata slot"
    return scan


async def write_slot(dev: BlockDevice, generation: int, meta: dict[str, Any]) -> None:
    """Write the metadata image for this generation into its slot (generation % 2)."""
    await dev.write(SLOT_OFFSETS[generation % 2], pack_slot(generation, meta))


async def write_superblock(dev: BlockDevice, sb: Superblock) -> None:
    """Write a member's superblock."""
    await dev.write(0, sb.pack())
