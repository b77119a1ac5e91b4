"""Background resync after an unclean shutdown without a journal (raid1, raid5, raid6, raid10).

As md: the pool serves at once, the dirty regions of the write-intent bitmap are
resynced in the background (paced), they stay marked on the members until
resynced (a second crash resyncs them again), and whatever trusts a row's
redundancy before the resync reaches it resyncs the row first.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import trio

from vstore.consistency.metadata import DATA_OFFSET
from vstore.ops import toolkit
from vstore.ops.rebuild import replace, resume
from vstore.ops.scrub import run_scrub, scrub_units
from vstore.pool.home import Home
from vstore.pool.pool import Pool
from vstore.raid.geometry import parity_row_members
from vstore.testing import CrashRecorder, abandon, verify_parity
from vstore.testing.checks import degraded_views
from vstore.testing.crash import dead_owner

REPO = Path(__file__).resolve().parent.parent
CHUNK = 4096
_names = itertools.count()


async def _open_after_crash(home: Home, name: str = "p") -> Pool:
    """Open as a new process would after kill -9: the resync is left to the background."""
    with dead_owner():
        return await Pool.open(home, name)


async def _crash_pool(tmp_path: Path, level: str, n: int, size: int = 6 << 20
                      ) -> tuple[CrashRecorder, Home, Pool]:
    rec = CrashRecorder(f"rs{next(_names)}")
    uris = [rec.add_memory(f"m{i}", size) for i in range(n)]
    home = Home(tmp_path / "home")
    p = await Pool.create(home, "p", level, uris, chunk=CHUNK)
    await p.aclose()
    pool = await Pool.open(home, "p")
    await rec.start()
    return rec, home, pool


def _spoil_parity(rec: CrashRecorder, n: int, rows: list[int]) -> None:
    """Make the parity of these raid5 rows disagree with their data (a torn update's trace)."""
    for row in rows:
        _, pm = parity_row_members("raid5", row, n)
        at = DATA_OFFSET + row * CHUNK
        rec.members[f"m{pm[0]}"].store[at : at + 64] ^= 0x5A


async def _dirty_raid5(tmp_path: Path) -> tuple[CrashRecorder, Home, np.ndarray, list[int]]:
    """A raid5 pool written all over and cut off unflushed, parity spoilt in rows of every region."""
    n = 4
    rec, home, pool = await _crash_pool(tmp_path, "raid5", n)
    size = pool.layout.size
    model = np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8)
    await pool.data_dev.write(0, model)  # every region dirty; no flush clears a bit
    bm = pool.consistency.bitmap
    assert bm.status()["dirty"] == bm.nbits
    abandon(pool)
    await rec.crash(rec.materialize(mode="keep"))  # the data made it; the bits are set
    per = bm.region // CHUNK
    spoilt = [r * per + per - 1 for r in range(bm.nbits) if r * per + per - 1 < pool.layout.rows]
    _spoil_parity(rec, n, spoilt)
    return rec, home, model, spoilt


async def test_pool_serves_while_the_resync_runs_in_the_background(tmp_path: Path) -> None:
    """(a) Open at once; status shows the resync running; reads and writes are right meanwhile."""
    rec, home, model, spoilt = await _dirty_raid5(tmp_path)
    pool = await _open_after_crash(home)
    try:
        rs = pool.status()["journal"]["resync"]
        assert rs["state"] == "running" and rs["rows"] == pool.layout.rows and rs["done"] == 0
        assert rs["reason"] == "unclean shutdown"
        pool.consistency.resync_speed = (0, 40 * pool.layout.row_bytes)  # 40 rows/s
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run_background)
            await trio.sleep(0.5)
            rs = pool.status()["journal"]["resync"]
            assert rs["state"] == "running" and 0 < rs["done"] < rs["rows"], rs
            # Reads of rows not resynced yet return their data.
            assert np.array_equal(await pool.data_dev.read(0, len(model)), model)
            # A partial-row write to a row not resynced (read-modify-write of its stale
            # parity): the row is resynced first, so its parity ends up right.
            last = spoilt[-1]
            assert pool.layout.resync.pending(last)
            buf = np.full(100, 0xC3, np.uint8)
            at = last * pool.layout.row_bytes + 10
            await pool.data_dev.write(at, buf)
            model[at : at + 100] = buf
            assert await verify_parity(pool.layout, [last]) == []
            # Finish it in this task (what a command does before it closes the pool).
            await pool.consistency.wait_resynced()
            nursery.cancel_scope.cancel()
        rs = pool.status()["journal"]["resync"]
        assert rs["state"] == "done" and rs["done"] == rs["rows"] == pool.layout.rows
        assert await verify_parity(pool.layout) == []
        assert np.array_equal(await pool.data_dev.read(0, len(model)), model)
        assert pool.layout.resync is None
    finally:
        await pool.aclose()
        rec.forget()


async def test_power_cut_during_the_background_resync(tmp_path: Path) -> None:
    """(b) Crash mid-resync: the regions not resynced are still marked; the next open resyncs them."""
    rec, home, model, spoilt = await _dirty_raid5(tmp_path)
    pool = await _open_after_crash(home)
    bm = pool.consistency.bitmap
    per = bm.region // CHUNK
    await rec.start()
    first = pool.consistency.resyncer
    # The resync does its first region, and a bit of the second, then the power fails.
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run_background)
        pool.consistency.resync_speed = (0, 200 * pool.layout.row_bytes)
        with trio.fail_after(20):
            while first.done < per + 5:
                await trio.sleep(0.01)
        abandon(pool)
        await rec.crash(rec.materialize(len(rec.events), "random", random.Random(3)))
        nursery.cancel_scope.cancel()
    assert 0 < len(first.todo) < bm.nbits  # it was cut short, after finishing a region
    pool = await _open_after_crash(home)
    try:
        rs = pool.status()["journal"]["resync"]
        assert rs["state"] == "running"
        # Every region the first resync had not finished is resynced again.
        left = pool.consistency.resyncer.todo
        assert first.todo <= left, (sorted(first.todo), sorted(left))
        await pool.consistency.wait_resynced()
        assert await verify_parity(pool.layout) == []
        assert np.array_equal(await pool.data_dev.read(0, len(model)), model)
    finally:
        await pool.aclose()
        rec.forget()


async def test_a_clean_close_keeps_what_is_not_resynced(tmp_path: Path) -> None:
    """A mount that stops cleanly mid-resync leaves the rest marked; the next open resumes it.

    A command that opened the pool itself finishes the resync before it closes.
    """
    rec, home, model, spoilt = await _dirty_raid5(tmp_path)
    pool = await _open_after_crash(home)
    pool.lifecycle.resident = True  # the mount process
    await pool.layout.sync_rows([0])  # a little progress
    left = set(pool.consistency.resyncer.todo)
    await pool.aclose()
    assert pool.meta["clean"] is True
    ro = await Pool.open(home, "p", read_only=True)
    try:
        assert ro.status()["journal"]["resync"] == {"state": "interrupted", "regions": len(left)}
    finally:
        await ro.aclose()
    pool = await Pool.open(home, "p")  # clean: no crash recovery, yet the resync resumes
    try:
        assert pool.recovered_from is None
        rs = pool.status()["journal"]["resync"]
        assert rs["state"] == "running" and rs["reason"] == "resync interrupted by a stop"
        assert set(pool.consistency.resyncer.todo) == left
    finally:
        await pool.aclose()  # a command: finishes it first
    pool = await Pool.open(home, "p")
    try:
        assert "resync" not in pool.status()["journal"]
        assert await verify_parity(pool.layout) == []
        assert np.array_equal(await pool.data_dev.read(0, len(model)), model)
    finally:
        await pool.aclose()
        rec.forget()


async def test_degraded_read_of_an_unsynced_row_is_not_stale_parity(tmp_path: Path) -> None:
    """(c) A torn update (data written, parity not); then a member whose chunk is fine fails.

    Reconstructing its chunk from the stale parity would return garbage: the row is
    resynced before the member leaves.
    """
    n = 4
    rec, home, pool = await _crash_pool(tmp_path, "raid5", n)
    lay = pool.layout
    old = np.random.default_rng(1).integers(0, 256, 4 * lay.row_bytes, dtype=np.uint8)
    await pool.data_dev.write(0, old)
    await pool.flush()
    await rec.start()
    dmem, pmem = lay.row_members(0)
    await pool.data_dev.write(0, np.full(CHUNK, 0xAB, np.uint8))  # chunk 0: RMW of P
    durable, pending = rec.durable_and_pending(len(rec.events))
    for w in pending[f"m{dmem[0]}"]:  # the data write made it, the parity write did not
        durable[f"m{dmem[0]}"][w.offset : w.offset + len(w.data)] = w.data
    abandon(pool)
    await rec.crash(durable)
    pool = await _open_after_crash(home)
    try:
        assert pool.layout.resync is not None and pool.layout.resync.pending(0)
        assert await verify_parity(pool.layout, [0]) == [0]  # stale parity, not resynced yet
        await pool.fail_member(dmem[1])  # its chunk is fine: it must not be lost
        got = await pool.data_dev.read(0, lay.row_bytes)
        assert (got[:CHUNK] == 0xAB).all()
        assert np.array_equal(got[CHUNK:], old[CHUNK : lay.row_bytes])
        assert np.array_equal(await pool.data_dev.read(lay.row_bytes, 3 * lay.row_bytes),
                              old[lay.row_bytes :])
    finally:
        await pool.aclose()
        rec.forget()


async def test_rmw_and_scrub_of_unsynced_rows_resync_them_first(tmp_path: Path) -> None:
    """A read-modify-write and a scrub of rows the resync has not reached: resynced, not reported."""
    rec, home, model, spoilt = await _dirty_raid5(tmp_path)
    pool = await _open_after_crash(home)
    try:
        assert pool.status()["journal"]["resync"]["state"] == "running"
        units, _ = scrub_units(pool)
        assert set(spoilt) & set(units)
        res = await run_scrub(pool)
        assert res["mismatches"] == 0  # the spoilt rows were resynced, not "repaired"
        assert await verify_parity(pool.layout, units) == []
        assert np.array_equal(await pool.data_dev.read(0, len(model)), model)
    finally:
        await pool.aclose()
        rec.forget()


@pytest.mark.parametrize(("level", "n"), [("raid1", 2), ("raid1", 3), ("raid10", 4), ("raid10", 3)])
async def test_mirror_copies_made_equal_after_a_crash(tmp_path: Path, level: str, n: int) -> None:
    """(d) raid1/raid10 without a journal: copies that differ after a crash are made equal."""
    rec, home, pool = await _crash_pool(tmp_path, level, n)
    lay = pool.layout
    assert pool.consistency.bitmap is not None and pool.meta["bitmap"]["region"] > 0
    old = np.random.default_rng(2).integers(0, 256, 64 * CHUNK, dtype=np.uint8)
    await pool.data_dev.write(0, old)
    await pool.flush()
    await rec.start()
    new = np.random.default_rng(3).integers(0, 256, 64 * CHUNK, dtype=np.uint8)
    await pool.data_dev.write(0, new)
    # The power fails with the write on every member but the first: the copies differ.
    durable, pending = rec.durable_and_pending(len(rec.events))
    for name, ws in pending.items():
        if name != "m0":
            for w in ws:
                durable[name][w.offset : w.offset + len(w.data)] = w.data
    abandon(pool)
    await rec.crash(durable)
    pool = await _open_after_crash(home)
    try:
        lay = pool.layout
        assert pool.status()["journal"]["resync"]["state"] == "running"
        # However the reads are spread over the copies, they agree.
        first = np.asarray(await pool.data_dev.read(0, len(old)))
        for _ in range(6):
            assert np.array_equal(await pool.data_dev.read(0, len(old)), first)
            for c in range(0, 64, 7):
                got = await pool.data_dev.read(c * CHUNK, CHUNK)
                assert np.array_equal(got, first[c * CHUNK : (c + 1) * CHUNK])
        # Each chunk is wholly old or wholly new (the chosen copy's).
        for c in range(64):
            part = first[c * CHUNK : (c + 1) * CHUNK]
            assert np.array_equal(part, old[c * CHUNK : (c + 1) * CHUNK]) or \
                np.array_equal(part, new[c * CHUNK : (c + 1) * CHUNK])
        await pool.consistency.wait_resynced()
        assert pool.status()["journal"]["resync"]["state"] == "done"
        for failed, view in degraded_views(lay):
            got = np.asarray(await view.read(0, len(old)))
            assert np.array_equal(got, first), f"members {sorted(failed)} failed: other bytes"
        assert (await run_scrub(pool))["mismatches"] == 0
    finally:
        await pool.aclose()
        rec.forget()


@pytest.mark.parametrize(("level", "n"), [("raid1", 2), ("raid10", 4)])
async def test_mirrors_keep_their_discards_under_the_bitmap(tmp_path: Path, level: str, n: int) -> None:
    """(d) A discard reaches the members, marked in the bitmap like a write; a crash half way is mended."""
    rec, home, pool = await _crash_pool(tmp_path, level, n)
    data = np.random.default_rng(4).integers(1, 256, 32 * CHUNK, dtype=np.uint8)
    await pool.data_dev.write(0, data)
    for _ in range(3):
        await pool.flush()
    bm = pool.consistency.bitmap
    assert bm.status()["dirty"] == 0
    await rec.start()
    await pool.layout.discard(4 * CHUNK, 8 * CHUNK)
    assert bm.status()["dirty"] >= 1  # marked before the members were touched
    discarded = [w for w in rec.events if hasattr(w, "data") and not w.data.any()
                 and w.offset >= DATA_OFFSET]
    assert len(discarded) >= 2  # both copies got it
    assert not (await pool.data_dev.read(4 * CHUNK, 8 * CHUNK)).any()
    # A crash with the discard on one copy only.
    durable, pending = rec.durable_and_pending(len(rec.events))
    for w in pending["m1"]:
        durable["m1"][w.offset : w.offset + len(w.data)] = w.data
    abandon(pool)
    await rec.crash(durable)
    pool = await _open_after_crash(home)
    try:
        await pool.consistency.wait_resynced()
        assert (await run_scrub(pool))["mismatches"] == 0
        got = np.asarray(await pool.data_dev.read(0, len(data)))
        for failed, view in degraded_views(pool.layout):
            assert np.array_equal(np.asarray(await view.read(0, len(data))), got), sorted(failed)
        assert np.array_equal(got[: 4 * CHUNK], data[: 4 * CHUNK])
        assert np.array_equal(got[12 * CHUNK :], data[12 * CHUNK :])
    finally:
        await pool.aclose()
        rec.forget()


def _record_rebuild_checkpoints(pool: Pool) -> list[int]:
    """The cursors of the rebuild checkpoints the pool commits from now on (a list that grows)."""
    committed: list[int] = []
    real_commit = pool.commit

    async def commit() -> None:
        await real_commit()
        op = pool.meta.get("operation") or {}
        if op.get("kind") == "rebuild":
            committed.append(int(op["cursor"]))

    pool.commit = commit  # type: ignore[method-assign]
    return committed


async def test_rebuild_resumes_at_its_cursor_after_a_crash_without_journal(tmp_path: Path,
                                                                            monkeypatch) -> None:
    """A raid5 rebuild cut by a power failure after a checkpoint resumes there once reopened."""
    monkeypatch.setattr(toolkit, "CHECKPOINT_BYTES", 128 << 10)
    n = 4
    rec, home, pool = await _crash_pool(tmp_path, "raid5", n, size=8 << 20)
    new_uri = rec.add_memory("new", 8 << 20)
    vol = await pool.create_volume("v", 12 << 20)
    rng = np.random.default_rng(9)
    model = rng.integers(0, 256, vol.size, dtype=np.uint8)
    await vol.write(0, model)
    await pool.fail_member(2)
    await pool.flush()
    await rec.start()
    committed = _record_rebuild_checkpoints(pool)
    tail: list[tuple[int, np.ndarray]] = []
    async with trio.open_nursery() as nursery:
        async def rebuild() -> None:
            await replace(pool, 2, new_uri, speed={"max": 2 << 20})

        async def writes_then_crash() -> None:
            with trio.fail_after(30):
                while not committed or committed[-1] < 100:
                    await trio.sleep(0.005)
            # Writes acknowledged and flushed, then some in flight at the cut.
            for _ in range(20):
                ln = int(rng.integers(1, 3 * CHUNK))
                at = int(rng.integers(0, vol.size - ln))
                buf = rng.integers(0, 256, ln, dtype=np.uint8)
                await vol.write(at, buf)
                model[at : at + ln] = buf
            await pool.flush()
            for _ in range(8):
                ln = int(rng.integers(1, 3 * CHUNK))
                at = int(rng.integers(0, 2 << 20))  # below the cursor: rows the rebuild passed
                buf = rng.integers(0, 256, ln, dtype=np.uint8)
                await vol.write(at, buf)
                tail.append((at, buf))
            abandon(pool)
            await rec.crash(rec.materialize(len(rec.events), "random", random.Random(11)))
            nursery.cancel_scope.cancel()

        nursery.start_soon(rebuild)
        nursery.start_soon(writes_then_crash)
    cursor = committed[-1]
    assert cursor > 0
    # And an update caught half way on the new member: its chunk of a row below the cursor
    # (in a dirty region) reached it, the parity did not. The resync trusts the new
    # member there like any other: the parity follows it.
    row = next(r for r in range(cursor) if 2 in parity_row_members("raid5", r, n)[0])
    j = parity_row_members("raid5", row, n)[0].index(2)
    torn = rng.integers(0, 256, CHUNK, dtype=np.uint8)
    at = DATA_OFFSET + row * CHUNK
    rec.members["new"].store[at : at + CHUNK] = torn
    tail.append((row * 3 * CHUNK + j * CHUNK, torn))
    pool = await _open_after_crash(home)
    try:
        assert pool.members[2].state == "rebuilding"
        assert pool.meta["operation"]["cursor"] == cursor
        assert pool.status()["journal"]["resync"]["state"] == "running"
        # The resync first (as a resumed rebuild waits for it), while member 2 is rebuilding.
        await pool.consistency.wait_resynced()
        assert pool.members[2].state == "rebuilding"
        res = await resume(pool)
        assert res["resumed_at_row"] == cursor > 0
        assert pool.state == "clean"
        assert await verify_parity(pool.layout) == []  # every member, the rebuilt one too
        got = np.asarray(await pool.get_volume("v").read(0, vol.size))
        ok = got == model
        for at, buf in tail:  # in flight at the cut: old or new, byte by byte
            ok[at : at + len(buf)] |= got[at : at + len(buf)] == buf
        assert ok.all(), f"bytes differ, first at {np.flatnonzero(~ok)[:5]}"
        for failed, view in degraded_views(pool.layout):
            seen = np.asarray(await view.read(0, pool.layout.size))
            assert np.array_equal(seen, np.asarray(await pool.layout.read(0, pool.layout.size))), \
                f"members {sorted(failed)} failed: other bytes"
        assert (await run_scrub(pool))["mismatches"] == 0
    finally:
        await pool.aclose()
        rec.forget()


# ---------------------------------------------------------------------------- a real kill -9

needs_fuse_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")


def _vstore(home: Path, *args: str, env: dict[str, str] | None = None) -> str:
    res = subprocess.run([sys.executable, "-m", "vstore.cli.main", *args], capture_output=True,
                         text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "VSTORE_HOME": str(home), "PYTHONPATH": str(REPO),
                              **(env or {})})
    assert res.returncode == 0, f"vstore {' '.join(args)}: {res.stdout}{res.stderr}"
    return res.stdout


def _kill_mount(home: Path, mp: Path) -> None:
    from fuse_mount.daemon import mount_entry, mounted_pool_socket
    from vstore.pool import control

    sock = mounted_pool_socket(home, "p")
    pid = control.call_sync(sock, {"cmd": "mount-info"})["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.02)
    _vstore(home, "umount", str(mp))
    assert mount_entry(mp) is None


def _status(mp: Path) -> dict:
    return json.loads((mp / ".vstore" / "status").read_text())


async def _scrub(home: Path) -> list[int]:
    pool = await Pool.open(Home(home), "p", read_only=True)
    try:
        return await verify_parity(pool.layout)
    finally:
        await pool.aclose()


@pytest.mark.integration
@needs_fuse_root
@pytest.mark.parametrize("level", ["raid5", "raid10"])
def test_kill9_mount_during_background_resync(tmp_path: Path, level: str) -> None:
    """(e) kill -9 the mount, remount (slow resync running), kill -9 again, remount: all mended."""
    from tests.fuse_helpers import force_unmount

    home, mp = tmp_path / "home", tmp_path / "mnt"
    mp.mkdir()
    n, chunk = 4, 16 << 10
    try:
        _vstore(home, "create", "p", "--level", level, "--size", "24M", "--chunk", "16K",
                *[f"file://{tmp_path}/m{i}.img" for i in range(n)])
        _vstore(home, "volume", "create", "p", "v", "--size", "16M")
        _vstore(home, "mount", "p", str(mp))
        data = np.random.default_rng(8).integers(0, 256, 8 << 20, dtype=np.uint8)
        fd = os.open(mp / "v", os.O_WRONLY)
        try:
            os.pwrite(fd, data.tobytes(), 0)
            os.fsync(fd)  # acknowledged: every byte must survive
        finally:
            os.close(fd)
        _kill_mount(home, mp)
        # Parity (raid5) or a second copy (raid10: member 1 holds the copy of member 0's
        # chunk in each row) a torn update could have left, in rows of each dirty region.
        rows = [10, 70, 150]
        for row in rows:
            stale = parity_row_members("raid5", row, n)[1][0] if level == "raid5" else 1
            with open(tmp_path / f"m{stale}.img", "r+b") as f:
                f.seek(DATA_OFFSET + row * chunk)
                f.write(bytes(64))
        slow = {"VSTORE_RESYNC_SPEED_MIN": "0", "VSTORE_RESYNC_SPEED_MAX": str(2 * 3 * chunk)}
        _vstore(home, "mount", "p", str(mp), env=slow)
        st = _status(mp)
        assert st["recovered"] is True
        rs = st["journal"]["resync"]
        assert rs["state"] == "running" and rs["rows"] >= 3 * 64 and rs["done"] < rs["rows"], rs
        with open(mp / "v", "rb") as f:  # served meanwhile, with the data
            assert f.read(len(data)) == data.tobytes()
        _kill_mount(home, mp)
        _vstore(home, "mount", "p", str(mp))
        st = _status(mp)
        assert st["journal"]["resync"]["state"] in ("running", "done")
        deadline = time.monotonic() + 30
        while st["journal"]["resync"]["state"] != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
            st = _status(mp)
        assert st["journal"]["resync"]["state"] == "done", st["journal"]
        assert st["journal"]["resync"]["rows"] >= 3 * 64  # the regions were still marked
        with open(mp / "v", "rb") as f:
            assert f.read(len(data)) == data.tobytes()
        _vstore(home, "umount", str(mp))
        if level == "raid5":
            assert trio.run(_scrub, home) == []
        out = _vstore(home, "scrub", "p", "--json")  # exit 0: no parity or copy differs
        assert json.loads(out)["mismatches"] == 0, out
    finally:
        for rec_path in (home / "mounts").glob("*.json"):
            try:
                os.kill(json.loads(rec_path.read_text())["pid"], signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass
        force_unmount(mp)
        shutil.rmtree(mp, ignore_errors=True)


async def test_start_resync_of_given_rows_and_of_all(tmp_path: Path) -> None:
    """``start_resync`` (what a pool that loses its journal uses): rows marked, resynced, cleared."""
    from vstore.pool.consistency import uses_bitmap

    assert all(uses_bitmap(lv) for lv in ("raid1", "raid5", "raid6", "raid10"))
    assert not any(uses_bitmap(lv) for lv in ("linear", "raid0"))
    n = 4
    rec, home, pool = await _crash_pool(tmp_path, "raid5", n)
    try:
        model = np.random.default_rng(6).integers(0, 256, pool.layout.size, dtype=np.uint8)
        await pool.data_dev.write(0, model)
        for _ in range(3):
            await pool.flush()
        bm = pool.consistency.bitmap
        assert bm.status()["dirty"] == 0
        per = bm.region // CHUNK
        _spoil_parity(rec, n, [3, per + 7])
        await pool.consistency.start_resync([3], "test")
        st = pool.status()["journal"]["resync"]
        assert st["state"] == "running" and st["reason"] == "test" and st["rows"] == per
        assert bm.status()["dirty"] == 1
        # Durably marked: the bit is on the members before anything is resynced.
        from vstore.consistency.bitmap import WriteIntentBitmap
        probe = WriteIntentBitmap(pool.meta["pool_uuid"], bm.nbits * bm.region, bm.region,
                                  bm.active)
        assert await probe.load_dirty() == {0}
        await pool.consistency.wait_resynced()
        assert await verify_parity(pool.layout) == [per + 7]  # only what was asked
        for _ in range(3):
            await pool.flush()
        assert bm.status()["dirty"] == 0 and await probe.load_dirty() == set()
        await pool.consistency.start_resync(None, "everything")
        assert pool.status()["journal"]["resync"]["rows"] == pool.layout.rows
        await pool.consistency.wait_resynced()
        assert await verify_parity(pool.layout) == []
        assert np.array_equal(await pool.data_dev.read(0, len(model)), model)
    finally:
        await pool.aclose()
        rec.forget()


async def test_degraded_read_below_a_rebuild_cursor_resyncs_the_row_first(tmp_path: Path,
                                                                          monkeypatch) -> None:
    """(c) A member being rebuilt is read degraded; below its cursor its chunk is good.

    A torn update in such a row (another data chunk written, parity not) leaves the
    parity stale: reconstructing the rebuilt member's chunk from it would return
    garbage. The degraded read resyncs the row first, trusting the member below the
    cursor, and then reconstructs the right bytes.
    """
    monkeypatch.setattr(toolkit, "CHECKPOINT_BYTES", 128 << 10)
    n = 4
    rec, home, pool = await _crash_pool(tmp_path, "raid5", n, size=8 << 20)
    new_uri = rec.add_memory("new", 8 << 20)
    await rec.start()
    vol = await pool.create_volume("v", 12 << 20)
    assert vol.extents[0] == 0  # volume offsets are pool offsets
    model = np.random.default_rng(12).integers(0, 256, vol.size, dtype=np.uint8)
    await vol.write(0, model)
    await pool.fail_member(2)
    await pool.flush()
    committed = _record_rebuild_checkpoints(pool)
    async with trio.open_nursery() as nursery:
        async def stop_after_a_checkpoint() -> None:
            with trio.fail_after(30):
                while not committed or committed[-1] < 64:
                    await trio.sleep(0.005)
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_after_a_checkpoint)
        await replace(pool, 2, new_uri, speed={"max": 2 << 20})
    cursor = committed[-1]
    row = next(r for r in range(cursor) if 2 in parity_row_members("raid5", r, n)[0])
    dmem, pmem = parity_row_members("raid5", row, n)
    j2 = dmem.index(2)
    j = next(x for x in range(n - 1) if x != j2)
    at = DATA_OFFSET + row * CHUNK
    old_parity = rec.members[f"m{pmem[0]}"].store[at : at + CHUNK].copy()
    new = np.full(CHUNK, 0x6D, np.uint8)
    await vol.write(row * 3 * CHUNK + j * CHUNK, new)  # its region is marked dirty first
    abandon(pool)
    await rec.crash(rec.materialize(mode="keep"))
    rec.members[f"m{pmem[0]}"].store[at : at + CHUNK] = old_parity  # the parity write was lost
    pool = await _open_after_crash(home)
    try:
        assert pool.members[2].state == "rebuilding" and pool.meta["operation"]["cursor"] == cursor
        assert pool.status()["journal"]["resync"]["state"] == "running"
        assert pool.layout.resync.pending(row)
        base = row * 3 * CHUNK
        got = np.asarray(await vol_read(pool, base + j2 * CHUNK, CHUNK))
        assert np.array_equal(got, model[base + j2 * CHUNK : base + (j2 + 1) * CHUNK])
        assert not pool.layout.resync.pending(row)
        got = np.asarray(await vol_read(pool, base + j * CHUNK, CHUNK))
        assert np.array_equal(got, new)  # the torn update's data, now with its parity
        await pool.consistency.wait_resynced()
        res = await resume(pool)
        assert res["resumed_at_row"] == cursor
        model[base + j * CHUNK : base + (j + 1) * CHUNK] = new
        assert np.array_equal(np.asarray(await vol_read(pool, 0, vol.size)), model)
        assert await verify_parity(pool.layout) == []  # every member, the rebuilt one too
    finally:
        await pool.aclose()
        rec.forget()


async def vol_read(pool: Pool, offset: int, length: int) -> np.ndarray:
    """Read the test volume."""
    return await pool.get_volume("v").read(offset, length)
