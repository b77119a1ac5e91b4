"""Logical volumes: a named list of fixed-size extents of the pool's address space.

A volume's byte ``off`` lives at pool offset ``extents[off // E] * E + off % E``
(E = the pool's extent size). Requests that cross extents are split, runs of
adjacent extents are merged into one pool request, and the pieces are issued
concurrently.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from vstore.errors import ReadOnlyError
from vstore.io.aio import run_all
from vstore.stack.device import BlockDevice, Buffer, DeviceBase, as_u8

EXTENT_SIZE = 4 << 20


def runs_to_list(runs: list[list[int]]) -> list[int]:
    """Expand [[start, count], ...] into a list of extent numbers."""
    out: list[int] = []
    for start, count in runs:
        out.extend(range(start, start + count))
    return out


def list_to_runs(extents: list[int]) -> list[list[int]]:
    """Compress extent numbers into [[start, count], ...] runs."""
    runs: list[list[int]] = []
    for e in extents:
        if runs and runs[-1][0] + runs[-1][1] == e:
            runs[-1][1] += 1
        else:
            runs.append([e, 1])
    return runs


class Volume(DeviceBase):
    """A logical volume: a BlockDevice mapped onto extents of the pool device."""

    def __init__(self, name: str, size: int, extents: list[int], pool_dev: BlockDevice,
                 extent_size: int = EXTENT_SIZE, read_only: bool = False) -> None:
        self.name = name
        self.size = size
        self.extents = extents
        self.pool_dev = pool_dev
        self.extent_size = extent_size
        self.block_size = pool_dev.block_size
        self.read_only = read_only

    def to_meta(self) -> dict[str, Any]:
        """The volume's record in the pool metadata."""
        return {"name": self.name, "size": self.size, "extents": list_to_runs(self.extents)}

    def pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Split a volume range into (volume offset, pool offset, length), merging adjacent extents."""
        es = self.extent_size
        out: list[tuple[int, int, int]] = []
        pos, end = offset, offset + length
        while pos < end:
            idx = pos // es
            within = pos - idx * es
            n = min(es - within, end - pos)
            pool_off = self.extents[idx] * es + within
            if out and out[-1][1] + out[-1][2] == pool_off:
                v, p, ln = out[-1]
                out[-1] = (v, p, ln + n)
            else:
                out.append((pos, pool_off, n))
            pos += n
        return out

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read length bytes at offset of the volume."""
        self.check(offset, length)
        pieces = self.pieces(offset, length)
        if len(pieces) == 1:
            return await self.pool_dev.read(pieces[0][1], length)
        out = np.empty(length, dtype=np.uint8)

        async def one(voff: int, poff: int, n: int) -> None:
            out[voff - offset : voff - offset + n] = await self.pool_dev.read(poff, n)

        await run_all([partial(one, *piece) for piece in pieces])
        return out

    async def write(self, offset: int, data: Buffer) -> None:
        """Write bytes at offset of the volume (never past its end)."""
        if self.read_only:
            raise ReadOnlyError(f"volume {self.name!r} is read-only")
        buf = as_u8(data)
        self.check(offset, len(buf))
        pieces = self.pieces(offset, len(buf))
        if len(pieces) == 1:
            await self.pool_dev.write(pieces[0][1], buf)
            return
        await run_all([
            partial(self.pool_dev.write, poff, buf[voff - offset : voff - offset + n])
            for voff, poff, n in pieces
        ])

    async def flush(self) -> None:
        """Flush the pool device below (all volumes share it)."""
        await self.pool_dev.flush()

    async def discard(self, offset: int, length: int) -> None:
        """Pass discards down (the layers below may ignore them)."""
        self.check(offset, length)
        for _, poff, n in self.pieces(offset, length):
            await self.pool_dev.discard(poff, n)

    async def aclose(self) -> None:
        """Volumes own nothing; the pool closes the devices."""
