"""Block checksums (`vstore create --checksums`): the CRC32C helper, the member layer, and through the CLI
a flipped block on a member read back right, rewritten in place, counted, and named by scrub."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import trio

from backends.memory import MemoryDevice
from tests.fuse_helpers import force_unmount
from tests.test_lifecycle_cli import vstore, vstore_process
from vstore.consistency.metadata import DATA_OFFSET
from vstore.crc import BLOCK, block_sums, crc32c
from vstore.stack.checksum import (
    PAGE_ENTRIES,
    UNKNOWN,
    ChecksumDevice,
    ChecksumError,
    entries_of,
    split_window,
)
from vstore.stack.device import FilterDevice

MiB = 1 << 20

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                                reason="needs /dev/fuse and fusermount3")


# ---------------------------------------------------------------------------- the helpers


def test_crc32c_matches_rfc3720_vectors_and_block_sums_agree() -> None:
    """One CRC32C everywhere: RFC 3720 B.4's vectors, and the per-block kernel equals it block by block."""
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    buf = np.random.default_rng(1).integers(0, 256, 37 * BLOCK + 100, dtype=np.uint8)
    sums = block_sums(buf)
    assert len(sums) == 37
    assert [int(x) for x in sums] == [crc32c(buf[i * BLOCK : (i + 1) * BLOCK].tobytes()) for i in range(37)]
    assert int(entries_of(np.zeros(BLOCK, np.uint8))[0]) == 0  # a zero block's entry is 0


def test_split_window_fits_blocks_and_their_area() -> None:
    for window in (BLOCK + 4096, 10 * MiB, 62 * MiB + 12345, 1 << 34):
        blocks, area = split_window(window)
        assert blocks * BLOCK + area <= window and area >= 4 * blocks and area % BLOCK == 0
        assert area == -(-blocks // PAGE_ENTRIES) * BLOCK  # pages of 1023 entries and their own CRC
        assert (blocks + 1) * BLOCK + -(-(blocks + 1) // PAGE_ENTRIES) * BLOCK > window  # the most that fit


async def test_checksum_device_verifies_and_names_bad_blocks() -> None:
    inner = MemoryDevice(np.zeros(8 * MiB, np.uint8))
    dev = ChecksumDevice(inner)
    data = np.random.default_rng(2).integers(0, 256, 64 * BLOCK, dtype=np.uint8)
    await dev.write(4 * BLOCK, data)
    assert np.array_equal(await dev.read(4 * BLOCK, len(data)), data)
    # Bit rot under the layer: the block is named, its bytes never returned.
    raw = await inner.read(10 * BLOCK, BLOCK)
    flipped = raw.copy()
    flipped[17] ^= 0x40
    await inner.write(10 * BLOCK, flipped)
    with pytest.raises(ChecksumError) as e:
        await dev.read(0, 32 * BLOCK)
    assert e.value.bad == [10 * BLOCK]
    got, bad = await dev.check_blocks(8 * BLOCK, 4 * BLOCK)
    assert bad == [10 * BLOCK] and got[2 * BLOCK + 17] == flipped[17]
    # Entries reach the member with a flush; a fresh layer over the same bytes sees the same.
    fresh = ChecksumDevice(inner)
    assert len((await fresh.check_blocks(4 * BLOCK, 64 * BLOCK))[1]) == 64  # not flushed yet
    await dev.flush()
    again = ChecksumDevice(inner)
    assert (await again.check_blocks(8 * BLOCK, 4 * BLOCK))[1] == [10 * BLOCK]
    # Rechecksum trusts the bytes (a resync after a crash); a discard is unverified until rewritten.
    await again.rechecksum(10 * BLOCK, BLOCK)
    assert (await again.check_blocks(8 * BLOCK, 4 * BLOCK))[1] == []
    await again.discard(20 * BLOCK, 2 * BLOCK)
    assert again._entries(20, 2).tolist() == [UNKNOWN, UNKNOWN]
    await inner.write(20 * BLOCK, b"x" * BLOCK)
    await again.read(20 * BLOCK, 2 * BLOCK)  # not verified: no error
    # Never-written blocks read as zeros and verify (a sparse member is consistent as it is).
    assert not (await again.read(100 * BLOCK, 8 * BLOCK)).any()
    with pytest.raises(Exception, match="whole 4096-byte blocks"):
        await again.read(512, BLOCK)


# ---------------------------------------------------------------------------- through the CLI


def _pool(home: Path, d: Path, level: str, n: int, *extra: str) -> list[Path]:
    files = [d / f"m{i}.img" for i in range(n)]
    vstore(home, "create", "p", "--level", level, "--size", "24M", "--chunk", "16K", "--checksums",
           *extra, *[f"file://{f}" for f in files])
    return files


def _import(home: Path, d: Path, size: int = 4 * MiB, seed: int = 5) -> bytes:
    src = d / "src.bin"
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    src.write_bytes(data)
    vstore(home, "import", "p", "v", str(src))
    return data


def _blocks_of(path: Path) -> np.ndarray:
    raw = np.fromfile(path, dtype=np.uint8)[DATA_OFFSET:]
    return raw[: len(raw) // BLOCK * BLOCK].reshape(-1, BLOCK)


def _find_block(files: list[Path], data: bytes, index: int = 0, *, which: int = 7) -> tuple[int, int]:
    """(member index, file offset) of one 4 KiB block of data as stored on member `index`."""
    want = {data[i : i + BLOCK] for i in range(0, len(data), BLOCK)}
    blocks = _blocks_of(files[index])
    hits = [b for b in range(len(blocks)) if blocks[b].tobytes() in want]
    assert len(hits) > which
    return index, DATA_OFFSET + hits[which] * BLOCK


def _find_parity_block(files: list[Path], data: bytes, index: int) -> int:
    """The file offset of a nonzero block on member index that is not a data block (a parity block)."""
    want = {data[i : i + BLOCK] for i in range(0, len(data), BLOCK)}
    blocks = _blocks_of(files[index])
    for b in range(len(blocks)):
        if blocks[b].any() and blocks[b].tobytes() not in want:
            return DATA_OFFSET + b * BLOCK
    raise AssertionError("no parity block found")


def _flip(path: Path, offset: int) -> bytes:
    """Flip one byte of the 4 KiB block at offset (as bit rot would); the block as it was."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(BLOCK)
        f.seek(offset + 1000)
        f.write(bytes([old[1000] ^ 0x5A]))
    return old


def _read_at(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(BLOCK)


def _cksum(st: dict) -> list[int]:
    return [m["checksum_errors"] for m in st["members"]]


@needs_fuse
@pytest.mark.parametrize(("level", "n"), [("raid5", 4), ("raid1", 2)])
def test_flipped_block_is_read_back_right_rewritten_and_counted(tmp_path: Path, level: str, n: int) -> None:
    """Done-when of the issue: through the mount a flipped block reads back right, is rewritten in
    place on its member and counted in status (CKSUM) — for raid5 and one side of a mirror."""
    home, d, mp = tmp_path / "home", tmp_path, tmp_path / "mnt"
    mp.mkdir()
    files = _pool(home, d, level, n)
    data = _import(home, d)
    k = n - 1
    member, off = _find_block(files, data, k)
    good = _flip(files[member], off)
    try:
        assert vstore_process(home, "mount", "p", str(mp)).returncode == 0
        with open(mp / "v", "rb") as f:
            assert f.read(len(data)) == data
        assert _read_at(files[member], off) == good  # rewritten in place
        st = json.loads(vstore(home, "status", "p", "--json").stdout)  # through the mount
        assert _cksum(st) == [1 if i == member else 0 for i in range(n)]
        assert st["state"] == "clean"
        text = vstore(home, "status", "p").stdout
        assert "cksum" in text and "crc32c" in text
        vstore(home, "umount", str(mp))
    finally:
        if (mp / ".vstore").exists():
            vstore(home, "umount", str(mp), check=False)
        force_unmount(mp)
    st = json.loads(vstore(home, "status", "p", "--json").stdout)
    assert _cksum(st) == [1 if i == member else 0 for i in range(n)]  # kept in the metadata
    assert vstore(home, "scrub", "p").returncode == 0


@pytest.mark.parametrize(("level", "n", "what"),
                         [("raid5", 4, "data"), ("raid5", 4, "parity"), ("raid1", 2, "data"),
                          ("raid6", 5, "data"), ("raid10", 4, "data")])
def test_scrub_names_the_member_and_repairs_the_right_copy(tmp_path: Path, level: str, n: int,
                                                           what: str) -> None:
    """Scrub with checksums knows the member at fault where parity alone cannot (raid5, two-way
    mirrors); raid6's P/Q verdict agrees; --repair rewrites that member's block, nothing else."""
    home, d = tmp_path / "home", tmp_path
    files = _pool(home, d, level, n)
    data = _import(home, d)
    k = 1
    off = _find_parity_block(files, data, k) if what == "parity" else _find_block(files, data, k)[1]
    good = _flip(files[k], off)
    before = [f.read_bytes()[DATA_OFFSET:] for f in files]
    res = vstore(home, "scrub", "p", "--json", check=False)
    assert res.returncode == 1, res.stderr
    r = json.loads(res.stdout)
    assert r["mismatches"] == 1 and r["repaired"] == 0
    (f,) = r["found"]
    assert (f["member"], f["culprit"], f["what"], f["offset"]) == (k, k, "checksum", off)
    if level == "raid6":
        assert f["pq"] == "agrees"
    assert [p.read_bytes()[DATA_OFFSET:] for p in files] == before  # a check changes no data
    res = vstore(home, "scrub", "p", "--repair", check=False)
    assert res.returncode == 0 and "member 1 at fault" in res.stdout and "checksum" in res.stdout
    assert _read_at(files[k], off) == good
    assert vstore(home, "scrub", "p").returncode == 0
    st = json.loads(vstore(home, "status", "p", "--json").stdout)
    assert _cksum(st) == [2 if i == k else 0 for i in range(n)]  # seen by the check and the repair
    out = d / "out.bin"
    vstore(home, "export", "p", "v", str(out))
    assert out.read_bytes()[: len(data)] == data


def test_read_only_export_reads_around_a_bad_block(tmp_path: Path) -> None:
    """A read-only open never writes: the bad block is served from redundancy and left as it is."""
    home, d = tmp_path / "home", tmp_path
    files = _pool(home, d, "raid5", 4)
    data = _import(home, d)
    member, off = _find_block(files, data, 2)
    _flip(files[member], off)
    flipped = _read_at(files[member], off)
    out = d / "out.bin"
    vstore(home, "export", "p", "v", str(out))
    assert out.read_bytes()[: len(data)] == data
    assert _read_at(files[member], off) == flipped


def test_bad_blocks_beyond_redundancy_are_an_error_never_data(tmp_path: Path) -> None:
    """The same block flipped on both sides of a mirror: the read fails with one clear line."""
    home, d = tmp_path / "home", tmp_path
    files = _pool(home, d, "raid1", 2)
    data = _import(home, d)
    _, off = _find_block(files, data, 0)
    _flip(files[0], off)
    _flip(files[1], off)
    res = vstore(home, "export", "p", "v", str(d / "out.bin"), check=False)
    assert res.returncode != 0
    assert "checksum" in res.stderr and "Traceback" not in res.stderr
    res = vstore(home, "scrub", "p", "--repair", "--json", check=False)
    assert res.returncode == 1
    assert all(not f["repaired"] and f["what"] == "checksum" for f in json.loads(res.stdout)["found"])


def test_member_past_the_checksum_threshold_is_failed(tmp_path: Path, monkeypatch) -> None:
    """As ZFS faults a vdev with too many checksum errors: more than VSTORE_CHECKSUM_FAIL_COUNT fail it."""
    monkeypatch.setenv("VSTORE_CHECKSUM_FAIL_COUNT", "2")
    home, d = tmp_path / "home", tmp_path
    files = _pool(home, d, "raid5", 4)
    data = _import(home, d)
    for which in (3, 9, 15):
        _flip(files[0], _find_block(files, data, 0, which=which)[1])
    out = d / "out.bin"
    vstore(home, "scrub", "p", "--repair", check=False)
    st = json.loads(vstore(home, "status", "p", "--json").stdout)
    assert st["members"][0]["state"] == "failed" and "checksums" in st["members"][0]["error"]
    assert st["state"] == "degraded"
    vstore(home, "export", "p", "v", str(out))
    assert out.read_bytes()[: len(data)] == data


def test_checksums_need_redundancy(tmp_path: Path) -> None:
    home, d = tmp_path / "home", tmp_path
    res = vstore(home, "create", "p", "--level", "raid0", "--size", "24M", "--checksums",
                 f"file://{d}/a.img", f"file://{d}/b.img", check=False)
    assert res.returncode != 0 and "redundancy" in res.stderr
    assert not (d / "a.img").exists()


async def test_layout_heals_on_memory_members_with_concurrent_writes() -> None:
    """Reads racing writes to the same blocks are no corruption (re-checked under the row lock)."""
    from vstore.raid import make_layout

    inner = [MemoryDevice(np.zeros(4 * MiB, np.uint8)) for _ in range(4)]
    layout = make_layout("raid5", [ChecksumDevice(m) for m in inner], 16384)
    rng = np.random.default_rng(9)
    model = np.zeros(layout.size // 4, np.uint8)

    async def writer() -> None:
        for _ in range(200):
            off = int(rng.integers(0, len(model) // BLOCK - 8)) * BLOCK
            buf = rng.integers(0, 256, int(rng.integers(1, 8)) * BLOCK, dtype=np.uint8)
            await layout.write(off, buf)
            model[off : off + len(buf)] = buf

    async def reader() -> None:
        for _ in range(400):
            off = int(rng.integers(0, len(model) // BLOCK - 8)) * BLOCK
            await layout.read(off, 8 * BLOCK)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        nursery.start_soon(reader)
    assert layout.checksum_errors == [0, 0, 0, 0]
    assert np.array_equal(await layout.read(0, len(model)), model)


class _FlipFirstRead(FilterDevice):
    """Flips the bytes of its first read at or beyond ``at`` (a transient bad read of a checksum page)."""

    def __init__(self, inner, at: int) -> None:
        super().__init__(inner)
        self.at, self.armed = at, True

    async def read(self, offset: int, length: int) -> np.ndarray:
        got = (await self.inner.read(offset, length)).copy()
        if self.armed and offset >= self.at:
            self.armed = False
            got ^= 0xFF
        return got


async def test_a_checksum_page_is_checked_by_its_own_crc() -> None:
    """A flipped read of a checksum page is read again (no healthy block taken for corrupt); a page
    corrupt on the member leaves its blocks unverified, never reported bad, and is rewritten valid."""
    inner = MemoryDevice(np.zeros(8 * MiB, np.uint8))
    dev = ChecksumDevice(inner)
    data = np.random.default_rng(3).integers(0, 256, 32 * BLOCK, dtype=np.uint8)
    await dev.write(0, data)
    await dev.flush()
    flaky = ChecksumDevice(_FlipFirstRead(inner, dev.area_offset))
    assert np.array_equal(await flaky.read(0, len(data)), data)
    assert flaky.stats.get("page_rereads") == 1 and not flaky.stats.get("bad_pages")
    raw = await inner.read(dev.area_offset, BLOCK)
    await inner.write(dev.area_offset, raw ^ 0x01)  # the page itself rots on the member
    rotten = ChecksumDevice(inner)
    assert np.array_equal(await rotten.read(0, len(data)), data)  # unverified, not "corrupt"
    assert rotten.stats["bad_pages"] == 1
    await rotten.write(0, data)
    await rotten.flush()  # the page is written again, valid, with the entries of what was written
    again = ChecksumDevice(inner)
    assert (await again.check_blocks(0, len(data)))[1] == []
    assert not again.stats.get("bad_pages")


def test_create_force_over_old_bytes_reads_zeros_and_scrubs_clean(tmp_path: Path) -> None:
    """Members that held other bytes (--force): no volume sees them, nothing is taken for corrupt."""
    home, d = tmp_path / "home", tmp_path
    files = [d / f"m{i}.img" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(np.random.default_rng(i).integers(0, 256, 24 * MiB, dtype=np.uint8).tobytes())
    vstore(home, "create", "p", "--level", "raid5", "--checksums", "--force", *[f"file://{f}" for f in files])
    assert vstore(home, "scrub", "p").returncode == 0
    vstore(home, "volume", "create", "p", "z", "--size", "8M")
    out = d / "z.bin"
    vstore(home, "export", "p", "z", str(out))
    assert not np.frombuffer(out.read_bytes(), np.uint8).any()  # a new volume reads zeros
    data = _import(home, d, 4 * MiB)
    vstore(home, "export", "p", "v", str(out))
    assert out.read_bytes()[: len(data)] == data
    assert vstore(home, "scrub", "p").returncode == 0
    st = json.loads(vstore(home, "status", "p", "--json").stdout)
    assert _cksum(st) == [0, 0, 0]


async def test_a_discarded_block_reads_as_zeros_whatever_the_member_returns() -> None:
    """A block vstore cannot vouch for (discarded: UNKNOWN) reads as zeros on every copy, even when a
    member kept its old bytes (NFS) or returns flipped ones, and a resync does not bless those bytes."""
    from vstore.raid import make_layout

    inner = [MemoryDevice(np.zeros(4 * MiB, np.uint8)) for _ in range(2)]
    layout = make_layout("raid1", [ChecksumDevice(m) for m in inner], 16384)
    data = np.random.default_rng(4).integers(0, 256, 16 * BLOCK, dtype=np.uint8)
    await layout.write(0, data)
    await layout.discard(4 * BLOCK, 4 * BLOCK)
    # Whatever the members hold there now (a member that ignores discards keeps old bytes;
    # rot flips them), the discarded blocks read as zeros, and the rest as written.
    await inner[0].write(4 * BLOCK, np.full(4 * BLOCK, 0xEE, np.uint8))
    expect = data.copy()
    expect[4 * BLOCK : 8 * BLOCK] = 0
    for _ in range(4):  # both mirrors are read in turn
        assert np.array_equal(await layout.read(0, len(data)), expect)
    await layout.rechecksum_row(0)
    assert np.array_equal(await layout.read(0, len(data)), expect)
    assert layout.checksum_errors == [0, 0]
