"""The alignment layer: byte-granular volumes over members that take only whole blocks."""

from __future__ import annotations

import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.memory import MemoryDevice
from vstore.errors import OutOfRangeError
from vstore.stack.align import AlignedDevice


class StrictDevice(MemoryDevice):
    """A memory device that refuses what an iSCSI LUN refuses: partial blocks."""

    def check(self, offset: int, length: int) -> None:
        super().check(offset, length)
        if offset % self.block_size or length % self.block_size:
            raise OutOfRangeError(f"unaligned I/O at {offset}+{length}")

    async def read(self, offset: int, length: int) -> np.ndarray:
        data = await super().read(offset, length)
        await trio.sleep(0)  # let other writers run between a read and its write-back
        return data

    async def write(self, offset: int, data) -> None:
        await trio.sleep(0)
        await super().write(offset, data)


SIZE = 64 * 512


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 3000), st.integers(0, 255)),
                min_size=1, max_size=12))
def test_random_unaligned_writes_match_a_model(ops):
    async def main() -> None:
        dev = AlignedDevice(StrictDevice(np.zeros(SIZE, np.uint8), block_size=512))
        model = np.zeros(SIZE, np.uint8)
        # Each batch runs concurrently: byte ranges in one batch never overlap, but
        # they may share blocks, which is exactly what the edge locks are for.
        batch: list[tuple[int, int, int]] = []
        taken = np.zeros(SIZE, bool)
        for off, n, v in ops:
            n = min(n, SIZE - off)
            if taken[off : off + n].any():
                continue
            taken[off : off + n] = True
            batch.append((off, n, v))
        async with trio.open_nursery() as nursery:
            for off, n, v in batch:
                nursery.start_soon(dev.write, off, np.full(n, v, np.uint8))
                model[off : off + n] = v
        for off, n, _ in batch:
            assert (await dev.read(off, n) == model[off : off + n]).all()
        assert (await dev.read(0, SIZE) == model).all()

    trio.run(main)


async def test_aligned_requests_pass_straight_through():
    inner = StrictDevice(np.zeros(SIZE, np.uint8), block_size=512)
    dev = AlignedDevice(inner)
    await dev.write(1024, np.full(2048, 5, np.uint8))
    assert (inner.store[1024:3072] == 5).all() and not inner.store[:1024].any()
    await dev.discard(100, 1500)  # only whole blocks inside the range: 512..1536
    assert (inner.store[512:1536] == 0).all() and (inner.store[1536:3072] == 5).all()


async def test_vectored_requests_aligned_and_not():
    """Whole-block vectored requests go straight below as such; others are merged as writes are."""

    class Counting(StrictDevice):
        readvs = writevs = 0

        async def readv_into(self, offset, views):
            self.readvs += 1
            self.check(offset, sum(len(v) for v in views))
            await super().readv_into(offset, views)

        async def writev(self, offset, views):
            self.writevs += 1
            self.check(offset, sum(len(v) for v in views))
            await super().writev(offset, views)

    inner = Counting(np.zeros(SIZE, np.uint8), block_size=512)
    dev = AlignedDevice(inner)
    model = np.zeros(SIZE, np.uint8)
    data = np.arange(2048, dtype=np.uint16).astype(np.uint8)
    await dev.writev(1024, [data[:100], data[100:1500], data[1500:]])
    model[1024:3072] = data
    out = np.zeros(2048, np.uint8)
    await dev.readv_into(1024, [out[:1000], out[1000:]])
    assert np.array_equal(out, data) and (inner.readvs, inner.writevs) == (1, 1)
    # Unaligned: read, merged and written as whole blocks below; neighbours keep their bytes.
    await dev.writev(1100, [data[:7], data[7:700]])
    model[1100:1800] = data[:700]
    out = np.zeros(901, np.uint8)
    await dev.readv_into(999, [out[:1], out[1:900], out[900:]])
    assert np.array_equal(out, model[999:1900]) and (inner.readvs, inner.writevs) == (1, 1)
    assert np.array_equal(inner.store, model)
    for op in (dev.writev, dev.readv_into):
        with pytest.raises(OutOfRangeError):
            await op(SIZE - 10, [np.zeros(11, np.uint8)])
