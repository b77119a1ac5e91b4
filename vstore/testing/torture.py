"""The torture campaign engine: random schedules of I/O, failures and crashes, checked against a model.

A *schedule* is a list of operations, written as text (``w:0:4096:7,f,x:2,crash@0.5:random:3``):

==========================  =============================================================
``w:OFF:LEN:SEED``          write LEN bytes (random, from SEED) at OFF
``c:OFF:LEN:SEED+...``      several disjoint writes at once
``r:OFF:LEN``               read and compare with the model
``f``                       flush (the pool's flush: members, then any failure commit)
``d:OFF:LEN``               discard (the range then reads as its old bytes or zeros)
``x:M``                     member M fails: every I/O on it errs from now on
``h:M``                     member M is healed; if the pool dropped it, it is rebuilt
``p:M:P`` / ``q:M:P``       path P of multipath member M fails / is reinstated
``s:M:MS``                  member M answers MS milliseconds late (0: at once)
``z:M:N``                   silent corruption: member M's next N reads return their bytes
                            inverted, without an error (a pool with checksums heals them;
                            without, a wrong byte read is reported as silent corruption)
``m:M``                     member M moves (``vstore move``) to a free rig member (``s0``...)
``j:1`` / ``j:0``           the rig member ``j`` is attached as the journal / the journal is
                            detached (``vstore journal attach|detach``)
``crash@FRAC:MODE:SEED``    the power fails after FRAC of the previous operation's member
                            writes and flushes; unflushed writes are dropped (``drop``),
                            kept (``keep``) or, with ``random``, dropped, kept, torn at
                            sector boundaries and reordered (from SEED); the pool is reopened
                            as after ``kill -9`` (journal replay or resync) and checked
==========================  =============================================================

A ``Runner`` applies a schedule to a ``Target`` (a pool built on a ``Rig`` of
crash-recorded members, or any ``BlockDevice`` factory) and keeps a byte-array
model. The checks:

(a) acknowledged data intact: reads return the model; after a crash every write
    acknowledged before it is there (with a journal: every one; without: every one
    acknowledged before the last completed flush);
(b) no torn write units: bytes a crash may have caught hold their old or new
    content; with a journal a write is all old or all new per stripe row (chunk for
    mirrors);
(c) parity consistent: a scrub of the rows in use finds no mismatch (raid5/raid6);
(d) degraded reads identical: every survivable set of failed members returns the
    same bytes.

``generate`` draws a schedule from a seed, ``shrink`` cuts a failing one down to
a minimal one that still fails, ``Campaign`` runs rounds until its time is up.
Rounds are independent (a fresh pool each), so a failing round is reproduced by
its schedule alone; trio's scheduler is seeded from the schedule, so with
memory members a replay takes the very same interleavings.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from vstore.errors import ConfigError, VstoreError
from vstore.pool.home import Home
from vstore.raid.geometry import survives
from vstore.stack.device import BlockDevice
from vstore.testing.faults import FaultRule, Rig

MODES = ("random", "drop", "keep")
MIRRORED = ("raid1", "raid10")
PARITY = ("raid5", "raid6")


class CheckFailed(AssertionError):
    """A consistency check failed; ``check`` is its letter (a-d, or e for an unexpected error)."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"({check}) {message}")
        self.check = check


# ---------------------------------------------------------------------------- operations

@dataclass(frozen=True)
class Op:
    """One step of a schedule."""

    kind: str  # w c r f d x h p q s z m j crash
    args: tuple[Any, ...] = ()

    def __str__(self) -> str:
        if self.kind == "crash":
            frac, mode, seed = self.args
            return f"crash@{frac:.3g}:{mode}:{seed}"
        if self.kind == "c":
            return "c:" + "+".join(f"{o}:{n}:{s}" for o, n, s in self.args)
        return ":".join([self.kind, *map(str, self.args)])

    def __repr__(self) -> str:
        # Failing examples (hypothesis prints steps with repr) then read as schedule text.
        return f"Op.parse({str(self)!r})"

    @staticmethod
    def parse(text: str) -> Op:
        """An operation from its text (ConfigError when malformed)."""
        text = text.strip()
        try:
            if text.startswith("crash@"):
                frac, mode, seed = text[6:].split(":")
                if mode not in MODES or not 0 <= float(frac) <= 1:
                    raise ValueError(mode)
                return Op("crash", (float(frac), mode, int(seed)))
            kind, _, rest = text.partition(":")
            if kind == "x" and rest.count(":") == 2:  # x:M:short:F / x:M:shrink:F
                m, how, frac = rest.split(":")
                if how not in ("short", "shrink") or not 0 <= float(frac) <= 1:
                    raise ValueError(text)
                return Op("x", (int(m), how, float(frac)))
            if kind == "c":
                parts = [tuple(int(x) for x in p.split(":")) for p in rest.split("+")]
                if any(len(p) != 3 for p in parts):
                    raise ValueError(rest)
                return Op("c", tuple(parts))
            arity = {"w": 3, "r": 2, "f": 0, "d": 2, "x": 1, "h": 1, "p": 2, "q": 2, "s": 2, "m": 1,
                     "j": 1, "z": 2}[kind]
            args = tuple(int(x) for x in rest.split(":")) if rest else ()
            if len(args) != arity or (kind == "j" and args[0] not in (0, 1)) or (kind == "z" and args[1] < 1):
                raise ValueError(text)
            return Op(kind, args)
        except (ValueError, KeyError):
            raise ConfigError(f"bad schedule step {text!r} (see `vstore torture --help`)") from None


def format_schedule(ops: Sequence[Op]) -> str:
    """The text of a schedule."""
    return ",".join(str(o) for o in ops)


def parse_schedule(text: str) -> list[Op]:
    """A schedule from its text."""
    return [Op.parse(t) for t in text.replace("\n", ",").split(",") if t.strip()]


def payload(seed: int, length: int) -> np.ndarray:
    """The bytes a write op writes."""
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8)


# ---------------------------------------------------------------------------- targets

class Target:
    """What a Runner drives: a device opened on a rig, reopened after crashes."""

    level = "device"
    members: list[str] = []  # rig names that member indexes refer to
    durable_writes = False  # acknowledged writes survive a crash without a flush (a journal)
    unit = 0  # bytes a write is atomic in, per aligned unit, across a crash (0: none promised)
    crashable = True
    checksums = False  # the device verifies block checksums (a silently corrupted read is caught)

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        # Blocks found failing their checksums (re-checks included), and those the layout
        # counted and rewrote from redundancy: summed over every open of the device.
        self.checksum_counts = {"mismatches": 0, "repairs": 0}

    async def open(self, reopen: bool) -> BlockDevice:
        """The device under test (created when reopen is False)."""
        raise NotImplementedError

    def layout(self) -> Any:
        """A RAID layout to scrub and degrade, or None."""
        return None

    def failed(self) -> set[int]:
        """Members the device itself has given up on."""
        return set()

    def parity_rows(self, layout: Any, window: int) -> Sequence[int]:
        """The stripe rows the first `window` bytes of the device live in (to scrub)."""
        return range(min(layout.rows, -(-window // layout.row_bytes)))

    def view_device(self, view: Any) -> BlockDevice:
        """The device under test as seen through a degraded view of its layout."""
        return view

    def survivable(self, failed: set[int]) -> bool:
        """Whether the device is meant to survive these members failing."""
        return not failed

    async def flush(self, dev: BlockDevice) -> None:
        """Flush the device."""
        await dev.flush()

    async def rebuild(self, index: int) -> None:
        """Bring a healed member back (nothing by default)."""

    async def recover(self) -> None:
        """After a reopen: finish anything a crash interrupted (nothing by default)."""

    async def move(self, index: int) -> None:
        """Move member index to other storage (nothing by default)."""

    async def switch_journal(self, on: bool) -> None:
        """Attach or detach a journal (nothing by default)."""

    def crash_note(self) -> str | None:
        """Why a crash cannot be checked now (None: it can)."""
        return None

    def abandon(self) -> None:
        """Drop the device as a killed process would (no flush, no close)."""

    def crashed(self, cut: int) -> None:
        """The power failed after the first ``cut`` recorded events: roll back what lives off the rig."""

    async def close(self) -> None:
        """Close the device cleanly."""


class PoolTarget(Target):
    """A vstore pool of one level on rig members m0..m{n-1} (and the rig member "j" as journal)."""

    def __init__(self, rig: Rig, level: str, *, chunk: int = 4096, journal: bool = False,
                 home: Path | None = None, rebuild: bool = True, checksums: bool = False) -> None:
        super().__init__(rig)
        self.level = level
        self.checksums = checksums  # the pool keeps a CRC32C per block (vstore create --checksums)
        self.rebuilds = rebuild  # False: a healed member the pool dropped stays out
        self.chunk = chunk
        self.journal = journal
        self.members = [n for n in rig.names if n != "j" and not n.startswith("s")]
        self.durable_writes = journal
        self.unit = 0
        self._tmp = None
        if home is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vstore-torture-")
            home = Path(self._tmp.name)
        self.home = RecordedHome(home, lambda: len(rig.events))
        self.pool: Any = None
        self.name = "torture"

    async def open(self, reopen: bool) -> BlockDevice:
        """Create the pool (first time) or reopen it after a crash."""
        from vstore.pool.pool import Pool
        from vstore.testing.crash import reopen_after_crash

        if not reopen:
            with contextlib.suppress(FileNotFoundError):
                self.home.pool_record_path(self.name).unlink()
            uris = [self.rig.uri(n) for n in self.members]
            jr = self.rig.uri("j") if self.journal else None
            p = await Pool.create(self.home, self.name, self.level, uris, chunk=self.chunk,
                                  force=True, journal=jr, journal_size=None, checksums=self.checksums)
            await p.aclose()
            self.pool = await Pool.open(self.home, self.name)
        else:
            self.pool = await reopen_after_crash(self.home, self.name)
        lay = self.pool.layout
        if lay is None:
            raise CheckFailed("e", f"pool {self.level} has no usable layout after opening "
                                   f"(members: {[m.state for m in self.pool.members]})")
        self._sync()
        return self.pool.data_dev

    def _sync(self) -> None:
        """Follow the pool: which rig member each index is now (after moves), and its journal."""
        pool = self.pool
        prefix = self.rig.uri("")
        for i, paths in enumerate(pool.record["members"]):
            if len(paths) == 1 and paths[0].startswith(prefix):
                self.members[i] = paths[0][len(prefix):]
        self.journal = bool(pool.meta.get("journal"))
        self.durable_writes = self.journal
        if self.level in PARITY:
            self.unit = pool.layout.row_bytes if self.journal else 0
        elif self.level in MIRRORED:
            self.unit = self.chunk if self.journal else 0

    def layout(self) -> Any:
        """The pool's layout."""
        return self.pool.layout if self.pool is not None else None

    def failed(self) -> set[int]:
        """Members the pool does not use (failed, missing, rebuilding)."""
        if self.pool is None:
            return set()
        return {m.index for m in self.pool.members if m.state != "active"}

    def survivable(self, failed: set[int]) -> bool:
        """The level's redundancy."""
        return survives(self.level, len(self.members), failed)

    async def flush(self, dev: BlockDevice) -> None:
        """The pool's flush (members, then the commit of any failure seen)."""
        await self.pool.flush()

    async def rebuild(self, index: int) -> None:
        """Re-add a dropped member onto the same storage and rebuild it."""
        from vstore.ops.rebuild import replace

        if self.pool.members[index].state == "active" or not self.rebuilds:
            return  # the pool never noticed the fault (or rebuilds are off): nothing to do
        await replace(self.pool, index, self.rig.uri(self.members[index]), force=True)

    async def recover(self) -> None:
        """Finish what the crash interrupted: the resync, a rebuild, a move (as a mount would)."""
        from vstore.ops import move, rebuild

        await self.pool.consistency.wait_resynced()
        if self.pool.meta.get("operation"):
            if rebuild.interrupted(self.pool) is not None:
                await rebuild.resume(self.pool)
            elif move.interrupted(self.pool) is not None:
                await move.resume(self.pool)
        self._sync()

    async def move(self, index: int) -> None:
        """Move member index to the first rig member the pool does not use."""
        from vstore.ops.move import move

        free = [n for n in self.rig.names if n != "j" and n not in self.members]
        if not free or self.pool.members[index].state != "active":
            return
        await move(self.pool, index, self.rig.uri(free[0]), force=True)
        self._sync()

    async def switch_journal(self, on: bool) -> None:
        """Attach the rig member "j" as the journal, or detach the journal."""
        if "j" not in self.rig.names or self.level not in MIRRORED + PARITY or on == self.journal:
            return
        if on:
            await self.pool.consistency.attach_journal(self.rig.uri("j"), force=True)
        else:
            await self.pool.consistency.detach_journal()
        self._sync()

    def crash_note(self) -> str | None:
        """No journal: a degraded parity array has the write hole."""
        if self.journal:
            return None
        if self.level in PARITY and (self.failed() or any(self.rig.failed(n) for n in self.members)):
            return "a degraded parity array without a journal has the write hole"
        return None

    def _count_checksums(self) -> None:
        """Add the open pool's checksum counts to ``checksum_counts`` (before it goes)."""
        from vstore.stack.checksum import ChecksumDevice

        lay = self.layout()
        if lay is None:
            return
        self.checksum_counts["mismatches"] += sum(
            m.stats["mismatches"] for m in lay.members if isinstance(m, ChecksumDevice))
        self.checksum_counts["repairs"] += sum(lay.checksum_errors)

    def abandon(self) -> None:
        """Drop the pool as kill -9 would."""
        from vstore.testing.crash import abandon

        if self.pool is not None:
            self._count_checksums()
            abandon(self.pool)
            self.pool = None

    def crashed(self, cut: int) -> None:
        """The pool record is a file off the rig: it holds what was written before the cut."""
        self.home.roll_back(self.name, cut)

    async def close(self) -> None:
        """Close the pool cleanly."""
        if self.pool is not None:
            self._count_checksums()
            pool, self.pool = self.pool, None
            await pool.aclose()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class RecordedHome(Home):
    """A config directory whose pool record writes are numbered by the rig's events.

    The record is written after the metadata commit it follows is durable; a crash cut
    before that commit must find the record as it was, as a real crash would.
    """

    def __init__(self, root: Path, clock: Callable[[], int]) -> None:
        super().__init__(root)
        self.clock = clock
        self.writes: list[tuple[int, str, dict[str, Any]]] = []

    def write_pool(self, pool: str, record: dict[str, Any], *, new: bool = False) -> None:
        """Write the record, remembering after how many rig events it was written."""
        super().write_pool(pool, record, new=new)
        self.writes.append((self.clock(), pool, copy.deepcopy(record)))

    def roll_back(self, pool: str, cut: int) -> None:
        """Put back the last record of pool written within the first ``cut`` events."""
        mine = [w for w in self.writes if w[1] == pool]
        kept = [w for w in mine if w[0] <= cut]
        if len(kept) < len(mine) and kept:
            super().write_pool(pool, kept[-1][2])
        self.writes = [(0, pool, kept[-1][2])] if kept else []


@dataclass
class Backing:
    """What a device factory gets: handles on the rig members, their URIs, and whether it reopens."""

    devices: list[BlockDevice]
    uris: list[str]
    reopen: bool
    scratch: Path


class DeviceTarget(Target):
    """Any BlockDevice made by factory(backing) (or factory()) over rig members b0..b{k-1}."""

    def __init__(self, rig: Rig, factory: Callable[..., Any], *, durable_writes: bool = False,
                 unit: int = 0, redundancy: int = 0) -> None:
        super().__init__(rig)
        self.factory = factory
        self.members = list(rig.names)
        self.durable_writes = durable_writes
        self.unit = unit
        self.redundancy = redundancy
        self.takes_backing = bool(inspect.signature(factory).parameters)
        self.crashable = self.takes_backing
        self.dev: Any = None
        self._tmp = tempfile.TemporaryDirectory(prefix="vstore-machine-")

    async def open(self, reopen: bool) -> BlockDevice:
        """Call the factory (again after a crash)."""
        if self.takes_backing:
            b = Backing([self.rig.handle(n) for n in self.members],
                        [self.rig.uri(n) for n in self.members], reopen, Path(self._tmp.name))
            dev = self.factory(b)
        else:
            dev = self.factory()
        if inspect.isawaitable(dev):
            dev = await dev
        self.dev = dev
        return dev

    def survivable(self, failed: set[int]) -> bool:
        """Up to `redundancy` failed members."""
        return len(failed) <= self.redundancy

    def abandon(self) -> None:
        """Forget the device without closing it."""
        self.dev = None

    async def close(self) -> None:
        """Close the device."""
        if self.dev is not None:
            dev, self.dev = self.dev, None
            await dev.aclose()
        self._tmp.cleanup()


class VolumeTarget(Target):
    """A scratch volume in an existing pool: workload and reads only (no crashes, no failures)."""

    def __init__(self, rig: Rig, pool: Any, volume: str) -> None:
        super().__init__(rig)
        self.pool = pool
        self.volume = volume
        self.level = pool.level
        self.crashable = False

    async def open(self, reopen: bool) -> BlockDevice:
        """The scratch volume."""
        return self.pool.get_volume(self.volume)

    def layout(self) -> Any:
        """The pool's layout (scrubbed and degraded where the volume lives)."""
        return self.pool.layout

    def parity_rows(self, layout: Any, window: int) -> Sequence[int]:
        """The rows of the volume's first `window` bytes."""
        vol = self.pool.get_volume(self.volume)
        rows: set[int] = set()
        for _voff, poff, n in vol.pieces(0, min(window, vol.size)):
            rows.update(range(poff // layout.row_bytes, -(-(poff + n) // layout.row_bytes)))
        return sorted(r for r in rows if r < layout.rows)

    def view_device(self, view: Any) -> BlockDevice:
        """The volume mapped onto the degraded view."""
        from vstore.stack.volume import Volume

        vol = self.pool.get_volume(self.volume)
        return Volume(vol.name, vol.size, vol.extents, view, vol.extent_size, read_only=True)

    async def flush(self, dev: BlockDevice) -> None:
        """The pool's flush."""
        await self.pool.flush()

    async def close(self) -> None:
        """Nothing: the pool stays open for the next round."""


async def build_rig(members: Sequence[str], *, member_size: int, journal: str | None = None,
                    journal_size: int = 4 << 20, wrap: Callable[[BlockDevice], BlockDevice] | None = None,
                    wrap_where: str = "all", force: bool = False, spare: bool = False) -> Rig:
    """A rig over real members (files, NFS, iSCSI; comma-joined paths make a multipath member).

    Each member is used up to member_size bytes; ``journal`` is ``"memory"`` or a URI.
    ``spare`` adds a memory member ``s0`` to move members to, and (without a journal) a
    memory ``j`` to attach one on.
    A member that holds a vstore pool other than an earlier torture run's is refused
    unless ``force`` (torture overwrites its members).
    """
    from vstore.consistency.metadata import scan_member
    from vstore.owner import refuse_live_owner
    from vstore.stack.multipath import MultipathDevice
    from vstore.stack.offset import OffsetDevice
    from vstore.uri import open_uri, split_paths

    only = {"journal": {"j"}, "members": {f"m{i}" for i in range(len(members))}}.get(wrap_where)
    rig = Rig(wrap=wrap, wrap_only=only)

    async def add(name: str, spec: str, size: int) -> None:
        paths = split_paths(spec)
        mp = None
        if len(paths) > 1:
            dev = mp = await MultipathDevice.open(paths, create_size=size)
        else:
            dev = await open_uri(paths[0], create_size=size)
        try:
            if dev.size < size:
                raise ConfigError(f"{paths[0].redacted()} has {dev.size} bytes; torture uses "
                                  f"{size} (--member-size)")
            scan = await scan_member(dev)
            refuse_live_owner(scan.meta, paths[0].redacted())
            if scan.superblock is not None and not force and (scan.meta or {}).get("name") != "torture":
                raise ConfigError(f"{paths[0].redacted()} belongs to vstore pool "
                                  f"{scan.superblock.pool_uuid}: torture would overwrite it "
                                  "(use --force)")
            rig.add(name, OffsetDevice(dev, 0, size), multipath=mp)
        except BaseException:
            await dev.aclose()
            raise

    try:
        for i, spec in enumerate(members):
            await add(f"m{i}", spec, member_size)
        if journal == "memory" or (spare and not journal):
            rig.add_memory("j", journal_size)
        elif journal:
            await add("j", journal, journal_size)
        if spare:
            rig.add_memory("s0", member_size)
        await rig.start()
    except BaseException:
        with trio.CancelScope(shield=True):
            await rig.aclose()
        raise
    return rig


async def pool_shape(rig: Rig, level: str, *, chunk: int, journal: bool, window: int,
                     checksums: bool = False) -> Shape:
    """Create the pool once to learn its geometry; the shape schedules are generated for."""
    from vstore.raid.geometry import redundancy

    target = PoolTarget(rig, level, chunk=chunk, journal=journal, checksums=checksums)
    try:
        dev = await target.open(False)
        lay = target.layout()
        row = lay.row_bytes or chunk * {
            "raid0": lay.n, "raid10": max(1, lay.n // 2)}.get(level, 1)
        members = target.members
        mp = tuple(i for i, n in enumerate(members) if n in rig.paths)
        return Shape(window=min(window, dev.size), level=level, members=len(members),
                     redundancy=redundancy(level, len(members)), chunk=chunk, row=row,
                     sector=max(512, lay.block_size), journal=journal, multipath=mp,
                     paths={i: len(rig.paths[members[i]].paths) for i in mp},
                     spares=sum(n.startswith("s") for n in rig.names),
                     journal_device="j" in rig.names and level in MIRRORED + PARITY,
                     checksums=checksums)
    finally:
        await target.close()


# ---------------------------------------------------------------------------- the runner

def _first_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.flatnonzero(a != b)[0])


@dataclass
class Stats:
    """Counts of what a campaign did."""

    rounds: int = 0
    ops: int = 0
    bytes_written: int = 0
    crashes: int = 0
    failures: int = 0
    paths: int = 0
    rebuilds: int = 0
    moves: int = 0
    switches: int = 0  # journal attached or detached
    checks: int = 0
    skipped_crashes: int = 0
    corruptions: int = 0  # silent-corruption faults armed (z steps)
    corrupt_reads: int = 0  # member reads that returned flipped bits
    checksum_mismatches: int = 0  # blocks found failing their checksums (re-checks included)
    checksum_repairs: int = 0  # blocks the layout counted and rewrote from redundancy
    notes: set[str] = field(default_factory=set)


class Runner:
    """Applies operations to a target and checks it against a byte-array model."""

    def __init__(self, target: Target, window: int | None = None, stats: Stats | None = None,
                 align: int = 1) -> None:
        self.target = target
        self.align = max(1, align)  # I/O rounded to this (members such as iSCSI LUNs need sectors)
        self.rig = target.rig
        self.want_window = window
        self.stats = stats or Stats()
        self.dev: BlockDevice | None = None
        self.model = np.zeros(0, np.uint8)
        self.base = self.model
        self.ops: list[tuple] = []  # since the last crash: (kind, first event, last event, ...)
        self.last: tuple[int, int] = (0, 0)  # event slice of the previous operation
        self.last_kind = ""
        self.corruptions: list[tuple[int, int, FaultRule]] = []  # z steps: (member, reads, rule)

    @property
    def window(self) -> int:
        """Bytes of the device the workload uses."""
        return len(self.model)

    async def start(self) -> None:
        """Reset the rig, open the target, zero the window (consistent parity), start recording."""
        # Every schedule starts from the same bytes: a failure is reproduced by its schedule alone.
        await self.rig.reset()
        self.dev = await self.target.open(False)
        size = self.dev.size if self.want_window is None else min(self.want_window, self.dev.size)
        size -= size % self.align
        self.model = np.zeros(size, np.uint8)
        self.base = self.model.copy()  # the model when the ops since the last crash began
        await self.dev.write(0, self.model)
        await self.target.flush(self.dev)
        self.rig.rebase()
        self.rig.recorder.recording = True

    def _events(self) -> int:
        return len(self.rig.events)

    def _unit(self) -> int | None:
        """What a crash leaves of a write made now: None unless durable once acknowledged, else
        the bytes it is atomic in (0: none promised)."""
        t = self.target
        return t.unit if t.durable_writes else None

    def _clip(self, off: int, length: int) -> tuple[int, int]:
        # Schedules are written for a window; a smaller device still runs them.
        w = self.window
        off = off % w
        a = self.align
        if a > 1:
            off -= off % a
            length = -(-max(1, length) // a) * a
        return off, max(1, min(length, w - off))

    async def apply(self, op: Op) -> None:
        """Carry out one operation (CheckFailed when a check fails)."""
        assert self.dev is not None, "start() first"
        st = self.stats
        st.ops += 1
        start = self._events()
        k, a = op.kind, op.args
        t = self.target
        if k == "w":
            off, n = self._clip(a[0], a[1])
            buf = payload(a[2], n)
            await self.dev.write(off, buf)
            self.ops.append(("w", start, self._events(), off, buf, self._unit()))
            self.model[off : off + n] = buf
            st.bytes_written += n
        elif k == "c":
            jobs = []
            taken = np.zeros(self.window, bool)
            for o, n, s in a:
                o, n = self._clip(o, n)
                if taken[o : o + n].any():
                    continue  # concurrent writes to the same bytes have no defined result
                taken[o : o + n] = True
                jobs.append((o, payload(s, n)))
            async with trio.open_nursery() as nursery:
                for o, buf in jobs:
                    nursery.start_soon(self.dev.write, o, buf)
            end = self._events()
            for o, buf in jobs:
                self.ops.append(("w", start, end, o, buf, self._unit()))
                self.model[o : o + len(buf)] = buf
                st.bytes_written += len(buf)
        elif k == "r":
            off, n = self._clip(a[0], a[1])
            got = np.asarray(await self.dev.read(off, n))
            st.checks += 1
            if not np.array_equal(got, self.model[off : off + n]):
                bad = off + _first_diff(got, self.model[off : off + n])
                state = f" (failed members {sorted(t.failed())})" if t.failed() else ""
                raise CheckFailed("a", f"read {off}+{n}{state}: byte {bad} is {got[bad - off]}, "
                                       f"{self.model[bad]} was written")
        elif k == "f":
            await t.flush(self.dev)
            self.ops.append(("f", start, self._events()))
        elif k == "d":
            off, n = self._clip(a[0], a[1])
            old = self.model[off : off + n].copy()
            await self.dev.discard(off, n)
            got = np.asarray(await self.dev.read(off, n)).copy()
            st.checks += 1
            bad = np.flatnonzero((got != old) & (got != 0))
            if len(bad):
                raise CheckFailed("a", f"discard {off}+{n}: byte {off + int(bad[0])} is neither its "
                                       "old content nor zero")
            self.ops.append(("d", start, self._events(), off, got, old))
            self.model[off : off + n] = got
        elif k == "x":
            # (member[, how, where]): a dead member, one whose reads come back short, or one
            # that shrank (ends at a fraction of its size; I/O past that fails).
            i = a[0]
            how = a[1] if len(a) > 1 else "error"
            if 0 <= i < len(t.members):
                gone = {j for j, name in enumerate(t.members) if self.rig.failed(name)} | t.failed()
                if i not in gone and t.survivable(gone | {i}):
                    at = int(a[2] * self.rig.handle(t.members[i]).size) if len(a) > 2 else 0
                    self.rig.clear_corruption(t.members[i])  # a dead member returns no bytes at all
                    self.rig.fail(t.members[i], how=how, at=at)
                    st.failures += 1
        elif k == "h":
            i = a[0]
            if 0 <= i < len(t.members) and self.rig.failed(t.members[i]):
                self.rig.heal(t.members[i])
                if i in t.failed():
                    await t.rebuild(i)
                    st.rebuilds += i not in t.failed()
        elif k in ("p", "q"):
            i, p = a
            mp = self.rig.paths.get(t.members[i]) if 0 <= i < len(t.members) else None
            if mp is not None and 0 <= p < len(mp.paths):
                if k == "p":
                    if sum(q.state == "active" for q in mp.paths) > 1 and mp.paths[p].state == "active":
                        mp.fail_path(p)
                        st.paths += 1
                else:
                    with contextlib.suppress(VstoreError):
                        await mp.reinstate_path(p)
        elif k == "s":
            i, ms = a
            if 0 <= i < len(t.members):
                self.rig.slow(t.members[i], ms / 1000)
        elif k == "z":
            # Silent corruption: the member's next N reads return flipped bits, no error.
            # Within redundancy, as failures are, counting members whose reads are still to
            # be flipped: with nothing to rebuild the bytes from, a read that fails its
            # checksum twice is rightly an error.
            i, count = a
            gone = {j for j, name in enumerate(t.members) if self.rig.failed(name)} | t.failed()
            armed = [r for rules in self.rig.rules.values() for r in rules]
            gone |= {j for j, _, rule in self.corruptions
                     if rule.count and j != i and any(r is rule for r in armed)}
            if 0 <= i < len(t.members) and i not in gone and t.survivable(gone | {i}):
                self.corruptions.append((i, count, self.rig.corrupt(t.members[i], count)))
                st.corruptions += 1
        elif k == "m":
            if 0 <= a[0] < len(t.members) and not any(self.rig.failed(n) for n in t.members):
                await t.move(a[0])
                st.moves += 1
        elif k == "j":
            if not any(self.rig.failed(n) for n in t.members):
                await t.switch_journal(bool(a[0]))
                st.switches += 1
        elif k == "crash":
            await self._crash(*a)
            return
        else:
            raise ConfigError(f"unknown operation {op}")
        if k not in ("r",):
            self.last = (start, self._events())
            self.last_kind = k

    # --- crashes ---------------------------------------------------------------------------

    async def _crash(self, frac: float, mode: str, seed: int) -> None:
        t = self.target
        note = t.crash_note() if t.crashable else "the device factory takes no backing storage"
        if note is not None:
            self.stats.skipped_crashes += 1
            self.stats.notes.add(f"crashes skipped: {note}")
            return
        a, b = self.last
        cut = a + int(round(frac * (b - a)))
        t.abandon()
        self.rig.clear_corruption()  # a flipped read is transient: it does not outlive the power
        await self.rig.crash(cut, mode, random.Random(seed))
        t.crashed(cut)
        self.stats.crashes += 1
        self.dev = await t.open(True)
        await t.recover()
        # The recovery (journal replay, resync, a resumed rebuild or move) is the step a
        # crash right after this one cuts into: a power failure during recovery.
        recovered = self._events()
        got = np.asarray(await self.dev.read(0, self.window)).copy()
        self._check_contents(got, cut)
        await self._check_redundancy(got)
        self.model = got
        self.base = got.copy()
        self.ops = []
        self.last = (0, recovered)
        self.last_kind = "recover"

    def _check_contents(self, got: np.ndarray, cut: int) -> None:
        """(a) and (b) after a crash at event ``cut``, for the writes since the last crash.

        A write is *exact* (its bytes must be there) when a flush that completed before
        the cut followed it, or when it was acknowledged before the cut while the target
        made writes durable on acknowledgement (a journal: each write records which mode
        it was made in, since a journal can be attached or detached between them). A write
        the cut may have caught is *loose*: its bytes hold their old or new content —
        per atomic unit all old or all new when the target promised one, else per byte.
        """
        self.stats.checks += 1
        ops = self.ops
        last_flush = -1
        # Steps run one after another, so the order of self.ops (not event indexes: a step
        # may cause no member I/O at all) says which writes a completed flush covers.
        for idx, op in enumerate(ops):
            if op[0] == "f" and op[2] <= cut:
                last_flush = idx
        expect = self.base.copy()
        loose_bytes: list[tuple[int, np.ndarray]] = []  # any byte may hold these
        loose_units: list[tuple[int, np.ndarray, int]] = []  # all old or all new per unit
        for idx, op in enumerate(ops):
            if op[0] == "w":
                _, s, e, off, buf, unit = op
                if s >= cut and idx > last_flush:
                    continue  # not begun when the power failed
                if idx < last_flush or (unit is not None and e <= cut):
                    expect[off : off + len(buf)] = buf
                elif unit is not None:
                    loose_units.append((off, buf, unit or 1))
                else:
                    loose_bytes.append((off, buf))
            elif op[0] == "d" and op[1] < cut:
                loose_bytes.append((op[3], op[4]))
                loose_bytes.append((op[3], op[5]))
        ok = got == expect
        loose = np.zeros(len(got), bool)
        for off, buf in loose_bytes:
            ok[off : off + len(buf)] |= got[off : off + len(buf)] == buf
            loose[off : off + len(buf)] = True
        for off, buf, unit in loose_units:
            pos = off
            while pos < off + len(buf):
                stop = min(off + len(buf), (pos // unit + 1) * unit)
                part = got[pos:stop]
                if np.array_equal(part, buf[pos - off : stop - off]) or np.array_equal(part, expect[pos:stop]):
                    ok[pos:stop] = True
                elif not ok[pos:stop].all():
                    raise CheckFailed("b", f"write {off}+{len(buf)} caught by the crash: bytes "
                                           f"{pos}..{stop} are a mixture of old and new")
                pos = stop
            loose[off : off + len(buf)] = True
        wrong = np.flatnonzero(~ok)
        if len(wrong):
            x = int(wrong[0])
            if loose[x]:
                raise CheckFailed("b", f"byte {x} is {got[x]} after the crash: neither its "
                                       f"acknowledged content ({expect[x]}) nor one written since")
            raise CheckFailed("a", f"acknowledged byte {x} is {got[x]} after the crash, {expect[x]} "
                                   "was written")

    async def _check_redundancy(self, got: np.ndarray) -> None:
        from vstore.raid.base import ParityLayout
        from vstore.testing.checks import degraded_views, verify_parity

        lay = self.target.layout()
        if lay is None:
            return
        if isinstance(lay, ParityLayout):
            bad = await verify_parity(lay, self.target.parity_rows(lay, self.window))
            self.stats.checks += 1
            if bad:
                raise CheckFailed("c", f"stripe rows with inconsistent parity: {bad[:8]}")
        if self.target.level in MIRRORED + PARITY:
            for failed, view in degraded_views(lay):
                seen = np.asarray(await self.target.view_device(view).read(0, self.window))
                self.stats.checks += 1
                if not np.array_equal(seen, got):
                    x = _first_diff(seen, got)
                    raise CheckFailed("d", f"with members {sorted(failed)} failed, byte {x} reads "
                                           f"{seen[x]} instead of {got[x]}")

    async def finish(self) -> None:
        """Final checks without a crash: flush, read everything back, scrub, degrade; then close."""
        assert self.dev is not None
        try:
            await self.target.flush(self.dev)
            got = np.asarray(await self.dev.read(0, self.window)).copy()
            self.stats.checks += 1
            if not np.array_equal(got, self.model):
                x = _first_diff(got, self.model)
                raise CheckFailed("a", f"byte {x} reads {got[x]}, {self.model[x]} was written")
            # The scrub and the degraded reads check what the members hold, read straight
            # (no healing): reads still to be flipped are not for them.
            self.rig.clear_corruption()
            await self._check_redundancy(got)
        finally:
            self.rig.heal()
            for mp in self.rig.paths.values():
                for i in range(len(mp.paths)):
                    with contextlib.suppress(VstoreError):
                        await mp.reinstate_path(i)
            await self.target.close()
        st = self.stats
        st.corrupt_reads += sum(hits for _, _, hits in self.corrupted())
        st.checksum_mismatches += self.target.checksum_counts["mismatches"]
        st.checksum_repairs += self.target.checksum_counts["repairs"]

    def corrupted(self) -> list[tuple[int, int, int]]:
        """The z steps so far: (member, reads armed, reads that returned flipped bits)."""
        return [(i, n, n - (rule.count or 0)) for i, n, rule in self.corruptions]

    def explain(self, error: BaseException) -> BaseException:
        """A finding after reads returned flipped bits says so, naming the members (else error as is)."""
        hit = [(i, h) for i, _, h in self.corrupted() if h > 0]
        if not hit:
            return error
        who = ", ".join(f"member {i}" for i in sorted({i for i, _ in hit}))
        reads = sum(h for _, h in hit)
        if isinstance(error, CheckFailed):
            check, msg = error.check, str(error)[len(f"({error.check}) "):]
        else:
            check, msg = "e", f"{type(error).__name__}: {error}"
        if self.target.checksums:
            out = CheckFailed(check, f"after silent corruption ({who}: {reads} read(s) returned "
                                     f"flipped bits; the pool keeps checksums): {msg}")
        else:
            out = CheckFailed(check, f"silent corruption not caught: {who} returned flipped bits on "
                                     f"{reads} read(s) and the pool has no checksums: {msg}")
        out.__cause__ = error  # (its traceback, for a debugger)
        return out


def seed_scheduler(seed: int) -> None:
    """Seed trio's scheduler so that ready tasks run in the same order on a replay."""
    with contextlib.suppress(Exception):  # a private hook: without it runs are merely random
        trio._core._run._r.seed(seed)  # noqa: SLF001


def schedule_seed(ops: Sequence[Op]) -> int:
    """A stable seed derived from a schedule's text."""
    return int.from_bytes(hashlib.sha256(format_schedule(ops).encode()).digest()[:8], "big")


# ---------------------------------------------------------------------------- generation

@dataclass
class Shape:
    """What a schedule generator needs to know about the target."""

    window: int
    level: str = "device"
    members: int = 0
    redundancy: int = 0
    chunk: int = 4096
    row: int = 4096
    sector: int = 512
    journal: bool = False
    multipath: tuple[int, ...] = ()  # members with several paths
    paths: dict[int, int] = field(default_factory=dict)  # member -> path count
    spares: int = 0  # free rig members a member can move to
    journal_device: bool = False  # a rig member "j" a journal can be attached on
    checksums: bool = False  # the pool keeps block checksums (vstore create --checksums)


def _extent(rng: random.Random, shape: Shape) -> tuple[int, int]:
    """An offset and length of any size and alignment, biased to interesting boundaries."""
    w = shape.window
    unit = rng.choice([1, shape.sector, shape.chunk, shape.row])
    off = rng.randrange(0, w)
    if unit > 1 and rng.random() < 0.6:
        off -= off % unit
    top = min(w - off, 3 * shape.row)
    kind = rng.random()
    if kind < 0.3:
        n = rng.randint(1, max(1, min(top, 600)))
    elif kind < 0.6:
        n = min(top, max(1, unit * rng.randint(1, 4)))
    else:
        n = rng.randint(1, top)
    return off, max(1, n)


def generate(rng: random.Random, shape: Shape, *, ops: int = 24, crashes: bool = True,
             failures: bool = True, slow: bool = True, corruption: bool = False) -> list[Op]:
    """A random schedule for a target of this shape.

    ``corruption`` (with ``failures``, on a target with redundancy) adds silent-corruption
    steps (``z``); without it the schedule of a seed is what it always was.
    """
    out: list[Op] = []
    failed: set[int] = set()
    journaled = shape.journal
    count = rng.randint(max(1, ops // 3), ops)
    can_fail = failures and shape.redundancy > 0 and shape.members > 0

    def heal_all() -> None:
        for i in sorted(failed):
            out.append(Op("h", (i,)))
        failed.clear()

    for _ in range(count):
        r = rng.random()
        if r < 0.38:
            off, n = _extent(rng, shape)
            out.append(Op("w", (off, n, rng.randrange(1 << 16))))
        elif r < 0.46:
            out.append(Op("c", tuple((*_extent(rng, shape), rng.randrange(1 << 16))
                                     for _ in range(rng.randint(2, 4)))))
        elif r < 0.60:
            out.append(Op("r", _extent(rng, shape)))
        elif r < 0.72:
            out.append(Op("f"))
        elif r < 0.76:
            out.append(Op("d", _extent(rng, shape)))
        elif r < 0.79 and can_fail and corruption and (covered := [
                j for j in range(shape.members) if j not in failed
                and survives(shape.level, shape.members, failed | {j})]):
            # A member returns flipped bits on its next reads (one, sometimes a few): one the
            # level can rebuild them for (a copy or parity left besides it).
            out.append(Op("z", (rng.choice(covered), rng.choice([1, 1, 2, 3]))))
        elif r < 0.86 and can_fail:
            alive = [i for i in range(shape.members) if i not in failed
                     and survives(shape.level, shape.members, failed | {i})] \
                if shape.level != "device" else \
                ([i for i in range(shape.members) if i not in failed]
                 if len(failed) < shape.redundancy else [])
            if alive and rng.random() < 0.6:
                i = rng.choice(alive)
                failed.add(i)
                how = rng.choice(["error", "error", "short", "shrink"])
                out.append(Op("x", (i,) if how == "error" else (i, how, round(rng.random(), 3))))
            elif failed:
                i = rng.choice(sorted(failed))
                failed.discard(i)
                out.append(Op("h", (i,)))
        elif r < 0.92 and failures and shape.multipath:
            m = rng.choice(shape.multipath)
            p = rng.randrange(shape.paths.get(m, 2))
            out.append(Op(rng.choice("pq"), (m, p)))
        elif r < 0.95 and slow and shape.members:
            out.append(Op("s", (rng.randrange(shape.members), rng.choice([0, 0, 1, 3]))))
        elif r < 0.965 and crashes and not failed and (shape.spares or shape.journal_device):
            # Operations a crash may interrupt: a move, a journal attached or detached.
            if shape.journal_device and (not shape.spares or rng.random() < 0.5):
                out.append(Op("j", (0 if journaled else 1,)))
                journaled = not journaled
            else:
                out.append(Op("m", (rng.randrange(shape.members),)))
        elif crashes and rng.random() < 0.5:
            if not journaled and failed:
                heal_all()
            crash = Op("crash", (_frac(rng), rng.choice(MODES), rng.randrange(1 << 16)))
            out.append(crash)
            again = random.Random(crash.args[2])  # (not from rng: other schedules stay as they were)
            if again.random() < 0.3:  # and again while the pool recovers from the first
                out.append(Op("crash", (round(again.random(), 3), again.choice(MODES),
                                        again.randrange(1 << 16))))
    if crashes:
        if not journaled and failed:
            heal_all()
        out.append(Op("crash", (_frac(rng), rng.choice(MODES), rng.randrange(1 << 16))))
    return out


def _frac(rng: random.Random) -> float:
    """Where in the previous step a crash cuts: often right after it, else anywhere inside."""
    return 1.0 if rng.random() < 0.25 else round(rng.random(), 3)


# ---------------------------------------------------------------------------- running and shrinking

MakeRunner = Callable[[], Awaitable[Runner]]


@dataclass
class Outcome:
    """The result of running one schedule."""

    ok: bool
    error: BaseException | None = None
    step: int = -1  # index of the operation that failed (len(ops) for the final checks)

    @property
    def message(self) -> str:
        """One line describing the failure."""
        if self.error is None:
            return "ok"
        if isinstance(self.error, CheckFailed):
            return str(self.error)
        return f"(e) {type(self.error).__name__}: {self.error}"

    @property
    def check(self) -> str:
        """The failed check's letter."""
        return getattr(self.error, "check", "e") if self.error is not None else ""


async def run_schedule(make: MakeRunner, ops: Sequence[Op]) -> Outcome:
    """Run one schedule on a fresh target; never raises for a failed check or a device error."""
    from vstore.io.aio import unwrap

    seed_scheduler(schedule_seed(ops))
    runner = None
    step = -1
    runner = await make()
    try:
        try:
            await runner.start()
        except (Exception, BaseExceptionGroup) as e:
            if isinstance(unwrap(e), ConfigError):
                raise unwrap(e) from None  # the target cannot be set up: a usage error, not a finding
            raise
        for step, op in enumerate(ops):  # noqa: B007 - the step is reported
            await runner.apply(op)
        step = len(ops)
        await runner.finish()
        runner = None
        return Outcome(True)
    except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - every error is a finding
        leaf = unwrap(e)
        if isinstance(leaf, trio.Cancelled | KeyboardInterrupt):
            raise
        return Outcome(False, runner.explain(leaf), step)
    finally:
        if runner is not None:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception, BaseExceptionGroup):
                runner.rig.heal()
                await runner.target.close()


async def shrink(make: MakeRunner, ops: list[Op], first: Outcome, *, budget: float = 30.0,
                 on_step: Callable[[list[Op]], None] | None = None) -> tuple[list[Op], Outcome]:
    """A minimal schedule that still fails (greedy: drop chunks, drop single ops, simplify)."""
    deadline = time.monotonic() + budget
    best, best_out = list(ops), first
    if 0 <= first.step < len(best):
        best = best[: first.step + 1]  # nothing after the failing step matters

    async def fails(cand: list[Op]) -> Outcome | None:
        out = await run_schedule(make, cand)
        return out if not out.ok else None

    if len(best) != len(ops):
        out = await fails(best)
        if out is None:
            best = list(ops)
        else:
            best_out = out
    size = max(1, len(best) // 2)
    while size >= 1 and time.monotonic() < deadline:
        i = 0
        changed = False
        while i < len(best) and time.monotonic() < deadline:
            cand = best[:i] + best[i + size :]
            out = await fails(cand) if cand else None
            if out is not None:
                best, best_out, changed = cand, out, True
                if on_step:
                    on_step(best)
            else:
                i += size
        if not changed:
            size //= 2
    # Simplify what is left: crashes after the whole previous step or keeping/dropping
    # everything, shorter writes; then try dropping steps once more.
    changed = False
    for i in range(len(best)):
        if time.monotonic() >= deadline:
            break
        op = best[i]
        variants: list[Op] = []
        if op.kind == "w" and op.args[1] > 1:
            variants = [Op("w", (op.args[0], max(1, op.args[1] // 2), op.args[2]))]
        elif op.kind == "c" and len(op.args) > 1:
            variants = [Op("w", op.args[0])]
        elif op.kind == "crash":
            variants = [Op("crash", (1.0, op.args[1], op.args[2]))] if op.args[0] != 1.0 else []
            if op.args[1] == "random":
                variants += [Op("crash", (op.args[0], "drop", 0)), Op("crash", (op.args[0], "keep", 0))]
        for v in variants:
            cand = best[:i] + [v] + best[i + 1 :]
            out = await fails(cand)
            if out is not None:
                best, best_out, changed = cand, out, True
                break
    i = 0
    while changed and i < len(best) and time.monotonic() < deadline:
        cand = best[:i] + best[i + 1 :]
        out = await fails(cand) if cand else None
        if out is not None:
            best, best_out = cand, out
        else:
            i += 1
    return best, best_out


# ---------------------------------------------------------------------------- campaigns

@dataclass
class Failure:
    """A failing round: its seed, its schedule, the shrunk schedule and the failure."""

    round_seed: int
    schedule: list[Op]
    minimal: list[Op]
    outcome: Outcome  # of the minimal schedule
    first: Outcome | None = None  # of the whole schedule


class Campaign:
    """Rounds of generated schedules until time is up or one fails (then it is shrunk)."""

    def __init__(self, make: MakeRunner, shape: Shape, *, seed: int, seconds: float,
                 crashes: bool = True, failures: bool = True, ops: int = 24,
                 corruption: bool = False,
                 max_rounds: int | None = None, shrink_budget: float = 30.0,
                 on_round: Callable[[Campaign], None] | None = None) -> None:
        self.make = make
        self.shape = shape
        self.seed = seed
        self.seconds = seconds
        self.crashes = crashes
        self.failures = failures
        self.corruption = corruption
        self.n_ops = ops
        self.max_rounds = max_rounds
        self.shrink_budget = shrink_budget
        self.on_round = on_round
        self.stats = Stats()
        self.failure: Failure | None = None
        self.started = 0.0
        self.phase = "running"

    def round_seed(self, k: int) -> int:
        """The seed of round k: rounds are reproducible one by one."""
        return int.from_bytes(hashlib.sha256(f"{self.seed}/{k}".encode()).digest()[:4], "big")

    def schedule(self, k: int) -> list[Op]:
        """The schedule of round k."""
        return generate(random.Random(self.round_seed(k)), self.shape, ops=self.n_ops,
                        crashes=self.crashes, failures=self.failures, corruption=self.corruption)

    async def run(self) -> Failure | None:
        """Run rounds; the first failing one is shrunk and returned."""
        self.started = time.monotonic()
        k = 0
        while time.monotonic() - self.started < self.seconds or k == 0:
            if self.max_rounds is not None and k >= self.max_rounds:
                break
            ops = self.schedule(k)
            out = await run_schedule(self._counted, ops)
            self.stats.rounds += 1
            if self.on_round:
                self.on_round(self)
            if not out.ok:
                self.phase = "shrinking"
                if self.on_round:
                    self.on_round(self)
                minimal, mout = await shrink(self.make, ops, out, budget=self.shrink_budget)
                self.failure = Failure(self.round_seed(k), ops, minimal, mout, out)
                return self.failure
            k += 1
        return None

    async def _counted(self) -> Runner:
        r = await self.make()
        r.stats = self.stats
        return r


def parse_time(text: str) -> float:
    """Seconds from '60s', '2m', '1.5', '500ms'."""
    t = text.strip().lower()
    try:
        for suffix, mult in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)):
            if t.endswith(suffix):
                return float(t[: -len(suffix)]) * mult
        return float(t)
    except ValueError:
        raise ConfigError(f"bad duration {text!r} (use e.g. 10s, 2m)") from None


__all__ = [
    "Backing",
    "Campaign",
    "CheckFailed",
    "DeviceTarget",
    "Failure",
    "Op",
    "Outcome",
    "PoolTarget",
    "Runner",
    "Shape",
    "Stats",
    "Target",
    "VolumeTarget",
    "build_rig",
    "format_schedule",
    "generate",
    "parse_schedule",
    "parse_time",
    "payload",
    "pool_shape",
    "run_schedule",
    "seed_scheduler",
    "shrink",
]
