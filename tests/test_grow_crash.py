"""A power cut at any point of a grow (vstore.ops.grow) loses no acknowledged write (the crash recorder).

Every write and flush of the members is recorded while a pool grows (and serves
writes); the pool is then reopened from the bytes the members would hold had the
power failed after each of a spread of event prefixes (volatile writes lost, kept,
torn or reordered), and must hold every write that was flushed before the cut. A
raid1 pool with a mirror added then finishes the copy from its checkpoint, and the
new mirror alone must then read back the same bytes.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import trio

from vstore.consistency.metadata import DATA_OFFSET
from vstore.ops import grow as ops_grow
from vstore.ops import rebuild
from vstore.pool.home import Home
from vstore.pool.pool import Pool
from vstore.testing import CrashRecorder, abandon, degraded_views, reopen_after_crash
from vstore.testing.crash import FlushEvent

MiB = 1 << 20
CHUNK = 16 << 10
CUTS = 16
_counter = itertools.count()


class Writer:
    """Writes distinct 4 KiB blocks of a volume, flushing each; remembers when each became durable."""

    def __init__(self, rec: CrashRecorder, pool: Pool, name: str, blocks: list[int], seed: int) -> None:
        self.rec, self.pool, self.name = rec, pool, name
        self.blocks = blocks
        self.rng = np.random.default_rng(seed)
        self.done: list[tuple[int, int, bytes]] = []  # (events when acknowledged, offset, bytes)

    async def run(self, count: int, pause: float = 0.0) -> None:
        vol = self.pool.get_volume(self.name)
        for b in self.blocks[:count]:
            data = self.rng.integers(0, 256, 4096, dtype=np.uint8)
            await vol.write(b * 4096, data)
            await self.pool.flush()
            self.done.append((len(self.rec.events), b * 4096, data.tobytes()))
            await trio.sleep(pause)


def _cuts(n_events: int) -> list[int]:
    """A spread of cut points over the recorded events, both ends included."""
    return sorted({round(n_events * k / (CUTS - 1)) for k in range(CUTS)})


async def _check_acknowledged(pool: Pool, name: str, done: list[tuple[int, int, bytes]], cut: int) -> None:
    vol = pool.get_volume(name)
    for when, off, data in done:
        if when <= cut:
            got = np.asarray(await vol.read(off, len(data))).tobytes()
            assert got == data, f"cut {cut}: write at {off} acknowledged at event {when} is lost"


def _last_flush_end(rec: CrashRecorder) -> int:
    return max(k for k, ev in enumerate(rec.events) if isinstance(ev, FlushEvent) and ev.end) + 1


async def test_power_cut_anywhere_in_a_linear_grow(tmp_path: Path) -> None:
    rec = CrashRecorder(f"growlin{next(_counter)}")
    try:
        uris = [rec.add_memory(f"m{i}", 8 * MiB) for i in range(2)]
        new = rec.add_memory("new", 8 * MiB)
        home = Home(tmp_path / "home")
        pool = await Pool.create(home, "p", "linear", uris, chunk=CHUNK)
        await pool.create_volume("v", 8 * MiB)
        old = np.random.default_rng(1).integers(0, 256, 8 * MiB, dtype=np.uint8)
        await pool.get_volume("v").write(0, old)
        await pool.flush()
        await rec.start()
        res = await ops_grow.add_linear(pool, [new])
        assert res["added_members"] == [2]
        committed = _last_flush_end(rec)  # the grow's commit ended here (the last flush so far)
        await pool.resize_volume("v", 16 * MiB)  # the new extents lie on the new member
        writer = Writer(rec, pool, "v", list(range(2048, 4096, 37)), seed=2)
        await writer.run(20)
        events = list(rec.events)
        abandon(pool)
        counts: Counter[int] = Counter()
        for cut in _cuts(len(events)):
            rec.events = list(events)
            states = rec.materialize(cut, "random", random.Random(cut))
            await rec.crash(states)
            pool = await reopen_after_crash(home, "p")
            try:
                assert len(pool.members) == (3 if cut >= committed else len(pool.members))
                assert len(pool.members) in (2, 3) and pool.state == "clean"
                counts[len(pool.members)] += 1
                got = np.asarray(await pool.get_volume("v").read(0, 8 * MiB))
                assert np.array_equal(got, old), f"cut {cut}: the old data changed"
                if pool.get_volume("v").size == 16 * MiB:
                    await _check_acknowledged(pool, "v", writer.done, cut)
                if len(pool.members) == 2:
                    # The grow did not commit: it is simply done again, the device taken without --force.
                    again = await ops_grow.add_linear(pool, [new])
                    assert again["added_members"] == [2]
            finally:
                await pool.aclose()
        assert counts[2] and counts[3], counts  # cuts before and after the commit
    finally:
        rec.forget()


@pytest.mark.parametrize("journal", [False, True], ids=["bitmap", "journal"])
async def test_power_cut_anywhere_while_a_mirror_is_added(tmp_path: Path, journal: bool) -> None:
    rec = CrashRecorder(f"growr1{next(_counter)}")
    try:
        uris = [rec.add_memory(f"m{i}", 6 * MiB) for i in range(2)]
        new = rec.add_memory("new", 6 * MiB)
        jr = rec.add_memory("j", 1 * MiB) if journal else None
        home = Home(tmp_path / "home")
        pool = await Pool.create(home, "p", "raid1", uris, chunk=CHUNK, journal=jr)
        await pool.create_volume("v", 4 * MiB)
        old = np.random.default_rng(3).integers(0, 256, 4 * MiB, dtype=np.uint8)
        await pool.get_volume("v").write(0, old)
        await pool.flush()
        await rec.start()
        writer = Writer(rec, pool, "v", list(range(0, 1024, 7)), seed=4)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run, 40, 0.002)  # acknowledged writes while the mirror is copied
            res = await ops_grow.add(pool, [new], speed={"max": 8 * MiB})
        assert res["added_members"] == [2] and pool.members[2].state == "active"
        events = list(rec.events)
        abandon(pool)
        expect = old.tobytes()
        phases: Counter[tuple[int, str]] = Counter()
        resumed: list[int] = []
        for cut in _cuts(len(events)):
            rec.events = list(events)
            states = rec.materialize(cut, "random", random.Random(cut))
            await rec.crash(states)
            pool = await reopen_after_crash(home, "p")
            try:
                await _check_acknowledged(pool, "v", writer.done, cut)
                phases[len(pool.members), pool.members[-1].state] += 1
                if len(pool.members) == 3 and pool.members[2].state == "rebuilding":
                    got = await rebuild.resume(pool)  # from its checkpoint
                    resumed.append(got["resumed_at_row"])
                if len(pool.members) == 3:
                    assert pool.members[2].state == "active" and pool.state == "clean"
                    got = np.asarray(await pool.data_dev.read(0, pool.layout.size))
                    for failed, view in degraded_views(pool.layout):
                        seen = np.asarray(await view.read(0, view.size))
                        assert np.array_equal(seen, got), f"cut {cut}: mirrors {sorted(failed)} failed: other bytes"
                    await _check_acknowledged(pool, "v", writer.done, cut)
                vol = np.asarray(await pool.get_volume("v").read(0, 4 * MiB)).tobytes()
                written = {off for _, off, _ in writer.done}
                untouched = [o for o in range(0, 4 * MiB, 4096) if o not in written]
                assert all(vol[o : o + 4096] == expect[o : o + 4096] for o in untouched), \
                    f"cut {cut}: a block nobody wrote changed"
            finally:
                await pool.aclose()
        # Every phase was cut: before the commit, during the copy (resumed, also past row 0), after.
        assert phases[2, "active"] and phases[3, "rebuilding"] and phases[3, "active"], phases
        assert any(r > 0 for r in resumed), resumed
        assert len(writer.done) == 40 and writer.done[0][0] < writer.done[-1][0]
    finally:
        rec.forget()


RESHAPES = [("raid0", 2, False), ("raid5", 3, False), ("raid5", 3, True), ("raid6", 4, False),
            ("raid1", 2, False), ("raid10", 3, False)]


async def _raid10_copies_differ(lay) -> list[int]:
    """The logical chunks of a raid10 layout whose two copies differ (healthy members only)."""
    bad = []
    for c in range(lay.chunks):
        (m0, o0), (m1, o1) = lay.copies(c)
        if m0 in lay.failed or m1 in lay.failed:
            continue
        a = np.asarray(await lay.members[m0].read(o0, lay.chunk))
        if not np.array_equal(a, np.asarray(await lay.members[m1].read(o1, lay.chunk))):
            bad.append(c)
    return bad


@pytest.mark.parametrize(("level", "n", "journal"), RESHAPES,
                         ids=["raid0", "raid5-bitmap", "raid5-journal", "raid6-bitmap", "raid1-to-raid5",
                              "raid10-odd"])
async def test_power_cut_anywhere_in_a_reshape(tmp_path: Path, level: str, n: int, journal: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """n -> n+1 members, online: the backup of the critical rows, the cursor's checkpoints, the finish.

    raid1 is converted to raid5 (``--level raid5``) by the commit that starts the reshape.
    """
    from vstore.ops import reshape
    from vstore.raid.reshape_layout import ReshapeLayout
    from vstore.testing import verify_parity

    redone: list[bool] = []  # the open rewrote the critical rows from the backup (a cut inside them)
    redo = reshape.redo_critical_section

    async def counted(pool: Pool) -> bool:
        redone.append(await redo(pool))
        return redone[-1]

    monkeypatch.setattr(reshape, "redo_critical_section", counted)
    rec = CrashRecorder(f"reshape{level}{next(_counter)}")
    try:
        convert = {"level": "raid5"} if level == "raid1" else {}
        # A mirror holds one member's worth; raid10 over 3 half of the members' space.
        size = 16 * MiB if convert else 12 * MiB if level == "raid10" else 8 * MiB
        uris = [rec.add_memory(f"m{i}", size) for i in range(n)]
        new = rec.add_memory("new", size)
        jr = rec.add_memory("j", 2 * MiB) if journal else None
        home = Home(tmp_path / "home")
        pool = await Pool.create(home, "p", level, uris, chunk=CHUNK, journal=jr)
        await pool.create_volume("v", 12 * MiB)
        old = np.random.default_rng(5).integers(0, 256, 12 * MiB, dtype=np.uint8)
        await pool.get_volume("v").write(0, old)
        await pool.flush()
        size0 = pool.status()["size"]
        await rec.start()
        writer = Writer(rec, pool, "v", list(range(0, 3072, 61)), seed=6)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run, 40, 0.003)  # acknowledged writes while the data moves
            res = await reshape.add(pool, [new], speed={"max": 16 * MiB}, **convert)
        assert res["kind"] == "reshape" and res["to"] == n + 1 and pool.status()["size"] > size0
        assert res["level"] == ("raid5" if convert else level)
        events = list(rec.events)
        abandon(pool)
        written = {off for _, off, _ in writer.done}
        untouched = [o for o in range(0, 12 * MiB, 4096) if o not in written]
        old_bytes = old.tobytes()
        phases: Counter[str] = Counter()
        # (and densely near the end: the last copy, its checkpoint, the zero rows, the finish)
        tail = list(range(max(0, len(events) - 60), len(events), 4))
        # and densely after the backup reached the new member: the critical section (short for raid10)
        from vstore.testing.crash import WriteEvent

        first_backup = next(i for i, e in enumerate(events) if isinstance(e, WriteEvent) and e.device == "new"
                            and e.offset >= DATA_OFFSET + size // 2)
        critical = list(range(first_backup, min(first_backup + 48, len(events)), 3))
        for cut in _cuts(len(events)) + [1, 2, 3, 5, 8, 13, 21, 34, 55] + tail + critical:
            rec.events = list(events)
            states = rec.materialize(cut, "random", random.Random(cut))
            await rec.crash(states)
            redone.clear()
            pool = await reopen_after_crash(home, "p")
            try:
                r = pool.meta.get("reshape")
                assert not (r and r["backup"]), "the open left the critical section to redo"
                phases["before" if len(pool.members) == n else "backup" if any(redone)
                       else "copying" if r else "done"] += 1
                # The level changed with the member count, in one commit.
                assert pool.level == (level if len(pool.members) == n or not convert else "raid5"), cut
                for attempt in ("reopened", "finished"):
                    vol = np.asarray(await pool.get_volume("v").read(0, 12 * MiB)).tobytes()
                    assert all(vol[o : o + 4096] == old_bytes[o : o + 4096] for o in untouched), \
                        f"cut {cut} ({attempt}): a block nobody wrote changed"
                    await _check_acknowledged(pool, "v", writer.done, cut)
                    if attempt == "reopened" and r:
                        await pool.consistency.wait_resynced()
                        got = await reshape.resume(pool)
                        assert got["kind"] == "reshape" and got["to"] == n + 1
                        assert "reshape" not in pool.meta and pool.status()["size"] > size0
                if level != "raid0" and len(pool.members) == n + 1:
                    await pool.consistency.wait_resynced()
                    lay = pool.layout.new if isinstance(pool.layout, ReshapeLayout) else pool.layout
                    if level == "raid10":
                        assert await _raid10_copies_differ(lay) == [], f"cut {cut}: copies differ after it"
                    else:
                        assert await verify_parity(lay) == [], f"cut {cut}: parity wrong after the reshape"
            finally:
                await pool.aclose()
        # Cuts fell before the reshape, in its critical section, during the copy and after it.
        assert phases["before"] and phases["backup"] and phases["copying"] and phases["done"], phases
    finally:
        rec.forget()


async def test_a_write_past_the_recorded_cursor_survives_a_crash(tmp_path: Path) -> None:
    """A write the new geometry took beyond the cursor on record: its flush puts the cursor on record."""
    from vstore.ops import reshape

    rec = CrashRecorder(f"reshapew{next(_counter)}")
    try:
        uris = [rec.add_memory(f"m{i}", 8 * MiB) for i in range(2)]
        new = rec.add_memory("new", 8 * MiB)
        home = Home(tmp_path / "home")
        pool = await Pool.create(home, "p", "raid0", uris, chunk=CHUNK)
        await pool.create_volume("v", 12 * MiB)  # the pool's first extents: volume offset = pool offset
        old = np.random.default_rng(8).integers(0, 256, 12 * MiB, dtype=np.uint8)
        await pool.get_volume("v").write(0, old)
        await pool.flush()
        await rec.start()
        seen: dict[str, int] = {}
        data = np.random.default_rng(9).integers(0, 256, 4096, dtype=np.uint8)

        async def writer() -> None:
            while True:
                layout = pool.layout
                if getattr(layout, "done", 0) - getattr(layout, "committed", 0) >= 4 and layout.committed >= 16:
                    break
                await trio.sleep(0.001)
            seen["committed"], seen["done"] = layout.committed, layout.done
            seen["offset"] = (layout.committed + 1) * CHUNK  # in the new geometry, not on record
            await pool.get_volume("v").write(seen["offset"], data)
            await pool.flush()
            seen["cut"] = len(rec.events)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await reshape.add(pool, [new], speed={"max": 4 * MiB})
        assert seen["done"] > seen["committed"]
        abandon(pool)
        await rec.crash(rec.materialize(seen["cut"], "drop"))  # only what the flush made durable
        pool = await reopen_after_crash(home, "p")
        try:
            assert pool.meta["reshape"]["cursor"] * CHUNK > seen["offset"]
            got = np.asarray(await pool.get_volume("v").read(seen["offset"], 4096))
            assert np.array_equal(got, data), "a flushed write past the recorded cursor was lost"
            await reshape.resume(pool)
            got = np.asarray(await pool.get_volume("v").read(seen["offset"], 4096))
            assert np.array_equal(got, data)
        finally:
            await pool.aclose()
    finally:
        rec.forget()


async def test_a_stopped_reshape_serves_both_geometries_and_resumes(tmp_path: Path) -> None:
    """`vstore stop` mid-reshape: the pool serves every byte from the geometry on record, then resumes."""
    from vstore.ops import reshape

    home = Home(tmp_path / "home")
    tag = next(_counter)
    uris = [f"memory://stop{tag}-{i}?size={8 * MiB}" for i in range(3)]
    pool = await Pool.create(home, "p", "raid0", uris[:2], chunk=CHUNK)
    try:
        await pool.create_volume("v", 12 * MiB)
        model = np.random.default_rng(11).integers(0, 256, 12 * MiB, dtype=np.uint8)
        vol = pool.get_volume("v")
        await vol.write(0, model)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.lifecycle.run_background)
            pool.lifecycle.resident = True
            await reshape.start_add(pool, [uris[2]], speed={"max": 4 * MiB})
            while pool.layout.done < pool.layout.total // 3:
                await trio.sleep(0.01)
            assert await pool.lifecycle.stop()
            assert pool.lifecycle.current is None and pool.meta["reshape"]["cursor"] > 0
            # Writes on both sides of the cursor, and one past the recorded cursor, then a flush.
            for off in (0, pool.layout.done * CHUNK - 4096, pool.layout.committed * CHUNK, 10 * MiB):
                data = np.random.default_rng(off).integers(0, 256, 8192, dtype=np.uint8)
                await vol.write(off, data)
                model[off : off + 8192] = data
            await pool.flush()
            assert pool.meta["reshape"]["cursor"] >= pool.layout.done  # the flush put it on record
            assert np.array_equal(np.asarray(await vol.read(0, 12 * MiB)), model)
            res = await reshape.resume(pool)
            assert res["resumed"] and "reshape" not in pool.meta
            nursery.cancel_scope.cancel()
        assert np.array_equal(np.asarray(await vol.read(0, 12 * MiB)), model)
    finally:
        await pool.aclose()


@pytest.mark.parametrize("level", ["raid5", "raid10"])
async def test_a_member_failing_mid_reshape_is_survived(tmp_path: Path, level: str) -> None:
    """3 -> 4 members: member 1 fails half way; the copy goes on degraded, every byte reads back."""
    from vstore.ops import reshape

    home = Home(tmp_path / "home")
    tag = next(_counter)
    size = 12 * MiB if level == "raid10" else 8 * MiB
    uris = [f"memory://fail{tag}-{i}?size={size}" for i in range(4)]
    pool = await Pool.create(home, "p", level, uris[:3], chunk=CHUNK)
    try:
        await pool.create_volume("v", 12 * MiB)
        model = np.random.default_rng(12).integers(0, 256, 12 * MiB, dtype=np.uint8)
        vol = pool.get_volume("v")
        await vol.write(0, model)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.lifecycle.run_background)
            pool.lifecycle.resident = True
            await reshape.start_add(pool, [uris[3]], speed={"max": 8 * MiB})
            while pool.layout.done < pool.layout.total // 2:
                await trio.sleep(0.01)
            await pool.fail_member(1)
            data = np.random.default_rng(13).integers(0, 256, 65536, dtype=np.uint8)
            await vol.write(3 * MiB, data)  # a write while degraded, on either side of the cursor
            model[3 * MiB : 3 * MiB + 65536] = data
            while pool.lifecycle.current is not None:
                await trio.sleep(0.01)
            assert pool.lifecycle.last["state"] == "done", pool.lifecycle.last
            nursery.cancel_scope.cancel()
        assert "reshape" not in pool.meta and pool.state == "degraded"
        assert np.array_equal(np.asarray(await vol.read(0, 12 * MiB)), model)
    finally:
        await pool.aclose()


@pytest.mark.parametrize("journal", [False, True], ids=["bitmap", "journal"])
async def test_a_started_reshape_keeps_the_journal_or_bitmap(tmp_path: Path, journal: bool) -> None:
    """The process that starts a reshape routes both geometries' updates through the pool's journal or bitmap."""
    from vstore.ops import reshape

    home = Home(tmp_path / "home")
    tag = next(_counter)
    uris = [f"memory://keep{tag}-{i}?size={8 * MiB}" for i in range(4)]
    jr = f"memory://keep{tag}-j?size={2 * MiB}" if journal else None
    pool = await Pool.create(home, "p", "raid5", uris[:3], chunk=CHUNK, journal=jr)
    try:
        log = pool.layout.journal
        assert log is not None
        await reshape.start(pool, [uris[3]])
        assert pool.layout.journal is log and pool.layout.old.journal is log and pool.layout.new.journal is log
    finally:
        await pool.aclose()
