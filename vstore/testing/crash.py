"""A crash-simulating device: record every write and flush of a pool, then cut the power anywhere.

A ``CrashRecorder`` holds a set of named members (its devices). Each member is
reached through ``crashsim://GROUP/NAME`` URIs (so a pool is created and
reopened on them like on any other member), and every write and flush that
reaches it is recorded, in one global order across all members of the group:

    rec = CrashRecorder("g1")
    for i in range(4):
        rec.add_memory(f"m{i}", 8 << 20)          # crashsim://g1/m0 ... m3
    rec.add_memory("j", 2 << 20)                  # a journal device: crashsim://g1/j
    ... create the pool, rec.start(), run a workload ...
    states = rec.materialize(len(rec.events) // 2, rng=random.Random(7))
    await rec.crash(states)                       # the "machine" reboots with those bytes

``materialize(prefix)`` gives the bytes every member holds if the power failed
right after the first ``prefix`` events: a write is durable once a flush of its
member that started after the write completed has itself completed; every other
write of the prefix is still in a volatile cache, and the ``mode`` decides its
fate — ``"drop"`` (lost), ``"keep"`` (made it), or ``"random"``: each is lost,
kept or torn at a sector boundary (a random subset of its sectors), and the kept
ones land in a random order (reordered). ``crash`` then loads the states into the
members and invalidates every handle opened before, so the crashed pool object
can do nothing more. ``reopen_after_crash`` opens the pool again the way a new
process would after ``kill -9`` (the dead owner's token is taken over).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.memory import MemoryDevice
from vstore import owner as owner_mod
from vstore import uri as uri_mod
from vstore.errors import MemberIOError, NotFoundError
from vstore.stack.device import BlockDevice, Buffer, DeviceBase, FilterDevice, as_u8
from vstore.stack.iovec import total_bytes
from vstore.uri import MemberURI

SCHEME = "crashsim"
_GROUPS: dict[str, CrashRecorder] = {}


@dataclass
class WriteEvent:
    """A completed write of bytes to one member."""

    device: str
    offset: int
    data: np.ndarray


@dataclass
class FlushEvent:
    """A flush of one member: ``end=False`` when it was issued, ``True`` when it completed."""

    device: str
    flush_id: int
    end: bool


Event = WriteEvent | FlushEvent


class CrashRecorder:
    """A group of members whose writes and flushes are recorded in one order."""

    def __init__(self, group: str, sector: int = 512) -> None:
        if group in _GROUPS:
            raise ValueError(f"crash group {group!r} exists (forget() it first)")
        self.group = group
        self.sector = sector
        self.members: dict[str, BlockDevice] = {}
        self.events: list[Event] = []
        self.base: dict[str, np.ndarray] = {}
        self.recording = False
        self.dead: set[str] = set()  # members failing every I/O until the next crash
        self.epoch = 0  # bumped by crash(): handles of an older epoch are dead
        self._flush_ids = 0
        _GROUPS[group] = self
        register()

    def uri(self, name: str) -> str:
        """The URI that opens member name."""
        return f"{SCHEME}://{self.group}/{name}"

    def add(self, name: str, device: BlockDevice) -> str:
        """Put a device in the group (its bytes are read back to snapshot it); returns its URI."""
        self.members[name] = device
        return self.uri(name)

    def add_memory(self, name: str, size: int, block_size: int = 512) -> str:
        """A new zero-filled memory member; returns its URI."""
        return self.add(name, MemoryDevice(np.zeros(size, np.uint8), block_size, name))

    def fail(self, name: str) -> None:
        """Member name fails every I/O from now on (it is back after the next crash)."""
        self.dead.add(name)

    def forget(self) -> None:
        """Remove the group from the registry."""
        _GROUPS.pop(self.group, None)

    async def _bytes_of(self, dev: BlockDevice) -> np.ndarray:
        if isinstance(dev, MemoryDevice):
            return dev.store.copy()
        return as_u8(await dev.read(0, dev.size)).copy()

    async def start(self) -> None:
        """Snapshot every member and record from now on."""
        self.base = {n: await self._bytes_of(d) for n, d in self.members.items()}
        self.events = []
        self.recording = True

    # --- what the devices report ------------------------------------------------------------

    def _write(self, name: str, offset: int, data: np.ndarray) -> None:
        if self.recording:
            self.events.append(WriteEvent(name, offset, data.copy()))

    def _flush_start(self, name: str) -> int:
        self._flush_ids += 1
        if self.recording:
            self.events.append(FlushEvent(name, self._flush_ids, False))
        return self._flush_ids

    def _flush_end(self, name: str, flush_id: int) -> None:
        if self.recording:
            self.events.append(FlushEvent(name, flush_id, True))

    # --- crash states ---------------------------------------------------------------------

    def durable_and_pending(self, prefix: int) -> tuple[dict[str, np.ndarray], dict[str, list[WriteEvent]]]:
        """After the first prefix events: the durable bytes per member and its volatile writes."""
        durable = {n: b.copy() for n, b in self.base.items()}
        pending: dict[str, list[tuple[int, WriteEvent]]] = {n: [] for n in self.members}
        started: dict[int, int] = {}
        for idx, ev in enumerate(self.events[:prefix]):
            if isinstance(ev, WriteEvent):
                pending[ev.device].append((idx, ev))
            elif not ev.end:
                started[ev.flush_id] = idx
            else:
                cut = started.get(ev.flush_id, idx)
                keep = []
                for widx, w in pending[ev.device]:
                    if widx < cut:
                        durable[ev.device][w.offset : w.offset + len(w.data)] = w.data
                    else:
                        keep.append((widx, w))
                pending[ev.device] = keep
        return durable, {n: [w for _, w in p] for n, p in pending.items()}

    def materialize(self, prefix: int | None = None, mode: str = "random",
                    rng: random.Random | None = None) -> dict[str, np.ndarray]:
        """Every member's bytes after a power cut following the first prefix events."""
        prefix = len(self.events) if prefix is None else prefix
        rng = rng or random.Random(0)
        durable, pending = self.durable_and_pending(prefix)
        for name, writes in pending.items():
            if mode == "drop" or not writes:
                continue
            if mode == "keep":
                chosen = [(w, None) for w in writes]
            elif mode == "random":
                chosen = []
                for w in writes:
                    fate = rng.random()
                    if fate < 0.4:
                        continue
                    pieces = self._sector_pieces(w)
                    if fate < 0.7 and len(pieces) > 1:
                        kept = sorted(rng.sample(range(len(pieces)), rng.randrange(1, len(pieces))))
                        chosen.append((w, [pieces[k] for k in kept]))
                    else:
                        chosen.append((w, None))
                rng.shuffle(chosen)
            else:
                raise ValueError(f"unknown crash mode {mode!r}")
            store = durable[name]
            for w, parts in chosen:
                if parts is None:
                    store[w.offset : w.offset + len(w.data)] = w.data
                    continue
                for a, b in parts:
                    store[w.offset + a : w.offset + b] = w.data[a:b]
        return durable

    def _sector_pieces(self, w: WriteEvent) -> list[tuple[int, int]]:
        """A write cut at the member's sector boundaries: (start, end) within its bytes."""
        out = []
        a = 0
        while a < len(w.data):
            b = min(len(w.data), (w.offset + a) // self.sector * self.sector + self.sector - w.offset)
            out.append((a, b))
            a = b
        return out

    async def crash(self, states: dict[str, np.ndarray] | None = None) -> None:
        """Power cut: load the states (default: only durable bytes) and kill every open handle."""
        if states is None:
            states = self.materialize(mode="drop")
        self.epoch += 1
        self.recording = False
        self.dead.clear()
        for name, data in states.items():
            dev = self.members[name]
            if isinstance(dev, MemoryDevice):
                dev.store[:] = data
            else:
                await dev.write(0, data)
                await dev.flush()
        self.events = []


class CrashDevice(FilterDevice):
    """A handle on one member of a CrashRecorder: passes I/O through and records it."""

    def __init__(self, recorder: CrashRecorder, name: str) -> None:
        super().__init__(recorder.members[name])
        self.recorder = recorder
        self.name = name
        self.epoch = recorder.epoch

    def _alive(self) -> None:
        if self.epoch != self.recorder.epoch:
            raise MemberIOError(f"{self.recorder.uri(self.name)}: the machine crashed")
        if self.name in self.recorder.dead:
            raise MemberIOError(f"{self.recorder.uri(self.name)}: simulated member failure")

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read through."""
        self._alive()
        self.check(offset, length)
        return await self.inner.read(offset, length)

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Read through into the views."""
        self._alive()
        self.check(offset, total_bytes(views))
        await self.inner.readv_into(offset, views)

    # Vectored writes are gathered and go through write, which records them.
    writev = DeviceBase.writev

    async def write(self, offset: int, data: Buffer) -> None:
        """Write through and record the write."""
        self._alive()
        buf = as_u8(data)
        self.check(offset, len(buf))
        await self.inner.write(offset, buf)
        self._alive()  # a write finishing after the crash never happened
        self.recorder._write(self.name, offset, buf)

    async def flush(self) -> None:
        """Flush through, recording when it began and when it ended."""
        self._alive()
        fid = self.recorder._flush_start(self.name)
        await self.inner.flush()
        self._alive()
        self.recorder._flush_end(self.name, fid)

    async def discard(self, offset: int, length: int) -> None:
        """Discards are recorded as writes of zeros (what a member may return after them)."""
        self.check(offset, length)
        await self.write(offset, np.zeros(length, np.uint8))

    async def aclose(self) -> None:
        """Nothing to release: the member outlives its handles."""

    def identity(self) -> str:
        """Equal for two handles on the same member."""
        return f"{SCHEME}:{self.recorder.group}/{self.name}"


async def open_uri(uri: MemberURI, *, create_size: int | None = None, **opts: Any) -> CrashDevice:
    """Open crashsim://GROUP/NAME (the group and member must have been set up)."""
    rec = _GROUPS.get(uri.host)
    name = uri.path.strip("/")
    if rec is None or name not in rec.members:
        raise NotFoundError(f"no crash-simulated member {uri.text!r}")
    return CrashDevice(rec, name)


def register() -> None:
    """Let crashsim:// URIs be parsed and opened (every CrashRecorder does this when built)."""
    uri_mod.register(uri_mod.Backend(SCHEME, open_uri))


@contextlib.contextmanager
def dead_owner() -> Iterator[None]:
    """Treat this process's own owner tokens as left by a dead process (a simulated kill -9)."""
    import os

    real = owner_mod.token_is_stale

    def stale(token: dict[str, Any] | None) -> bool:
        if token and token.get("pid") == os.getpid():
            return True
        return real(token)

    owner_mod.token_is_stale = stale
    try:
        yield
    finally:
        owner_mod.token_is_stale = real


def abandon(pool: Any) -> None:
    """Drop a pool object as a killed process would: no flush, no close; only its lock goes."""
    pool.abandon()


async def reopen_after_crash(home: Any, name: str, *, resynced: bool = True, **kwargs: Any) -> Any:
    """Open a pool whose owner (this process, before the simulated crash) died.

    Without a journal the resync runs in the background of an open pool; ``resynced``
    finishes it before returning (as checks of the recovered pool want), else it stays
    pending (run by ``pool.run_background`` or ``pool.consistency.wait_resynced``).
    """
    from vstore.pool.pool import Pool

    with dead_owner():
        pool = await Pool.open(home, name, **kwargs)
    if resynced and not pool.read_only:
        await pool.consistency.wait_resynced()
    return pool
