"""vstore.io.ordering.RangeOrder and vstore.io.aio.run_all: the shared ordering and concurrency helpers."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from vstore.errors import DegradedError, MemberIOError
from vstore.io.aio import run_all
from vstore.io.ordering import RangeOrder, spans_of_keys


def test_spans_of_keys_merges_consecutive_keys() -> None:
    assert spans_of_keys([5, 1, 2, 3, 9, 3]) == [(1, 4), (5, 6), (9, 10)]
    assert spans_of_keys([]) == []


async def test_uncontended_hold_takes_no_trip_through_the_scheduler() -> None:
    order = RangeOrder()
    stats = trio.lowlevel.current_statistics()
    before = stats.tasks_runnable
    entry = await order.acquire([(0, 10)])
    # acquire returned without yielding: nothing else ran, and the entry is granted.
    assert entry.granted and trio.lowlevel.current_statistics().tasks_runnable == before
    order.leave(entry)
    assert len(order) == 0


async def test_exclusive_waits_for_overlap_shared_do_not(autojump_clock) -> None:
    order = RangeOrder()
    log: list[str] = []

    async def holder(name: str, start: int, end: int, shared: bool, hold: float) -> None:
        async with order.hold(start, end, shared=shared):
            log.append(f"+{name}")
            await trio.sleep(hold)
            log.append(f"-{name}")

    async with trio.open_nursery() as n:
        n.start_soon(holder, "r1", 0, 10, True, 1)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(holder, "r2", 5, 15, True, 1)  # shared with r1: goes ahead at once
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(holder, "w", 8, 9, False, 0.1)  # overlaps both: waits for both
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(holder, "r3", 8, 9, True, 0.1)  # after the waiting writer: waits for it
        n.start_soon(holder, "x", 20, 30, False, 0.1)  # disjoint: goes ahead
    assert log.index("+r2") < log.index("-r1")
    assert log.index("+w") > max(log.index("-r1"), log.index("-r2"))
    assert log.index("+r3") > log.index("-w")
    assert log.index("+x") < log.index("-r1")


async def test_reentry_by_the_holder_does_not_deadlock() -> None:
    order = RangeOrder()
    got: list[str] = []

    async def other() -> None:
        async with order.hold_keys([3]):
            got.append("other")

    async with trio.open_nursery() as n:
        async with order.hold_keys([3]):
            n.start_soon(other)
            await trio.testing.wait_all_tasks_blocked()  # other now waits for us
            with trio.fail_after(1):
                async with order.hold_keys([3, 4]):  # re-entered, and a key beyond
                    got.append("inner")
        assert got == ["inner"]
    assert got == ["inner", "other"]


async def test_cancelled_waiter_leaves_no_entry(autojump_clock) -> None:
    order = RangeOrder()

    async def waiter() -> None:
        with trio.move_on_after(1):
            async with order.hold(2, 3):
                pytest.fail("must not get the range while it is held")

    async with order.hold(0, 4), trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(2)
        assert len(order) == 1
    assert len(order) == 0


async def test_fence_keeps_writers_off_until_its_deadline_and_lets_readers_by(autojump_clock) -> None:
    order = RangeOrder()
    w1 = await order.acquire([(0, 100)])
    fence = order.fence(10, 20, trio.current_time() + 5, behind=w1)
    order.leave(w1)
    async with order.hold(15, 16, shared=True):
        pass  # a read is not held back by a fence
    t0 = trio.current_time()
    async with order.hold(0, 11):
        assert trio.current_time() - t0 >= 5  # waited out the fence
    assert fence.finished and len(order) == 0


async def test_fence_lifted_early_releases_waiters(autojump_clock) -> None:
    order = RangeOrder()
    w1 = await order.acquire([(0, 8)])
    fence = order.fence(0, 8, trio.current_time() + 100, behind=w1)
    order.leave(w1)
    async with trio.open_nursery() as n:
        n.cancel_scope.deadline = trio.current_time() + 10

        async def writer() -> None:
            async with order.hold(4, 5):
                pass

        n.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        order.leave(fence)
    assert not n.cancel_scope.cancelled_caught


async def test_a_writer_already_waiting_also_waits_for_a_fence_its_predecessor_leaves(autojump_clock) -> None:
    order = RangeOrder()
    done: list[float] = []
    w1 = await order.acquire([(0, 8)])

    async def w2() -> None:
        async with order.hold(0, 8):
            done.append(trio.current_time())

    async with trio.open_nursery() as n:
        n.start_soon(w2)
        await trio.testing.wait_all_tasks_blocked()
        order.fence(0, 8, trio.current_time() + 3, behind=w1)  # w1 failed on a path
        t0 = trio.current_time()
        order.leave(w1)
    assert done and done[0] - t0 >= 3


async def test_settle_waits_for_present_entries_only(autojump_clock) -> None:
    order = RangeOrder()
    events: list[str] = []

    async def hold(name: str, t: float) -> None:
        async with order.hold(0, 1, shared=True):
            await trio.sleep(t)
            events.append(name)

    async def settle() -> None:
        await order.settle()
        events.append("settled")

    async with trio.open_nursery() as n:
        n.start_soon(hold, "early", 1)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(settle)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(hold, "late", 5)
    assert events.index("settled") > events.index("early")
    assert events.index("settled") < events.index("late")


async def test_run_all_runs_every_job_to_its_end_and_prefers(autojump_clock) -> None:
    ended: list[int] = []

    async def job(i: int) -> int:
        await trio.sleep(0.01 * i)
        ended.append(i)
        if i == 1:
            raise MemberIOError("member 1")
        if i == 2:
            raise DegradedError("too many")
        return i

    with pytest.raises(DegradedError):
        await run_all([lambda i=i: job(i) for i in range(4)], prefer=DegradedError)
    assert sorted(ended) == [0, 1, 2, 3]
    ended.clear()
    with pytest.raises(MemberIOError):
        await run_all([lambda i=i: job(i) for i in range(4)])
    assert await run_all([lambda: job(0), lambda: job(3)]) == [0, 3]


async def test_run_all_on_error_hands_errors_over_and_goes_on() -> None:
    seen: list[tuple[int, str]] = []

    async def bad() -> None:
        raise MemberIOError("gone")

    async def good() -> str:
        return "ok"

    async def note(i: int, e: BaseException) -> None:
        seen.append((i, str(e)))

    assert await run_all([good, bad, good], on_error=note) == ["ok", None, "ok"]
    assert seen == [(1, "gone")]
    assert await run_all([bad], on_error=note) == [None]


async def test_run_all_lets_other_errors_through_unwrapped(autojump_clock) -> None:
    async def boom() -> None:
        raise KeyError("bug")

    async def slow() -> None:
        await trio.sleep(100)

    with trio.fail_after(5), pytest.raises(KeyError):
        await run_all([boom, slow], catch=MemberIOError)
