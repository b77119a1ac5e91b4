"""Member lifecycle in-process: rebuild under writes, resume, second failures, scrub, spares, move."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import memory
from vstore.consistency.metadata import DATA_OFFSET
from vstore.errors import DegradedError, MemberIOError
from vstore.io.aio import unwrap
from vstore.ops import move as move_mod
from vstore.ops import toolkit
from vstore.ops.move import move
from vstore.ops.rebuild import (
    add_spare,
    rebuild_member,
    remove_spare,
    replace,
    resume,
    rows_of_member,
)
from vstore.ops.scrub import run_scrub, scrub_units
from vstore.pool.home import Home
from vstore.pool.pool import Pool
from vstore.testing import CrashRecorder, abandon, reopen_after_crash

CHUNK = 4096
MEMBER = 8 << 20  # bytes per member (6 MiB of data after the metadata area)
LEVELS = [("raid1", 3), ("raid5", 4), ("raid6", 5), ("raid10", 4)]


def mem_uris(n: int, tag: str) -> list[str]:
    return [f"memory://{tag}-{i}?size={MEMBER}" for i in range(n)]


async def mem_pool(home: Home, level: str, n: int, tag: str) -> Pool:
    return await Pool.create(home, "p", level, mem_uris(n, tag), chunk=CHUNK)


async def file_pool(home: Home, d: Path, level: str, n: int, size: int = MEMBER) -> Pool:
    return await Pool.create(home, "p", level, [f"file://{d}/m{i}.img" for i in range(n)],
                             size=size, chunk=CHUNK)


async def fill(vol, rng: np.random.Generator) -> np.ndarray:
    model = rng.integers(0, 256, vol.size, dtype=np.uint8)
    await vol.write(0, model)
    return model


class Writer:
    """Random writes to a volume, each recorded in the model once it returns."""

    def __init__(self, vol, model: np.ndarray, seed: int) -> None:
        self.vol, self.model = vol, model
        self.rng = np.random.default_rng(seed)
        self.count = 0

    async def one(self) -> None:
        n = int(self.rng.integers(1, 3 * CHUNK))
        off = int(self.rng.integers(0, self.vol.size - n))
        buf = self.rng.integers(0, 256, n, dtype=np.uint8)
        await self.vol.write(off, buf)
        self.model[off : off + n] = buf
        self.count += 1

    async def run(self, stop: trio.Event) -> None:
        while not stop.is_set():
            await self.one()
            await trio.sleep(0)


async def check(pool: Pool, name: str, model: np.ndarray) -> None:
    got = await pool.get_volume(name).read(0, len(model))
    bad = np.flatnonzero(got != model)
    assert not len(bad), f"{len(bad)} bytes differ, first at {bad[:4]}"


# --------------------------------------------------------------------------- rebuild


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(LEVELS), seed=st.integers(0, 2**31), stop_at=st.none() | st.floats(0.1, 0.8),
       which=st.integers(0, 10))
def test_replace_under_concurrent_writes_matches_model(tmp_path: Path, case, seed: int,
                                                       stop_at: float | None, which: int) -> None:
    """Replace a failed member while writes go on; optionally stop the rebuild and resume it."""
    level, n = case
    tag = uuid.uuid4().hex

    async def scenario() -> None:
        home = Home(tmp_path / tag)
        pool = await mem_pool(home, level, n, tag)
        try:
            vol = await pool.create_volume("v", 4 << 20)
            model = await fill(vol, np.random.default_rng(seed))
            victim = which % n
            await pool.fail_member(victim)
            await Writer(vol, model, seed).one()  # a degraded write before the rebuild
            writer = Writer(vol, model, seed + 1)
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run, stop)
                new = f"memory://{tag}-new?size={MEMBER}"
                if stop_at is None:
                    await replace(pool, victim, new)
                else:
                    with trio.CancelScope() as scope:

                        async def stopper() -> None:
                            while True:
                                op = pool.lifecycle.current
                                if op is not None and op.total and op.done >= stop_at * op.total:
                                    scope.cancel()
                                    return
                                await trio.sleep(0)

                        nursery.start_soon(stopper)
                        await replace(pool, victim, new)
                    if scope.cancelled_caught:
                        assert pool.members[victim].state == "rebuilding"
                        assert pool.status()["operation"]["state"] == "interrupted"
                        await writer.one()
                        res = await resume(pool)
                        assert res["resumed_at_row"] > 0
                stop.set()
            assert writer.count > 0
            assert pool.state == "clean" and pool.members[victim].state == "active"
            assert pool.members[victim].uri_text.startswith(f"memory://{tag}-new")
            await check(pool, "v", model)
            scrub = await run_scrub(pool)
            assert scrub["mismatches"] == 0, scrub["found"]
            # The replacement holds its share: with every other member failed (as far as the
            # level allows), the data still reads back.
            await pool.aclose()
            pool = await Pool.open(home, "p")
            await check(pool, "v", model)
        finally:
            await pool.aclose()
            for i in range(n):
                memory.forget(f"{tag}-{i}")
            memory.forget(f"{tag}-new")

    trio.run(scenario)


async def test_rebuild_resumes_after_restart(tmp_path: Path, monkeypatch) -> None:
    """Stop a rebuild, close the pool, reopen: the status shows it interrupted; resume goes on."""
    monkeypatch.setattr(toolkit, "CHECKPOINT_BYTES", 256 << 10)
    home = Home(tmp_path / "home")
    pool = await file_pool(home, tmp_path, "raid5", 4)
    vol = await pool.create_volume("v", 12 << 20)
    model = await fill(vol, np.random.default_rng(3))
    await pool.fail_member(2)
    with trio.move_on_after(30) as scope:
        async with trio.open_nursery() as nursery:
            async def stop_halfway() -> None:
                while not (pool.lifecycle.current and pool.lifecycle.current.done
                           > pool.lifecycle.current.total // 2):
                    await trio.sleep(0)
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_halfway)
            await replace(pool, 2, f"file://{tmp_path}/new.img", size=MEMBER,
                          speed={"max": 8 << 20})
    assert not scope.cancelled_caught
    cursor = pool.meta["operation"]["cursor"]
    assert cursor > 0
    await pool.aclose()
    pool = await Pool.open(home, "p")
    try:
        st = pool.status()
        assert st["members"][2]["state"] == "rebuilding"
        assert st["operation"]["state"] == "interrupted" and st["operation"]["cursor"] == cursor
        await check(pool, "v", model)  # reads of the rebuilding member are reconstructed
        # The mount process (resident) resumes it by itself, in the background.
        pool.lifecycle.resident = True
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.lifecycle.run_background)
            op = pool.lifecycle.current
            assert op is not None and op.kind == "rebuild"
            await op.finished.wait()
            nursery.cancel_scope.cancel()
        res = pool.lifecycle.last
        assert res["state"] == "done" and res["resumed_at_row"] == cursor
        assert pool.state == "clean" and pool.meta["operation"] is None
        await check(pool, "v", model)
        assert (await run_scrub(pool))["mismatches"] == 0
    finally:
        await pool.aclose()


async def run_until_power_cut(rec: CrashRecorder, pool: Pool, writer: Writer, operation, *,
                              journal: bool) -> None:
    """Run an operation under writes; well past a checkpoint (40% of what it had left), cut the power.

    Every write the writer saw return is acknowledged: with a journal once logged, without
    one the pool is flushed just before the cut. The pool object is dead afterwards.
    """
    states: list[dict] = []
    start = writer.count
    async with trio.open_nursery() as nursery:
        async def write_then_cut() -> None:
            while True:
                await writer.one()
                op = pool.lifecycle.current
                if (op is not None and op.total and op.done > op.base + 0.4 * (op.total - op.base)
                        and writer.count - start > 40):
                    for _ in range(10):  # some below the cursor, some above
                        await writer.one()
                    if journal:  # the log lets go of what the members hold durably
                        await pool.consistency.journal.checkpoint()
                    else:
                        await pool.flush()
                    states.append(rec.materialize(len(rec.events), mode="drop"))
                    nursery.cancel_scope.cancel()
                    return
                await trio.sleep(0.002)

        nursery.start_soon(write_then_cut)
        await operation()
    assert states, "the operation finished before the power cut"
    abandon(pool)
    await rec.crash(states[0])


@pytest.mark.parametrize("level,n", [("raid5", 4), ("raid10", 4)])
async def test_rebuild_resumes_from_its_checkpoint_after_a_crash(tmp_path: Path, monkeypatch, level: str,
                                                                  n: int) -> None:
    """Journal pool: power cut during a rebuild under writes; reopened, it resumes at its cursor."""
    monkeypatch.setattr(toolkit, "CHECKPOINT_BYTES", 256 << 10)
    rec = CrashRecorder(f"rebuild-crash-{uuid.uuid4().hex}")
    try:
        uris = [rec.add_memory(f"m{i}", MEMBER) for i in range(n)]
        new = rec.add_memory("new", MEMBER)
        home = Home(tmp_path / "home")
        pool = await Pool.create(home, "p", level, uris, chunk=CHUNK, journal=rec.add_memory("j", 384 << 10))
        vol = await pool.create_volume("v", 4 << 20)
        model = np.random.default_rng(21).integers(0, 256, vol.size, dtype=np.uint8)
        for off in range(0, vol.size, 64 << 10):  # updates that fit the journal
            await vol.write(off, model[off : off + (64 << 10)])
        await pool.fail_member(1)
        await pool.flush()
        await rec.start()
        writer = Writer(vol, model, 22)
        await run_until_power_cut(rec, pool, writer, lambda: replace(pool, 1, new, speed={"max": 2 << 20}),
                                  journal=True)
        pool = await reopen_after_crash(home, "p")
        cursor = pool.meta["operation"]["cursor"]
        assert pool.recovered_from is not None and pool.members[1].state == "rebuilding"
        st = pool.status()
        assert st["operation"]["state"] == "interrupted" and cursor > 0
        await check(pool, "v", model)  # every acknowledged write, member 1 reconstructed
        # A second power cut, during the resumed rebuild: it keeps what it had done.
        writer.vol = pool.get_volume("v")
        await rec.start()
        await run_until_power_cut(rec, pool, writer, lambda: resume(pool, speed={"max": 2 << 20}),
                                  journal=True)
        pool = await reopen_after_crash(home, "p")
        try:
            assert pool.meta["operation"]["cursor"] > cursor
            await check(pool, "v", model)
            res = await resume(pool)
            assert res["resumed_at_row"] > 0 and pool.state == "clean"
            await check(pool, "v", model)  # member 1 read again, as rebuilt and replayed
            assert (await run_scrub(pool))["mismatches"] == 0
            rows = pool.layout.rows
            computed = await rows_of_member(pool, 1, 0, rows)
            assert np.array_equal(await pool.layout.read_member(1, 0, rows * CHUNK), computed)
        finally:
            await pool.aclose()
    finally:
        rec.forget()


async def test_second_failure_during_raid6_rebuild(tmp_path: Path) -> None:
    """raid6 keeps rebuilding when another member fails; raid5 stops with a clear error."""
    for level, n, survives in (("raid6", 5, True), ("raid5", 4, False)):
        tag = uuid.uuid4().hex
        home = Home(tmp_path / tag)
        pool = await mem_pool(home, level, n, tag)
        vol = await pool.create_volume("v", 8 << 20)
        model = await fill(vol, np.random.default_rng(5))
        await pool.fail_member(1)
        writer = Writer(vol, model, 9)

        async def second_failure(pool=pool, writer=writer, survives=survives) -> None:
            while not (pool.lifecycle.current and pool.lifecycle.current.done
                       > pool.lifecycle.current.total // 3):
                await trio.sleep(0)
            await writer.one()
            # The I/O path: member 3 errs under a request (as a dying disk would).
            await pool.layout.member_failed(3, MemberIOError("injected: medium error"))
            if survives:
                await writer.one()

        try:
            if survives:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(second_failure)
                    res = await replace(pool, 1, f"memory://{tag}-new?size={MEMBER}",
                                        speed={"max": 24 << 20})
                assert res["member"] == 1 and pool.members[1].state == "active"
                assert pool.members[3].state == "failed" and pool.state == "degraded"
                await check(pool, "v", model)
                # member 1 is really rebuilt: fail another member and the data is still there
                await pool.fail_member(0)
                await check(pool, "v", model)
            else:
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(second_failure)
                        await replace(pool, 1, f"memory://{tag}-new?size={MEMBER}",
                                      speed={"max": 24 << 20})
                except BaseExceptionGroup as eg:
                    err = unwrap(eg)
                else:
                    err = None
                assert isinstance(err, DegradedError) and "failed members" in str(err)
                assert pool.state == "failed"
                assert pool.status()["operation"]["state"] in ("failed", "interrupted")
        finally:
            with contextlib.suppress(DegradedError):
                await pool.aclose(clean=survives)


# --------------------------------------------------------------------------- scrub


def _corrupt(path: Path, offset: int, length: int, rng: np.random.Generator) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(length)
        new = bytes(b ^ int(x) for b, x in zip(old, rng.integers(1, 256, length), strict=True))
        f.seek(offset)
        f.write(new)


@pytest.mark.parametrize("level,n", [("raid5", 4), ("raid6", 5), ("raid1", 3), ("raid10", 4)])
async def test_scrub_finds_exactly_the_injected_corruption(tmp_path: Path, level: str, n: int) -> None:
    """Garbage written into member files at known offsets: found where it is, then repaired."""
    home = Home(tmp_path / "home")
    rng = np.random.default_rng(11)
    pool = await file_pool(home, tmp_path, level, n, size=MEMBER if level != "raid1" else 16 << 20)
    await pool.create_volume("scratch", 4 << 20)
    vol = await pool.create_volume("v", 4 << 20)
    model = await fill(vol, rng)
    await pool.remove_volume("scratch")  # its extents are neither used nor zeroed now
    units, _ = scrub_units(pool)
    await pool.aclose()

    # Corrupt one member's copy of 12 scrubbed units (stripe rows; mirror chunks), 700 bytes each.
    places: dict[int, tuple[int, int]] = {}  # unit -> (member, member row)
    for u in rng.choice(units, 12, replace=False).tolist():
        if level == "raid10":
            d = 2 * u + int(rng.integers(0, 2))  # either copy of logical chunk u
            places[u] = (d % n, d // n)
        else:
            places[u] = (int(rng.integers(0, n)), u)
    for m, row in places.values():
        _corrupt(tmp_path / f"m{m}.img", DATA_OFFSET + row * CHUNK + 100, 700, rng)
    # Garbage in the removed volume's (unzeroed) extent is not a mismatch: no volume reads it.
    assert 0 not in units
    _corrupt(tmp_path / "m0.img", DATA_OFFSET, 4096, rng)

    pool = await Pool.open(home, "p")
    try:
        res = await run_scrub(pool)
        found = {f["row"]: f for f in res["found"]}
        assert set(found) == set(places), (sorted(found), sorted(places))
        assert res["mismatches"] == len(places)
        for u, (m, row) in places.items():
            f = found[u]
            if level in ("raid6", "raid1"):  # the member at fault is named
                assert (f["culprit"], f["data_offset"]) == (m, row * CHUNK), (u, f, m)
            elif level == "raid5":  # found in the row's parity, fault unknown
                assert f["member"] == pool.layout.row_members(u)[1][0] and f["culprit"] is None
            else:  # raid10: the second copy differs from the first
                d = 2 * u + 1
                assert (f["member"], f["data_offset"], f["culprit"]) == (d % n, d // n * CHUNK, None)
        fixed = await run_scrub(pool, repair=True)
        assert fixed["repaired"] == fixed["mismatches"] == len(places) and fixed["remaining"] == 0
        again = await run_scrub(pool)
        assert again["mismatches"] == 0
        if level in ("raid6", "raid1"):
            await check(pool, "v", model)  # the member at fault was rewritten, not the parity
    finally:
        await pool.aclose()


async def test_scrub_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    pool = await file_pool(home, tmp_path, "raid5", 4)
    try:
        vol = await pool.create_volume("v", 12 << 20)
        await fill(vol, np.random.default_rng(1))
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                async def stop() -> None:
                    while not (pool.lifecycle.current and pool.lifecycle.current.done
                               > pool.lifecycle.current.total // 2):
                        await trio.sleep(0)
                    scope.cancel()

                nursery.start_soon(stop)
                await run_scrub(pool, speed={"max": 16 << 20})
        assert pool.meta["scrub"]["state"] == "running" and pool.meta["scrub"]["cursor"] > 0
        assert pool.status()["operation"]["state"] == "interrupted"
        res = await run_scrub(pool)
        assert res["resumed_at"] == pool.meta["scrub"]["cursor"] or res["resumed_at"] > 0
        assert res["mismatches"] == 0 and pool.meta["scrub"]["state"] == "done"
        assert (await run_scrub(pool))["resumed_at"] == 0
    finally:
        await pool.aclose()


# --------------------------------------------------------------------------- spares


async def test_spare_takes_a_failed_members_place(tmp_path: Path) -> None:
    """By the command that saw the failure (settle), and in the background when resident."""
    home = Home(tmp_path / "home")
    pool = await file_pool(home, tmp_path, "raid5", 4)
    try:
        vol = await pool.create_volume("v", 8 << 20)
        model = await fill(vol, np.random.default_rng(2))
        await add_spare(pool, f"file://{tmp_path}/s0.img", size=MEMBER)
        await add_spare(pool, f"file://{tmp_path}/s1.img", size=MEMBER)
        assert len(pool.status()["spares"]) == 2
        # 1. vstore fail, no mount: the command settles before closing the pool.
        await pool.fail_member(1)
        done = await pool.lifecycle.settle()
        assert done and pool.members[1].uri_text.endswith("s0.img")
        assert pool.state == "clean" and len(pool.meta["spares"]) == 1
        await check(pool, "v", model)
        # 2. An I/O error in the mount process: the spare is rebuilt in the background.
        pool.lifecycle.resident = True
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.lifecycle.run_background)
            await pool.layout.member_failed(3, MemberIOError("injected"))
            op = pool.lifecycle.current
            assert op is not None and op.kind == "rebuild"
            await Writer(vol, model, 4).one()
            await op.finished.wait()
            nursery.cancel_scope.cancel()
        assert pool.members[3].uri_text.endswith("s1.img") and pool.state == "clean"
        assert pool.meta["spares"] == []
        await check(pool, "v", model)
        # A spare's superblock marks it (vstore create refuses it); removing it wipes that.
        await add_spare(pool, f"file://{tmp_path}/s2.img", size=MEMBER)
        assert (tmp_path / "s2.img").read_bytes()[:8] == b"VSTORESB"
        await remove_spare(pool, f"file://{tmp_path}/s2.img")
        assert pool.meta["spares"] == [] and (tmp_path / "s2.img").read_bytes()[:8] == bytes(8)
    finally:
        await pool.aclose()
    pool = await Pool.open(home, "p")
    try:
        assert [m.state for m in pool.members] == ["active"] * 4
        await check(pool, "v", model)
    finally:
        await pool.aclose()


# --------------------------------------------------------------------------- move


@pytest.mark.parametrize("level,n", [("raid5", 4), ("raid0", 3)])
async def test_move_under_concurrent_writes(tmp_path: Path, level: str, n: int) -> None:
    """Data identical before and after; the old member is released and written no more."""
    home = Home(tmp_path / "home")
    pool = await file_pool(home, tmp_path, level, n)
    old = tmp_path / "m1.img"
    try:
        vol = await pool.create_volume("v", 8 << 20)
        model = await fill(vol, np.random.default_rng(7))
        writer = Writer(vol, model, 8)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run, stop)
            res = await move(pool, 1, f"file://{tmp_path}/new.img", size=MEMBER,
                             speed={"max": 32 << 20})
            stop.set()
        assert writer.count > 0 and len(res["rounds"]) >= 2
        assert pool.members[1].uri_text.endswith("new.img")
        await check(pool, "v", model)
        assert old.read_bytes()[:4096] == bytes(4096)  # released: superblock wiped
        before = old.stat().st_mtime_ns, hash(old.read_bytes())
        for _ in range(20):
            await writer.one()
        await pool.flush()
        assert (old.stat().st_mtime_ns, hash(old.read_bytes())) == before
        await check(pool, "v", model)
    finally:
        await pool.aclose()
    pool = await Pool.open(home, "p")
    try:
        assert pool.record["members"][1] == [f"file://{tmp_path}/new.img"]
        await check(pool, "v", model)
    finally:
        await pool.aclose()


@pytest.mark.parametrize("level,n,journal", [("raid5", 4, True), ("raid0", 3, False)])
async def test_move_resumes_from_its_checkpoint_after_a_crash(tmp_path: Path, monkeypatch, level: str,
                                                               n: int, journal: bool) -> None:
    """Power cut during a move under writes; reopened, writes go on, the move resumes and switches."""
    monkeypatch.setattr(toolkit, "CHECKPOINT_BYTES", 1 << 20)
    monkeypatch.setattr(move_mod, "REGION", 64 << 10)  # fine-grained: which regions are copied again matters
    rec = CrashRecorder(f"move-crash-{uuid.uuid4().hex}")
    try:
        uris = [rec.add_memory(f"m{i}", MEMBER) for i in range(n)]
        new = rec.add_memory("new", MEMBER)
        home = Home(tmp_path / "home")
        pool = await Pool.create(home, "p", level, uris, chunk=CHUNK,
                                 journal=rec.add_memory("j", 1 << 20) if journal else None)
        vol = await pool.create_volume("v", pool.n_extents * pool.extent_size)  # all of every member
        model = np.random.default_rng(31).integers(0, 256, vol.size, dtype=np.uint8)
        for off in range(0, vol.size, 64 << 10):
            await vol.write(off, model[off : off + (64 << 10)])
        await pool.flush()
        await rec.start()
        writer = Writer(vol, model, 32)
        await run_until_power_cut(rec, pool, writer, lambda: move(pool, 1, new, speed={"max": 2 << 20}),
                                  journal=journal)
        pool = await reopen_after_crash(home, "p")
        st = pool.status()["operation"]
        assert st["kind"] == "move" and st["state"] == "interrupted" and st["cursor"] > 0, st
        assert pool.members[1].uri_text == uris[1]  # the old member serves until the switch
        await check(pool, "v", model)
        # A second power cut, during the resumed move.
        writer.vol = pool.get_volume("v")
        await rec.start()
        await run_until_power_cut(rec, pool, writer, lambda: pool.lifecycle.resume({"max": 2 << 20}),
                                  journal=journal)
        pool = await reopen_after_crash(home, "p")
        try:
            assert pool.status()["operation"]["cursor"] > st["cursor"]
            await check(pool, "v", model)
            writer.vol = pool.get_volume("v")
            for _ in range(5):  # recorded while the move waits to resume
                await writer.one()
            await pool.flush()
            res = await pool.lifecycle.resume()
            assert res["kind"] == "move" and res["resumed_at_region"] > 0
            assert pool.members[1].uri_text == new and pool.meta["operation"] is None
            assert "move" not in pool.record
            await check(pool, "v", model)
            if level == "raid5":
                assert (await run_scrub(pool))["mismatches"] == 0
            # At the switch the new device held exactly the old member's bytes (the old one
            # is written no more since; only its superblock was wiped).
            size = pool.members[1].data_size
            old_bytes = rec.members["m1"].store[DATA_OFFSET : DATA_OFFSET + size]
            new_bytes = rec.members["new"].store[DATA_OFFSET : DATA_OFFSET + size]
            assert np.array_equal(old_bytes, new_bytes)
        finally:
            await pool.aclose()
        pool = await Pool.open(home, "p")
        try:
            assert pool.recovered_from is None and pool.members[1].uri_text == new
            await check(pool, "v", model)
        finally:
            await pool.aclose()
    finally:
        rec.forget()


async def test_move_switched_before_the_record_said_so(tmp_path: Path, monkeypatch) -> None:
    """A crash between the switch's metadata commit and the pool record's update: the member is found."""
    rec = CrashRecorder(f"move-switch-{uuid.uuid4().hex}")
    try:
        uris = [rec.add_memory(f"m{i}", MEMBER) for i in range(3)]
        new = rec.add_memory("new", MEMBER)
        home = Home(tmp_path / "home")
        pool = await Pool.create(home, "p", "raid0", uris, chunk=CHUNK)
        vol = await pool.create_volume("v", 4 << 20)
        model = await fill(vol, np.random.default_rng(41))
        written = []
        real = home.write_pool

        def write_pool(name: str, record: dict, **kw) -> None:
            if record.get("members", [None, None])[1] == [new]:
                written.append(record)  # the switch's record update: lost in the crash
                return
            real(name, record, **kw)

        monkeypatch.setattr(home, "write_pool", write_pool)
        await move(pool, 1, new)
        assert written
        abandon(pool)
        await rec.crash(rec.materialize(mode="keep"))
        monkeypatch.setattr(home, "write_pool", real)
        pool = await reopen_after_crash(home, "p")
        try:
            assert [m.state for m in pool.members] == ["active"] * 3
            assert pool.members[1].uri_text == new and pool.record["members"][1] == [new]
            assert "move" not in pool.record and home.read_pool("p")["members"][1] == [new]
            await check(pool, "v", model)
        finally:
            await pool.aclose()
    finally:
        rec.forget()


async def test_rebuild_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    pool = await file_pool(home, tmp_path, "raid5", 4)
    try:
        with pytest.raises(Exception, match="not being rebuilt"):
            await pool.lifecycle.run("rebuild", lambda op: rebuild_member(pool, op, 1))
        await pool.fail_member(1)
        with pytest.raises(Exception, match="too small"):
            await replace(pool, 1, f"file://{tmp_path}/tiny.img", size=4 << 20)
        with pytest.raises(Exception, match="already a member"):
            await replace(pool, 1, f"file://{tmp_path}/m2.img")
        assert pool.members[1].state == "failed"
    finally:
        await pool.aclose()


_ = os
