"""Fault-injecting wrappers, and the rig that stacks them over crash-recorded storage.

The wrappers (all ``BlockDevice``s):

- ``FaultDevice`` (from ``vstore.testing.fault_device``): a *failing member* (``fail("all")``) or a
  *corrupt read* (``corrupt_reads()``), armed and healed on command;
- ``SlowDevice``: a *slow member*, every operation first sleeps (``trio.sleep``, so
  under ``trio.testing.MockClock`` the delay is virtual and the run deterministic);
- ``DropFlushes``: a deliberately broken layer whose ``flush`` does nothing — the
  negative control that proves the checks can fail;
- a *failing path*: ``fail_path(multipath_device, i)`` / ``reinstate_path``.

``Rig`` puts named devices (memory or real members) under a ``CrashRecorder``
and hands out ``vrig://GROUP/NAME`` URIs that open, per member, an optional
user wrapper over a persistent fault switch over the recorder:

    user layer (wrap) -> fault switch (fail/corrupt/slow) -> CrashDevice (recorded) -> storage

so a pool can be created and reopened on the URIs, members can be failed and
healed, and ``Rig.crash`` cuts the power after any recorded event.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import trio

from backends.memory import MemoryDevice
from vstore import uri as uri_mod
from vstore.errors import NotFoundError
from vstore.stack.device import BlockDevice, Buffer, FilterDevice
from vstore.testing.crash import CrashDevice, CrashRecorder
from vstore.testing.fault_device import KINDS, FaultDevice, FaultRule
from vstore.uri import MemberURI

__all__ = [
    "DropFlushes",
    "FaultDevice",
    "FaultRule",
    "Rig",
    "SlowDevice",
    "fail_path",
    "reinstate_path",
]

SCHEME = "vrig"
_RIGS: dict[str, Rig] = {}
_ids = itertools.count()
PAGE = 64 << 10  # granularity at which a crash writes changed bytes back to real storage

Wrap = Callable[[BlockDevice], BlockDevice]


class SlowDevice(FilterDevice):
    """A slow member: every operation waits `delay` seconds first."""

    def __init__(self, inner: BlockDevice, delay: float = 0.001) -> None:
        super().__init__(inner)
        self.delay = delay

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read after the delay."""
        await trio.sleep(self.delay)
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: Buffer) -> None:
        """Write after the delay."""
        await trio.sleep(self.delay)
        await self.inner.write(offset, data)

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Read into the views after the delay."""
        await trio.sleep(self.delay)
        await self.inner.readv_into(offset, views)

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Write the views after the delay."""
        await trio.sleep(self.delay)
        await self.inner.writev(offset, views)

    async def flush(self) -> None:
        """Flush after the delay."""
        await trio.sleep(self.delay)
        await self.inner.flush()

    async def discard(self, offset: int, length: int) -> None:
        """Discard after the delay."""
        await trio.sleep(self.delay)
        await self.inner.discard(offset, length)


class DropFlushes(FilterDevice):
    """A deliberately broken layer: writes pass, flushes are acknowledged and dropped."""

    async def flush(self) -> None:
        """The bug: claim durability without asking the device below."""


def fail_path(dev: Any, index: int) -> None:
    """Fail path index of a ``MultipathDevice`` (I/O moves to its other paths)."""
    dev.fail_path(index)


async def reinstate_path(dev: Any, index: int) -> None:
    """Probe path index of a ``MultipathDevice`` and put it back into service."""
    await dev.reinstate_path(index)


class _Switch(FaultDevice):
    """A FaultDevice whose rules and delay live in the rig: they outlast every handle (hardware state)."""

    def __init__(self, inner: BlockDevice, rig: Rig, name: str) -> None:
        super().__init__(inner, name=rig.uri(name))
        self.rules = rig.rules[name]  # shared list: arming it arms every open handle
        self._rig, self._member = rig, name

    @property  # type: ignore[override]
    def delay(self) -> float:
        return self._rig.delays.get(self._member, 0.0)

    @delay.setter
    def delay(self, value: float) -> None:
        pass  # set per member through Rig.slow


class Rig:
    """Named devices under one CrashRecorder, opened as vrig:// URIs through fault switches."""

    def __init__(self, *, sector: int = 512, wrap: Wrap | None = None,
                 wrap_only: set[str] | None = None) -> None:
        self.group = f"rig{next(_ids)}"
        self.recorder = CrashRecorder(self.group, sector=sector)
        self.wrap = wrap
        self.wrap_only = wrap_only  # names the wrap applies to (None: every member)
        self.rules: dict[str, list[FaultRule]] = {}
        self.delays: dict[str, float] = {}
        self.paths: dict[str, Any] = {}  # name -> MultipathDevice under it, for path drills
        self.initial: dict[str, np.ndarray] = {}
        _RIGS[self.group] = self
        register()

    # --- members -----------------------------------------------------------------------

    def uri(self, name: str) -> str:
        """The URI that opens member name through the rig."""
        return f"{SCHEME}://{self.group}/{name}"

    def add(self, name: str, device: BlockDevice, multipath: Any = None) -> str:
        """Put a device under the rig; returns its URI."""
        self.recorder.add(name, device)
        self.rules[name] = []
        if multipath is not None:
            self.paths[name] = multipath
        return self.uri(name)

    def add_memory(self, name: str, size: int, block_size: int = 512) -> str:
        """A zero-filled memory member; returns its URI."""
        self.recorder.add_memory(name, size, block_size)
        self.rules[name] = []
        return self.uri(name)

    @property
    def names(self) -> list[str]:
        """Member names in the order they were added."""
        return list(self.recorder.members)

    def handle(self, name: str) -> BlockDevice:
        """A fresh handle on a member (what opening its URI returns)."""
        if name not in self.recorder.members:
            raise NotFoundError(f"no rig member {self.uri(name)!r}")
        dev: BlockDevice = _Switch(CrashDevice(self.recorder, name), self, name)
        if self.wrap is not None and (self.wrap_only is None or name in self.wrap_only):
            dev = self.wrap(dev)
        return dev

    # --- faults ------------------------------------------------------------------------

    def fail(self, name: str, kind: str = "all", *, how: str = "error", at: int = 0) -> None:
        """The member fails: ``error`` every later operation of a kind raises MemberIOError (a dead
        disk), ``short`` its reads come back short, ``shrink`` it ends at byte ``at``."""
        if how == "short":
            self.rules[name].append(FaultRule(frozenset(["read"]), "fail", style="short"))
        elif how == "shrink":
            self.rules[name].append(FaultRule(frozenset({"read", "write", "discard"}), "fail", style="shrink",
                                              beyond=at))
        else:
            self.rules[name].append(FaultRule(frozenset(KINDS) if kind == "all" else frozenset([kind]),
                                              "fail"))

    def corrupt(self, name: str, count: int | None = 1) -> FaultRule:
        """The member's next `count` reads return inverted bytes (silent corruption); the rule armed.

        The rule's ``count`` goes down as reads are hit: how many were is ``count`` minus it.
        """
        rule = FaultRule(frozenset(["read"]), "corrupt", 0, count)
        self.rules[name].append(rule)
        return rule

    def clear_corruption(self, name: str | None = None) -> None:
        """Disarm a member's (or every member's) pending corrupt reads; other faults stay."""
        for n in [name] if name is not None else self.names:
            self.rules[n][:] = [r for r in self.rules[n] if r.action != "corrupt"]

    def slow(self, name: str, delay: float) -> None:
        """Every operation on the member waits `delay` seconds first."""
        self.delays[name] = delay

    def heal(self, name: str | None = None) -> None:
        """Forget a member's (or every member's) faults."""
        for n in [name] if name is not None else self.names:
            self.rules[n].clear()
            self.delays.pop(n, None)

    def failed(self, name: str) -> bool:
        """True while a fail rule is armed on the member."""
        return any(r.action == "fail" for r in self.rules[name])

    # --- recording and crashes ---------------------------------------------------------

    @property
    def events(self) -> list[Any]:
        """The recorded writes and flushes since the last start, rebase or crash."""
        return self.recorder.events

    async def start(self) -> None:
        """Snapshot every member (reads them once) and record from now on."""
        await self.recorder.start()
        self.initial = {n: b.copy() for n, b in self.recorder.base.items()}

    def rebase(self) -> None:
        """Take what the members hold now as the base (forget the events; no device read)."""
        rec = self.recorder
        rec.base = rec.materialize(None, "keep")
        rec.events = []

    async def crash(self, cut: int, mode: str = "random", rng: random.Random | None = None) -> None:
        """Power cut after the first `cut` events: members get the materialized bytes, handles die."""
        states = self.recorder.materialize(cut, mode, rng or random.Random(0))
        await self._load(states)

    async def reset(self) -> None:
        """Put every member back to what it held at start() (handles die, as in a crash)."""
        await self._load({n: b.copy() for n, b in self.initial.items()})

    async def _load(self, states: dict[str, np.ndarray]) -> None:
        rec = self.recorder
        current = rec.materialize(None, "keep")  # what the storage holds right now
        rec.epoch += 1  # every handle opened before is dead from here on
        for name, want in states.items():
            dev = rec.members[name]
            if isinstance(dev, MemoryDevice):
                dev.store[:] = want
                continue
            # Real storage: write back only the pages that differ (members can be remote).
            have = current[name]
            n = len(want)
            pages = -(-n // PAGE)
            pad = pages * PAGE - n
            diff = np.flatnonzero(
                np.pad(want != have, (0, pad)).reshape(pages, PAGE).any(axis=1))
            for p in diff.tolist():
                a, b = p * PAGE, min(n, (p + 1) * PAGE)
                await dev.write(a, want[a:b])
            if len(diff):
                await dev.flush()
        rec.base = states
        rec.events = []
        rec.recording = True

    def forget(self) -> None:
        """Remove the rig (and its recorder) from the registries."""
        self.recorder.forget()
        _RIGS.pop(self.group, None)

    async def aclose(self) -> None:
        """Close the devices under the rig and forget it."""
        try:
            for dev in self.recorder.members.values():
                await dev.aclose()
        finally:
            self.forget()


async def open_uri(uri: MemberURI, *, create_size: int | None = None, **opts: Any) -> BlockDevice:
    """Open vrig://GROUP/NAME (the rig and member must exist)."""
    rig = _RIGS.get(uri.host)
    if rig is None:
        raise NotFoundError(f"no test rig {uri.text!r}")
    return rig.handle(uri.path.strip("/"))


def register() -> None:
    """Let vrig:// URIs be parsed and opened (every Rig does this when built)."""
    uri_mod.register(uri_mod.Backend(SCHEME, open_uri))

