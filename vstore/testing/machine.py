"""Hypothesis state machines that check a BlockDevice (or a whole pool) against a byte-array model.

``device_state_machine(factory, ...)`` returns a ``RuleBasedStateMachine`` class
whose ``TestCase`` pytest (or unittest) runs. Each example builds a ``Rig`` of
memory members (recorded by a ``CrashRecorder``, behind fault switches), calls
``factory(backing)`` to get the device under test, and then draws steps —
writes, concurrent writes, reads, flushes and discards of any size and
alignment, and optionally member failures and power cuts — checking every read
and, after every crash, what survived (``vstore.testing.torture`` checks (a)-(d)).
When hypothesis finds a failure it shrinks it and prints the steps; the same
steps as a schedule replay with ``vstore.testing.torture.run_schedule``.

    from vstore.testing import device_state_machine
    TestMyCache = device_state_machine(
        lambda backing: MyCache(backing.devices[0]), size=1 << 20, crashes=True).TestCase

``factory`` takes a ``vstore.testing.torture.Backing`` (``devices``, ``uris``, ``reopen``,
``scratch``) or nothing (then there is nothing to crash or fail underneath);
it may be async. ``pool_state_machine(level, ...)`` does the same for a vstore
pool of any RAID level, with or without a journal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from vstore.raid.geometry import min_members, redundancy
from vstore.testing import strategies as vs
from vstore.testing.faults import Rig
from vstore.testing.torture import DeviceTarget, Op, PoolTarget, Runner, Target

__all__ = ["DEFAULT_SETTINGS", "device_state_machine", "pool_state_machine", "row_bytes"]

DEFAULT_SETTINGS = settings(max_examples=40, stateful_step_count=25, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.filter_too_much,
                                                   HealthCheck.data_too_large])


def row_bytes(level: str, members: int, chunk: int) -> int:
    """Bytes of one stripe row of a level (the torn-write unit with a journal)."""
    data = {"raid5": members - 1, "raid6": members - 2, "raid0": members,
            "raid10": max(1, members // 2)}.get(level, 1)
    return data * chunk


def _machine(name: str, make_rig: Callable[[], Rig], make_target: Callable[[Rig], Target], *,
             window: int, block_size: int, chunk: int, row: int, members: int,
             failures: bool, crashes: bool, discard: bool,
             test_settings: settings | None) -> type[RuleBasedStateMachine]:
    kw = {"block_size": block_size, "chunk": chunk, "row": row}
    workload = vs.workload(window, discard=discard, **kw)

    class DeviceMachine(RuleBasedStateMachine):
        """Steps against the device under test and its model; checks after every crash."""

        runner: Runner | None = None
        rig: Rig | None = None

        @initialize()
        def setup(self) -> None:
            self.rig = make_rig()
            self.runner = Runner(make_target(self.rig), window=window)
            trio.run(self._start)

        async def _start(self) -> None:
            await self.rig.start()
            await self.runner.start()

        failed = False

        def _apply(self, op: Op) -> None:
            note(str(op))  # the failing example then reads as a schedule
            try:
                trio.run(self.runner.apply, op)
            except BaseException:
                self.failed = True  # one failure per example: teardown skips the final checks
                raise

        @rule(op=workload)
        def io(self, op: Op) -> None:
            self._apply(op)

        @rule(op=vs.flushes())
        def flush(self, op: Op) -> None:
            # A rule of its own: what a crash may take depends on where the flushes fell.
            self._apply(op)

        @precondition(lambda self: crashes)
        @rule(op=vs.crashes())
        def crash(self, op: Op) -> None:
            self._apply(op)

        @precondition(lambda self: failures and members > 0)
        @rule(op=st.one_of(vs.member_failures(max(1, members)), vs.heals(max(1, members))))
        def fault(self, op: Op) -> None:
            self._apply(op)

        def teardown(self) -> None:
            if self.runner is None:
                return
            try:
                if self.runner.dev is not None and not self.failed:
                    note("(final checks)")
                    trio.run(self.runner.finish)
                elif self.runner.dev is not None:
                    trio.run(self._close_quietly)
            finally:
                self.rig.forget()

        async def _close_quietly(self) -> None:
            try:
                await self.runner.target.close()
            except Exception:  # noqa: BLE001 - the step's own failure is the one to report
                pass

    DeviceMachine.__name__ = DeviceMachine.__qualname__ = name
    DeviceMachine.TestCase.settings = test_settings or DEFAULT_SETTINGS
    return DeviceMachine


def device_state_machine(factory: Callable[..., Any], *, size: int = 1 << 20, block_size: int = 512,
                         members: int = 1, failures: bool = False, crashes: bool | None = None,
                         durable_writes: bool = False, atomic_unit: int = 0, redundancy: int = 0,
                         chunk: int = 4096, discard: bool = True,
                         settings: settings | None = None) -> type[RuleBasedStateMachine]:
    """A state machine checking factory's device against a model.

    ``size``: bytes of the device the steps touch (and of each backing member);
    ``members``: backing memory members handed to the factory; ``failures``: fail and
    heal backing members, at most ``redundancy`` at once; ``crashes`` (default: when
    the factory takes a backing): power cuts, after which ``factory`` is called again
    with ``backing.reopen`` True; ``durable_writes``: the device promises an
    acknowledged write survives a crash without a flush; ``atomic_unit``: it promises
    a write is all old or all new per aligned unit of this many bytes.
    """
    import inspect

    takes_backing = bool(inspect.signature(factory).parameters)
    if crashes is None:
        crashes = takes_backing
    if (crashes or failures) and not takes_backing:
        raise ValueError("crashes and failures need a factory that takes the backing devices")
    n = members if takes_backing else 0

    def make_rig() -> Rig:
        rig = Rig(sector=block_size)
        for i in range(n):
            rig.add_memory(f"b{i}", size, block_size)
        return rig

    def make_target(rig: Rig) -> Target:
        return DeviceTarget(rig, factory, durable_writes=durable_writes, unit=atomic_unit,
                            redundancy=redundancy)

    name = f"DeviceMachine_{getattr(factory, '__name__', 'factory')}".replace("<", "").replace(">", "")
    return _machine(name, make_rig, make_target, window=size, block_size=block_size,
                    chunk=chunk, row=chunk, members=n, failures=failures, crashes=crashes,
                    discard=discard, test_settings=settings)


def pool_state_machine(level: str, members: int | None = None, *, journal: bool = False,
                       chunk: int = 4096, member_size: int = 8 << 20, rows: int = 12,
                       failures: bool = True, crashes: bool = True, rebuild: bool = True,
                       wrap: Callable[[Any], Any] | None = None, wrap_journal_only: bool = False,
                       discard: bool = True, settings: settings | None = None
                       ) -> type[RuleBasedStateMachine]:
    """A state machine over a vstore pool of memory members (``wrap``: a layer over each member)."""
    n = members or {"raid6": 5, "raid5": 4, "raid10": 4}.get(level, max(2, min_members(level)))
    row = row_bytes(level, n, chunk)

    def make_rig() -> Rig:
        rig = Rig(wrap=wrap, wrap_only={"j"} if wrap_journal_only else None)
        for i in range(n):
            rig.add_memory(f"m{i}", member_size)
        if journal:
            rig.add_memory("j", 4 << 20)
        return rig

    def make_target(rig: Rig) -> Target:
        return PoolTarget(rig, level, chunk=chunk, journal=journal, rebuild=rebuild)

    name = f"PoolMachine_{level}_{'journal' if journal else 'bitmap'}"
    return _machine(name, make_rig, make_target, window=rows * row, block_size=512, chunk=chunk,
                    row=row, members=n, failures=failures and redundancy(level, n) > 0,
                    crashes=crashes, discard=discard, test_settings=settings)
