"""The write-ahead journal: codec, corrupt input, group commit, checkpoints, replay; the bitmap resync."""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import crcmod.predefined
import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.memory import MemoryDevice
from vstore.consistency.bitmap import WriteIntentBitmap, choose_region, rows_of_regions
from vstore.consistency.journal import (
    HDR_SIZE,
    LOG_OFFSET,
    Journal,
    JournalError,
    JournalSuperblock,
    LogScanner,
    Record,
    RecordError,
    ScanEnd,
    crc32c,
    encode_pad,
    encode_update,
    newest_superblock,
    parse_header,
    parse_payload,
    record_size,
)
from vstore.errors import ConfigError, VstoreError
from vstore.pool.home import Home
from vstore.pool.pool import Pool
from vstore.testing import CrashRecorder, abandon, reopen_after_crash, verify_parity

REPO = Path(__file__).resolve().parent.parent
POOL_UUID = "6f1c0a6e-1f55-4b53-9c55-0123456789ab"
_names = itertools.count()
crcmod_c = crcmod.predefined.mkPredefinedCrcFun("crc-32c")


def writes_of(seed: int, count: int = 3) -> list[tuple[int, int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(0, 6)), int(rng.integers(0, 1 << 30)),
             rng.integers(0, 256, int(rng.integers(1, 9000)), dtype=np.uint8)) for _ in range(count)]


# ---------------------------------------------------------------------------- codec


@given(st.binary(max_size=20000), st.integers(0, 2**32 - 1))
@settings(max_examples=200)
def test_crc32c_matches_crcmod(data: bytes, seed: int) -> None:
    assert crc32c(data) == crcmod_c(data)
    cut = seed % (len(data) + 1)
    assert crc32c(data[cut:], crc32c(data[:cut])) == crcmod_c(data)  # chaining


def test_record_round_trip_and_padding() -> None:
    writes = writes_of(1)
    raw = encode_update(7, 42, 8192, writes, 512)
    assert len(raw) % 512 == 0
    assert len(raw) == record_size(3, sum(len(w[2]) for w in writes), 512)
    hdr = parse_header(raw)
    assert (hdr.epoch, hdr.seq, hdr.lsn, hdr.kind) == (7, 42, 8192, 1)
    got = parse_payload(hdr, raw[HDR_SIZE + 16 * 3 :])
    for (m, off, buf), (m2, off2, buf2) in zip(writes, got, strict=True):
        assert (m, off) == (m2, off2) and np.array_equal(buf, buf2)
    pad = encode_pad(7, 4096, 1024)
    assert len(pad) == 1024 and parse_header(pad).kind == 2


def test_superblock_round_trip_and_damage() -> None:
    sb = JournalSuperblock(POOL_UUID, "00000000-0000-4000-8000-000000000001", 1 << 20, 512, 3, 9,
                           123 * 512, 17)
    assert JournalSuperblock.unpack(sb.pack()) == sb
    for pos in (0, 10, 40, 70, 90):
        bad = bytearray(sb.pack())
        bad[pos] ^= 0x10
        with pytest.raises(VstoreError):
            JournalSuperblock.unpack(bytes(bad))
    older = JournalSuperblock(POOL_UUID, sb.journal_uuid, 1 << 20, 512, 2, 9, 0, 1)
    assert newest_superblock([older.pack(), sb.pack()]) == sb
    assert newest_superblock([b"\0" * 4096, older.pack()]) == older
    torn = sb.pack()[:40] + bytes(4056)  # a damaged slot falls back to the other one
    assert newest_superblock([torn, older.pack()]) == older


@given(st.integers(0, 2**32 - 1), st.integers(0, 200), st.integers(0, 7))
@settings(max_examples=200)
def test_any_damage_to_a_record_is_refused(seed: int, pos: int, bit: int) -> None:
    raw = bytearray(encode_update(1, 5, 0, writes_of(seed, 2), 512))
    pos = pos * len(raw) // 201
    if pos >= HDR_SIZE + 32 + sum(len(w[2]) for w in writes_of(seed, 2)):
        return  # the zero padding after the payload carries nothing
    raw[pos] ^= 1 << bit
    with pytest.raises(RecordError):
        hdr = parse_header(bytes(raw))
        parse_payload(hdr, bytes(raw[HDR_SIZE + 32 :]))


def _log_image(records: list[bytes], size: int) -> bytes:
    img = b"".join(records)
    return img + bytes(size - len(img))


def _scan(sb: JournalSuperblock, log: bytes) -> tuple[list[Record], ScanEnd]:
    """Drive the sans-IO scanner over an in-memory log."""
    sc = LogScanner(sb)
    out = []
    for _ in range(10000):
        lsn, n = sc.want()
        at = lsn % sb.log_size
        got = sc.feed(log[at : at + n])
        if isinstance(got, Record):
            out.append(got)
        elif isinstance(got, ScanEnd):
            return out, got
    raise AssertionError("scanner did not stop")


def _three_records(size: int = 1 << 16) -> tuple[JournalSuperblock, list[bytes]]:
    sb = JournalSuperblock(POOL_UUID, "00000000-0000-4000-8000-000000000001", size, 512, 1, 3, 0, 1)
    recs, lsn = [], 0
    for i in range(3):
        r = encode_update(3, 1 + i, lsn, writes_of(i, 2), 512)
        recs.append(r)
        lsn += len(r)
    return sb, recs


def test_scanner_reads_every_record_then_stops_at_the_end() -> None:
    sb, recs = _three_records()
    got, end = _scan(sb, _log_image(recs, sb.log_size))
    assert [r.seq for r in got] == [1, 2, 3] and not end.torn
    assert end.lsn == sum(map(len, recs)) and end.seq == 4


def test_scanner_stops_at_a_bad_crc_in_the_middle() -> None:
    sb, recs = _three_records()
    bad = bytearray(recs[1])
    bad[HDR_SIZE + 40] ^= 0xFF  # payload byte of the second record
    got, end = _scan(sb, _log_image([recs[0], bytes(bad), recs[2]], sb.log_size))
    assert [r.seq for r in got] == [1]  # never the bad record, never what follows it
    assert end.torn and "CRC32C" in end.reason and end.lsn == len(recs[0])


def test_scanner_stops_at_a_truncated_record_and_at_garbage() -> None:
    sb, recs = _three_records()
    cut = recs[1][: len(recs[1]) // 2]  # torn: only its first half reached the journal
    got, end = _scan(sb, _log_image([recs[0], cut], sb.log_size))
    assert [r.seq for r in got] == [1] and end.torn
    garbage = np.random.default_rng(3).integers(0, 256, sb.log_size, dtype=np.uint8).tobytes()
    got, end = _scan(sb, garbage)
    assert got == [] and not end.torn and end.lsn == 0
    # A valid record of an earlier epoch (a previous pass over the log) is the end, not a record.
    old = encode_update(2, 1, 0, writes_of(9), 512)
    got, end = _scan(sb, _log_image([old], sb.log_size))
    assert got == [] and "earlier pass" in end.reason


@given(st.binary(min_size=0, max_size=4096), st.integers(0, 3))
@settings(max_examples=300)
def test_scanner_survives_any_garbage(junk: bytes, where: int) -> None:
    sb, recs = _three_records(1 << 15)
    pos = sum(len(r) for r in recs[:where])
    log = bytearray(_log_image(recs, sb.log_size))
    log[pos : pos + len(junk)] = junk
    got, end = _scan(sb, bytes(log))
    assert [r.seq for r in got] == list(range(1, len(got) + 1))
    for r in got:  # whatever was replayed is exactly what was logged
        assert bytes(recs[r.seq - 1]) == bytes(log[r.lsn : r.lsn + r.rec_len])


# ---------------------------------------------------------------------------- the journal


class Members:
    """Memory members that record the member writes applied to them."""

    def __init__(self, n: int, size: int) -> None:
        self.devs = [MemoryDevice(np.zeros(size, np.uint8)) for _ in range(n)]
        self.flushes = 0

    async def apply(self, m: int, off: int, buf: np.ndarray) -> None:
        await self.devs[m].write(off, buf)

    async def flush(self) -> None:
        self.flushes += 1


async def test_group_commit_shares_flushes() -> None:
    dev = MemoryDevice(np.zeros(4 << 20, np.uint8))
    jr = await Journal.format(dev, POOL_UUID)
    await jr.start()
    members = Members(4, 1 << 20)
    jr.flush_members = members.flush
    flushes = []
    real_flush = dev.flush

    async def slow_flush() -> None:
        flushes.append(1)
        await trio.sleep(0.01)  # a flush takes time: writers arriving meanwhile share the next
        await real_flush()

    dev.flush = slow_flush  # type: ignore[method-assign]

    async def writer(i: int) -> None:
        t = await jr.commit([(i % 4, i * 4096, np.full(4096, i, np.uint8))])
        jr.applied(t)

    async with trio.open_nursery() as nursery:
        for i in range(64):
            nursery.start_soon(writer, i)
    assert jr.stats["records"] == 64
    assert len(flushes) == jr.stats["flushes"] <= 8  # 64 commits, a handful of flushes
    # Everything logged replays in order after a "crash" (no checkpoint was written).
    jr2 = await Journal.open(dev, POOL_UUID)
    res = await jr2.recover(members.apply, members.flush)
    assert res.records == 64 and not res.torn
    for i in range(64):
        assert (await members.devs[i % 4].read(i * 4096, 4096) == i).all()


async def test_log_wraps_and_checkpoints_when_full() -> None:
    dev = MemoryDevice(np.zeros(LOG_OFFSET + (256 << 10), np.uint8))
    jr = await Journal.format(dev, POOL_UUID)
    await jr.start()
    members = Members(3, 8 << 20)
    jr.flush_members = members.flush
    rng = np.random.default_rng(5)
    last = {}
    for i in range(200):  # about 10 laps of the log
        buf = rng.integers(0, 256, int(rng.integers(1, 12000)), dtype=np.uint8)
        off = int(rng.integers(0, 64)) * 4096
        t = await jr.commit([(i % 3, off, buf)])
        await members.apply(i % 3, off, buf)
        jr.applied(t)
        last[(i % 3, off)] = buf
    assert jr.stats["checkpoints"] >= 3 and members.flushes >= 3 and jr.used() <= jr.log_size
    # Replay from the last checkpoint onto stale members gives the same bytes (idempotent).
    expect = [d.store.copy() for d in members.devs]
    jr2 = await Journal.open(dev, POOL_UUID)
    res = await jr2.recover(members.apply, members.flush)
    assert res.records > 0 and not res.torn
    for d, e in zip(members.devs, expect, strict=True):
        assert np.array_equal(d.store, e)


async def test_record_larger_than_half_the_log_is_refused() -> None:
    dev = MemoryDevice(np.zeros(LOG_OFFSET + (256 << 10), np.uint8))
    jr = await Journal.format(dev, POOL_UUID)
    await jr.start()
    with pytest.raises(JournalError, match="too small"):
        await jr.commit([(0, 0, np.zeros(200 << 10, np.uint8))])


async def test_foreign_or_blank_journal_is_refused() -> None:
    dev = MemoryDevice(np.zeros(1 << 20, np.uint8))
    with pytest.raises(JournalError, match="not a vstore journal"):
        await Journal.open(dev, POOL_UUID)
    await Journal.format(dev, POOL_UUID)
    with pytest.raises(JournalError, match="another pool"):
        await Journal.open(dev, "00000000-0000-4000-8000-0000000000ff")
    with pytest.raises(ConfigError, match="too small"):
        await Journal.format(MemoryDevice(np.zeros(128 << 10, np.uint8)), POOL_UUID)


# ---------------------------------------------------------------------------- pools


def crash_pool(level: str = "raid5", n: int = 4, journal: bool = True, jsize: int = 1 << 20):
    rec = CrashRecorder(f"tj{next(_names)}")
    size = (2 << 20) + (1536 << 10) if level in ("raid5", "raid6") else 8 << 20  # one extent
    uris = [rec.add_memory(f"m{i}", size) for i in range(n)]
    juri = rec.add_memory("j", jsize) if journal else None
    return rec, uris, juri


async def _pool(tmp_path: Path, level: str = "raid5", n: int = 4, journal: bool = True):
    rec, uris, juri = crash_pool(level, n, journal)
    home = Home(tmp_path / "home")
    p = await Pool.create(home, "p", level, uris, chunk=4096, journal=juri)
    await p.aclose()
    pool = await Pool.open(home, "p")
    await rec.start()
    return rec, home, pool


async def test_corrupt_record_in_the_middle_stops_replay_with_a_message(tmp_path: Path, caplog) -> None:
    rec, home, pool = await _pool(tmp_path)
    try:
        lay = pool.layout
        jr = pool.consistency.journal
        for i in range(3):  # straight to the layout: records of exactly these bytes
            await lay.write(i * lay.row_bytes + 100, np.full(500, 10 + i, np.uint8))
        lsn1 = jr.tail_lsn + record_size(2, 1000, 512)  # the second record starts here
        await rec.crash(rec.materialize(mode="drop"))  # in-place writes lost, journal kept
        abandon(pool)
        # Corrupt the second record's payload on the journal device.
        jdev = rec.members["j"]
        jdev.store[jr.sb.log_offset + lsn1 % jr.log_size + HDR_SIZE + 32 + 7] ^= 0xFF
        with caplog.at_level(logging.WARNING, logger="vstore.consistency.journal"):
            pool = await reopen_after_crash(home, "p")
        assert "CRC32C mismatch" in caplog.text and "1 record(s) before it replayed" in caplog.text
        assert pool.status()["journal"]["replayed"]["torn"] is True
        got = await pool.data_dev.read(0, 3 * lay.row_bytes)
        assert (got[100:600] == 10).all()  # replayed
        # Never a byte of the bad record (nor of those after it): rows 1 and 2 stay old.
        assert (got[lay.row_bytes + 100 : lay.row_bytes + 600] == 0).all()
        assert (got[2 * lay.row_bytes + 100 : 2 * lay.row_bytes + 600] == 0).all()
        assert await verify_parity(pool.layout) == []
    finally:
        await pool.aclose()
        rec.forget()


async def test_crash_during_replay_replays_again(tmp_path: Path) -> None:
    rec, home, pool = await _pool(tmp_path)
    try:
        buf = np.random.default_rng(2).integers(0, 256, 100000, dtype=np.uint8)
        await pool.data_dev.write(777, buf)
        abandon(pool)
        await rec.crash(rec.materialize(mode="drop"))
        await rec.start()
        pool = await reopen_after_crash(home, "p")  # replays; we cut the power half way
        replay_events = len(rec.events)
        abandon(pool)
        await rec.crash(rec.materialize(replay_events // 2, "random"))
        pool = await reopen_after_crash(home, "p")
        assert np.array_equal(await pool.data_dev.read(777, len(buf)), buf)
        assert await verify_parity(pool.layout) == []
    finally:
        await pool.aclose()
        rec.forget()


@pytest.mark.parametrize("journal", [False, True], ids=["bitmap", "journal"])
async def test_write_hole_of_a_degraded_array(tmp_path: Path, journal: bool) -> None:
    """Degraded raid5, crash after a data write but before its parity write.

    Without a journal the failed member's data in that row is lost (the write hole,
    which a resync cannot close); with the journal it is intact.
    """
    rec, home, pool = await _pool(tmp_path, journal=journal)
    try:
        lay = pool.layout
        old = np.random.default_rng(1).integers(0, 256, lay.row_bytes, dtype=np.uint8)
        await pool.data_dev.write(0, old)
        await pool.flush()
        dmem, pmem = lay.row_members(0)
        await pool.fail_member(dmem[1])  # data chunk 1 of row 0 now lives in parity only
        await rec.start()
        await pool.data_dev.write(0, np.full(4096, 0xAB, np.uint8))  # chunk 0: RMW of P
        # Power cut: the data write reached member dmem[0], the parity write did not.
        durable, pending = rec.durable_and_pending(len(rec.events))
        for w in pending[f"m{dmem[0]}"]:
            durable[f"m{dmem[0]}"][w.offset : w.offset + len(w.data)] = w.data
        abandon(pool)
        await rec.crash(durable)
        pool = await reopen_after_crash(home, "p")
        got = await pool.data_dev.read(0, lay.row_bytes)
        untouched_ok = np.array_equal(got[4096:8192], old[4096:8192])
        assert untouched_ok is journal
        if journal:
            assert (got[:4096] == 0xAB).all()
    finally:
        await pool.aclose()
        rec.forget()


async def test_bitmap_resync_repairs_parity_of_dirty_regions_only(tmp_path: Path) -> None:
    rec, home, pool = await _pool(tmp_path, journal=False)
    try:
        lay = pool.layout
        bm = pool.consistency.bitmap
        assert bm.region == 1 << 20
        await pool.data_dev.write(5000, np.full(30000, 7, np.uint8))
        await pool.flush()  # region 0 stays dirty until it has been idle for a flush
        assert bm.status()["dirty"] == 1
        await pool.flush()
        await pool.flush()
        assert bm.status()["dirty"] == 0 and bm.stats["clears"] == 1
        await pool.data_dev.write(5000, np.full(30000, 9, np.uint8))
        assert bm.status()["dirty"] == 1
        # Crash with the parity writes lost: only region 0 is resynced, and it is consistent.
        durable, pending = rec.durable_and_pending(len(rec.events))
        abandon(pool)
        await rec.start()
        await rec.crash(rec.materialize(mode="keep"))
        for row in (1, 2):  # make parity wrong in rows of region 0 (dirty)
            _, pm = lay.row_members(row)
            rec.members[f"m{pm[0]}"].store[(2 << 20) + row * 4096 : (2 << 20) + row * 4096 + 10] ^= 0x55
        pool = await reopen_after_crash(home, "p")
        st = pool.status()["journal"]
        assert st["mode"] == "none" and st["resync"]["state"] == "done"
        assert st["resync"]["rows"] == bm.region // 4096
        assert await verify_parity(pool.layout) == []
        assert (await pool.data_dev.read(5000, 30000) == 9).all()
    finally:
        await pool.aclose()
        rec.forget()


def test_bitmap_geometry() -> None:
    assert choose_region(1 << 30, 65536) == 4 << 20  # about 256 regions per member
    assert choose_region(64 << 20, 65536) == 1 << 20  # never below 1 MiB
    assert choose_region(1 << 40, 65536) >= 64 << 20
    assert choose_region(1 << 40, 65536) >= (1 << 40) // (60 << 13)
    assert rows_of_regions([0, 2], 1 << 20, 1 << 18, 100) == [0, 1, 2, 3, 8, 9, 10, 11]
    bm = WriteIntentBitmap(POOL_UUID, 10 << 20, 1 << 20, lambda: [])
    assert bm.regions_of([(0, (1 << 20) - 1, b"ab"), (1, 5 << 20, b"x")]) == {0, 1, 5}


# ---------------------------------------------------------------------------- CLI


def _vstore(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "vstore.cli.main", "--home", str(home), *args],
                         capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_cli_create_with_journal_and_status(tmp_path: Path) -> None:
    home = tmp_path / "home"
    members = [f"file://{tmp_path}/d{i}.img" for i in range(3)]
    out = _vstore(home, "create", "p", "--level", "raid5", "--size", "16M", "--journal",
                  f"file://{tmp_path}/j.img", "--journal-size", "4M", *members).stdout
    assert f"journal file://{tmp_path}/j.img" in out
    assert os.path.getsize(tmp_path / "j.img") == 4 << 20
    st = json.loads(_vstore(home, "status", "p", "--json").stdout)
    assert st["journal"]["mode"] == "journal" and st["journal"]["uri"] == f"file://{tmp_path}/j.img"
    assert "journal: mode journal" in _vstore(home, "status", "p").stdout
    _vstore(home, "create", "q", "--level", "raid6", "--size", "16M",
            *[f"file://{tmp_path}/e{i}.img" for i in range(4)])
    st = json.loads(_vstore(home, "status", "q", "--json").stdout)
    assert st["journal"]["mode"] == "none" and "bitmap" in st["journal"]["protection"]
    bad = _vstore(home, "create", "r", "--level", "raid0", "--size", "16M", "--journal",
                  f"file://{tmp_path}/j2.img", *[f"file://{tmp_path}/f{i}.img" for i in range(2)],
                  check=False)
    assert bad.returncode == 2 and "no redundancy" in bad.stderr and "Traceback" not in bad.stderr
    bad = _vstore(home, "create", "s", "--level", "raid5", "--size", "16M", "--journal",
                  members[0], *[f"file://{tmp_path}/g{i}.img" for i in range(2)], members[0].replace("d0", "g2"),
                  check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


async def test_background_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import vstore.pool.consistency

    monkeypatch.setattr(vstore.pool.consistency, "CHECKPOINT_INTERVAL", 0.01)
    rec, home, pool = await _pool(tmp_path)
    try:
        jr = pool.consistency.journal
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.consistency.run_background)
            for i in range(40):
                await pool.data_dev.write(i * 20000, np.full(20000, i, np.uint8))
            with trio.fail_after(5):  # no flush from us: the background empties the log
                while jr.used() > jr.log_size // 8:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert jr.stats["checkpoints"] > 0 and jr.stats["waits_full"] == 0
        abandon(pool)
        await rec.crash(rec.materialize(mode="drop"))
        pool = await reopen_after_crash(home, "p")
        for i in range(40):
            assert (await pool.data_dev.read(i * 20000, 20000) == i).all()
    finally:
        await pool.aclose()
        rec.forget()


@pytest.mark.parametrize(("level", "n"), [("raid1", 2), ("raid10", 4), ("raid6", 5)])
async def test_journal_replays_other_levels(tmp_path: Path, level: str, n: int) -> None:
    rec, home, pool = await _pool(tmp_path, level, n)
    try:
        buf = np.random.default_rng(1).integers(0, 256, 50000, dtype=np.uint8)
        await pool.data_dev.write(1000, buf)
        abandon(pool)
        await rec.crash(rec.materialize(mode="drop"))  # nothing reached the members in place
        pool = await reopen_after_crash(home, "p")
        assert pool.status()["journal"]["replayed"]["records"] >= 1
        assert np.array_equal(await pool.data_dev.read(1000, len(buf)), buf)
    finally:
        await pool.aclose()
        rec.forget()


@pytest.mark.parametrize(("level", "n"), [("raid1", 2), ("raid1", 3), ("raid10", 4)])
async def test_mirror_writes_longer_than_a_record_are_split(tmp_path: Path, level: str, n: int) -> None:
    """A mirror write whose copies outgrow one journal record is several updates (as for parity
    levels), not an error; each is logged whole, so a crash replays them all."""
    rec, home, pool = await _pool(tmp_path, level, n)
    try:
        limit = pool.consistency.journal.max_update_bytes
        buf = np.random.default_rng(2).integers(0, 256, 3 * limit // 2 + 777, dtype=np.uint8)
        assert len(buf) * 2 > limit  # one update would not fit
        await pool.data_dev.write(5000, buf)
        assert np.array_equal(await pool.data_dev.read(5000, len(buf)), buf)
        abandon(pool)
        await rec.crash(rec.materialize(mode="drop"))  # only the journal had them
        pool = await reopen_after_crash(home, "p")
        assert pool.status()["journal"]["replayed"]["records"] >= 1  # (the log may have checkpointed)
        assert np.array_equal(await pool.data_dev.read(5000, len(buf)), buf)
    finally:
        await pool.aclose()
        rec.forget()
