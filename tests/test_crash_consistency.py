"""Crash consistency: random writes, flushes and failures, a power cut anywhere, recovery, checks.

A hypothesis state machine runs a workload against a raid5, raid6, raid1 or raid10 pool on
crash-simulated memory members (``vstore.testing.crash``), with a journal or with
the write-intent bitmap, and keeps a model. At the end of every example the
power fails after a random prefix of the recorded member writes and flushes;
unflushed writes are dropped, kept, torn at sector boundaries and reordered at
random. The pool is reopened as after ``kill -9`` (journal replay or resync),
and then:

(a) acknowledged writes read back exactly — with a journal every acknowledged
    write (it is durable once logged), without one every write acknowledged
    before the last completed flush;
(b) every other byte holds its old or one of its new contents; with a journal a
    stripe row of a write is all old or all new, never a mixture;
(c) a scrub finds the parity of every row consistent;
(d) failing any member (any two for raid6) returns the same bytes (for mirrors:
    every copy holds the same bytes).

Deliberately broken variants (the journal flush skipped; the resync skipped) must be caught.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from vstore.consistency.metadata import DATA_OFFSET
from vstore.errors import VstoreError
from vstore.pool.consistency import Consistency
from vstore.pool.home import Home
from vstore.pool.pool import Pool
from vstore.raid.base import RaidLayout
from vstore.raid.geometry import survives
from vstore.testing import (
    CrashRecorder,
    DropFlushes,
    abandon,
    degraded_views,
    reopen_after_crash,
    verify_parity,
)

REPO = Path(__file__).resolve().parent.parent
CHUNK = 4096
MEMBER_SIZE = (2 << 20) + (1536 << 10)
JOURNAL_SIZE = 320 << 10  # a small log, so that it wraps and fills during a run
WINDOW_ROWS = 12
CASES = {"raid5": 4, "raid6": 5}
MIRRORS = {"raid1": 2, "raid10": 4}
_counter = itertools.count()


RUN_LIMIT = 120.0  # seconds one step of a machine may take before it is called stuck


def _task_tree() -> str:
    """Where every task of this trio run waits (what a stuck step is stuck on)."""
    lines: list[str] = []

    def walk(task, depth: int) -> None:
        coro, where = task.coro, []
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is None:
                break
            where.append(f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        lines.append("  " * depth + f"{task.name}: " + " <- ".join(reversed(where)))
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    return "\n".join(lines)


def _run(fn, *args):
    """trio.run(fn, *args), failing (with every task's place) instead of hanging past RUN_LIMIT."""
    killer = threading.Timer(30.0, os._exit, (3,))

    async def main():
        stuck: list[str] = []
        outcome: dict = {}
        async with trio.open_nursery() as nursery:
            async def watchdog() -> None:
                await trio.sleep(RUN_LIMIT)
                stuck.append(_task_tree())
                print(f"stuck step, tasks:\n{stuck[0]}", file=sys.stderr, flush=True)
                # A task stuck inside a shielded scope ignores the cancel: then the whole run
                # is ended, rather than the suite hanging until CI's limit.
                killer.start()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watchdog)
            try:
                outcome["value"] = await fn(*args)
            except BaseException as e:  # raised below as it is (not in the nursery's exception group)
                outcome["error"] = e
            nursery.cancel_scope.cancel()
        if stuck:
            raise AssertionError(f"a step took more than {RUN_LIMIT} s; tasks:\n{stuck[0]}")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    try:
        return trio.run(main)
    finally:
        killer.cancel()


async def _no_resync(self) -> None:
    """The deliberately broken recovery without a journal: no resync at all."""


async def _no_rechecksum(self, row: int, trusted: frozenset[int] | set[int] = frozenset()) -> None:
    """The deliberately broken resync of a checksummed pool: checksums left as the crash left them."""


def machine_for(level: str, journal: bool, broken: str | None = None, *,
                checksums: bool = False) -> type[RuleBasedStateMachine]:
    """A crash state machine for one level, with or without a journal (and block checksums).

    broken: "flush" (the journal's flush skipped), "resync" (no resync) or "rechecksum"
    (the resync trusts the data without recomputing its checksums).
    """
    n = {**CASES, **MIRRORS}[level]

    class CrashMachine(RuleBasedStateMachine):
        @initialize(seed=st.integers(0, 2**32 - 1), cut=st.floats(0, 1),
                    mode=st.sampled_from(["random", "random", "drop", "keep"]))
        def setup(self, seed: int, cut: float, mode: str) -> None:
            self.seed, self.cut, self.mode = seed, cut, mode
            self.monkey = pytest.MonkeyPatch()
            self.tmp = Path(tempfile.mkdtemp(prefix="vstore-crash-"))
            self.home = Home(self.tmp / "home")
            self.rec = CrashRecorder(f"crash{next(_counter)}")
            size = MEMBER_SIZE if level in CASES else 7 << 20  # a mirror's extent is 4 MiB
            self.uris = [self.rec.add_memory(f"m{i}", size) for i in range(n)]
            self.jr_uri = self.rec.add_memory("j", JOURNAL_SIZE) if journal else None
            _run(self._setup)
            self.ops: list[tuple] = []  # (kind, first event, last event, payload...)
            self.model = np.zeros(self.window, np.uint8)

        async def _setup(self) -> None:
            p = await Pool.create(self.home, "p", level, self.uris, chunk=CHUNK,
                                  journal=self.jr_uri, checksums=checksums)
            await p.aclose()
            self.pool = await Pool.open(self.home, "p")
            if broken == "flush":
                jr = self.pool.consistency.journal
                jr.dev = DropFlushes(jr.dev)  # the deliberately broken journal
            self.layout = self.pool.layout
            self.row_bytes = self.layout.row_bytes or 4 * CHUNK
            self.window = WINDOW_ROWS * self.row_bytes
            await self.rec.start()

        # ------------------------------------------------------------------ workload
        def _events(self) -> int:
            return len(self.rec.events)

        @rule(data=st.data(), seed=st.integers(0, 2**32 - 1))
        def write(self, data, seed: int) -> None:
            off = data.draw(st.integers(0, self.window - 1), label="offset")
            top = min(self.window - off, 3 * self.row_bytes)
            ln = data.draw(st.one_of(st.integers(1, top), st.sampled_from([min(top, CHUNK), top])),
                           label="length")
            buf = np.random.default_rng(seed).integers(0, 256, ln, dtype=np.uint8)
            start = self._events()
            _run(self.pool.data_dev.write, off, buf)
            self.ops.append(("w", start, self._events(), off, buf))
            self.model[off : off + ln] = buf

        @rule(seed=st.integers(0, 2**32 - 1), count=st.integers(2, 4))
        def concurrent_writes(self, seed: int, count: int) -> None:
            # Disjoint ranges at once: they share stripes and journal flushes, never bytes.
            rng = np.random.default_rng(seed)
            cuts = sorted({int(x) for x in rng.integers(0, self.window, 2 * count)})
            jobs = []
            for a, b in zip(cuts[::2], cuts[1::2], strict=False):
                b = min(b, a + 2 * self.row_bytes)
                jobs.append((a, rng.integers(0, 256, b - a, dtype=np.uint8)))

            async def go() -> None:
                async with trio.open_nursery() as nursery:
                    for a, buf in jobs:
                        nursery.start_soon(self.pool.data_dev.write, a, buf)

            start = self._events()
            _run(go)
            end = self._events()
            for a, buf in jobs:
                self.ops.append(("w", start, end, a, buf))
                self.model[a : a + len(buf)] = buf

        @rule()
        def flush(self) -> None:
            start = self._events()
            _run(self.pool.flush)
            self.ops.append(("f", start, self._events()))

        @precondition(lambda self: journal)
        @rule(data=st.data())
        def fail_member(self, data) -> None:
            # Only with a journal: a degraded array without one has the write hole
            # (test_write_hole_without_journal shows it).
            failed = set(self.layout.failed) | {int(m[1:]) for m in self.rec.dead}
            choices = [i for i in range(n) if i not in failed and survives(level, n, failed | {i})]
            if not choices:
                return
            i = data.draw(st.sampled_from(choices), label="member")
            start = self._events()
            _run(self.pool.fail_member, i)
            self.ops.append(("x", start, self._events(), i))

        @precondition(lambda self: journal)
        @rule(data=st.data())
        def member_dies(self, data) -> None:
            # A member starts failing its I/O mid-workload (it is back after the crash): the
            # layout drops it and the pool records that at the next flush — or never, if the
            # crash comes first; then the replay must bring it up to date.
            failed = set(self.layout.failed) | {int(m[1:]) for m in self.rec.dead}
            choices = [i for i in range(n) if i not in failed and survives(level, n, failed | {i})]
            if choices:
                self.rec.fail(f"m{data.draw(st.sampled_from(choices), label='dying member')}")

        @rule(data=st.data())
        def read(self, data) -> None:
            off = data.draw(st.integers(0, self.window - 1), label="offset")
            ln = data.draw(st.integers(1, min(self.window - off, 2 * self.row_bytes)), label="length")
            got = _run(self.pool.data_dev.read, off, ln)
            assert np.array_equal(got, self.model[off : off + ln])

        # ------------------------------------------------------------------ crash and checks
        def teardown(self) -> None:
            if not hasattr(self, "pool"):
                return
            try:
                _run(self._crash_and_check)
            finally:
                self.rec.forget()

        async def _crash_and_check(self) -> None:
            cut = int(round(self.cut * self._events()))
            states = self.rec.materialize(cut, self.mode, random.Random(self.seed))
            abandon(self.pool)
            await self.rec.crash(states)
            if broken == "resync":
                self.monkey.setattr(Consistency, "_resync", _no_resync)
            if broken == "rechecksum":
                self.monkey.setattr(RaidLayout, "rechecksum_row", _no_rechecksum)
            try:
                pool = await reopen_after_crash(self.home, "p")
            except VstoreError as e:
                self.monkey.undo()
                raise AssertionError(f"recovery after the crash failed: {e}") from e
            except BaseException:
                self.monkey.undo()
                raise
            try:
                got = np.asarray(await pool.data_dev.read(0, self.window))
                self._check_contents(got, cut)
                if level in CASES:
                    bad = await verify_parity(pool.layout)
                    assert not bad, f"(c) rows with inconsistent parity after recovery: {bad[:10]}"
                for failed, view in degraded_views(pool.layout):
                    seen = np.asarray(await view.read(0, self.window))
                    assert np.array_equal(seen, got), f"(d) members {sorted(failed)} failed: other bytes"
                if checksums:
                    await self._check_checksums(pool)
            finally:
                await pool.aclose()
                self.monkey.undo()

        async def _check_checksums(self, pool: Pool) -> None:
            """(e) no false repair: nothing read after the crash failed a checksum, and every block
            of every member in use agrees with its checksum (the crash tore none apart for good)."""
            await pool.consistency.wait_resynced()
            layout = pool.layout
            assert not any(layout.checksum_errors), (
                f"(e) blocks taken for corrupt after the crash: {layout.checksum_errors}")
            for i in layout.healthy():
                dev = layout.members[i]
                _, bad = await dev.check_blocks(0, layout.rows * layout.chunk)
                assert not bad, f"(e) member {i}: blocks disagree with their checksums at {bad[:5]}"

        def _check_contents(self, got: np.ndarray, cut: int) -> None:
            writes = [op for op in self.ops if op[0] == "w"]
            if journal:
                # (a) every write acknowledged before the cut is on the pool exactly;
                # (b) a write in flight shows, per stripe row, all its bytes or none.
                expect = np.zeros(self.window, np.uint8)
                inflight = []
                for _, start, end, off, buf in writes:
                    if end <= cut:
                        expect[off : off + len(buf)] = buf
                    elif start < cut:
                        inflight.append((off, buf))
                covered = np.zeros(self.window, bool)
                for off, buf in inflight:
                    pos = off
                    while pos < off + len(buf):
                        stop = min(off + len(buf), (pos // self.row_bytes + 1) * self.row_bytes)
                        new = buf[pos - off : stop - off]
                        part = got[pos:stop]
                        assert np.array_equal(part, new) or np.array_equal(part, expect[pos:stop]), (
                            f"(b) write at {off} (+{len(buf)}), row bytes {pos}..{stop}: "
                            "a mixture of old and new")
                        pos = stop
                    covered[off : off + len(buf)] = True
                wrong = np.flatnonzero((got != expect) & ~covered)
                assert not len(wrong), f"(a) acknowledged bytes differ, first at {wrong[:5]}"
                return
            # Without a journal: what the last completed flush covered is exact, the rest
            # holds its durable content or one written since.
            flush_start = -1
            for op in self.ops:
                if op[0] == "f" and op[2] <= cut:
                    flush_start = op[1]
            durable = np.zeros(self.window, np.uint8)
            later = []
            for _, start, end, off, buf in writes:
                if end <= flush_start:
                    durable[off : off + len(buf)] = buf
                elif start < cut:
                    later.append((off, buf))
            ok = got == durable
            for off, buf in later:
                ok[off : off + len(buf)] |= got[off : off + len(buf)] == buf
            wrong = np.flatnonzero(~ok)
            assert not len(wrong), f"(a)/(b) bytes hold neither old nor new content, first at {wrong[:5]}"

    CrashMachine.__name__ = (f"Crash_{level}_{'journal' if journal else 'bitmap'}_{broken or 'ok'}"
                             f"{'_checksums' if checksums else ''}")
    return CrashMachine


SETTINGS = settings(max_examples=30, stateful_step_count=20, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "bitmap"])
@pytest.mark.parametrize("level", list(CASES))
def test_crash_consistency(level: str, journal: bool) -> None:
    machine = machine_for(level, journal)
    machine.TestCase.settings = SETTINGS
    machine.TestCase().runTest()


@pytest.mark.parametrize("level", list(MIRRORS))
def test_crash_consistency_of_mirrors_without_journal(level: str) -> None:
    """raid1/raid10 with the write-intent bitmap: after the resync every copy holds the same bytes."""
    machine = machine_for(level, False)
    machine.TestCase.settings = SETTINGS
    machine.TestCase().runTest()


@pytest.mark.parametrize(("level", "journal"), [("raid5", True), ("raid5", False), ("raid6", False),
                                               ("raid1", False), ("raid10", True)])
def test_crash_consistency_with_checksums(level: str, journal: bool) -> None:
    """Block checksums: after any crash and its recovery no block is taken for corrupt, no write lost."""
    machine = machine_for(level, journal, checksums=True)
    machine.TestCase.settings = SETTINGS
    machine.TestCase().runTest()


@pytest.mark.parametrize(("level", "journal", "broken", "checksums"),
                         [("raid5", True, "flush", False), ("raid5", False, "resync", False),
                          ("raid1", False, "resync", False), ("raid5", False, "rechecksum", True)])
def test_broken_variants_are_caught(level: str, journal: bool, broken: str, checksums: bool) -> None:
    """Skip the journal flush, the resync, or the resync's checksums: the checks must fail within a
    bounded number of examples."""
    machine = machine_for(level, journal, broken=broken, checksums=checksums)
    machine.TestCase.settings = settings(SETTINGS, max_examples=150, phases=[Phase.generate])
    with pytest.raises((AssertionError, Flaky)):
        machine.TestCase().runTest()


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "bitmap"])
async def test_a_new_pool_killed_before_closing_is_recovered(tmp_path: Path, journal: bool) -> None:
    """The creating process owns the pool: killed before it closed it, the next open recovers it."""
    rec = CrashRecorder(f"created{next(_counter)}")
    try:
        uris = [rec.add_memory(f"m{i}", MEMBER_SIZE) for i in range(4)]
        jr = rec.add_memory("j", JOURNAL_SIZE) if journal else None
        home = Home(tmp_path / "home")
        pool = await Pool.create(home, "p", "raid5", uris, chunk=CHUNK, journal=jr)
        assert pool.meta["owner"] is not None and pool.meta["clean"] is False
        parity = pool.layout.row_members(0)[1][0]
        await rec.start()
        data = np.random.default_rng(5).integers(0, 256, 3000, dtype=np.uint8)
        await pool.data_dev.write(100, data)  # row 0: a data chunk and its parity
        # The power fails: unflushed member writes are lost, except (without a journal) the
        # data chunk's, so that row 0's parity is stale unless the pool is resynced.
        durable, pending = rec.durable_and_pending(len(rec.events))
        if not journal:
            for name, writes in pending.items():
                for w in writes:
                    if name != f"m{parity}" or w.offset < DATA_OFFSET:
                        durable[name][w.offset : w.offset + len(w.data)] = w.data
        abandon(pool)
        await rec.crash(durable)
        pool = await reopen_after_crash(home, "p")
        try:
            assert pool.recovered_from is not None
            await pool.consistency.wait_resynced()
            if journal:  # acknowledged once logged: the replay puts it on the members
                assert pool.status()["journal"]["replayed"]["records"] > 0
                assert np.array_equal(np.asarray(await pool.data_dev.read(100, len(data))), data)
            assert await verify_parity(pool.layout) == []
        finally:
            await pool.aclose()
        pool = await Pool.open(home, "p")  # closed cleanly now
        try:
            assert pool.recovered_from is None
        finally:
            await pool.aclose()
    finally:
        rec.forget()


# ---------------------------------------------------------------------------- a real crash

needs_fuse_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("fio") is None
    or shutil.which("mkfs.ext4") is None, reason="needs root, /dev/fuse, fio and e2fsprogs")


def _vstore(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "vstore.cli.main", *args], capture_output=True,
                         text=True, cwd=REPO, timeout=180,
                         env={**os.environ, "VSTORE_HOME": str(home), "PYTHONPATH": str(REPO)})
    if check:
        assert res.returncode == 0, f"vstore {' '.join(args)}: {res.stdout}{res.stderr}"
    return res


async def _scrub(home: Path) -> tuple[list[int], dict]:
    pool = await Pool.open(Home(home), "p", read_only=True)
    try:
        return await verify_parity(pool.layout), pool.status()
    finally:
        await pool.aclose()


@pytest.mark.integration
@needs_fuse_root
@pytest.mark.parametrize("journal", [True, False], ids=["journal", "bitmap"])
def test_kill9_mount_under_fio_then_recover(tmp_path: Path, journal: bool) -> None:
    """kill -9 `vstore mount` while fio writes into ext4 on the volume; remount, scrub, e2fsck."""
    from fuse_mount.daemon import mount_entry, mounted_pool_socket
    from tests.fuse_helpers import detach_loops, force_unmount
    from vstore.pool import control

    home, mp, ext = tmp_path / "home", tmp_path / "mnt", tmp_path / "ext4"
    mp.mkdir()
    ext.mkdir()
    members = [f"file://{tmp_path}/m{i}.img" for i in range(4)]
    jr = ["--journal", f"file://{tmp_path}/journal.img", "--journal-size", "8M"] if journal else []
    fio = None
    try:
        _vstore(home, "create", "p", "--level", "raid5", "--size", "40M", "--chunk", "16K", *jr, *members)
        _vstore(home, "volume", "create", "p", "v", "--size", "96M")
        _vstore(home, "mount", "p", str(mp))
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(mp / "v")], check=True,
                       capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(mp / "v"), str(ext)], check=True)
        fio = subprocess.Popen(
            ["fio", "--name=crash", f"--directory={ext}", "--size=24M", "--rw=randwrite",
             "--bs=4k", "--ioengine=psync", "--fsync=32", "--numjobs=2", "--time_based",
             "--runtime=60", "--direct=1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2.5)
        assert fio.poll() is None, "fio stopped early"
        sock = mounted_pool_socket(home, "p")
        pid = control.call_sync(sock, {"cmd": "mount-info"})["pid"]
        os.kill(pid, signal.SIGKILL)
        fio.kill()
        fio.wait()
        subprocess.run(["umount", "-l", str(ext)], capture_output=True)
        detach_loops(mp)
        deadline = time.monotonic() + 10
        while mounted_pool_socket(home, "p") is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        _vstore(home, "umount", str(mp))
        assert mount_entry(mp) is None
        deadline = time.monotonic() + 20  # a killed FUSE daemon takes a moment to be gone
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        # The remount replays the journal before serving, or serves at once and resyncs in
        # the background.
        _vstore(home, "mount", "p", str(mp))
        st = json.loads((mp / ".vstore" / "status").read_text())
        assert st["recovered"] is True
        print("after the kill:", json.dumps(st["journal"]))
        if journal:  # fio kept writing until the kill: there is always a record to replay
            assert st["journal"]["replayed"]["records"] > 0
        else:
            assert st["journal"]["resync"]["state"] in ("running", "done")
            assert st["journal"]["resync"]["rows"] > 0
            deadline = time.monotonic() + 60
            while st["journal"]["resync"]["state"] != "done" and time.monotonic() < deadline:
                time.sleep(0.1)
                st = json.loads((mp / ".vstore" / "status").read_text())
            assert st["journal"]["resync"]["state"] == "done"
        # ext4 replays its own journal on mount; afterwards it must be clean.
        subprocess.run(["mount", "-o", "loop", str(mp / "v"), str(ext)], check=True)
        subprocess.run(["umount", str(ext)], check=True)
        detach_loops(mp)
        res = subprocess.run(["e2fsck", "-fn", str(mp / "v")], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        _vstore(home, "umount", str(mp))
        bad, status = trio.run(_scrub, home)
        assert bad == [], f"rows with inconsistent parity: {bad[:10]}"
        assert status["state"] == "clean"
    finally:
        if fio is not None and fio.poll() is None:
            fio.kill()
            fio.wait()
        subprocess.run(["umount", "-l", str(ext)], capture_output=True)
        detach_loops(mp)
        for rec_path in (home / "mounts").glob("*.json"):
            with contextlib.suppress(Exception):
                os.kill(json.loads(rec_path.read_text())["pid"], signal.SIGKILL)
        force_unmount(mp)
