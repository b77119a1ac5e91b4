"""Multipath with fake in-memory paths: selectors, failover, checker, no_path_retry, damping, ordering.

Time is trio's MockClock (autojump), so the timing rules are checked exactly and fast.
"""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.vectors import ViewSet
from vstore.errors import ConfigError, MemberIOError, NoPathError, NotFoundError, OutOfRangeError
from vstore.stack.device import DeviceBase, as_u8
from vstore.stack.multipath import MultipathDevice, strip_priority, validate_options
from vstore.uri import parse_uri

SIZE = 1 << 20
BS = 512


class FakePath(DeviceBase):
    """A path to a shared bytearray that can be told to fail, hang, be slow or lose writes late."""

    def __init__(self, store: np.ndarray, ident: str = "fake:lun", *, latency: float = 0.0,
                 rate: float = 0.0) -> None:
        self.store = store
        self.size = len(store)
        self.block_size = BS
        self.ident = ident
        self.mode = "ok"  # ok | error | hang
        self.latency = latency
        self.rate = rate  # bytes/s: latency grows with the size (0: none)
        self.ios = self.bytes = self.probes = self.flushes = 0
        self.late_nursery: trio.Nursery | None = None  # lost writes land late when set
        self.late_delay = 1.0
        self.pending: list[list] = []
        self.closed = False
        self.inflight = self.max_inflight = 0
        self.vios = 0  # vectored requests (readv_into / writev) that reached this path
        self.background = "never"  # its run_background: never started, running, stopped

    async def run_background(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        self.background = "running"
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self.background = "stopped"

    def identity(self) -> str:
        return self.ident

    async def _gate(self, nbytes: int) -> None:
        delay = self.latency + (nbytes / self.rate if self.rate else 0.0)
        if delay:
            await trio.sleep(delay)
        else:
            await trio.lowlevel.checkpoint()
        if self.mode == "hang":
            await trio.sleep_forever()
        if self.mode == "error":
            raise MemberIOError("fake path is down")
        if self.mode == "medium":
            err = MemberIOError("medium error")
            err.sense_key = 0x3  # what ScsiError carries: about the medium, not the path
            raise err
        if self.mode == "gone":
            raise NotFoundError("LUN gone on this path")

    async def read(self, offset: int, length: int) -> np.ndarray:
        self.check(offset, length)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await self._gate(length)
        finally:
            self.inflight -= 1
        self.ios += 1
        self.bytes += length
        return self.store[offset:offset + length].copy()

    async def write(self, offset: int, data) -> None:
        buf = as_u8(data).copy()
        self.check(offset, len(buf))
        self.inflight += 1
        try:
            await self._gate(len(buf))
        except BaseException:  # an error or a cancelled (timed-out) attempt
            if self.late_nursery is not None:  # the target still runs it, later
                job = [offset, buf, False]
                self.pending.append(job)
                self.late_nursery.start_soon(self._land_late, job)
            raise
        finally:
            self.inflight -= 1
        self.ios += 1
        self.bytes += len(buf)
        self.store[offset:offset + len(buf)] = buf

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        self.vios += 1
        if self.mode != "ok":  # a failing path may leave garbage in the caller's views
            for v in views:
                v[...] = 0xEE
        data = await self.read(offset, sum(len(v) for v in views))
        pos = 0
        for v in views:
            v[:] = data[pos:pos + len(v)]
            pos += len(v)

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        self.vios += 1
        await self.write(offset, np.concatenate([as_u8(v) for v in views]) if views else b"")

    async def _land_late(self, job: list) -> None:
        await trio.sleep(self.late_delay)
        self._land(job)

    def _land(self, job: list) -> None:
        if not job[2]:
            job[2] = True
            self.store[job[0]:job[0] + len(job[1])] = job[1]

    async def flush(self) -> None:
        await self._gate(0)
        self.flushes += 1

    async def probe(self, timeout: float | None = None) -> None:
        self.probes += 1
        await self._gate(0)
        # A fresh session: whatever the old one still had in flight has run by now.
        for job in self.pending:
            self._land(job)
        self.pending.clear()

    async def aclose(self) -> None:
        self.closed = True


def make_paths(n: int, **kw) -> tuple[np.ndarray, list[FakePath]]:
    store = np.zeros(SIZE, dtype=np.uint8)
    return store, [FakePath(store, **kw) for _ in range(n)]


async def open_mp(fakes: list[FakePath], *, uris: list[str] | None = None, **options) -> MultipathDevice:
    uris = uris or [f"memory://p{i}?size=1M" for i in range(len(fakes))]
    by_host = {f"p{i}": f for i, f in enumerate(fakes)}

    async def opener(uri, *, create_size=None):
        return by_host[uri.host]

    return await MultipathDevice.open([parse_uri(u) for u in uris], opener=opener, **options)


def pattern(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


# ---------------------------------------------------------------------------- open and options


async def test_identity_mismatch_is_refused_naming_the_path():
    store = np.zeros(SIZE, dtype=np.uint8)
    a, b = FakePath(store, "lun:A"), FakePath(np.zeros(SIZE, dtype=np.uint8), "lun:B")
    with pytest.raises(ConfigError, match=r"different storage.*memory://p1\?size=1M is lun:B"):
        await open_mp([a, b])
    assert a.closed and b.closed


async def test_path_without_identity_is_refused():
    class NoIdentity(FakePath):
        def identity(self) -> None:
            return None

    store, (a,) = make_paths(1)
    b = NoIdentity(store)
    with pytest.raises(ConfigError, match="has no identity"):
        await open_mp([a, b])


def test_options_and_priorities():
    assert validate_options({})["selector"] == "service-time"
    with pytest.raises(ConfigError, match="unknown path selector"):
        validate_options({"selector": "random"})
    with pytest.raises(ConfigError, match="unknown path policy"):
        validate_options({"policy": "group_by_serial"})
    with pytest.raises(ConfigError, match="must be positive"):
        validate_options({"no_path_retry": -1})
    u, prio = strip_priority(parse_uri("iscsi://h:3260/iqn.x:y/1?prio=5&timeout=3"))
    assert prio == 5 and u.params == {"timeout": "3"} and u.text == "iscsi://h:3260/iqn.x:y/1?timeout=3"
    u, prio = strip_priority(parse_uri("iscsi://h/iqn.x:y/1?timeout=3&prio=1"))
    assert prio == 1 and u.text == "iscsi://h/iqn.x:y/1?timeout=3"
    u, prio = strip_priority(parse_uri("iscsi://h/iqn.x:y/1?prio=1"))
    assert prio == 1 and u.text == "iscsi://h/iqn.x:y/1"


async def test_unopenable_path_starts_failed_and_checker_opens_it(autojump_clock):
    store, (a, b) = make_paths(2)
    opened = {"p0": a}

    async def opener(uri, *, create_size=None):
        if uri.host not in opened:
            raise MemberIOError(f"{uri.host} unreachable")
        return opened[uri.host]

    uris = [parse_uri(f"memory://p{i}?size=1M") for i in range(2)]
    with pytest.raises(MemberIOError, match="cannot open path memory://p1"):
        await MultipathDevice.open(uris, opener=opener)
    mp = await MultipathDevice.open(uris, opener=opener, require_all=False, check_interval=1.0)
    assert [p["state"] for p in mp.path_stats()] == ["active", "failed"]
    async with trio.open_nursery() as nursery:
        await nursery.start(mp.run_background)
        await trio.sleep(3)
        assert mp.paths[1].state == "failed"
        opened["p1"] = FakePath(np.zeros(SIZE, dtype=np.uint8), "other:lun")  # wrong storage
        await trio.sleep(3)
        assert mp.paths[1].state == "failed" and "other storage" in mp.paths[1].error
        opened["p1"] = b
        await trio.sleep(3)
        assert mp.paths[1].state == "active" and mp.paths[1].dev is b
        # The path opened late runs its own background work (an iSCSI session's reader) too.
        assert b.background == "running" and a.background == "running"
        nursery.cancel_scope.cancel()
    assert b.background == "stopped"
    await mp.aclose()


# ---------------------------------------------------------------------------- selectors


async def test_round_robin_alternates():
    store, fakes = make_paths(3)
    mp = await open_mp(fakes, selector="round-robin")
    for i in range(30):
        await mp.read((i % 8) * BS, BS)
    assert [f.ios for f in fakes] == [10, 10, 10]
    assert [p["ios"] for p in mp.path_stats()] == [10, 10, 10]
    assert all(p["bytes"] == 10 * BS and p["inflight"] == 0 for p in mp.path_stats())


async def _parallel_reads(mp: MultipathDevice, count: int, size: int, width: int) -> None:
    async def worker(w: int) -> None:
        for k in range(w, count, width):
            await mp.read((k * size) % (SIZE - size), size)

    async with trio.open_nursery() as nursery:
        for w in range(width):
            nursery.start_soon(worker, w)


async def test_queue_length_prefers_the_shorter_queue(autojump_clock):
    store = np.zeros(SIZE, dtype=np.uint8)
    slow, fast = FakePath(store, latency=0.05), FakePath(store, latency=0.01)
    mp = await open_mp([slow, fast], selector="queue-length")
    await _parallel_reads(mp, 400, 4096, 8)
    assert fast.ios > 3 * slow.ios, (slow.ios, fast.ios)


async def test_service_time_follows_throughput(autojump_clock):
    store = np.zeros(SIZE, dtype=np.uint8)
    slow, fast = FakePath(store, rate=100e6), FakePath(store, rate=300e6)
    mp = await open_mp([slow, fast], selector="service-time")
    await _parallel_reads(mp, 600, 65536, 8)
    ratio = fast.bytes / slow.bytes
    assert 2.0 < ratio < 4.5, ratio
    rates = [p.rate for p in mp.paths]
    assert 2.0 < rates[1] / rates[0] < 4.5, rates


async def test_round_robin_is_fair_with_equal_paths(autojump_clock):
    store, fakes = make_paths(2, latency=0.01)
    for selector in ("round-robin", "queue-length", "service-time"):
        for f in fakes:
            f.ios = 0
        mp = await open_mp(fakes, selector=selector)
        await _parallel_reads(mp, 200, 4096, 4)
        assert abs(fakes[0].ios - fakes[1].ios) <= 20, (selector, fakes[0].ios, fakes[1].ios)


# ---------------------------------------------------------------------------- failover


async def test_error_fails_over_invisibly_and_counts(autojump_clock):
    store, (a, b) = make_paths(2)
    data = pattern(1, 8192)
    mp = await open_mp([a, b], selector="round-robin")
    a.mode = "error"
    for i in range(10):
        await mp.write(i * 8192, data)
        assert np.array_equal(await mp.read(i * 8192, 8192), data)
    stats = mp.path_stats()
    assert stats[0]["state"] == "failed" and stats[0]["errors"] == 1 and "down" in stats[0]["error"]
    assert stats[1]["state"] == "active" and stats[1]["ios"] == 20


async def test_hang_times_out_and_fails_over(autojump_clock):
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], selector="round-robin", io_timeout=2.0)
    a.mode = "hang"
    t0 = trio.current_time()
    for _ in range(4):
        await mp.read(0, BS)
    assert trio.current_time() - t0 == pytest.approx(2.0)
    assert mp.paths[0].state == "failed" and "2 s" in mp.paths[0].error


async def test_failover_policy_uses_one_path_and_fails_back(autojump_clock):
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], policy="failover", check_interval=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(mp.run_background)
        for _ in range(5):
            await mp.read(0, BS)
        assert (a.ios, b.ios) == (5, 0)
        assert [p["state"] for p in mp.path_stats()] == ["active", "standby"]
        a.mode = "error"
        for _ in range(5):
            await mp.read(0, BS)
        assert b.ios == 5 and [p["state"] for p in mp.path_stats()] == ["failed", "active"]
        a.mode = "ok"
        await trio.sleep(1.5)  # failback immediate: the next checker round brings it back
        assert [p["state"] for p in mp.path_stats()] == ["active", "standby"]
        await mp.read(0, BS)
        assert a.ios == 6
        nursery.cancel_scope.cancel()


async def test_failover_with_explicit_priorities_groups_paths(autojump_clock):
    store, fakes = make_paths(3)
    uris = ["memory://p0?size=1M&prio=1", "memory://p1?size=1M&prio=5", "memory://p2?size=1M&prio=5"]
    mp = await open_mp(fakes, uris=uris, policy="failover", selector="round-robin")
    for _ in range(10):
        await mp.read(0, BS)
    assert [f.ios for f in fakes] == [0, 5, 5]
    assert [p["priority"] for p in mp.path_stats()] == [1, 5, 5]
    assert mp.path_stats()[0]["uri"] == "memory://p0?size=1M"
    fakes[1].mode = fakes[2].mode = "error"
    await mp.read(0, BS)
    assert fakes[0].ios == 1


# ---------------------------------------------------------------------------- no path left


async def test_no_path_retry_fails_after_the_delay_then_at_once(autojump_clock):
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], no_path_retry=7.0, check_interval=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(mp.run_background)
        a.mode = b.mode = "error"
        t0 = trio.current_time()
        with pytest.raises(NoPathError, match="no usable path"):
            await mp.read(0, BS)
        assert trio.current_time() - t0 == pytest.approx(7.0)
        t1 = trio.current_time()
        with pytest.raises(NoPathError):
            await mp.write(0, b"x" * BS)
        assert trio.current_time() == t1  # the grace is spent: fail at once until a path returns
        b.mode = "ok"
        await trio.sleep(1.5)
        await mp.write(0, b"y" * BS)
        assert bytes(store[:BS]) == b"y" * BS
        nursery.cancel_scope.cancel()


async def test_no_path_retry_zero_fails_at_once(autojump_clock):
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], no_path_retry=0)
    a.mode = b.mode = "error"
    t0 = trio.current_time()
    with pytest.raises(NoPathError):
        await mp.read(0, BS)
    assert trio.current_time() == t0


@pytest.mark.parametrize("checker", [True, False])
async def test_path_returning_within_no_path_retry_completes_io(autojump_clock, checker):
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], no_path_retry=30.0, check_interval=1.0)
    data = pattern(2, 4096)
    async with trio.open_nursery() as nursery:
        if checker:
            await nursery.start(mp.run_background)
        a.mode = b.mode = "error"
        done = trio.Event()

        async def writer() -> None:
            await mp.write(4096, data)
            done.set()

        nursery.start_soon(writer)
        await trio.sleep(10)
        assert not done.is_set()
        b.mode = "ok"
        t0 = trio.current_time()
        await done.wait()
        assert trio.current_time() - t0 <= 1.0 + 1e-9
        assert np.array_equal(store[4096:8192], data)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- checker rules


async def test_failback_delay(autojump_clock):
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], failback_delay=10.0, check_interval=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(mp.run_background)
        a.mode = "error"
        await mp.read(0, BS)
        await mp.read(0, BS)
        assert mp.paths[0].state == "failed"
        a.mode = "ok"
        t0 = trio.current_time()
        await trio.sleep(0.5)
        while mp.paths[0].state != "active":
            assert mp.paths[0].state in ("failed", "pending")
            await trio.sleep(0.25)
        waited = trio.current_time() - t0
        assert 10.0 <= waited <= 12.0, waited
        nursery.cancel_scope.cancel()


async def _fail_once(mp: MultipathDevice, fake: FakePath) -> None:
    fake.mode = "error"
    for _ in range(4):
        await mp.read(0, BS)
    assert mp.paths[fakes_index(mp, fake)].state == "failed"
    fake.mode = "ok"


def fakes_index(mp: MultipathDevice, fake: FakePath) -> int:
    return next(p.index for p in mp.paths if p.dev is fake)


async def _time_to_active(mp: MultipathDevice, i: int) -> float:
    t0 = trio.current_time()
    while mp.paths[i].state != "active":
        await trio.sleep(0.25)
    return trio.current_time() - t0


async def test_flapping_path_is_held_back(autojump_clock):
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], selector="round-robin", check_interval=1.0, flap_threshold=3,
                       flap_window=60.0, flap_hold=20.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(mp.run_background)
        for _ in range(2):
            await _fail_once(mp, a)
            assert await _time_to_active(mp, 0) <= 1.5
        await _fail_once(mp, a)  # third failure within the window: damped
        assert 20.0 <= await _time_to_active(mp, 0) <= 22.0
        assert mp.path_stats()[0]["errors"] == 3
        # With no other path, a damped path comes back at once: better than none.
        await _fail_once(mp, a)
        b.mode = "error"
        await mp.read(0, BS)  # b fails, a is taken back at the next round
        assert mp.paths[0].state == "active"
        nursery.cancel_scope.cancel()


async def test_checker_finds_a_dead_idle_path(autojump_clock):
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], healthy_check_interval=5.0, check_interval=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(mp.run_background)
        b.mode = "error"
        await trio.sleep(7)
        assert mp.paths[1].state == "failed" and mp.paths[1].errors == 1
        nursery.cancel_scope.cancel()


async def test_probe_timeout_on_a_hung_path(autojump_clock):
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], probe_timeout=3.0, check_interval=1.0, io_timeout=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(mp.run_background)
        a.mode = "hang"
        await mp.read(0, BS)
        await mp.read(0, BS)
        await trio.sleep(10)
        assert mp.paths[0].state == "failed" and "probe" in mp.paths[0].error
        a.mode = "ok"
        await trio.sleep(5)
        assert mp.paths[0].state == "active"
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- drills


async def test_fail_and_reinstate_path_drills(autojump_clock):
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], check_interval=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(mp.run_background)
        mp.fail_path(0)
        with pytest.raises(ConfigError, match="last usable path"):
            mp.fail_path(1)
        await trio.sleep(10)  # the checker leaves an administratively failed path alone
        st = mp.path_stats()[0]
        assert st["state"] == "failed" and st["admin"] and st["errors"] == 0
        for _ in range(4):
            await mp.read(0, BS)
        assert a.ios == 0 and b.ios == 4
        a.mode = "error"
        with pytest.raises(MemberIOError, match="does not answer"):
            await mp.reinstate_path(0)
        a.mode = "ok"
        await mp.reinstate_path(0)
        assert mp.paths[0].state == "active"
        mp.fail_path(0)
        mp.fail_path(1, force=True)
        with pytest.raises(ConfigError):
            mp.fail_path(2)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- ordering and fences


async def test_overlapping_requests_are_ordered(autojump_clock):
    store, (a, b) = make_paths(2, latency=0.1)
    b.latency = 0.01
    mp = await open_mp([a, b], selector="round-robin")
    order = []

    async def w(tag: int, off: int) -> None:
        await mp.write(off, np.full(4096, tag, dtype=np.uint8))
        order.append(tag)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(w, 1, 0)  # goes to the slow path
        await trio.sleep(0)
        nursery.start_soon(w, 2, 2048)  # overlaps: must wait, even on the fast path
    assert order == [1, 2]
    assert (store[:2048] == 1).all() and (store[2048:6144] == 2).all()


async def test_lost_write_never_overtakes_newer_data(autojump_clock):
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], selector="round-robin", stale_write_hold=5.0, check_interval=1.0)
    async with trio.open_nursery() as nursery:
        a.late_nursery = nursery
        a.late_delay = 3.0
        a.mode = "error"
        old, new = np.full(4096, 1, np.uint8), np.full(4096, 2, np.uint8)
        mp._rr = 1  # the next pick is path 0 (the one that loses the write)
        await mp.write(0, old)  # fails on a (lands there 3 s later), retried on b
        assert a.pending and mp.paths[0].state == "failed"
        t0 = trio.current_time()
        await mp.write(0, new)  # must wait for the fence
        assert trio.current_time() - t0 >= 3.0
        await trio.sleep(10)
        assert (store[:4096] == 2).all()
        nursery.cancel_scope.cancel()


async def test_reinstatement_lifts_the_fence(autojump_clock):
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], selector="round-robin", stale_write_hold=60.0, check_interval=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(mp.run_background)
        a.late_nursery = nursery
        a.late_delay = 100.0
        a.mode = "error"
        mp._rr = 1
        await mp.write(0, np.full(4096, 1, np.uint8))
        t_other = trio.current_time()
        await mp.write(8192, np.full(4096, 3, np.uint8))  # another range: no wait
        assert trio.current_time() == t_other
        a.mode = "ok"
        t0 = trio.current_time()
        await mp.write(0, np.full(4096, 2, np.uint8))  # waits for a's reinstatement (~1 s), not 60 s
        assert trio.current_time() - t0 <= 1.5
        await trio.sleep(200)
        assert (store[:4096] == 2).all() and (store[8192:12288] == 3).all()
        nursery.cancel_scope.cancel()


async def test_flush_reaches_every_path_that_wrote(autojump_clock):
    store, fakes = make_paths(3)
    mp = await open_mp(fakes, selector="round-robin")
    await mp.write(0, b"a" * BS)
    await mp.write(BS, b"b" * BS)
    await mp.flush()
    assert sorted(f.flushes for f in fakes) == [0, 1, 1]
    await mp.flush()
    assert sum(f.flushes for f in fakes) == 2  # nothing written since
    await mp.write(0, b"c" * BS)
    dirty = next(f for f, p in zip(fakes, mp.paths, strict=True) if p.dirty)
    dirty.mode = "error"
    await mp.flush()  # the dirty path fails: another path's flush covers its writes
    assert sum(f.flushes for f in fakes) == 3
    before = dirty.flushes
    await mp.write(BS, b"d" * BS)  # goes to a live path
    await mp.flush()  # that path's own flush covers the storage: no extra one
    assert sum(f.flushes for f in fakes) == 4
    dirty.mode = "ok"
    await mp.check_paths()  # back: it first flushes what it carried, through itself
    assert dirty.flushes == before + 1 and all(p.state == "active" for p in mp.paths)
    assert not any(p.dirty for p in mp.paths)


async def test_aclose_stops_the_checker_and_closes_paths(autojump_clock):
    store, fakes = make_paths(2)
    mp = await open_mp(fakes)
    async with trio.open_nursery() as nursery:
        await nursery.start(mp.run_background)
        await trio.sleep(3)
        await mp.aclose()
    assert all(f.closed for f in fakes)


# ---------------------------------------------------------------------------- vectored I/O

VEC_SIZES = [100, 1000, 3 * BS + 12, 4096 - 1112]  # 11 blocks in uneven views


async def test_vectored_io_is_one_request_on_one_path():
    """writev / readv_into: one request on one path, counted like write / read, same bytes."""
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], selector="round-robin")
    total = sum(VEC_SIZES)
    data = pattern(5, total)
    await mp.writev(BS, ViewSet(VEC_SIZES, strided=(1,)).fill(data).views)
    assert sorted([a.vios, b.vios]) == [0, 1] and a.ios + b.ios == 1
    assert np.array_equal(store[BS:BS + total], data)
    dst = ViewSet(VEC_SIZES, strided=(0, 2))
    await mp.readv_into(BS, dst.views)  # round-robin: the other path
    assert (a.vios, b.vios) == (1, 1)
    assert np.array_equal(dst.joined(), data) and dst.outside_untouched()
    assert np.array_equal(await mp.read(BS, total), data)
    stats = mp.path_stats()
    assert sorted(p["ios"] for p in stats) == [1, 2] and sum(p["bytes"] for p in stats) == 3 * total
    assert all(p["inflight"] == 0 for p in stats)
    # Plain write, vectored read; and the path that took the writev is flushed.
    await mp.write(8192, data[::-1].copy())
    dst.clear()
    await mp.readv_into(8192, dst.views)
    assert np.array_equal(dst.joined(), data[::-1]) and dst.outside_untouched()
    await mp.flush()
    assert a.flushes + b.flushes >= 1 and not any(p.dirty for p in mp.paths)
    await mp.writev(0, [])
    await mp.readv_into(0, [])


async def test_path_failing_during_writev_completes_on_the_other(autojump_clock):
    """A writev that fails on its path completes on the other; its lost copy is fenced like a write's."""
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], selector="round-robin", stale_write_hold=5.0)
    total = sum(VEC_SIZES)
    async with trio.open_nursery() as nursery:
        a.late_nursery = nursery
        a.late_delay = 3.0
        a.mode = "error"
        mp._rr = 1  # the next pick is path 0 (the one that loses the write)
        await mp.writev(0, ViewSet(VEC_SIZES, strided=(2,)).fill(np.full(total, 1, np.uint8)).views)
        assert (a.vios, b.vios) == (1, 1) and a.pending  # failed on a, done on b
        assert (store[:total] == 1).all()
        stats = mp.path_stats()
        assert stats[0]["state"] == "failed" and stats[0]["errors"] == 1 and stats[1]["ios"] == 1
        t0 = trio.current_time()
        await mp.writev(0, ViewSet(VEC_SIZES).fill(np.full(total, 2, np.uint8)).views)
        assert trio.current_time() - t0 >= 3.0  # waited for the fence of the lost copy
        await trio.sleep(10)
        assert (store[:total] == 2).all()
        nursery.cancel_scope.cancel()


async def test_readv_into_fails_over_and_leaves_no_garbage(autojump_clock):
    """A path that hangs (or errs) after scribbling into the views: the retry elsewhere fills them."""
    store, (a, b) = make_paths(2)
    store[:] = pattern(9, SIZE)
    mp = await open_mp([a, b], selector="round-robin", io_timeout=2.0)
    total = sum(VEC_SIZES)
    dst = ViewSet(VEC_SIZES, strided=(1,))
    a.mode = "hang"
    mp._rr = 1
    t0 = trio.current_time()
    await mp.readv_into(4096, dst.views)
    assert trio.current_time() - t0 == pytest.approx(2.0)
    assert np.array_equal(dst.joined(), store[4096:4096 + total]) and dst.outside_untouched()
    assert mp.paths[0].state == "failed" and "2 s" in mp.paths[0].error
    a.mode = "ok"
    await mp.reinstate_path(0)
    b.mode = "error"
    mp._rr = 0  # the next pick is path 1
    dst.clear()
    await mp.readv_into(4096, dst.views)
    assert np.array_equal(dst.joined(), store[4096:4096 + total]) and dst.outside_untouched()
    assert mp.paths[1].state == "failed" and (a.vios, b.vios) == (2, 2)  # each: one failure, one success


async def test_vectored_out_of_range_fails_like_write():
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b])
    for off, sizes in ((SIZE - BS, [BS, BS]), (SIZE, [1]), (-1, [1]), (SIZE - 10, [5, 6])):
        with pytest.raises(OutOfRangeError) as plain:
            await mp.write(off, np.zeros(sum(sizes), np.uint8))
        for op in (mp.writev, mp.readv_into):
            with pytest.raises(OutOfRangeError) as vec:
                await op(off, [np.zeros(n, np.uint8) for n in sizes])
            assert str(vec.value) == str(plain.value)
    assert a.ios + b.ios + a.vios + b.vios == 0
    assert all(p["state"] == "active" and p["errors"] == 0 for p in mp.path_stats())


# ---------------------------------------------------------------------------- property test

BLOCKS = 16
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, BLOCKS - 1), st.integers(1, 4), st.integers(0, 255)),
        st.tuples(st.just("read"), st.integers(0, BLOCKS - 1), st.integers(1, 4), st.integers(0, 1)),
        st.tuples(st.just("fail"), st.integers(0, 2), st.sampled_from(["error", "hang"]), st.just(0)),
        st.tuples(st.just("heal"), st.integers(0, 2), st.just(""), st.just(0)),
        st.tuples(st.just("sleep"), st.integers(1, 4), st.just(""), st.just(0)),
    ),
    min_size=1, max_size=50,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, selector=st.sampled_from(["round-robin", "queue-length", "service-time"]),
       policy=st.sampled_from(["multibus", "failover"]), concurrent=st.booleans())
def test_random_io_and_path_failures_match_a_model(ops, selector, policy, concurrent):
    """While one path lives no I/O fails, and every read sees the model (lost writes land late)."""

    async def main() -> None:
        store = np.zeros(BLOCKS * 4096, dtype=np.uint8)
        fakes = [FakePath(store, latency=0.001 * (i + 1)) for i in range(3)]
        model = bytearray(len(store))
        mp = await open_mp(fakes, selector=selector, policy=policy, io_timeout=1.0,
                           check_interval=0.5, stale_write_hold=2.0, no_path_retry=5.0)
        sequence: list[tuple] = []  # (op, offset, bytes) in the order requests entered the device

        async def do(op: str, off: int, n: int, val: int) -> None:
            if op == "write":
                data = np.full(n, val, dtype=np.uint8)
                data[::7] = (val + off) % 256
                sequence.append(("w", off, bytes(data)))
                if val % 2:  # vectored: the same request as views
                    await mp.writev(off, [data[:1000], data[1000:1001], data[1001:]])
                else:
                    await mp.write(off, data)
            else:
                slot = len(sequence)
                sequence.append(("r", off, n, None))
                if val:
                    got = np.empty(n, np.uint8)
                    await mp.readv_into(off, [got[:n // 2], got[n // 2:]])
                else:
                    got = await mp.read(off, n)
                sequence[slot] = ("r", off, n, bytes(got))

        async with trio.open_nursery() as nursery:
            for f in fakes:
                f.late_nursery = nursery
                f.late_delay = 1.5
            await nursery.start(mp.run_background)
            async with trio.open_nursery() as io:
                for op, a, b, c in ops:
                    if op in ("write", "read"):
                        off, n = a * 4096, min(b, BLOCKS - a) * 4096
                        if concurrent:
                            io.start_soon(do, op, off, n, c)
                            await trio.sleep(0.0005)
                        else:
                            await do(op, off, n, c)
                    elif op == "fail":
                        alive = [i for i, f in enumerate(fakes) if f.mode == "ok" and i != a]
                        if alive:  # never the last live path
                            fakes[a].mode = b
                    elif op == "heal":
                        fakes[a].mode = "ok"
                    else:
                        await trio.sleep(a * 0.4)
            for entry in sequence:
                if entry[0] == "w":
                    _tag, off, data = entry
                    model[off:off + len(data)] = data
                else:
                    _tag, off, n, got = entry
                    assert got == bytes(model[off:off + n]), f"read at {off} saw other bytes"
            await trio.sleep(5)  # every lost write has landed or been fenced out by now
            assert bytes(store) == bytes(model)
            assert bytes(await mp.read(0, len(store))) == bytes(model)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# ---------------------------------------------------------------------------- in a pool


async def test_pool_with_multipath_members(tmp_path):
    """Pool.create/open with two-path members: options kept in the metadata, drills, status."""
    from backends import memory
    from vstore.pool.commands import run_command
    from vstore.pool.home import Home
    from vstore.pool.pool import Pool

    home = Home(tmp_path / "home")
    members = [f"memory://mpp{i}?size=32M,memory://mpp{i}?size=32M&path=2" for i in range(2)]
    try:
        pool = await Pool.create(home, "mpp", "raid1", members,
                                 multipath={"selector": "round-robin", "no_path_retry": 0})
        try:
            vol = await pool.create_volume("v", 4 << 20)
            data = pattern(5, 1 << 20)
            await vol.write(0, data)
            st = pool.status()
            for m in st["members"]:
                assert [p["state"] for p in m["paths"]] == ["active", "active"]
                assert {p["selector"] for p in m["paths"]} == {"round-robin"}
            await run_command(pool, "path_fail", member=0, path=1)
            await vol.write(1 << 20, data)
            assert np.array_equal(await vol.read(1 << 20, 1 << 20), data)
            st = pool.status()
            assert [p["state"] for p in st["members"][0]["paths"]] == ["active", "failed"]
            assert st["state"] == "clean"
            with pytest.raises(ConfigError, match="last usable path"):
                await pool.set_path_state(0, 0, fail=True)
            await pool.set_path_state(0, "memory://mpp0?size=32M&path=2", fail=False)
            assert pool.status()["members"][0]["paths"][1]["state"] == "active"
            with pytest.raises(ConfigError, match="no path"):
                await pool.set_path_state(1, "memory://nowhere?size=1M", fail=True)
            with pytest.raises(ConfigError, match="members 0..1"):
                await pool.set_path_state(5, 0, fail=True)
        finally:
            await pool.aclose()
        pool = await Pool.open(home, "mpp")
        try:
            assert pool.meta["multipath"]["selector"] == "round-robin"
            assert pool.members[0].dev.selector == "round-robin"
            assert pool.members[0].dev.no_path_retry == 0
            async with trio.open_nursery() as nursery:
                await nursery.start(pool.run_background)  # the checkers run under the pool
                assert all(m.dev._checker_scope is not None for m in pool.members)
                vol = pool.get_volume("v")
                assert np.array_equal(await vol.read(0, 1 << 20), data)
                nursery.cancel_scope.cancel()
            assert all(m.dev._checker_scope is None for m in pool.members)
        finally:
            await pool.aclose()
    finally:
        for i in range(2):
            memory.forget(f"mpp{i}")


async def test_medium_errors_do_not_fail_paths_and_odd_errors_do_not_stop_the_checker(autojump_clock):
    store, (a, b) = make_paths(2)
    mp = await open_mp([a, b], check_interval=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(mp.run_background)
        a.mode = b.mode = "medium"
        with pytest.raises(MemberIOError, match="medium error"):
            await mp.read(0, BS)
        assert [p.state for p in mp.paths] == ["active", "active"]
        a.mode, b.mode = "gone", "ok"
        for _ in range(4):
            await mp.read(0, BS)  # a NotFoundError on a path is a path failure too
        assert mp.paths[0].state == "failed"
        await trio.sleep(5)  # the checker keeps going through NotFoundError probes
        assert mp._checker_scope is not None and mp.paths[0].state == "failed"
        a.mode = "ok"
        await trio.sleep(2)
        assert mp.paths[0].state == "active"
        nursery.cancel_scope.cancel()
