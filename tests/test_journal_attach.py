"""A journal you can lose and replace: the pool goes on without a lost journal device; `vstore journal
attach|detach` add, replace or remove one on a live pool, and a crash at any point of a switch
leaves the pool consistent with every acknowledged write intact (issue 17 item 4)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import trio

from vstore.consistency.metadata import BITMAP_OFFSET
from vstore.pool.home import Home
from vstore.pool.pool import Pool
from vstore.testing import CrashRecorder, abandon, reopen_after_crash, verify_parity

REPO = Path(__file__).resolve().parent.parent
CHUNK = 4096
MEMBER_SIZE = (2 << 20) + (1536 << 10)  # one extent of a 4-member raid5 with 4 KiB chunks
_names = itertools.count()


def _recorder(journal: bool = True) -> tuple[CrashRecorder, list[str], str]:
    rec = CrashRecorder(f"tja{next(_names)}")
    uris = [rec.add_memory(f"m{i}", MEMBER_SIZE) for i in range(4)]
    juri = rec.add_memory("j", 1 << 20) if journal else rec.uri("j")
    return rec, uris, juri


async def _pool(tmp_path: Path, journal: bool = True) -> tuple[CrashRecorder, Home, Pool, str]:
    rec, uris, juri = _recorder(journal)
    home = Home(tmp_path / "home")
    p = await Pool.create(home, "p", "raid5", uris, chunk=CHUNK, journal=juri if journal else None)
    await p.aclose()
    pool = await Pool.open(home, "p")
    await rec.start()
    return rec, home, pool, juri


def _block(i: int, n: int = 6000) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8)


def _offset(i: int) -> int:
    return i * 7 * CHUNK + 100  # unaligned, spread over rows; never overlapping


async def _corrupt_parity_outside_writes(rec: CrashRecorder, pool: Pool, row: int) -> None:
    """Make one row's parity wrong where nothing was written (only a full resync mends it)."""
    _, pmem = pool.layout.row_members(row)
    at = (2 << 20) + row * CHUNK
    rec.members[f"m{pmem[0]}"].store[at : at + 16] ^= 0x5A


# ---------------------------------------------------------------------------- (a) lost at open


@pytest.mark.parametrize("how", ["failed", "deleted", "wiped"])
async def test_pool_opens_without_its_lost_journal_and_resyncs_every_row(tmp_path: Path, how: str,
                                                                          caplog) -> None:
    rec, home, pool, _ = await _pool(tmp_path)
    try:
        for i in range(4):
            await pool.data_dev.write(_offset(i), _block(i))
        await pool.flush()
        await pool.data_dev.write(_offset(4), _block(4))  # logged, in flight at the crash
        abandon(pool)
        await rec.crash(rec.materialize(mode="random", rng=random.Random(3)))
        far_row = pool.layout.rows - 3
        await _corrupt_parity_outside_writes(rec, pool, far_row)
        if how == "failed":
            rec.fail("j")
        elif how == "deleted":
            del rec.members["j"]
        else:
            rec.members["j"].store[:] = 0
        # Read-only: opens, says the journal cannot be opened, changes nothing.
        with caplog.at_level(logging.WARNING):
            ro = await reopen_after_crash(home, "p", read_only=True)
        try:
            assert "the next open for writing goes on without it" in caplog.text
            assert "cannot be opened" in ro.status()["journal"]["warning"]
            assert ro.meta["journal"] is not None
        finally:
            await ro.aclose()
        pool = await reopen_after_crash(home, "p")
        st = pool.status()["journal"]
        assert st["mode"] == "none" and "write-intent bitmap" in st["protection"]
        assert st["resync"]["state"] == "done" and st["resync"]["rows"] == pool.layout.rows
        assert "lost at" in st["warning"] and "resync of every row done" in st["warning"]
        assert pool.meta["journal"] is None and pool.meta["journal_lost"]["resync"] == "all rows"
        assert "journal" not in home.read_pool("p")
        assert await verify_parity(pool.layout) == []
        for i in range(4):
            assert np.array_equal(await pool.data_dev.read(_offset(i), 6000), _block(i))
        await pool.data_dev.write(_offset(5), _block(5))  # the pool takes writes
        await pool.aclose()
        # The next open does not look for the journal; the warning stays until one is attached.
        pool = await Pool.open(home, "p")
        st = pool.status()["journal"]
        assert "resync" not in st and "lost at" in st["warning"]
        assert np.array_equal(await pool.data_dev.read(_offset(5), 6000), _block(5))
    finally:
        await pool.aclose()
        rec.forget()


async def test_clean_pool_without_its_journal_needs_no_resync(tmp_path: Path) -> None:
    rec, home, pool, _ = await _pool(tmp_path)
    try:
        await pool.data_dev.write(_offset(0), _block(0))
        await pool.aclose()
        del rec.members["j"]
        pool = await Pool.open(home, "p")
        st = pool.status()["journal"]
        assert "resync" not in st and "lost at" in st["warning"]
        assert pool.meta["journal_lost"]["resync"] == "none"
        assert np.array_equal(await pool.data_dev.read(_offset(0), 6000), _block(0))
        assert await verify_parity(pool.layout) == []
    finally:
        await pool.aclose()
        rec.forget()


async def test_journal_failing_during_replay_is_dropped_after_what_it_replayed(tmp_path: Path) -> None:
    """The device opens, its records replay, then it fails (the new checkpoint cannot be written)."""
    from vstore.testing import Rig

    rig = Rig()
    uris = [rig.add_memory(f"m{i}", MEMBER_SIZE) for i in range(4)]
    home = Home(tmp_path / "home")
    p = await Pool.create(home, "p", "raid5", uris, chunk=CHUNK, journal=rig.add_memory("j", 1 << 20))
    await p.aclose()
    pool = await Pool.open(home, "p")
    try:
        await rig.start()
        for i in range(4):
            await pool.data_dev.write(_offset(i), _block(i))  # logged; never flushed in place
        abandon(pool)
        await rig.crash(len(rig.events), "drop")  # only the journal holds them
        rig.fail("j", "write")
        pool = await reopen_after_crash(home, "p")
        st = pool.status()["journal"]
        assert "lost at" in st["warning"] and st["resync"]["rows"] == pool.layout.rows
        for i in range(4):  # replayed before the device failed
            assert np.array_equal(await pool.data_dev.read(_offset(i), 6000), _block(i))
        assert await verify_parity(pool.layout) == []
    finally:
        await pool.aclose()
        rig.forget()


# ---------------------------------------------------------------------------- (b) fails live


async def test_journal_failing_under_writes_switches_to_the_bitmap(tmp_path: Path) -> None:
    rec, home, pool, _ = await _pool(tmp_path)
    try:
        for i in range(3):  # acknowledged under the journal: durable once logged, no flush
            await pool.data_dev.write(_offset(i), _block(i))
        rec.fail("j")
        mark = len(rec.events)

        async def writer(i: int) -> None:
            await pool.data_dev.write(_offset(i), _block(i))

        async with trio.open_nursery() as nursery:  # concurrent writers all hit the dead journal
            for i in range(3, 9):
                nursery.start_soon(writer, i)
        await pool.flush()
        switch_events = list(rec.events)
        st = pool.status()["journal"]
        assert st["mode"] == "none" and "lost at" in st["warning"]
        assert "simulated member failure" in pool.meta["journal_lost"]["error"]
        assert pool.consistency.log.backend is pool.consistency.bitmap
        await pool.data_dev.write(_offset(9), _block(9))  # unflushed at the crash: old or new
        # A power cut at the end, and at points inside the switch (with the journal back
        # after the reboot, or still dead): acknowledged writes intact, parity consistent.
        cuts = sorted({len(rec.events), *range(mark, len(switch_events), max(1, (len(switch_events) - mark) // 6))})
        events = list(rec.events)
        abandon(pool)
        for k, cut in enumerate(cuts):
            rec.events = events
            await rec.crash(rec.materialize(cut, "random", random.Random(cut)))
            if k % 2:
                rec.fail("j")
            pool = await reopen_after_crash(home, "p")
            # Logged writes survive a crash through the journal, or through the switch's member
            # flush; losing the journal AND the power before that flush loses what it held.
            done = cut >= len(switch_events)
            acked = range(9) if done else range(3) if k % 2 == 0 else range(0)
            for i in acked:
                assert np.array_equal(await pool.data_dev.read(_offset(i), 6000), _block(i)), (cut, i)
            assert await verify_parity(pool.layout) == [], cut
            abandon(pool)
    finally:
        rec.forget()


# ---------------------------------------------------------------------------- (c)/(d) in process


async def test_attach_replace_detach_on_a_live_pool(tmp_path: Path) -> None:
    rec, home, pool, _ = await _pool(tmp_path, journal=False)
    j1, j2 = rec.add_memory("j1", 1 << 20), rec.add_memory("j2", 1 << 20)
    try:
        bm_before = pool.consistency.bitmap
        async with trio.open_nursery() as nursery:
            async def writes() -> None:
                for i in range(30):
                    await pool.data_dev.write(_offset(i), _block(i))
            nursery.start_soon(writes)
            st = await pool.consistency.attach_journal(j1)
        assert st["mode"] == "journal" and pool.consistency.log.logs_parity
        assert pool.meta["journal"]["uri"] == j1 and home.read_pool("p")["journal"] == j1
        assert bm_before.status()["dirty"] == 0  # cleared after the switch
        await pool.consistency.attach_journal(j2)  # replace: the old one is wiped
        assert pool.meta["journal"]["uri"] == j2
        assert not rec.members["j1"].store[:8192].any()
        await pool.data_dev.write(_offset(30), _block(30))
        await pool.consistency.detach_journal()
        assert not rec.members["j2"].store[:8192].any()
        assert pool.meta["journal"] is None and "journal" not in home.read_pool("p")
        assert pool.status()["journal"]["mode"] == "none" and not pool.consistency.log.logs_parity
        await pool.data_dev.write(_offset(31), _block(31))
        await pool.aclose()
        pool = await Pool.open(home, "p")
        for i in range(32):
            assert np.array_equal(await pool.data_dev.read(_offset(i), 6000), _block(i)), i
        assert await verify_parity(pool.layout) == []
    finally:
        await pool.aclose()
        rec.forget()


async def test_attach_refuses_bad_devices(tmp_path: Path) -> None:
    from vstore.errors import ConfigError, ExistsError, NotFoundError

    rec, home, pool, uris = await _pool(tmp_path, journal=False)
    small = rec.add_memory("small", 64 << 10)
    try:
        with pytest.raises(NotFoundError, match="has no journal"):
            await pool.consistency.detach_journal()
        with pytest.raises(ConfigError, match="also a member"):
            await pool.consistency.attach_journal(rec.uri("m1"))
        with pytest.raises(ConfigError, match="too small"):
            await pool.consistency.attach_journal(small)
        other = rec.add_memory("other", 1 << 20)
        rec2 = CrashRecorder(f"tja{next(_names)}")
        q = await Pool.create(Home(tmp_path / "home2"), "q", "raid5",
                              [rec2.add_memory(f"m{i}", MEMBER_SIZE) for i in range(4)],
                              chunk=CHUNK, journal=other)
        await q.aclose()
        rec2.forget()
        with pytest.raises(ExistsError, match="another pool"):
            await pool.consistency.attach_journal(other)
        await pool.consistency.attach_journal(rec.add_memory("j", 1 << 20))
        with pytest.raises(ExistsError, match="already the journal"):
            await pool.consistency.attach_journal(rec.uri("j"))
        assert pool.meta["journal"]["uri"] == rec.uri("j")
    finally:
        await pool.aclose()
        rec.forget()


# ---------------------------------------------------------------------------- (4) power cuts


@pytest.mark.parametrize("op", ["attach", "detach", "replace"])
async def test_power_cut_anywhere_in_a_switch(tmp_path: Path, op: str) -> None:
    """Writes (some flushed) run while the journal is attached, replaced or detached; the power
    fails after every prefix of the recorded events (sampled): reopen, scrub, acked writes intact."""
    rec, home, pool, _ = await _pool(tmp_path, journal=op != "attach")
    jnew = rec.add_memory("jnew", 1 << 20)
    try:
        for i in range(4):
            await pool.data_dev.write(_offset(i), _block(i))
        await pool.flush()
        await rec.start()
        acked: list[tuple[int, int, bool]] = []  # (block, event index at its ack, safe by itself)
        flushed: list[tuple[int, int]] = []  # (blocks before it, event index at its end)

        async def writer() -> None:
            for i in range(4, 28):
                journal_before = pool.consistency.journal is not None
                await pool.data_dev.write(_offset(i), _block(i))
                # Logged (and so durable) only if a journal took it for sure: one before and after.
                acked.append((i, len(rec.events), journal_before and pool.consistency.journal is not None))
                if i % 3 == 0:
                    await pool.flush()
                    flushed.append((i + 1, len(rec.events)))
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            for _ in range(5):
                await trio.sleep(0)
            w0 = len(rec.events)
            if op == "detach":
                await pool.consistency.detach_journal()
            else:
                await pool.consistency.attach_journal(jnew)
            w1 = len(rec.events)
        events = list(rec.events)
        abandon(pool)
        n = len(events)
        rng = random.Random(n)
        # Every point of the switch itself (spaced if it is long), and some of the writes around it.
        inside = range(w0, w1 + 1, max(1, (w1 - w0) // 30))
        cuts = sorted({0, n, *inside, *rng.sample(range(n), min(n, 8))})
        assert len(inside) > 5
        for cut in cuts:
            rec.events = events
            await rec.crash(rec.materialize(cut, "random", random.Random(cut)))
            pool = await reopen_after_crash(home, "p")
            durable_upto = max([b for b, at in flushed if at <= cut], default=4)
            for i, at, logged in [(i, 0, True) for i in range(4)] + acked:
                if at <= cut and (logged or i < durable_upto):
                    got = await pool.data_dev.read(_offset(i), 6000)
                    assert np.array_equal(got, _block(i)), (op, cut, i)
            assert await verify_parity(pool.layout) == [], (op, cut)
            assert pool.consistency.status()["mode"] in ("journal", "none")
            abandon(pool)
        # Without a cut the switch is done: the new mode is the recorded one.
        rec.events = events
        await rec.crash(rec.materialize(n, "keep"))
        pool = await reopen_after_crash(home, "p")
        assert (pool.meta["journal"] is None) == (op == "detach")
        if op != "detach":
            assert pool.meta["journal"]["uri"] == jnew
        abandon(pool)
    finally:
        rec.forget()


async def test_detach_leaves_a_clear_bitmap_before_the_metadata_commit(tmp_path: Path) -> None:
    """A stale bitmap left on the members in journal mode must not survive a detach."""
    rec, home, pool, _ = await _pool(tmp_path)
    try:
        for m in pool.members:  # garbage where the bitmap lives (as a lost journal's mark_all leaves)
            await m.dev.write(BITMAP_OFFSET + 4096, np.full(4096, 0xFF, np.uint8))
        await pool.consistency.detach_journal()
        assert await pool.consistency.bitmap.load_dirty() == set()
    finally:
        await pool.aclose()
        rec.forget()


async def test_an_update_too_big_for_a_new_journal_is_logged_in_whole_rows() -> None:
    """A request planned before the attach may bring an update the new journal cannot take whole."""
    from backends.memory import MemoryDevice
    from vstore.consistency.journal import Journal, JournalError
    from vstore.consistency.switch import SwitchableLog

    pool_uuid = "6f1c0a6e-1f55-4b53-9c55-0123456789ab"
    jdev = MemoryDevice(np.zeros(1 << 20, np.uint8))
    jr = await Journal.format(jdev, pool_uuid)
    await jr.start()
    log_ = SwitchableLog(jr, row_unit=CHUNK)
    rng = np.random.default_rng(5)
    rows = 24  # 24 rows of 4 members: 384 KiB, more than a record may hold (a quarter of the log)
    writes = [(m, r * CHUNK, rng.integers(0, 256, CHUNK, dtype=np.uint8))
              for r in range(rows) for m in range(4)]
    ticket = await log_.commit(writes)
    assert jr.stats["records"] > 1 and log_.inflight == 1
    log_.applied(ticket)
    assert log_.inflight == 0 and not jr._unapplied
    # Replayed, the records give back every byte, each row within one record.
    jr2 = await Journal.open(jdev, pool_uuid)
    got: dict[tuple[int, int], np.ndarray] = {}

    async def apply(m: int, off: int, buf: np.ndarray) -> None:
        got[(m, off)] = buf.copy()

    async def flush() -> None:
        return None

    res = await jr2.recover(apply, flush)
    assert res.records == jr.stats["records"] and not res.torn
    for m, off, buf in writes:
        assert np.array_equal(got[(m, off)], buf)
    # More than the log can hold at once: a clear error, never a wait for room that cannot come.
    await jr2.start()
    huge = [(m, r * CHUNK, np.zeros(CHUNK, np.uint8)) for r in range(64) for m in range(4)]
    with trio.fail_after(5), pytest.raises(JournalError, match="cannot hold"):
        await SwitchableLog(jr2, row_unit=CHUNK).commit(huge)


# ---------------------------------------------------------------------------- CLI and the mount


def _vstore(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "vstore.cli.main", *args], capture_output=True,
                         text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "VSTORE_HOME": str(home), "PYTHONPATH": str(REPO)})
    if check:
        assert res.returncode == 0, f"vstore {' '.join(args)}: {res.stdout}{res.stderr}"
    return res


class Cli:
    """`vstore ...` run in this process (as its entry point does: errors are one line and an exit code)."""

    def __init__(self, home: Path, capsys) -> None:
        self.home, self.capsys = home, capsys

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        from vstore.cli.main import main

        self.capsys.readouterr()
        old = sys.argv
        sys.argv = ["vstore", "--home", str(self.home), *args]
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.argv = old
        out = self.capsys.readouterr()
        res = subprocess.CompletedProcess(args, code, out.out, out.err)
        if check:
            assert code == 0, f"vstore {' '.join(args)}: {out.out}{out.err}"
        return res


def test_cli_journal_commands_and_errors(tmp_path: Path, capsys) -> None:
    vstore = Cli(tmp_path / "home", capsys)
    members = [f"file://{tmp_path}/d{i}.img" for i in range(3)]
    vstore("create", "p", "--level", "raid5", "--size", "16M", *members)
    out = vstore("journal", "attach", "p", f"file://{tmp_path}/j.img", "--size", "4M").stdout
    assert f"journal file://{tmp_path}/j.img" in out
    st = json.loads(vstore("journal", "status", "p", "--json").stdout)
    assert st["mode"] == "journal"
    assert Home(tmp_path / "home").pool_storage_of(str(tmp_path / "j.img")) == "the journal of pool 'p'"
    for args, msg in [
        (("journal", "attach", "nosuch", f"file://{tmp_path}/x.img"), "pool 'nosuch' not found"),
        (("journal", "attach", "p", members[1]), "also a member"),
        (("journal", "attach", "p", f"file://{tmp_path}/small.img", "--size", "100K"), "too small"),
        (("journal", "attach", "p", f"file://{tmp_path}/j.img"), "already the journal"),
    ]:
        bad = vstore(*args, check=False)
        assert bad.returncode != 0 and msg in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "small.img").exists()  # a refused journal file is not left behind
    assert "journal detached" in vstore("journal", "detach", "p").stdout
    bad = vstore("journal", "detach", "p", check=False)
    assert bad.returncode != 0 and "has no journal" in bad.stderr and "Traceback" not in bad.stderr
    assert "write-intent bitmap" in vstore("status", "p").stdout
    # A lost journal: status warns in one line.
    vstore("journal", "attach", "p", f"file://{tmp_path}/j.img")
    os.unlink(tmp_path / "j.img")
    assert "cannot be opened" in vstore("status", "p").stdout
    vstore("volume", "create", "p", "v", "--size", "1M")  # an open for writing goes on
    out = vstore("status", "p").stdout
    assert "warning: journal" in out and "lost at" in out
    assert "journal" in vstore("--help").stdout.split("Commands:")[1]
    assert "attach" in vstore("journal", "--help").stdout


needs_fuse_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")


class FileWriter:
    """Writes random 4 KiB blocks into a volume file in a thread, keeping what fsync acknowledged."""

    def __init__(self, path: Path, size: int, seed: int) -> None:
        self.path, self.size = path, size
        self.rng = random.Random(seed)
        self.model = bytearray(size)  # what was written (acknowledged once fsync returned)
        self.acked = bytearray(size)
        self.acked_mask = bytearray(size // 4096)
        # Blocks written since their last acknowledgement: a crash may leave any of these there.
        self.unacked: dict[int, list[bytes]] = {}
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.writes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
            try:
                pending: list[int] = []
                while not self.stop.is_set():
                    blk = self.rng.randrange(self.size // 4096)
                    data = self.rng.randbytes(4096)
                    os.pwrite(fd, data, blk * 4096)
                    self.model[blk * 4096 : (blk + 1) * 4096] = data
                    self.unacked.setdefault(blk, []).append(data)
                    pending.append(blk)
                    self.writes += 1
                    if len(pending) >= 4:
                        os.fsync(fd)
                        for b in pending:
                            self.acked[b * 4096 : (b + 1) * 4096] = self.model[b * 4096 : (b + 1) * 4096]
                            self.acked_mask[b] = 1
                            self.unacked.pop(b, None)
                        pending = []
            finally:
                os.close(fd)
        except OSError as e:
            self.errors.append(e)

    def check(self, got: bytes) -> None:
        """Every acknowledged block holds what fsync acknowledged, or a write made after it."""
        for b in range(len(self.acked_mask)):
            if self.acked_mask[b]:
                block = got[b * 4096 : (b + 1) * 4096]
                if block != bytes(self.acked[b * 4096 : (b + 1) * 4096]):
                    assert block in self.unacked.get(b, []), f"acknowledged block {b} lost"

    def __enter__(self) -> FileWriter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def _scrub(home: Path) -> tuple[list[int], dict]:
    async def go() -> tuple[list[int], dict]:
        pool = await Pool.open(Home(home), "p", read_only=True)
        try:
            return await verify_parity(pool.layout), pool.status()
        finally:
            await pool.aclose()

    return trio.run(go)


def _wait_for(cond, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.integration
@needs_fuse_root
def test_attach_and_detach_on_a_mounted_pool_under_io(tmp_path: Path) -> None:
    from tests.fuse_helpers import force_unmount

    home, mp = tmp_path / "home", tmp_path / "mnt"
    mp.mkdir()
    members = [f"file://{tmp_path}/m{i}.img" for i in range(4)]
    try:
        _vstore(home, "create", "p", "--level", "raid5", "--size", "24M", "--chunk", "16K", *members)
        _vstore(home, "volume", "create", "p", "v", "--size", "16M")
        _vstore(home, "mount", "p", str(mp))
        with FileWriter(mp / "v", 16 << 20, 1) as w:
            _wait_for(lambda: w.writes > 50)
            out = _vstore(home, "journal", "attach", "p", f"file://{tmp_path}/j1.img", "--size", "8M").stdout
            assert "journal file://" in out
            st = json.loads((mp / ".vstore" / "status").read_text())
            assert st["journal"]["mode"] == "journal" and st["journal"]["state"] == "active"
            n = w.writes
            _wait_for(lambda: w.writes > n + 50)
            _vstore(home, "journal", "attach", "p", f"file://{tmp_path}/j2.img", "--size", "8M")
            n = w.writes
            _wait_for(lambda: w.writes > n + 50)
            assert "journal detached" in _vstore(home, "journal", "detach", "p").stdout
            st = json.loads(_vstore(home, "status", "p", "--json").stdout)
            assert st["journal"]["mode"] == "none"
            n = w.writes
            _wait_for(lambda: w.writes > n + 50)
        assert not w.errors, w.errors
        assert (mp / "v").read_bytes() == bytes(w.model)
        _vstore(home, "umount", str(mp))
        bad, status = _scrub(home)
        assert bad == [] and status["state"] == "clean" and status["journal"]["mode"] == "none"
    finally:
        force_unmount(mp)


@pytest.mark.integration
@needs_fuse_root
@pytest.mark.parametrize("op", ["attach", "detach"])
def test_kill9_of_the_mount_during_a_switch_then_remount(tmp_path: Path, op: str) -> None:
    from fuse_mount.daemon import mounted_pool_socket
    from tests.fuse_helpers import force_unmount
    from vstore.pool import control

    home, mp = tmp_path / "home", tmp_path / "mnt"
    mp.mkdir()
    members = [f"file://{tmp_path}/m{i}.img" for i in range(4)]
    jr = ["--journal", f"file://{tmp_path}/j0.img", "--journal-size", "8M"] if op == "detach" else []
    pid = None
    try:
        _vstore(home, "create", "p", "--level", "raid5", "--size", "24M", "--chunk", "16K", *jr, *members)
        _vstore(home, "volume", "create", "p", "v", "--size", "16M")
        _vstore(home, "mount", "p", str(mp))
        pid = control.call_sync(mounted_pool_socket(home, "p"), {"cmd": "mount-info"})["pid"]
        with FileWriter(mp / "v", 16 << 20, 2) as w:
            _wait_for(lambda: w.writes > 100)
            args = (["journal", "attach", "p", f"file://{tmp_path}/j1.img", "--size", "8M"]
                    if op == "attach" else ["journal", "detach", "p"])
            cmd = subprocess.Popen([sys.executable, "-m", "vstore.cli.main", *args], cwd=REPO,
                                   env={**os.environ, "VSTORE_HOME": str(home), "PYTHONPATH": str(REPO)},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # Kill the mount as the switch runs: once the attach formats its journal, or once
            # the detach command has connected to the control socket.
            deadline = time.monotonic() + 20
            while cmd.poll() is None and time.monotonic() < deadline:
                if (tmp_path / "j1.img").exists() if op == "attach" else _has_socket(cmd.pid):
                    break
                time.sleep(0.0005)
            os.kill(pid, signal.SIGKILL)
            w.stop.set()
        cmd.communicate(timeout=30)
        print(f"{op}: command exit {cmd.returncode}")
        _wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 20)
        force_unmount(mp)
        _wait_for(lambda: mounted_pool_socket(home, "p") is None)
        _vstore(home, "mount", "p", str(mp))  # recovers (replay or resync) before serving
        st = json.loads((mp / ".vstore" / "status").read_text())
        assert st["recovered"] is True
        assert st["journal"]["mode"] in ("journal", "none")
        w.check((mp / "v").read_bytes())
        # The switch can be done (again) now: the pool ends in the mode asked for.
        if (st["journal"]["mode"] == "journal") == (op == "detach"):
            _vstore(home, *args)
        _vstore(home, "umount", str(mp))
        bad, status = _scrub(home)
        assert bad == [] and status["state"] == "clean"
        assert status["journal"]["mode"] == ("journal" if op == "attach" else "none")
    finally:
        if pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for rec_path in (home / "mounts").glob("*.json"):
            with contextlib.suppress(Exception):
                os.kill(json.loads(rec_path.read_text())["pid"], signal.SIGKILL)
        force_unmount(mp)


def _has_socket(pid: int) -> bool:
    """Whether process pid has a socket open (the CLI's connection to the control socket)."""
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    return True
    return False
