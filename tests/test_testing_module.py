"""vstore.testing as a product: strategies, state machines, fault wrappers and the torture engine.

The pool state machine runs over every RAID level with memory members, with and
without a journal; a user-style device (a write-back cache) passes the device
state machine; deliberately broken layers (flushes dropped under the journal,
under the members, or inside a cache) are caught by the state machines and by
the campaign engine within a bounded number of examples, and the engine's shrunk
schedule fails again when replayed.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Flaky

from vstore.stack.device import Buffer, DeviceBase, as_u8
from vstore.testing import (
    DropFlushes,
    Rig,
    device_state_machine,
    pool_state_machine,
)
from vstore.testing import strategies as vs
from vstore.testing.torture import (
    Campaign,
    CheckFailed,
    Op,
    PoolTarget,
    Runner,
    Shape,
    format_schedule,
    parse_schedule,
    run_schedule,
)

FAST = settings(max_examples=5, stateful_step_count=10, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
HUNT = settings(FAST, max_examples=60, stateful_step_count=15, phases=[Phase.generate],
                derandomize=True)  # the same examples every run: caught once, caught always

CASES = [(level, False) for level in ("linear", "raid0", "raid1", "raid5", "raid6", "raid10")]
CASES += [(level, True) for level in ("raid1", "raid5", "raid6", "raid10")]


def _run(machine: type) -> None:
    machine.TestCase().runTest()


# ---------------------------------------------------------------------------- pools


@pytest.mark.parametrize(("level", "journal"), CASES,
                         ids=[f"{lv}-{'journal' if j else 'bitmap'}" for lv, j in CASES])
def test_pool_machine_every_level(level: str, journal: bool) -> None:
    """Workload, member failures and rebuilds, crashes anywhere: all checks pass."""
    m = pool_state_machine(level, journal=journal, rows=6, settings=FAST)
    _run(m)


def test_pool_machine_catches_a_journal_that_skips_its_flush() -> None:
    """The journal's flushes dropped: acknowledged writes are lost in a crash, and it is seen."""
    m = pool_state_machine("raid5", journal=True, wrap=DropFlushes, wrap_journal_only=True,
                           failures=False, rows=4, settings=HUNT)
    with pytest.raises((CheckFailed, Flaky)):
        _run(m)


async def test_campaign_catches_members_that_drop_flushes() -> None:
    """Without a journal, flushed data must survive a crash; members that drop flushes lose it."""
    rig = await _memory_rig("raid6", 5, journal=False, wrap=DropFlushes)
    shape = Shape(window=4 * 12288, level="raid6", members=5, redundancy=2, row=12288)

    async def make() -> Runner:
        return Runner(PoolTarget(rig, "raid6"), window=shape.window)

    try:
        camp = Campaign(make, shape, seed=5, seconds=30, crashes=True, failures=False,
                        max_rounds=30, shrink_budget=2)
        failure = await camp.run()
        assert failure is not None and failure.outcome.check in "ab"
        kinds = [op.kind for op in failure.minimal]
        assert "f" in kinds and kinds[-1] == "crash", format_schedule(failure.minimal)
    finally:
        await rig.aclose()


# ---------------------------------------------------------------------------- a user's device


class WriteBackCache(DeviceBase):
    """A user's layer: writes stay in RAM until flush (a correct write-back cache)."""

    def __init__(self, inner, *, flush_through: bool = True) -> None:
        self.inner = inner
        self.size, self.block_size = inner.size, inner.block_size
        self.dirty: list[tuple[int, np.ndarray]] = []  # (offset, bytes), in write order
        self.flush_through = flush_through

    async def read(self, offset: int, length: int) -> np.ndarray:
        out = np.asarray(await self.inner.read(offset, length)).copy()
        for off, buf in self.dirty:
            a, b = max(off, offset), min(off + len(buf), offset + length)
            if a < b:
                out[a - offset : b - offset] = buf[a - off : b - off]
        return out

    async def write(self, offset: int, data: Buffer) -> None:
        self.check(offset, len(as_u8(data)))
        self.dirty.append((offset, as_u8(data).copy()))

    async def flush(self) -> None:
        for off, buf in self.dirty:
            await self.inner.write(off, buf)
        self.dirty.clear()
        if self.flush_through:
            await self.inner.flush()

    async def discard(self, offset: int, length: int) -> None:
        await self.flush()
        await self.inner.discard(offset, length)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_device_machine_on_a_users_cache() -> None:
    """The ten-line use: a write-back cache over a recorded member, crashes included."""
    TestCache = device_state_machine(lambda backing: WriteBackCache(backing.devices[0]),
                                     size=256 << 10, settings=FAST)
    _run(TestCache)


def test_device_machine_catches_a_cache_that_forgets_the_device_flush() -> None:
    """The cache writes back on flush but never flushes the device below: caught after a crash."""
    m = device_state_machine(lambda b: WriteBackCache(b.devices[0], flush_through=False),
                             size=16 << 10, settings=settings(HUNT, max_examples=300))
    with pytest.raises((CheckFailed, Flaky)):
        _run(m)


def test_device_machine_without_backing() -> None:
    """A factory with no arguments: workload and reads against the model, no crashes."""
    from backends.memory import MemoryDevice

    m = device_state_machine(lambda: MemoryDevice(np.zeros(128 << 10, np.uint8)), size=128 << 10,
                             settings=FAST)
    _run(m)


# ---------------------------------------------------------------------------- strategies, schedules


@settings(max_examples=60, deadline=None, database=None)
@given(vs.schedules(100_000, members=4, with_crashes=True, with_failures=True, block_size=512,
                    chunk=4096, row=12288))
def test_schedules_stay_in_bounds_and_round_trip(ops: list[Op]) -> None:
    for op in ops:
        if op.kind in "wrd":
            off, n = op.args[:2]
            assert 0 <= off < 100_000 and 1 <= n and off + n <= 100_000
    assert parse_schedule(format_schedule(ops)) == [Op.parse(str(o)) for o in ops]


def test_bad_schedule_text_is_a_usage_error() -> None:
    from vstore.errors import ConfigError

    for bad in ("w:1", "crash@2:random:1", "zz", "c:1:2"):
        with pytest.raises(ConfigError):
            parse_schedule(bad)


# ---------------------------------------------------------------------------- the campaign engine


async def _memory_rig(level: str, n: int, *, journal: bool, wrap=None, journal_only=False) -> Rig:
    rig = Rig(wrap=wrap, wrap_only={"j"} if journal_only else None)
    for i in range(n):
        rig.add_memory(f"m{i}", 8 << 20)
    if journal:
        rig.add_memory("j", 4 << 20)
    await rig.start()
    return rig


async def test_campaign_catches_a_broken_journal_and_its_replay_fails_again() -> None:
    rig = await _memory_rig("raid5", 4, journal=True, wrap=DropFlushes, journal_only=True)
    shape = Shape(window=12 * 12288, level="raid5", members=4, redundancy=1, row=12288,
                  journal=True)

    async def make() -> Runner:
        return Runner(PoolTarget(rig, "raid5", journal=True), window=shape.window)

    try:
        camp = Campaign(make, shape, seed=7, seconds=30, crashes=True, failures=False,
                        max_rounds=40, shrink_budget=10)
        failure = await camp.run()
        assert failure is not None, "40 rounds never noticed that the journal is not flushed"
        assert failure.outcome.check in "ab"
        assert len(failure.minimal) <= len(failure.schedule)
        again = await run_schedule(make, parse_schedule(format_schedule(failure.minimal)))
        assert not again.ok and again.check == failure.outcome.check
    finally:
        await rig.aclose()


async def test_campaign_passes_on_a_sound_pool_with_failures_and_crashes() -> None:
    rig = await _memory_rig("raid6", 5, journal=True)
    shape = Shape(window=8 * 12288, level="raid6", members=5, redundancy=2, row=12288,
                  journal=True)

    async def make() -> Runner:
        return Runner(PoolTarget(rig, "raid6", journal=True, rebuild=False), window=shape.window)

    try:
        camp = Campaign(make, shape, seed=11, seconds=3, crashes=True, failures=True, max_rounds=8)
        failure = await camp.run()
        assert failure is None, failure and failure.outcome.message
        assert camp.stats.crashes > 0 and camp.stats.failures > 0
    finally:
        await rig.aclose()


async def test_known_replay_after_rebuild() -> None:
    """Found by vstore torture: member 0 fails, the array is written degraded, member 0 is
    rebuilt, and a crash follows; the replay brought back pre-rebuild records (row 7's parity).
    Fixed: with a journal the layout logs parity even for a lost parity member."""
    rig = await _memory_rig("raid5", 4, journal=True)

    async def make() -> Runner:
        return Runner(PoolTarget(rig, "raid5", journal=True), window=8 * 12288)

    try:
        out = await run_schedule(make, parse_schedule(
            "x:0,w:12288:10739:53304,w:65536:27764:45920,h:0,w:54742:1024:50355,"
            "crash@0.077:keep:42616"))
        assert out.ok, out.message
    finally:
        await rig.aclose()


async def test_known_discard_diverges_mirrors() -> None:
    """Found by the pool state machine: a crash after a discard left one copy discarded.
    Fixed: under a journal, mirrors drop discards (they are advisory)."""
    rig = await _memory_rig("raid1", 2, journal=True)

    async def make() -> Runner:
        return Runner(PoolTarget(rig, "raid1", journal=True), window=12 * 4096)

    try:
        out = await run_schedule(make, parse_schedule(
            "w:0:7806:65535,r:23512:1,crash@0.357:keep:5052,crash@0:keep:2,d:1398:2,w:0:2:25022,"
            "w:41966:444:441,c:724:2:496+3978:71:23867,crash@0.357:random:245"))
        assert out.ok, out.message
    finally:
        await rig.aclose()


async def test_rig_crash_writes_back_only_what_changed() -> None:
    """Over a non-memory device the crash writes the differing pages, then flushes."""
    from backends.memory import MemoryDevice
    from vstore.testing.fault_device import FaultDevice

    inner = FaultDevice(MemoryDevice(np.zeros(1 << 20, np.uint8)))
    rig = Rig()
    rig.add("m", inner)
    await rig.start()
    try:
        h = rig.handle("m")
        await h.write(4096, np.full(100, 7, np.uint8))
        await h.flush()
        await h.write(300_000, np.full(10, 9, np.uint8))  # unflushed: dropped below
        before = inner.ops["write"]
        await rig.crash(len(rig.events), "drop", random.Random(1))
        assert inner.ops["write"] - before == 1  # one 64 KiB page differs
        got = np.asarray(await rig.handle("m").read(0, 1 << 20))
        assert (got[4096:4196] == 7).all() and not got[300_000:300_010].any()
        with pytest.raises(Exception, match="crashed"):
            await h.read(0, 1)
    finally:
        await rig.aclose()


def test_trio_is_not_left_seeded_oddly() -> None:
    """run_schedule seeds trio's scheduler; plain trio.run still works afterwards."""
    assert trio.run(trio.sleep, 0) is None


async def test_rig_corrupt_read_and_slow_member() -> None:
    """A corrupt read from a member is silent to raid5 (no checksums): the read check sees it;
    a slow member only delays (here under trio's real clock, by milliseconds)."""
    rig = await _memory_rig("raid5", 3, journal=False)
    runner = Runner(PoolTarget(rig, "raid5"), window=4 * 8192)
    try:
        await runner.start()
        await runner.apply(Op.parse("w:0:8192:1"))
        rig.slow("m1", 0.002)
        await runner.apply(Op.parse("r:0:8192"))
        rig.heal("m1")
        rig.corrupt("m0")  # its next read returns inverted bytes
        with pytest.raises(CheckFailed, match=r"\(a\) read"):
            await runner.apply(Op.parse("r:0:8192"))
    finally:
        await runner.target.close()
        await rig.aclose()


class _VectoredMemory(DeviceBase):
    """A memory device that counts the vectored requests reaching it natively."""

    def __init__(self, size: int) -> None:
        from backends.memory import MemoryDevice

        self.mem = MemoryDevice(np.zeros(size, np.uint8))
        self.store, self.size, self.block_size = self.mem.store, size, 512
        self.readvs = self.writevs = self.writes = 0

    async def read(self, offset: int, length: int) -> np.ndarray:
        return await self.mem.read(offset, length)

    async def write(self, offset: int, data: Buffer) -> None:
        self.writes += 1
        await self.mem.write(offset, data)

    async def readv_into(self, offset: int, views: list) -> None:
        self.readvs += 1
        await self.mem.readv_into(offset, views)

    async def writev(self, offset: int, views: list) -> None:
        self.writevs += 1
        await self.mem.writev(offset, views)

    async def flush(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_wrappers_forward_vectored_io_and_keep_their_semantics() -> None:
    """Fault, slow, drop-flush, crash and counting wrappers: vectored I/O still injects, records, counts."""
    from vstore.ops.move import CountingDevice
    from vstore.testing import SlowDevice
    from vstore.testing.crash import CrashDevice, CrashRecorder, WriteEvent
    from vstore.testing.fault_device import FaultDevice

    data = np.arange(3000, dtype=np.uint16).astype(np.uint8)
    size = 1 << 16

    def views_of(buf: np.ndarray) -> list[np.ndarray]:
        return [buf[:100], buf[100:1700], buf[1700:]]

    for wrap in (FaultDevice, SlowDevice, DropFlushes, CountingDevice):
        inner = _VectoredMemory(size)
        dev = wrap(inner)
        await dev.writev(512, views_of(data))
        out = np.zeros(3000, np.uint8)
        await dev.readv_into(512, views_of(out))
        assert np.array_equal(out, data) and np.array_equal(inner.store[512:3512], data)
        assert (inner.readvs, inner.writevs, inner.writes) == (1, 1, 0), wrap  # forwarded as such

    inner = _VectoredMemory(size)
    f = FaultDevice(inner)
    f.corrupt_reads(count=1)
    await f.writev(0, views_of(data))
    out = np.zeros(3000, np.uint8)
    await f.readv_into(0, views_of(out))
    assert np.array_equal(out, data ^ 0xFF)  # corrupted, as read would be
    f.fail("read", count=1)
    with pytest.raises(Exception, match="injected read failure"):
        await f.readv_into(0, views_of(out))
    f.fail("write", count=1, torn=True)
    with pytest.raises(Exception, match="injected write failure"):
        await f.writev(8192, views_of(data))
    assert np.array_equal(inner.store[8192:9692], data[:1500]) and not inner.store[9692:11192].any()
    assert f.ops["read"] == 2 and f.ops["write"] == 2 and f.faults_hit == 3

    rec = CrashRecorder("vec-wrappers")
    try:
        rec.add_memory("m", size)
        await rec.start()
        h = CrashDevice(rec, "m")
        await h.writev(1024, views_of(data))
        [ev] = [e for e in rec.events if isinstance(e, WriteEvent)]
        assert ev.offset == 1024 and np.array_equal(ev.data, data)  # recorded as one write
        out = np.zeros(3000, np.uint8)
        await h.readv_into(1024, views_of(out))
        assert np.array_equal(out, data)
        await rec.crash()  # nothing was flushed: the write is gone, the handle is dead
        with pytest.raises(Exception, match="crashed"):
            await h.readv_into(1024, views_of(out))
        assert not (await CrashDevice(rec, "m").read(1024, 3000)).any()
    finally:
        rec.forget()


async def test_short_read_and_shrink_faults():
    """FaultDevice.short_reads / shrink, and a raid5 that serves a shrunk member's bytes from redundancy."""
    import numpy as np

    from backends.memory import MemoryDevice
    from vstore.errors import MemberIOError
    from vstore.raid import make_layout
    from vstore.testing.fault_device import FaultDevice
    from vstore.testing.torture import format_schedule, parse_schedule

    f = FaultDevice(MemoryDevice(np.zeros(1 << 20, np.uint8)), "m")
    f.shrink(at=256 * 1024)
    await f.read(0, 4096)  # below the end: fine
    with pytest.raises(MemberIOError, match="short read .*ends at 262144"):
        await f.read(250 * 1024, 16 * 1024)
    with pytest.raises(MemberIOError, match="short write"):
        await f.write(512 * 1024, b"x" * 512)
    f.heal()
    f.short_reads(count=1)
    with pytest.raises(MemberIOError, match="short read"):
        await f.read(0, 512)
    await f.read(0, 512)  # count=1: only once

    members = [FaultDevice(MemoryDevice(np.zeros(1 << 20, np.uint8)), f"m{i}") for i in range(4)]
    lay = make_layout("raid5", members, chunk=4096)
    data = np.random.default_rng(5).integers(0, 256, lay.size, dtype=np.uint8)
    await lay.write(0, data)
    members[2].shrink(at=300 * 1024)
    assert np.array_equal(await lay.read(0, lay.size), data)
    assert lay.failed == {2}

    steps = "x:1,x:2:short:0.5,x:0:shrink:0.25,h:1"
    assert format_schedule(parse_schedule(steps)) == steps


@pytest.mark.parametrize("journal", [False, True], ids=["bitmap", "journal"])
async def test_a_crash_after_a_crash_cuts_into_the_recovery(journal: bool) -> None:
    """The recovery (resync or replay) is the step a second crash cuts: its member writes are
    the ones a power failure during recovery may lose, and the pool must still recover."""
    rig = await _memory_rig("raid5", 4, journal=journal)
    runner = Runner(PoolTarget(rig, "raid5", journal=journal), window=8 * 12288)
    try:
        await runner.start()
        for op in parse_schedule("w:0:30000:1,w:40000:20000:2,w:70000:9000:3,crash@0.6:keep:1"):
            await runner.apply(op)
        a, b = runner.last
        assert runner.last_kind == "recover" and b > a, "the recovery wrote nothing to cut into"
        kinds = {type(e).__name__ for e in rig.events[a:b]}
        assert "WriteEvent" in kinds, kinds
        for frac in (0.3, 0.7):  # power fails during that recovery, twice
            await runner.apply(Op.parse(f"crash@{frac}:random:7"))
        assert runner.stats.crashes == 3 and runner.stats.skipped_crashes == 0
        await runner.finish()
    finally:
        rig.heal()
        await rig.aclose()


@pytest.mark.parametrize(("level", "n"), [("raid5", 4), ("raid1", 2)])
@pytest.mark.parametrize("frac", [0.2, 0.5, 0.9])
async def test_crashes_during_a_move_and_a_journal_switch(level: str, n: int, frac: float) -> None:
    """Torture's m and j steps: the power fails inside a move, a journal attach and a detach
    (and inside the recovery that resumes the move); every check holds after each."""
    rig = await _memory_rig(level, n, journal=True)
    rig.add_memory("s0", 8 << 20)
    await rig.start()
    runner = Runner(PoolTarget(rig, level, journal=False), window=8 * 12288)
    sched = parse_schedule(
        f"w:0:40000:1,f,w:50000:9000:2,m:1,crash@{frac}:random:3,crash@{frac}:keep:4,"
        f"w:20000:30000:5,j:1,crash@{frac}:random:6,w:1000:5000:7,j:0,crash@{frac}:random:8,"
        "w:7000:20000:9,r:0:90000")
    try:
        await runner.start()
        for op in sched:
            await runner.apply(op)
        st = runner.stats
        assert st.moves == 1 and st.switches == 2 and st.crashes == 4 and st.skipped_crashes == 0
        # The move finished (resumed after the crash when it cut it short).
        assert runner.target.members[1] == "s0"
        await runner.finish()
    finally:
        rig.heal()
        await rig.aclose()
