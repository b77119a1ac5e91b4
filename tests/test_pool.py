"""Pools in-process: metadata redundancy, ownership, fresh extents, member states."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vstore.consistency.metadata import SLOT_OFFSETS, Superblock, pack_slot, unpack_slot
from vstore.errors import DegradedError, MetadataError, PoolBusyError
from vstore.pool.home import Home
from vstore.pool.pool import Pool


def uris(d: Path, n: int) -> list[str]:
    return [f"file://{d}/m{i}.img" for i in range(n)]


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home")


async def make(home: Home, d: Path, level: str = "raid5", n: int = 4) -> Pool:
    return await Pool.create(home, "p", level, uris(d, n), size=24 << 20, chunk=16384)


def test_superblock_and_slot_codecs():
    sb = Superblock("6f1c0a6e-1f55-4b53-9c55-0123456789ab", "00000000-0000-4000-8000-000000000001",
                    2, 5, "raid6", 65536, 2 << 20, 123 << 20, 7)
    raw = sb.pack()
    assert len(raw) == 4096 and Superblock.unpack(raw) == sb
    for pos in (0, 9, 30, 60, 83):
        bad = bytearray(raw)
        bad[pos] ^= 0x40
        with pytest.raises(MetadataError):
            Superblock.unpack(bytes(bad))
    meta = {"generation": 9, "pool_uuid": "x", "volumes": []}
    img = pack_slot(9, meta)
    assert unpack_slot(img) == (9, meta)
    bad = bytearray(img)
    bad[40] ^= 1
    with pytest.raises(MetadataError):
        unpack_slot(bytes(bad))


async def test_highest_valid_generation_wins(home: Home, tmp_path: Path):
    pool = await make(home, tmp_path)
    await pool.create_volume("a", 1 << 20)
    await pool.create_volume("b", 1 << 20)
    gen = pool.meta["generation"]
    await pool.aclose()
    # Tear the newest slot on every member: the previous generation must be used.
    newest = (gen + 1) % 2  # aclose committed gen+1
    for i in range(4):
        with open(tmp_path / f"m{i}.img", "r+b") as f:
            f.seek(SLOT_OFFSETS[newest] + 100)
            f.write(b"torn!")
    pool = await Pool.open(home, "p", read_only=True)
    try:
        assert pool.meta["generation"] == gen
        assert set(pool.volumes) == {"a", "b"}
    finally:
        await pool.aclose()


async def test_one_owner_at_a_time(home: Home, tmp_path: Path):
    pool = await make(home, tmp_path)
    await pool.aclose()
    first = await Pool.open(home, "p")
    try:
        with pytest.raises(PoolBusyError, match="in use by pid"):
            await Pool.open(home, "p")
    finally:
        await first.aclose()
    # Another config directory (another host, as far as the lock file knows) sees the token.
    other = Home(tmp_path / "other-home")
    other.write_pool("p", home.read_pool("p"))
    first = await Pool.open(home, "p")
    try:
        # A live owner on this host: refused, naming it.
        with pytest.raises(PoolBusyError, match=f"pid {os.getpid()}"):
            await Pool.open(other, "p")
    finally:
        await first.aclose()


async def test_dead_owner_is_taken_over(home: Home, tmp_path: Path):
    pool = await make(home, tmp_path)
    await pool.aclose()
    # A child process opens the pool and dies without closing it.
    code = (
        "import os, trio, sys\n"
        "from vstore.pool.home import Home\nfrom vstore.pool.pool import Pool\n"
        "async def main():\n"
        f"    p = await Pool.open(Home({str(home.root)!r}), 'p')\n"
        "    os._exit(0)\n"
        "trio.run(main)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    pool = await Pool.open(home, "p")
    try:
        assert pool.recovered_from is not None  # it noticed the unclean shutdown
        assert pool.meta["owner"]["pid"] == os.getpid()
    finally:
        await pool.aclose()
    pool = await Pool.open(home, "p")
    assert pool.recovered_from is None
    await pool.aclose()


async def test_fresh_extent_never_shows_old_bytes(home: Home, tmp_path: Path):
    pool = await make(home, tmp_path)
    try:
        free = pool.status()["free"]
        vol = await pool.create_volume("secret", free)
        await vol.write(0, np.full(vol.size, 0xA5, dtype=np.uint8))
        await pool.remove_volume("secret")
        vol2 = await pool.create_volume("new", free)
        data = await vol2.read(0, vol2.size)
        assert not data.any()
    finally:
        await pool.aclose()


async def test_failed_member_stays_failed_until_rebuilt(home: Home, tmp_path: Path):
    pool = await make(home, tmp_path, "raid6", 5)
    vol = await pool.create_volume("v", 4 << 20)
    payload = np.random.default_rng(3).integers(0, 256, 4 << 20, dtype=np.uint8)
    await vol.write(0, payload)
    await pool.fail_member(4)
    await vol.write(0, payload[::-1].copy())  # written while member 4 is out
    await pool.aclose()
    pool = await Pool.open(home, "p")
    try:
        assert pool.members[4].state == "failed"
        assert pool.state == "degraded"
        got = await pool.volumes["v"].read(0, 4 << 20)
        assert (got == payload[::-1]).all()
        await pool.fail_member(0)
        got = await pool.volumes["v"].read(0, 4 << 20)
        assert (got == payload[::-1]).all()
        with pytest.raises(DegradedError):
            await pool.fail_member(1)
    finally:
        await pool.aclose()


async def test_missing_member_is_degraded_and_persisted(home: Home, tmp_path: Path):
    pool = await make(home, tmp_path, "raid1", 3)
    vol = await pool.create_volume("v", 1 << 20)
    await vol.write(4096, b"hello")
    await pool.aclose()
    os.rename(tmp_path / "m1.img", tmp_path / "gone.img")
    pool = await Pool.open(home, "p")
    try:
        assert pool.members[1].state == "missing" and pool.state == "degraded"
        assert bytes(await pool.volumes["v"].read(4096, 5)) == b"hello"
    finally:
        await pool.aclose()
    # Even when the member comes back it is stale: it stays failed.
    os.rename(tmp_path / "gone.img", tmp_path / "m1.img")
    pool = await Pool.open(home, "p", read_only=True)
    try:
        assert pool.members[1].state == "failed"
    finally:
        await pool.aclose()
