"""RAID layouts over memory members: random I/O against a model, degraded mode, member failures."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import trio

from backends.memory import MemoryDevice
from vstore.errors import ConfigError, DegradedError, MemberIOError, OutOfRangeError
from vstore.raid import geometry, make_layout
from vstore.stack.offset import OffsetDevice
from vstore.testing.fault_device import FaultDevice

CHUNK = 4096

# (level, member count) pairs covering the smallest, odd and even counts.
CASES = [
    ("linear", 1), ("linear", 3),
    ("raid0", 1), ("raid0", 3),
    ("raid1", 2), ("raid1", 3),
    ("raid5", 3), ("raid5", 4), ("raid5", 5),
    ("raid6", 4), ("raid6", 5), ("raid6", 6),
    ("raid10", 2), ("raid10", 3), ("raid10", 4),
]
IDS = [f"{lvl}-{n}" for lvl, n in CASES]


def build(level, n, *, rows=12, chunk=CHUNK, failed=(), on_failed=None, delay=0.0):
    """A layout over FaultDevice-wrapped memory members (linear gets mixed sizes)."""
    sizes = [rows * chunk + (i * 1536 if level == "linear" else 0) for i in range(n)]
    members = [FaultDevice(MemoryDevice(np.zeros(s, np.uint8)), f"m{i}", delay) for i, s in enumerate(sizes)]
    lay = make_layout(level, members, chunk=chunk, failed=set(failed), on_member_failed=on_failed)
    return lay, members


def failure_sets(level, n):
    """Every set of failed members the level must survive (capped to keep tests quick)."""
    out = []
    for f in range(1, n + 1):
        for s in itertools.combinations(range(n), f):
            if geometry.survives(level, n, set(s)):
                out.append(set(s))
    return out[:12]


def fatal_set(level, n):
    """A set of failed members the level cannot survive."""
    if level == "raid10":
        return {0, 1}
    return set(range(geometry.redundancy(level, n) + 1))


async def random_io(lay, model, rng, ops, max_len=None):
    max_len = max_len or 3 * lay.size // 4
    for _ in range(ops):
        off = int(rng.integers(0, lay.size))
        ln = int(rng.integers(0, min(lay.size - off, max_len) + 1))
        if rng.random() < 0.5:
            data = rng.integers(0, 256, ln, dtype=np.uint8)
            await lay.write(off, data)
            model[off : off + ln] = data
        else:
            got = await lay.read(off, ln)
            assert got.dtype == np.uint8 and len(got) == ln
            assert np.array_equal(got, model[off : off + ln]), f"read {off}+{ln}"


async def check_all(lay, model):
    assert np.array_equal(await lay.read(0, lay.size), model)


@pytest.mark.parametrize(("level", "n"), CASES, ids=IDS)
async def test_random_io_matches_model(level, n):
    lay, _ = build(level, n)
    rng = np.random.default_rng(n)
    model = np.zeros(lay.size, np.uint8)
    assert lay.state == "clean" and lay.level == level and lay.chunk == CHUNK
    await random_io(lay, model, rng, 150, max_len=5 * CHUNK)
    await random_io(lay, model, rng, 20)
    await check_all(lay, model)
    await lay.flush()
    assert len(await lay.read(0, 0)) == 0 and len(await lay.read(lay.size, 0)) == 0
    # Writes from bytes and bytearray, too.
    await lay.write(5, b"hello")
    await lay.write(lay.size - 3, bytearray(b"end"))
    model[5:10] = np.frombuffer(b"hello", np.uint8)
    model[-3:] = np.frombuffer(b"end", np.uint8)
    await check_all(lay, model)
    await lay.aclose()


@pytest.mark.parametrize(("level", "n"), CASES, ids=IDS)
async def test_degraded_reads_and_writes(level, n):
    for failed in failure_sets(level, n):
        lay, members = build(level, n, rows=6)
        rng = np.random.default_rng(len(failed) * 7 + n)
        model = rng.integers(0, 256, lay.size, dtype=np.uint8)
        await lay.write(0, model)
        for i in failed:
            lay.fail_member(i)
        assert lay.state == "degraded"
        before = [dict(m.ops) for m in members]
        await check_all(lay, model)
        await random_io(lay, model, rng, 60, max_len=3 * CHUNK)
        await check_all(lay, model)
        # The failed members were left alone.
        for i in failed:
            assert members[i].ops == before[i]


@pytest.mark.parametrize(("level", "n"), CASES, ids=IDS)
async def test_degraded_writes_then_each_survivor_set_reads_right(level, n):
    """Writes made while degraded keep parity right for every later failure the level survives."""
    for failed in failure_sets(level, n)[:4]:
        lay, members = build(level, n, rows=5)
        rng = np.random.default_rng(n)
        model = rng.integers(0, 256, lay.size, dtype=np.uint8)
        await lay.write(0, model)
        first = sorted(failed)[0]
        lay.fail_member(first)
        await random_io(lay, model, rng, 40, max_len=2 * CHUNK)
        for more in failure_sets(level, n):
            if first in more:
                again = make_layout(level, members, chunk=CHUNK, failed=more)
                await check_all(again, model)


@pytest.mark.parametrize(("level", "n"), CASES, ids=IDS)
async def test_beyond_redundancy_raises(level, n):
    lay, _ = build(level, n, rows=4)
    await lay.write(0, np.ones(lay.size, np.uint8))
    for i in fatal_set(level, n):
        lay.fail_member(i)
    assert lay.state == "failed"
    with pytest.raises(DegradedError, match="cannot be returned"):
        await lay.read(0, 10)
    with pytest.raises(DegradedError):
        await lay.write(0, b"x")
    with pytest.raises(DegradedError):
        await lay.flush()


@pytest.mark.parametrize(("level", "n"), [c for c in CASES if c[0] not in ("linear", "raid0")], ids=lambda c: str(c))
@pytest.mark.parametrize("kind", ["read", "write", "all"])
async def test_member_error_mid_io_marks_failed_and_succeeds(level, n, kind):
    seen = []

    async def on_failed(i, exc):
        assert isinstance(exc, MemberIOError)
        seen.append(i)

    lay, members = build(level, n, rows=8, on_failed=on_failed)
    rng = np.random.default_rng(3)
    model = rng.integers(0, 256, lay.size, dtype=np.uint8)
    await lay.write(0, model)
    victim = n - 1
    members[victim].fail(kind, after=2)
    await random_io(lay, model, rng, 40, max_len=3 * CHUNK)
    await check_all(lay, model)
    assert seen == [victim] and lay.failed == {victim} and lay.state == "degraded"
    # Beyond redundancy, every further error is a DegradedError, never wrong data.
    for i in range(n):
        members[i].fail("all")
    with pytest.raises(DegradedError):
        await lay.read(0, lay.size)
    with pytest.raises(DegradedError):
        await lay.write(0, b"abc")


@pytest.mark.parametrize(("level", "n"), [("linear", 2), ("raid0", 3)])
async def test_no_redundancy_member_error_is_degraded_error(level, n):
    seen = []
    lay, members = build(level, n, rows=4, on_failed=lambda i, e: seen.append(i))
    members[1].fail("read")
    with pytest.raises(DegradedError):
        await lay.read(0, lay.size)
    assert seen == [1] and lay.state == "failed"


async def test_member_write_error_mid_stripe_keeps_parity_right():
    """A member dying during a stripe update: the survivors hold a consistent stripe."""
    for level, n in [("raid5", 4), ("raid6", 5)]:
        for victim in range(n):
            for torn in (False, True):
                lay, members = build(level, n, rows=4)
                rng = np.random.default_rng(victim)
                model = rng.integers(0, 256, lay.size, dtype=np.uint8)
                await lay.write(0, model)
                members[victim].fail("write", torn=torn)
                # Partial chunks at both ends: every member of row 0 is written.
                ln = lay.k * CHUNK
                new = rng.integers(0, 256, ln, dtype=np.uint8)
                await lay.write(2000, new)
                model[2000 : 2000 + ln] = new
                assert lay.failed == {victim}
                await check_all(lay, model)


async def test_read_modify_write_vs_reconstruct_write_by_cost():
    lay, members = build("raid5", 5, rows=4)  # k = 4
    reads = lambda: sum(m.ops["read"] for m in members)  # noqa: E731
    # One small write: read-modify-write reads old data + P.
    await lay.write(100, b"x" * 10)
    assert reads() == 2
    # Three of four chunks: reconstruct-write reads only the fourth.
    before = reads()
    await lay.write(0, np.ones(3 * CHUNK, np.uint8))
    assert reads() - before == 1
    # A full stripe: no reads at all.
    before = reads()
    await lay.write(4 * CHUNK, np.ones(4 * CHUNK, np.uint8))
    assert reads() == before
    lay6, members6 = build("raid6", 6, rows=4)  # k = 4
    await lay6.write(100, b"y" * 10)
    assert sum(m.ops["read"] for m in members6) == 3  # old data, P, Q


async def test_long_kernels_run_in_a_worker_thread(monkeypatch):
    from vstore.raid import base

    calls = []
    real = trio.to_thread.run_sync

    async def counting(fn, *args, **kw):
        calls.append(fn.__name__)
        return await real(fn, *args, **kw)

    monkeypatch.setattr(base, "KERNEL_THREAD_BYTES", 3 * CHUNK)
    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    for level, n in [("raid5", 5), ("raid6", 6)]:
        lay, _ = build(level, n, rows=3)
        rng = np.random.default_rng(0)
        model = rng.integers(0, 256, lay.size, dtype=np.uint8)
        await lay.write(0, model)  # full stripes: parity in a thread
        lay.fail_member(1)
        await check_all(lay, model)  # reconstruction of whole rows: in a thread
        await lay.write(10, b"small")  # small: inline
        model[10:15] = np.frombuffer(b"small", np.uint8)
        await check_all(lay, model)
    # Full stripes: all rows' parity in one call (the whole request's); reconstruction.
    assert "_parity_of_rows" in calls and ("recover" in calls)


@pytest.mark.parametrize(("level", "n"), [("raid5", 4), ("raid6", 5), ("raid1", 3), ("raid10", 3)])
async def test_concurrent_writes_to_one_stripe_keep_redundancy(level, n):
    """Many writers in the same rows at once (members slowed to interleave them)."""
    lay, members = build(level, n, rows=3, delay=0.001)
    model = np.zeros(lay.size, np.uint8)
    rng = np.random.default_rng(1)
    pieces = []
    for off in range(0, lay.size - 1500, 1500):
        data = rng.integers(0, 256, 1500, dtype=np.uint8)
        pieces.append((off, data))
        model[off : off + 1500] = data
    async with trio.open_nursery() as nursery:
        for off, data in pieces:
            nursery.start_soon(lay.write, off, data)
    await check_all(lay, model)
    assert not lay._locks  # locks are dropped when unused
    for failed in failure_sets(level, n):
        again = make_layout(level, members, chunk=CHUNK, failed=failed)
        await check_all(again, model)


async def test_concurrent_degraded_reads_and_writes():
    lay, members = build("raid6", 5, rows=4, delay=0.0005)
    lay.fail_member(0)
    lay.fail_member(3)
    model = np.zeros(lay.size, np.uint8)
    rng = np.random.default_rng(9)
    async with trio.open_nursery() as nursery:
        for off in range(0, lay.size - 2000, 2000):
            data = rng.integers(0, 256, 2000, dtype=np.uint8)
            model[off : off + 2000] = data
            nursery.start_soon(lay.write, off, data)
            nursery.start_soon(lay.read, off, 2000)
    await check_all(lay, model)


async def test_raid1_reads_are_balanced():
    lay, members = build("raid1", 3, rows=16)
    for i in range(30):
        await lay.read((i % 16) * CHUNK, 512)
    counts = [m.ops["read"] for m in members]
    assert all(c == 10 for c in counts), counts
    await lay.read(0, lay.size)  # a large read is split across the mirrors
    assert all(m.ops["read"] > c for m, c in zip(members, counts, strict=True))


async def test_member_bytes_of_raid0_raid10_linear():
    lay, members = build("raid0", 3, rows=4)
    data = np.arange(lay.size, dtype=np.uint32).view(np.uint8)[: lay.size]
    await lay.write(0, data)
    for c in range(lay.size // CHUNK):
        m, row = c % 3, c // 3
        assert np.array_equal(members[m].inner.store[row * CHUNK : (row + 1) * CHUNK], data[c * CHUNK : (c + 1) * CHUNK])
    lay, members = build("raid10", 3, rows=4)
    data = np.random.default_rng(0).integers(0, 256, lay.size, dtype=np.uint8)
    await lay.write(0, data)
    for c in range(lay.size // CHUNK):
        for d in (2 * c, 2 * c + 1):
            m, row = d % 3, d // 3
            assert np.array_equal(members[m].inner.store[row * CHUNK : (row + 1) * CHUNK], data[c * CHUNK : (c + 1) * CHUNK])
    lay, members = build("linear", 3, rows=2)
    assert lay.size == sum(m.size for m in members)
    data = np.random.default_rng(1).integers(0, 256, lay.size, dtype=np.uint8)
    await lay.write(0, data)
    assert np.array_equal(np.concatenate([m.inner.store for m in members]), data)


@pytest.mark.parametrize(("level", "n"), CASES, ids=IDS)
async def test_discard_and_flush(level, n):
    lay, members = build(level, n, rows=4)
    model = np.full(lay.size, 7, np.uint8)
    await lay.write(0, model)
    await lay.discard(CHUNK, 2 * CHUNK)
    got = await lay.read(0, lay.size)
    if level in ("raid5", "raid6"):
        assert np.array_equal(got, model)  # parity levels keep the data
    else:
        model[CHUNK : 3 * CHUNK] = 0
        assert np.array_equal(got, model)
    await lay.flush()
    assert all(m.ops["flush"] == 1 for m in members)
    if lay.redundancy:
        members[0].fail("flush")
        await lay.flush()
        assert lay.failed == {0}
        assert np.array_equal(await lay.read(0, lay.size), model)


async def test_out_of_range_and_block_size():
    members = [MemoryDevice(np.zeros(8 * CHUNK, np.uint8), block_size=bs) for bs in (512, 4096, 512)]
    lay = make_layout("raid5", members, chunk=CHUNK)
    assert lay.block_size == 4096 and lay.size == 16 * CHUNK
    with pytest.raises(OutOfRangeError):
        await lay.read(lay.size - 1, 2)
    with pytest.raises(OutOfRangeError):
        await lay.write(-1, b"a")
    assert len(await lay.read(lay.size, 0)) == 0
    await lay.write(lay.size, b"")
    await lay.aclose()
    assert all(m.closed for m in members)


async def test_offset_device_window():
    inner = MemoryDevice(np.zeros(64 * 1024, np.uint8))
    win = OffsetDevice(inner, 8192, 16384)
    assert win.size == 16384 and win.block_size == 512
    await win.write(10, b"abc")
    assert bytes(inner.store[8202:8205]) == b"abc"
    assert bytes(await win.read(10, 3)) == b"abc"
    await win.discard(0, 512)
    assert not inner.store[8192 : 8192 + 512].any()
    with pytest.raises(OutOfRangeError):
        await win.read(16380, 5)
    with pytest.raises(ConfigError):
        OffsetDevice(inner, 60000, 8192)
    with pytest.raises(ConfigError):
        OffsetDevice(inner, 100, 512)
    assert OffsetDevice(inner, 4096).size == 60 * 1024
    assert win.identity().endswith("@8192+16384")
    await win.flush()
    await win.aclose()
    assert inner.closed
    # A layout over windows: the area before each window is left alone.
    stores = [np.zeros(20 * CHUNK, np.uint8) for _ in range(3)]
    lay = make_layout("raid5", [OffsetDevice(MemoryDevice(s), 4 * CHUNK) for s in stores], chunk=CHUNK)
    data = np.random.default_rng(0).integers(1, 256, lay.size, dtype=np.uint8)
    await lay.write(0, data)
    assert all(not s[: 4 * CHUNK].any() and s[4 * CHUNK :].any() for s in stores)
    assert np.array_equal(await lay.read(0, lay.size), data)


async def test_fault_device_rules():
    f = FaultDevice(MemoryDevice(np.zeros(8192, np.uint8)), "disk")
    f.fail("write", after=1, count=1)
    await f.write(0, b"a")
    with pytest.raises(MemberIOError, match="disk: injected write failure"):
        await f.write(0, b"b")
    await f.write(1, b"c")
    assert bytes(await f.read(0, 2)) == b"ac"
    f.corrupt_reads(count=1)
    assert bytes(await f.read(0, 2)) == bytes([0xFF ^ ord("a"), 0xFF ^ ord("c")])
    assert bytes(await f.read(0, 2)) == b"ac"
    f.fail("all")
    for op in (f.read(0, 1), f.flush(), f.discard(0, 512), f.write(0, b"z")):
        with pytest.raises(MemberIOError):
            await op
    f.heal()
    await f.flush()
    f.fail("write", torn=True)
    with pytest.raises(MemberIOError):
        await f.write(0, b"WXYZ")
    assert bytes(await f.read(0, 4)) == b"WX\0\0"
    assert f.ops["write"] == 5 and f.faults_hit == 7
    with pytest.raises(ConfigError):
        f.fail("frobnicate")


@pytest.mark.parametrize(("level", "n"), [c for c in CASES if c[0] not in ("linear", "raid0")], ids=lambda c: str(c))
async def test_member_bytes_recompute_each_member(level, n):
    """member_bytes(i) (the rebuild primitive) equals member i's bytes, without reading it."""
    lay, members = build(level, n, rows=5)
    rng = np.random.default_rng(n)
    await lay.write(0, rng.integers(0, 256, lay.size, dtype=np.uint8))
    await lay.write(777, rng.integers(0, 256, 5000, dtype=np.uint8))
    for i in range(n):
        before = members[i].ops["read"]
        msize = members[i].size
        got = await lay.member_bytes(i, 0, msize)
        assert np.array_equal(got, members[i].inner.store[:msize]), f"member {i}"
        assert members[i].ops["read"] == before
        part = await lay.member_bytes(i, 1000, 6000)
        assert np.array_equal(part, members[i].inner.store[1000:7000])
    # Still computable with other members failed, within redundancy.
    for failed in failure_sets(level, n):
        again = make_layout(level, members, chunk=CHUNK, failed=failed)
        for i in range(n):
            if i not in failed and geometry.survives(level, n, failed | {i}):
                assert np.array_equal(await again.member_bytes(i, 0, members[i].size), members[i].inner.store)
            elif i not in failed:
                with pytest.raises(DegradedError):
                    await again.member_bytes(i, 0, 10)


async def test_member_bytes_without_redundancy_and_bad_index():
    lay, _ = build("raid0", 2, rows=2)
    with pytest.raises(DegradedError):
        await lay.member_bytes(0, 0, 10)
    with pytest.raises(ConfigError):
        await lay.member_bytes(5, 0, 10)
    lay, _ = build("raid5", 3, rows=2)
    with pytest.raises(OutOfRangeError):
        await lay.member_bytes(0, 0, 3 * CHUNK)


@pytest.mark.parametrize(("level", "n"), [("raid5", 4), ("raid6", 5)])
async def test_verify_row_finds_parity_mismatch(level, n):
    lay, members = build(level, n, rows=4)
    await lay.write(0, np.random.default_rng(0).integers(0, 256, lay.size, dtype=np.uint8))
    assert [await lay.verify_row(r) for r in range(lay.rows)] == [[]] * lay.rows
    dmem, pmem = lay.row_members(2)
    members[pmem[-1]].inner.store[2 * CHUNK + 100] ^= 1
    assert await lay.verify_row(2) == [pmem[-1]]
    members[dmem[0]].inner.store[3 * CHUNK + 5] ^= 1
    assert sorted(await lay.verify_row(3)) == sorted(lay.row_members(3)[1])
    lay.fail_member(dmem[1])
    with pytest.raises(DegradedError):
        await lay.verify_row(2)


@pytest.mark.parametrize(("level", "n"), [("raid1", 2), ("raid10", 4), ("raid0", 2), ("linear", 2)])
async def test_discard_error_fails_the_member(level, n):
    lay, members = build(level, n, rows=4)
    members[1].fail("discard")
    if lay.redundancy:
        await lay.discard(0, lay.size)
        assert lay.failed == {1}
        assert not (await lay.read(0, lay.size)).any()
    else:
        with pytest.raises(DegradedError):
            await lay.discard(0, lay.size)


@pytest.mark.parametrize(("level", "n"), [("raid5", 4), ("raid6", 5), ("raid1", 3), ("raid10", 4)])
async def test_cancelled_write_leaves_redundancy_consistent(level, n):
    """A caller's timeout mid-write: every stripe is old or new, never half of each."""
    for timeout in (0.003, 0.007, 0.012, 0.02):
        lay, members = build(level, n, rows=6)
        rng = np.random.default_rng(int(timeout * 1000))
        await lay.write(0, rng.integers(0, 256, lay.size, dtype=np.uint8))
        for i, m in enumerate(members):
            m.delay = 0.001 * (i + 1)  # unequal members: a cancel lands between their writes
        with trio.move_on_after(timeout):
            await lay.write(100, rng.integers(0, 256, lay.size - 200, dtype=np.uint8))
        if level in ("raid5", "raid6"):
            assert all([await lay.verify_row(r) == [] for r in range(lay.rows)])
        # Every survivable failure set reads the same bytes.
        whole = await lay.read(0, lay.size)
        for failed in failure_sets(level, n):
            again = make_layout(level, members, chunk=CHUNK, failed=failed)
            assert np.array_equal(await again.read(0, lay.size), whole), failed
