"""What every RAID layout shares: member bookkeeping, failure handling, locks, member I/O.

A ``RaidLayout`` is a BlockDevice over member BlockDevices. A member that raises
``MemberIOError`` is marked failed (and the ``on_member_failed(index, exc)`` hook
given at construction is told, so the pool can persist it); the request is then
retried without it while the level's redundancy allows, and otherwise fails
with ``DegradedError``. Data is never returned from a layout that cannot compute it.

All member writes of one update go through ``submit_member_writes`` as a list
of ``(member, member offset, bytes)``, the seam where the journal or the
write-intent bitmap (``journal``) and a move's watcher (``write_watch``) see
every stripe update. ``ParityLayout`` (raid5/raid6) lives here too because both
levels share its stripe machinery and differ only in geometry and kernels.

The maintenance API (rebuild, move, scrub, resync; ``vstore.ops``, ``vstore.consistency``):
``read_member`` / ``read_members`` read members directly (``MemberFailed`` when
one fails: start again against the new failed set), ``write_member`` writes one
outside an update, ``submit_member_writes`` writes one update's members,
``member_failed`` reports a failure seen outside the layout, ``start_rebuild`` /
``finish_rebuild`` bracket a member's rebuild and ``swap_member`` puts another
device in a member's place (a move).
"""

from __future__ import annotations

import contextvars
import inspect
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import numpy as np
import trio

from vstore.cluster.fence import check_writes
from vstore.errors import (
    ConfigError,
    CorruptError,
    DegradedError,
    MemberIOError,
    OutOfRangeError,
    VstoreError,
)
from vstore.io import aio
from vstore.io import op as io_op
from vstore.io import threads as io_threads
from vstore.io.ordering import RangeOrder, spans_of_keys
from vstore.io.stats import HANDOFFS, LayerStats, now_ns
from vstore.raid import geometry
from vstore.stack.checksum import BLOCK as SUM_BLOCK
from vstore.stack.checksum import ChecksumDevice, ChecksumError, entries_of
from vstore.stack.device import BlockDevice, Buffer, DeviceBase, as_u8, read_into, write_from

# Kernel calls on at least this many bytes run in a worker thread (numba kernels are
# nogil) so the trio thread keeps serving other requests. Below it the thread hop costs
# more than it saves: XOR runs at ~60 GB/s (a 1 MiB request's parity in ~20 us, less
# than one hop), and a hop per request halved full-stripe write throughput.
KERNEL_THREAD_BYTES = 4 << 20

MemberWrite = tuple[int, int, np.ndarray]
# Consecutive bytes of one member and the buffers they move between: (member, offset, views).
MemberRun = tuple[int, int, list[np.ndarray]]


def merge_runs(pieces: Iterable[tuple[int, int, np.ndarray]]) -> list[MemberRun]:
    """Group (member, member offset, buffer) pieces into runs of consecutive member bytes.

    The plan of a request: every member gets one vectored I/O per stretch of
    consecutive bytes (the chunks of one member across stripe rows are one
    stretch), whatever the level and however many rows the request covers.
    """
    runs: list[list[Any]] = []
    for m, off, buf in sorted(pieces, key=lambda p: (p[0], p[1])):
        n = len(buf)
        if not n:
            continue
        last = runs[-1] if runs else None
        if last is not None and last[0] == m and last[3] == off:
            last[2].append(buf)
            last[3] += n
        else:
            runs.append([m, off, [buf], off + n])
    return [(m, off, views) for m, off, views, _ in runs]
OnMemberFailed = Callable[[int, BaseException], Any]


class MemberFailed(Exception):
    """A member failed during a request or a maintenance read: retry it against the new failed set."""


class BlockCorrupt(VstoreError):
    """Member blocks that failed their checksums on a read: heal them (``RaidLayout.heal``), then retry.

    ``blocks`` lists (member, member offset) of each 4 KiB block.
    """

    def __init__(self, blocks: list[tuple[int, int]]) -> None:
        self.blocks = blocks
        where = ", ".join(f"member {m} at {off}" for m, off in blocks[:4])
        super().__init__(f"{len(blocks)} block(s) fail their checksum: {where}"
                         + (" ..." if len(blocks) > 4 else ""))


# Members one request reads around (a read-only pool cannot rewrite a block that failed its
# checksum, so the request that saw it is served from the others): set by RaidLayout.read.
_AVOID: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("vstore_avoid", default=frozenset())

# A member with more checksum errors than this within CHECKSUM_FAIL_WINDOW seconds is
# failed, as ZFS's diagnosis engine faults a vdev (its checksum_N=10 in checksum_T=600s).
CHECKSUM_FAIL_COUNT_ENV = "VSTORE_CHECKSUM_FAIL_COUNT"
CHECKSUM_FAIL_WINDOW = 600.0


# What becomes of blocks that failed their checksums (RaidLayout.note_checksum_errors).
CHECKSUM_OUTCOMES = {
    "repaired": "rewritten from redundancy",
    "read-only": "served from redundancy, not rewritten (pool open read-only)",
    "check": "found by a scrub without --repair",
    "lost": "no redundancy left to rebuild them: reads fail",
}


def checksum_fail_count() -> int:
    """Checksum errors within the window that fail a member (0: never)."""
    try:
        return max(0, int(os.environ.get(CHECKSUM_FAIL_COUNT_ENV, "") or 10))
    except ValueError:
        return 10


async def run_kernel(nbytes: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a kernel inline, or in a worker thread when it is long."""
    if nbytes >= KERNEL_THREAD_BYTES:
        HANDOFFS["kernel_thread_calls"] += 1
        return await trio.to_thread.run_sync(fn, *args)
    return fn(*args)


async def run_all(jobs: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """``vstore.io.aio.run_all`` as the layouts use it: every job to its end, a DegradedError first."""
    return await aio.run_all(jobs, prefer=DegradedError)


class UpdateLog(Protocol):
    """What a layout asks of the journal or write-intent bitmap it is given (``vstore.consistency``)."""

    logs_parity: bool  # a journal logs whole updates (parity too); a bitmap only marks regions
    stats: dict[str, int]

    @property
    def max_update_bytes(self) -> int | None:
        """The largest member payload one update may carry (None: no limit of its own)."""
        ...

    async def commit(self, writes: Sequence[MemberWrite]) -> Any:
        """Make the update safe to apply (logged, or its regions marked); returns a ticket."""
        ...

    def applied(self, ticket: Any) -> None:
        """The update's member writes are done."""
        ...

    def before_flush(self) -> Any:
        """A mark taken before the members are flushed."""
        ...

    async def after_flush(self, mark: Any) -> None:
        """The members are flushed up to mark: what the log held before it is on them."""
        ...


class RowSync(Protocol):
    """What a layout asks of a pending resync (``vstore.consistency.bitmap.Resync``): rows not yet made consistent."""

    def pending(self, row: int) -> bool:
        """Whether member row ``row`` still awaits its resync."""
        ...

    async def sync_row(self, row: int) -> None:
        """Resync member row ``row`` now (its keys locked; the caller may hold them already)."""
        ...


class RaidLayout(DeviceBase):
    """Base of every layout: a BlockDevice over members, with failure handling."""

    level: str = ""
    rows: int | None = None  # stripe rows (None: linear, which has none)
    row_bytes: int | None = None  # data bytes of one row (parity levels)
    transient = False  # the old geometry of a conversion (a 2-member raid5): geometry.check_member_count

    def __init__(
        self,
        members: Sequence[BlockDevice],
        chunk: int = 65536,
        failed: Iterable[int] = frozenset(),
        on_member_failed: OnMemberFailed | None = None,
        rebuilding: Iterable[int] = frozenset(),
    ) -> None:
        geometry.check_member_count(self.level, len(members), layout=self.transient)
        geometry.check_chunk(chunk)
        self.members: list[BlockDevice] = list(members)
        self.n = len(self.members)
        self.chunk = chunk
        self.block_size = max(m.block_size for m in self.members)
        for i, m in enumerate(self.members):
            if chunk % m.block_size:
                raise ConfigError(
                    f"chunk size {chunk} is not a multiple of member {i}'s block size {m.block_size}"
                )
        self.failed: set[int] = set()
        for i in failed:
            if not 0 <= i < self.n:
                raise ConfigError(f"failed member index {i} out of range 0..{self.n - 1}")
            self.failed.add(i)
        self.on_member_failed = on_member_failed
        self.inflight = [0] * self.n
        self._locks = RangeOrder()  # rows (parity levels) or chunks (raid1/raid10) held by updates
        self.closed = False
        # The pool's journal (vstore.consistency.journal) or write-intent bitmap (vstore.consistency.bitmap): when
        # set, every update's member writes pass through journal.commit() first.
        self.journal: UpdateLog | None = None
        # Members being rebuilt (vstore.ops.rebuild): in ``failed`` for reads, yet written by every
        # update (rows the rebuild already passed must stay current; the rest it overwrites).
        self.rebuilding: set[int] = set()
        for i in rebuilding:
            if i not in self.failed:
                raise ConfigError(f"member {i} is rebuilt, so it must be failed for reads too")
            self.rebuilding.add(i)
        # Observes every update's member writes (vstore.ops.move: dirty tracking, the final pause).
        self.write_watch: Any = None
        # A resync after an unclean shutdown not yet finished (vstore.consistency.bitmap.Resync): rows
        # it has not reached are synced first by whatever would trust their redundancy (a
        # degraded read, a read-modify-write, a rebuild, a scrub, a mirror read). None when none runs.
        self.resync: RowSync | None = None
        # Foreground requests so far: background work (rebuild, scrub) slows down when it moves.
        self.io_count = 0
        # Where requests spend their time (vstore.io.stats): shown in the mount's fuse-stats.
        self.iostats = LayerStats()
        # A pool opened read-only: blocks failing their checksums are read around, not rewritten.
        self.read_only = False
        # Blocks per member that failed their checksums (status's CKSUM), their times (the
        # threshold that fails a member), and who is told (the pool: log and metadata).
        self.checksum_errors = [0] * self.n
        self._checksum_times: list[list[float]] = [[] for _ in range(self.n)]
        self.on_checksum_error: Callable[[int, list[int], str], Any] | None = None

    # --- state --------------------------------------------------------------------------

    @property
    def redundancy(self) -> int:
        """How many failed members this layout always survives."""
        return geometry.redundancy(self.level, self.n)

    @property
    def state(self) -> str:
        """'clean', 'degraded' (failed members within redundancy) or 'failed'."""
        if not self.failed:
            return "clean"
        return "degraded" if geometry.survives(self.level, self.n, self.failed) else "failed"

    def healthy(self) -> list[int]:
        """Indexes of the members in use (for this request: not those it reads around)."""
        gone = self.unreadable()
        return [i for i in range(self.n) if i not in gone]

    def unreadable(self) -> set[int] | frozenset[int]:
        """The members a read must not use: the failed ones, and those this request reads around."""
        avoid = _AVOID.get()
        return self.failed | avoid if avoid else self.failed

    def fail_member(self, i: int) -> None:
        """Stop using member i (an operator's or the pool's decision; no callback)."""
        if not 0 <= i < self.n:
            raise ConfigError(f"member index {i} out of range 0..{self.n - 1}")
        self.failed.add(i)

    def require_usable(self) -> None:
        """Raise DegradedError when too many members have failed to serve data."""
        if self.state == "failed":
            lost = ", ".join(str(i) for i in sorted(self.failed))
            raise DegradedError(
                f"{self.level} array of {self.n} members has failed members {lost}; "
                f"it survives at most {self.redundancy}: data cannot be returned"
            )

    async def member_failed(self, i: int, exc: BaseException) -> None:
        """Mark member i failed after an I/O error and tell the owner once (on_member_failed).

        The layout calls it for its own member I/O; others report here what they saw
        go wrong on a member outside it (the bitmap's writes, a journal replay).
        """
        check_writes()  # a write refused by the lease's fence is not the member's fault
        if i in self.failed and i not in self.rebuilding:
            return
        self.rebuilding.discard(i)
        self.failed.add(i)
        if self.on_member_failed is not None:
            res = self.on_member_failed(i, exc)
            if inspect.isawaitable(res):
                await res

    # --- maintenance: a member's rebuild, a member's device ---------------------------------

    def start_rebuild(self, i: int, dev: BlockDevice) -> None:
        """Put dev in member i's place to be rebuilt: reads reconstruct i, every update writes dev."""
        if not 0 <= i < self.n:
            raise ConfigError(f"member index {i} out of range 0..{self.n - 1}")
        self.failed.add(i)
        self.members[i] = dev
        self._checksummed = None
        self.rebuilding.add(i)

    def finish_rebuild(self, i: int) -> None:
        """Member i is rebuilt (every row written and flushed): it serves reads again."""
        if i not in self.rebuilding:
            raise ConfigError(f"member {i} is not being rebuilt")
        self.rebuilding.discard(i)
        self.failed.discard(i)

    def swap_member(self, i: int, dev: BlockDevice) -> BlockDevice:
        """Put dev in member i's place (same bytes; a move's switch); the device it replaces."""
        if not 0 <= i < self.n:
            raise ConfigError(f"member index {i} out of range 0..{self.n - 1}")
        old, self.members[i] = self.members[i], dev
        self._checksummed = None
        return old

    # --- member I/O ---------------------------------------------------------------------

    async def read_member(self, i: int, offset: int, length: int) -> np.ndarray:
        """Read from member i; a failure marks it failed and raises MemberFailed."""
        if i in self.failed:
            raise MemberFailed(i)
        self.inflight[i] += 1
        try:
            return as_u8(await self.members[i].read(offset, length))
        except MemberIOError as e:
            await self.member_failed(i, e)
            raise MemberFailed(i) from e
        except ChecksumError as e:
            raise BlockCorrupt([(i, off) for off in e.bad]) from e
        finally:
            self.inflight[i] -= 1

    async def _read_member_into(self, i: int, offset: int, views: list[np.ndarray]) -> None:
        """Scatter-read member i into views; a failure marks it failed and raises MemberFailed."""
        if i in self.failed:
            raise MemberFailed(i)
        self.inflight[i] += 1
        try:
            await read_into(self.members[i], offset, views)
        except MemberIOError as e:
            await self.member_failed(i, e)
            raise MemberFailed(i) from e
        except ChecksumError as e:
            raise BlockCorrupt([(i, off) for off in e.bad]) from e
        finally:
            self.inflight[i] -= 1

    async def _member_io(self, is_write: bool, runs: Sequence[MemberRun], *, verify: bool = True
                         ) -> list[tuple[int, MemberIOError | ChecksumError]]:
        """Move every run with one vectored I/O per run, all at once; return the (member, error) failures.

        Members that can hand out I/O-engine ops (local files and devices, through
        their offset window) are submitted together as ONE batch and awaited by
        this task alone: no task, thread hand-off or event per member. Others
        (network members, test wrappers) each run as one task of readv_into/writev.
        Failures are returned, not raised, and not yet recorded (a checksummed member's
        blocks that fail their checksums are a ChecksumError; with ``verify`` False a
        read of one moves the bytes as stored, for the caller to verify).
        """
        if is_write:
            check_writes()  # a pool owned through a lease that lapsed writes nothing (vstore.cluster.fence)
        ops: list[tuple[int, io_op.Op]] = []
        slow: list[MemberRun] = []
        checked: list[tuple[MemberRun, io_op.Op]] = []  # checksummed I/O through ops: their CRCs after
        raw: dict[int, BlockDevice] = {}  # unverified reads of checksummed members: their windows
        for run in runs:
            dev = self.members[run[0]]
            if not verify and isinstance(dev, ChecksumDevice):
                dev = raw[run[0]] = dev.inner
            op = dev.prepare_io(is_write, run[1], run[2])
            if op is None:
                slow.append(run)
            else:
                ops.append((run[0], op))
                if isinstance(dev, ChecksumDevice):
                    checked.append((run, op))
        # A write's CRCs are taken on this thread while the I/O threads write (below), once
        # for a mirror's copies (the same buffers on several members).
        same: dict[tuple[int, ...], io_op.Op] = {}
        op_views: dict[tuple[int, ...], list[np.ndarray]] = {}
        if is_write:
            for (_, _, views), op in checked:
                op.after = None
                key = tuple(map(id, views))
                if key not in same:
                    same[key] = op
                    op_views[key] = views
        failures: list[tuple[int, MemberIOError | ChecksumError]] = []
        inflight = self.inflight
        for run in runs:
            inflight[run[0]] += 1
        t0 = now_ns()
        op_list = [op for _, op in ops]
        try:
            if ops:
                if checked and not is_write and len(op_list) > 1:
                    # Each batch goes to one I/O thread, which also takes the CRCs of what it
                    # read (Op.after): two batches, so that two threads share that work.
                    half = len(op_list) // 2
                    io_threads.submit(op_list[:half])
                    io_threads.submit(op_list[half:])
                else:
                    io_threads.submit(op_list)
                if checked and is_write:
                    # A write's CRCs need only its bytes: taken here while the I/O thread writes.
                    for key, op in same.items():
                        if op.result is None:
                            op.result = ChecksumDevice.entries_of_views([v for v in op_views[key]])
            if slow:
                async def one(m: int, off: int, views: list[np.ndarray]) -> None:
                    try:
                        if is_write:
                            await write_from(self.members[m], off, views)
                        else:
                            await read_into(raw.get(m) or self.members[m], off, views)
                    except (MemberIOError, ChecksumError) as e:
                        failures.append((m, e))

                jobs: list[Callable[[], Awaitable[Any]]] = [lambda r=r: one(*r) for r in slow]
                if ops:
                    jobs.append(lambda: io_threads.wait(op_list))
                await run_all(jobs)
            elif ops:
                await io_threads.wait(op_list)
        finally:
            for run in runs:
                inflight[run[0]] -= 1
            st = self.iostats
            st.wait("member_write" if is_write else "member_read", now_ns() - t0,
                    sum(len(v) for run in runs for v in run[2]))
            st.bump("member_runs", len(runs))
            st.bump("member_runs_in_threads", len(ops))
        for m, op in ops:
            msg = op.failure()
            if msg is not None:
                failures.append((m, MemberIOError(msg)))
        if failures and is_write:
            check_writes()  # refused by the fence in an I/O thread: not the members' fault
        if checked and is_write:
            for (m, off, views), op in checked:
                if op.error is None:
                    dev = self.members[m]
                    got = op.result
                    if got is None:
                        first = same.get(tuple(map(id, views)))
                        got = first.result if first is not None and first.result is not None \
                            else ChecksumDevice.entries_of_views(views)
                    await dev.written(off, got)
        elif checked:
            await self._verify_ops(checked, failures)
        return failures

    async def _verify_ops(self, checked: list[tuple[MemberRun, io_op.Op]],
                          failures: list[tuple[int, MemberIOError | ChecksumError]]) -> None:
        """Compare checksummed reads done as ops with their entries; add the blocks that fail to failures.

        The CRCs were taken where each read completed (``Op.after``: an I/O thread), else
        here; every run is compared in one go, and only a mismatch is looked at run by run.
        """
        runs: list[tuple[int, int, np.ndarray]] = []
        for (m, off, views), op in checked:
            dev = self.members[m]
            if isinstance(dev, ChecksumDevice) and not any(f[0] == m for f in failures):
                got = op.result
                if got is None:
                    got = ChecksumDevice.entries_of_views(views)
                runs.append((m, off, got))
        if not runs:
            return
        want = [await self.members[m].entries(off // SUM_BLOCK, len(got)) for m, off, got in runs]
        for (m, off, views), _ in checked:  # blocks vstore cannot vouch for read as zeros
            dev = self.members[m]
            if isinstance(dev, ChecksumDevice) and dev.has_unknown:
                dev.zero_unknown(off, views)
        if len(runs) == 1:
            if np.array_equal(runs[0][2], want[0]):
                return
        elif np.array_equal(np.concatenate([g for _, _, g in runs]), np.concatenate(want)):
            return
        for m, off, got in runs:
            bad = await self.members[m].compare(off, got)
            if bad:
                failures.append((m, ChecksumError(bad)))

    async def _read_runs(self, runs: Sequence[MemberRun], *, verify: bool = True) -> None:
        """Read runs straight into their views; a failed member is marked failed and MemberFailed raised."""
        for m, _, _ in runs:
            if m in self.failed and m not in self.rebuilding:
                raise MemberFailed(m)
        failures = await self._member_io(False, runs, verify=verify)
        if failures:
            lost = [(m, e) for m, e in failures if not isinstance(e, ChecksumError)]
            for m, e in lost:
                await self.member_failed(m, e)
            if lost:
                raise MemberFailed(lost[0][0]) from lost[0][1]
            raise BlockCorrupt([(m, off) for m, e in failures if isinstance(e, ChecksumError)
                                for off in e.bad])

    async def _read_pieces(self, pieces: Sequence[tuple[int, int, int, int]], out: np.ndarray) -> None:
        """Read (member, member offset, length, out offset) pieces straight into out, one I/O per member run.

        With block checksums the whole of out is checksummed at once after the reads
        (one kernel call, not one per piece) and compared with each piece's entries.
        """
        runs = merge_runs((m, off, out[at : at + n]) for m, off, n, at in pieces)
        # (Not for local files: their reads are checksummed in the I/O threads, beside this one.)
        whole = self.checksummed and all(
            at % SUM_BLOCK == 0 and n % SUM_BLOCK == 0
            and getattr(self.members[m], "engine", None) is False for m, _, n, at in pieces)
        await self._read_runs(runs, verify=not whole)
        if whole:
            got = entries_of(out)
            mine: list[np.ndarray] = []
            want: list[np.ndarray] = []
            for m, off, n, at in pieces:
                dev = self.members[m]
                if isinstance(dev, ChecksumDevice):
                    mine.append(got[at // SUM_BLOCK : (at + n) // SUM_BLOCK])
                    want.append(await dev.entries(off // SUM_BLOCK, n // SUM_BLOCK))
            for m, off, n, at in pieces:  # blocks vstore cannot vouch for read as zeros
                dev = self.members[m]
                if isinstance(dev, ChecksumDevice) and dev.has_unknown:
                    dev.zero_unknown(off, [out[at : at + n]])
            if len(mine) == 1 and np.array_equal(mine[0], want[0]) or np.array_equal(
                    np.concatenate(mine), np.concatenate(want)):
                return
            bad: list[tuple[int, int]] = []
            for m, off, n, at in pieces:
                dev = self.members[m]
                if isinstance(dev, ChecksumDevice):
                    bad += [(m, b) for b in await dev.compare(off, got[at // SUM_BLOCK : (at + n) // SUM_BLOCK])]
            if bad:
                raise BlockCorrupt(bad)

    async def read_members(self, reqs: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
        """Read (member, offset, length) ranges at once into fresh buffers; MemberFailed if any failed."""
        bufs = [np.empty(n, dtype=np.uint8) for _, _, n in reqs]
        await self._read_runs(merge_runs((m, off, b) for (m, off, _), b in zip(reqs, bufs, strict=True)))
        return bufs

    async def read_members_checked(self, reqs: Sequence[tuple[int, int, int]]
                                   ) -> tuple[list[np.ndarray], list[list[int]]]:
        """Read (member, offset, length) ranges as stored, with the offsets of their blocks failing checksums.

        What a scrub reads: nothing raises for a bad checksum (a member without
        checksums has none); MemberFailed when a member fails.
        """
        bufs: list[np.ndarray] = [np.empty(0, dtype=np.uint8)] * len(reqs)
        bad: list[list[int]] = [[] for _ in reqs]
        lost: list[tuple[int, MemberIOError]] = []

        async def one(x: int) -> None:
            m, off, n = reqs[x]
            dev = self.members[m]
            try:
                if isinstance(dev, ChecksumDevice):
                    bufs[x], bad[x] = await dev.check_blocks(off, n)
                else:
                    bufs[x] = as_u8(await dev.read(off, n))
            except MemberIOError as e:
                lost.append((m, e))

        for m, _, _ in reqs:
            if m in self.failed and m not in self.rebuilding:
                raise MemberFailed(m)
        await run_all([lambda x=x: one(x) for x in range(len(reqs))])
        for m, e in lost:
            await self.member_failed(m, e)
        if lost:
            raise MemberFailed(lost[0][0]) from lost[0][1]
        return bufs, bad

    async def write_member(self, i: int, offset: int, data: np.ndarray) -> None:
        """Write to member i alone (a rebuild, a resync); a failure marks it failed, skipped if failed."""
        if i in self.failed and i not in self.rebuilding:
            return
        check_writes()
        self.inflight[i] += 1
        try:
            await self.members[i].write(offset, data)
        except MemberIOError as e:
            await self.member_failed(i, e)
        finally:
            self.inflight[i] -= 1

    async def submit_member_writes(self, writes: Sequence[MemberWrite]) -> None:
        """Issue one update's member writes concurrently, skipping failed members.

        A member that fails here is marked failed but the update is not retried:
        the bytes written to the others were computed for the whole update, so the
        failed member's intended content stays computable from them.
        """
        intended = [w for w in writes if len(w[2])]
        writes = [w for w in intended if w[0] not in self.failed or w[0] in self.rebuilding]
        watch = self.write_watch
        if watch is not None and writes:
            await watch.before(writes)  # a move may hold updates back while it switches members
        try:
            await self._issue_member_writes(writes, intended)
        finally:
            if watch is not None and writes:
                watch.after(writes)
        self.require_usable()

    async def _issue_member_writes(self, writes: Sequence[MemberWrite],
                                   intended: Sequence[MemberWrite] | None = None) -> None:
        if writes:
            check_writes()
        if writes and self.journal is not None:
            # Logged first, then written in place; neither half may be cancelled alone
            # (a logged but unwritten update would be replayed over later ones). The log
            # keeps the failed members' bytes too (intended): should a crash come before
            # their failure reaches the metadata, the replay brings them level with parity.
            with trio.CancelScope(shield=True):
                t0 = now_ns()
                ticket = await self.journal.commit(intended or writes)
                self.iostats.wait("journal_commit", now_ns() - t0)
                try:
                    await self._write_runs(writes)
                finally:
                    self.journal.applied(ticket)
        elif writes:
            # Once an update's member writes start they all finish: a cancelled caller
            # must not leave data and parity (or two mirrors) disagreeing.
            with trio.CancelScope(shield=True):
                await self._write_runs(writes)

    async def _write_runs(self, writes: Sequence[MemberWrite]) -> None:
        """One vectored write per member run of the update, all at once; failed members are marked."""
        for m, e in await self._member_io(True, merge_runs(writes)):
            await self.member_failed(m, e)

    async def _discard_members(self, ranges: Sequence[tuple[int, int, int]]) -> None:
        """Discard (member, offset, length) ranges concurrently; an error fails that member.

        A member that errs may have discarded part of the range, so its copy can no
        longer be trusted, just as after a failed write.
        """
        if self.journal is not None and self.journal.logs_parity:
            # Under a journal a discard is dropped (it is advisory): unlogged, a crash could
            # leave one copy discarded and the other not, and no replay would mend that.
            return

        check_writes()

        async def one(i: int, off: int, n: int) -> None:
            if i in self.failed and i not in self.rebuilding:
                return
            try:
                await self.members[i].discard(off, n)
            except MemberIOError as e:
                await self.member_failed(i, e)

        watch = self.write_watch
        # A move (vstore.ops.move) tracks discards as it tracks writes: the range is copied again.
        marks = [(i, off, np.broadcast_to(np.uint8(0), (n,))) for i, off, n in ranges]
        if ranges and watch is not None:
            await watch.before(marks)
        try:
            if ranges:
                bitmap = self.journal
                # An update like a write: with the write-intent bitmap its regions are marked
                # first, so a crash half way through is resynced (the copies made equal).
                with trio.CancelScope(shield=True):
                    ticket = await bitmap.commit(marks) if bitmap is not None else None
                    try:
                        await run_all([lambda r=r: one(*r) for r in ranges])
                    finally:
                        if bitmap is not None:
                            bitmap.applied(ticket)
        finally:
            if ranges and watch is not None:
                watch.after(marks)
        self.require_usable()

    # --- resync after an unclean shutdown (vstore.consistency.bitmap) ------------------------

    def resync_keys(self, row: int) -> list[int]:
        """The lock keys a resync of member row ``row`` holds (rows; raid10: its chunks)."""
        return [row]

    def rows_of_keys(self, keys: Iterable[int]) -> set[int]:
        """The member rows that hold these lock keys (rows; raid10 overrides for chunks)."""
        return set(keys)

    async def resync_row(self, row: int, trusted: frozenset[int] | set[int] = frozenset()) -> None:
        """Make member row ``row``'s redundancy agree again (the caller holds ``resync_keys(row)``).

        ``trusted``: members being rebuilt whose content in this row is good (below
        the rebuild's cursor): read like healthy ones, and brought in line.
        """
        raise DegradedError(f"{self.level} has no redundancy to resync")

    async def sync_rows(self, rows: Iterable[int]) -> None:
        """Resync those of these member rows that a pending resync has not reached yet."""
        rs = self.resync
        if rs is None:
            return
        for r in sorted(set(rows)):
            if rs.pending(r):
                await rs.sync_row(r)

    async def sync_keys(self, keys: Iterable[int]) -> None:
        """``sync_rows`` of the rows holding these lock keys."""
        if self.resync is not None:
            await self.sync_rows(self.rows_of_keys(keys))

    # --- block checksums (vstore.stack.checksum): self-healing reads ----------------------

    @property
    def checksummed(self) -> bool:
        """Whether the members keep block checksums (a pool made with --checksums)."""
        got = self.__dict__.get("_checksummed")
        if got is None:  # looked up once, again after a member's device changes
            got = self._checksummed = any(isinstance(m, ChecksumDevice) for m in self.members)
        return got

    async def note_checksum_errors(self, i: int, offsets: list[int], outcome: str) -> None:
        """Count member i's blocks that failed their checksums; fail it past the threshold.

        outcome (``CHECKSUM_OUTCOMES``): what becomes of them, for the owner's log line.
        """
        if not offsets:
            return
        self.checksum_errors[i] += len(offsets)
        now = time.monotonic()
        times = [t for t in self._checksum_times[i] if now - t < CHECKSUM_FAIL_WINDOW]
        times += [now] * len(offsets)
        self._checksum_times[i] = times[-1000:]
        if self.on_checksum_error is not None:
            res = self.on_checksum_error(i, offsets, outcome)
            if inspect.isawaitable(res):
                await res
        limit = checksum_fail_count()
        if limit and len(times) > limit and i not in self.failed:
            await self.member_failed(i, MemberIOError(
                f"{len(times)} blocks failed their checksums within {int(CHECKSUM_FAIL_WINDOW)} s "
                f"(more than {limit}, {CHECKSUM_FAIL_COUNT_ENV})"))

    async def rechecksum_row(self, row: int, trusted: frozenset[int] | set[int] = frozenset()) -> None:
        """Make member row ``row``'s checksums agree with its bytes on every member (a resync after a crash).

        The first step of a resync of a checksummed pool: a crash may have left a block
        and its checksum from different writes, and the resync trusts the data, as it
        does for parity. A no-op without checksums.
        """
        async def one(i: int) -> None:
            dev = self.members[i]
            if not isinstance(dev, ChecksumDevice) or (i in self.failed and i not in trusted):
                return
            start = row * self.chunk
            n = min(self.chunk, dev.size - start)
            if n <= 0:
                return
            try:
                await dev.rechecksum(start, n)
            except MemberIOError as e:
                await self.member_failed(i, e)

        if self.checksummed:
            await run_all([lambda i=i: one(i) for i in range(self.n)])

    async def _read_around(self, blocks: list[tuple[int, int]]) -> contextvars.Token[frozenset[int]]:
        """Count blocks that failed their checksums on a read-only pool; read around their members."""
        by_member: dict[int, list[int]] = {}
        for m, off in blocks:
            by_member.setdefault(m, []).append(off)
        avoid = _AVOID.get() | set(by_member)
        can = geometry.survives(self.level, self.n, self.failed | avoid)
        for m, offs in sorted(by_member.items()):
            await self.note_checksum_errors(m, sorted(set(offs)), "read-only" if can else "lost")
        if not can:
            raise CorruptError(
                f"{self.level}: block(s) of member(s) {sorted(by_member)} fail their checksums and no "
                f"redundancy is left to read around them")
        return _AVOID.set(frozenset(avoid))

    async def heal(self, blocks: Iterable[tuple[int, int]]) -> None:
        """Rewrite member blocks that failed their checksums with what redundancy says they hold.

        Each is checked again under its row's lock (a write racing the read that saw it
        is no corruption; a row a crash left unsynced is resynced, its checksums
        recomputed, not repaired), counted (``checksum_errors``; a member past the
        threshold is failed instead), computed from the other members as a rebuild
        would (``member_bytes``, whose reads are verified too) and written back in
        place as an update. CorruptError when no redundancy is left to compute it from.
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for m, off in blocks:
            groups.setdefault((m, off // self.chunk), []).append(off - off % SUM_BLOCK)
        for (m, row), offs in sorted(groups.items()):
            dev = self.members[m]
            if not isinstance(dev, ChecksumDevice):
                raise CorruptError(f"member {m} reported a checksum error but keeps no checksums")
            async with self.locked(self.resync_keys(row)):
                await self.sync_rows([row])
                if m in self.failed and m not in self.rebuilding:
                    continue  # failed meanwhile: the retry reads around it
                still: list[int] = []
                try:
                    for off in sorted(set(offs)):
                        _, bad = await dev.check_blocks(off, SUM_BLOCK)
                        still += bad
                except MemberIOError as e:
                    await self.member_failed(m, e)
                    continue
                if not still:
                    continue
                can = geometry.survives(self.level, self.n, self.failed | {m})
                await self.note_checksum_errors(m, still, "repaired" if can else "lost")
                if m in self.failed and m not in self.rebuilding:
                    continue  # past the threshold: failed, and the retry reads around it
                if not can:
                    raise CorruptError(
                        f"{self.level} member {m}: block(s) at {', '.join(map(str, still[:4]))} fail "
                        f"their checksums and no redundancy is left to rebuild them")
                self.iostats.bump("checksum_repairs", len(still))
                try:
                    good = [await self._member_bytes(m, off, SUM_BLOCK) for off in still]
                except MemberFailed:
                    continue  # another member failed meanwhile (marked): the caller's retry reads around it
                except BlockCorrupt as e:
                    raise CorruptError(
                        f"{self.level} member {m}: block(s) at {', '.join(map(str, still[:4]))} fail "
                        f"their checksums, and so does what would rebuild them ({e})") from e
                await self.submit_member_writes([(m, off, g) for off, g in zip(still, good, strict=True)])

    # --- per-key locks ------------------------------------------------------------------

    @asynccontextmanager
    async def locked(self, keys: Iterable[int]):
        """Hold these keys (stripe rows or chunks) against every other update of them.

        First come first served (``vstore.io.ordering``); a task that holds a key may
        lock it again (a rebuild holds the row while member_bytes locks it).
        """
        t0 = now_ns()
        entry = await self._locks.acquire(spans_of_keys(keys))
        try:
            self.iostats.wait("stripe_locks", now_ns() - t0)
            yield
        finally:
            self._locks.leave(entry)

    # --- BlockDevice --------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read length bytes at offset, reconstructing from redundancy where needed."""
        self.check(offset, length)
        self.io_count += 1
        t0 = now_ns()
        avoiding = None
        try:
            while True:
                self.require_usable()
                try:
                    return await self._read(offset, length)
                except MemberFailed:
                    self.iostats.bump("retries_after_member_failure")
                    continue
                except BlockCorrupt as e:
                    if not self.read_only:
                        await self.heal(e.blocks)
                        continue
                    # Read-only: nothing may be rewritten; this request reads around the member.
                    token = await self._read_around(e.blocks)
                    avoiding = avoiding or token
        finally:
            if avoiding is not None:
                _AVOID.reset(avoiding)
            self.iostats.read.add(length, now_ns() - t0)

    async def write(self, offset: int, data: Buffer) -> None:
        """Write the bytes at offset to every copy / with parity."""
        buf = as_u8(data)
        self.check(offset, len(buf))
        if not len(buf):
            return
        self.io_count += 1
        self.require_usable()
        t0 = now_ns()
        try:
            await self._write(offset, buf)
        finally:
            self.iostats.write.add(len(buf), now_ns() - t0)

    async def flush(self) -> None:
        """Flush every healthy member, and every member being rebuilt, concurrently.

        A member being rebuilt takes every update: what a flush acknowledged must be
        durable there too, or a crash would leave the rows its rebuild passed stale.
        """
        self.require_usable()
        check_writes()
        journal = self.journal
        mark = journal.before_flush() if journal is not None else None

        async def one(i: int) -> None:
            if i in self.failed and i not in self.rebuilding:
                return
            try:
                await self.members[i].flush()
            except MemberIOError as e:
                await self.member_failed(i, e)

        t0 = now_ns()
        await run_all([lambda i=i: one(i) for i in sorted(set(self.healthy()) | self.rebuilding)])
        self.iostats.flush.add(0, now_ns() - t0)
        self.require_usable()
        if journal is not None:
            await journal.after_flush(mark)

    async def aclose(self) -> None:
        """Close every member."""
        if self.closed:
            return
        self.closed = True
        for m in self.members:
            try:
                await m.aclose()
            except MemberIOError:
                pass  # closing a dead member is not worth an error

    async def member_bytes(self, i: int, offset: int, length: int) -> np.ndarray:
        """What member i should hold at [offset, offset+length), computed without reading it.

        The primitive of a rebuild onto a replacement (or a move of a healthy member):
        bytes past the layout's data area come back as zeros.
        """
        if not 0 <= i < self.n:
            raise ConfigError(f"member index {i} out of range 0..{self.n - 1}")
        size = self.members[i].size
        if offset < 0 or length < 0 or offset + length > size:
            raise OutOfRangeError(f"range {offset}+{length} is outside member {i} ({size} bytes)")
        while True:
            if not geometry.survives(self.level, self.n, self.failed | {i}):
                self.require_usable()
                raise DegradedError(
                    f"{self.level}: member {i} cannot be computed from the others "
                    f"(failed: {sorted(self.failed) or 'none'})"
                )
            try:
                return await self._member_bytes(i, offset, length)
            except MemberFailed:
                continue
            except BlockCorrupt as e:
                await self.heal(e.blocks)
                continue

    async def _member_bytes(self, i: int, offset: int, length: int) -> np.ndarray:
        # Levels with redundancy override this; linear and raid0 have nothing to compute from.
        raise DegradedError(f"{self.level} has no redundancy to compute member {i} from")

    async def _read(self, offset: int, length: int) -> np.ndarray:
        raise NotImplementedError

    async def _write(self, offset: int, buf: np.ndarray) -> None:
        raise NotImplementedError

    def update_spans(self, offset: int, length: int, copies: int) -> list[tuple[int, int]]:
        """(offset, length) pieces of a write, each small enough for one journal record.

        Each byte goes to ``copies`` members; a piece ends on a chunk boundary. One
        piece (the whole write) without a journal, or when it fits.
        """
        limit = self.journal.max_update_bytes if self.journal is not None else None
        if not limit or length * copies <= limit:
            return [(offset, length)]
        span = max(self.chunk, limit // copies // self.chunk * self.chunk)
        out = []
        pos, end = offset, offset + length
        while pos < end:
            stop = min(end, (pos // span + 1) * span)
            out.append((pos, stop - pos))
            pos = stop
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.level} n={self.n} chunk={self.chunk} size={self.size} {self.state}>"


class ParityLayout(RaidLayout):
    """raid5 and raid6: rows of k data chunks plus P (and Q), rotating across members.

    Subclasses give ``row_members`` (geometry), ``compute_parity`` (P or P+Q of a
    (k, span) data array), ``update_parity`` (read-modify-write of the parity for
    one data chunk) and ``recover`` (rebuild missing data rows in place).
    """

    nparity = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.k = self.n - self.nparity
        self.rows = min(m.size for m in self.members) // self.chunk
        self.row_bytes = self.k * self.chunk
        self.size = self.rows * self.row_bytes
        self._row_cache: dict[int, tuple[list[int], list[int]]] = {}

    # --- geometry and kernels (subclasses) ------------------------------------------------

    def row_members(self, row: int) -> tuple[list[int], list[int]]:
        """(data members j = 0..k-1, parity members) of a row."""
        got = self._row_cache.get(row % self.n)
        if got is None:
            got = self._row_cache[row % self.n] = geometry.parity_row_members(self.level, row, self.n)
        return got

    async def compute_parity(self, data: np.ndarray) -> list[np.ndarray]:
        """The parity chunks ([P] or [P, Q]) of a (k, span) data array."""
        raise NotImplementedError

    def update_parity(self, parity: list[np.ndarray], old: np.ndarray, new: np.ndarray, j: int) -> None:
        """Update parity columns in place for data chunk j changing from old to new."""
        raise NotImplementedError

    def recover(self, data: np.ndarray, parity: list[np.ndarray | None], missing: list[int]) -> None:
        """Rebuild the missing data rows in place from the others and the parity read."""
        raise NotImplementedError

    # --- reads --------------------------------------------------------------------------

    async def _read(self, offset: int, length: int) -> np.ndarray:
        C = self.chunk
        pieces: list[tuple[int, int, int, int]] = []  # member, member offset, length, out offset
        degraded_rows: dict[int, list[tuple[int, int, int]]] = {}  # row -> (row offset, len, out off)
        gone = self.unreadable()
        for c, start, n, at in geometry.split_chunks(offset, length, C):
            row, j = divmod(c, self.k)
            m = self.row_members(row)[0][j]
            if m in gone:
                degraded_rows.setdefault(row, []).append((j * C + start, n, at))
            else:
                pieces.append((m, row * C + start, n, at))
        out = np.empty(length, dtype=np.uint8)

        async def rebuilt(row: int, parts: list[tuple[int, int, int]]) -> None:
            # Reconstruct only the columns the request touches in this row.
            c0 = min(s % C for s, _, _ in parts)
            c1 = max((s % C) + n for s, n, _ in parts)
            async with self.locked([row]):
                # Reconstructing trusts the parity: a row written at a crash is resynced first.
                if self.resync is not None:
                    await self.sync_rows([row])
                data, _ = await self.read_row(row, c0, c1)
            for s, n, at in parts:
                j, cs = divmod(s, C)
                out[at : at + n] = data[j, cs - c0 : cs - c0 + n]

        jobs: list[Callable[[], Awaitable[Any]]] = [lambda r=r, ps=ps: rebuilt(r, ps)
                                                     for r, ps in degraded_rows.items()]
        if pieces:
            jobs.append(lambda: self._read_pieces(pieces, out))
        await run_all(jobs)
        return out

    async def read_row(
        self,
        row: int,
        c0: int = 0,
        c1: int | None = None,
        *,
        with_parity: bool = False,
        exclude: frozenset[int] | set[int] = frozenset(),
        include: frozenset[int] | set[int] = frozenset(),
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Columns [c0, c1) of a row's data (k, span), reconstructed where members failed.

        With ``with_parity`` the parity columns come back too (recomputed when their
        member failed) — what a rebuild of one member needs. Members in ``exclude``
        are treated as failed (not read); members being rebuilt in ``include`` are
        read like healthy ones (a resync below the rebuild's cursor). The caller
        holds the row's lock when writers may be active.
        """
        c1 = self.chunk if c1 is None else c1
        span = c1 - c0
        dmem, pmem = self.row_members(row)
        base = row * self.chunk + c0
        # Decide once what to read: self.failed may grow while the reads are in flight
        # (a read that then fails raises MemberFailed and the caller starts again).
        gone = (self.failed - (set(include) & self.rebuilding)) | set(exclude) | _AVOID.get()
        missing = [j for j, m in enumerate(dmem) if m in gone]
        live_data = [j for j, m in enumerate(dmem) if m not in gone]
        live_par = [i for i, m in enumerate(pmem) if m not in gone]
        data = np.empty((self.k, span), dtype=np.uint8)
        need_par = live_par if (missing or with_parity) else []
        reqs = [(dmem[j], base, span) for j in live_data]
        reqs += [(pmem[i], base, span) for i in need_par]
        got = await self.read_members(reqs)
        for j, g in zip(live_data, got, strict=False):
            data[j] = g
        parity: list[np.ndarray | None] = [None] * self.nparity
        for i, g in zip(need_par, got[len(live_data) :], strict=True):
            parity[i] = g
        if missing:
            if len(missing) > len(live_par):
                self.require_usable()
                # Only reachable with exclude: the array survives, this request does not.
                raise DegradedError(f"{self.level} row {row}: too many failed members to reconstruct")
            await run_kernel(data.nbytes, self.recover, data, parity, missing)
        if with_parity and len(live_par) < self.nparity:
            fresh = await self.compute_parity(data)
            parity = [p if p is not None else fresh[i] for i, p in enumerate(parity)]
        # Without with_parity, parity holds what was read (None where not needed).
        return data, parity

    async def _member_bytes(self, i: int, offset: int, length: int) -> np.ndarray:
        out = np.zeros(length, dtype=np.uint8)

        async def one(row: int, start: int, n: int, at: int) -> None:
            if row >= self.rows:
                return  # past the data area: zeros
            async with self.locked([row]):
                await self.sync_rows([row])
                data, parity = await self.read_row(
                    row, start, start + n, with_parity=True, exclude={i}
                )
            dmem, pmem = self.row_members(row)
            out[at : at + n] = data[dmem.index(i)] if i in dmem else parity[pmem.index(i)]

        await run_all([lambda p=p: one(*p) for p in geometry.split_chunks(offset, length, self.chunk)])
        return out

    async def verify_row(self, row: int) -> list[int]:
        """The parity members of a row whose bytes disagree with its data ([] when consistent).

        The start of a scrub; it needs every member of the row healthy.
        """
        dmem, pmem = self.row_members(row)
        if (set(dmem) | set(pmem)) & self.failed:
            raise DegradedError(f"{self.level} row {row} has a failed member: parity cannot be verified")
        async with self.locked([row]):
            await self.sync_rows([row])
            data, parity = await self.read_row(row, with_parity=True)
        fresh = await self.compute_parity(data)
        return [pmem[x] for x in range(self.nparity) if not np.array_equal(fresh[x], parity[x])]

    # --- writes -------------------------------------------------------------------------

    # Rows of one update at most (a request longer than this is several updates, in
    # order): bounds the rows one request locks and the size of one journal record.
    MAX_UPDATE_BYTES = 8 << 20

    def _update_rows(self) -> int:
        limit = self.MAX_UPDATE_BYTES
        journal_limit = self.journal.max_update_bytes if self.journal is not None else None
        if journal_limit:
            limit = min(limit, journal_limit)
        return max(1, limit // (self.n * self.chunk))

    async def _write(self, offset: int, buf: np.ndarray) -> None:
        segments = list(geometry.split_rows(offset, len(buf), self.row_bytes))
        step = self._update_rows()
        for i in range(0, len(segments), step):
            await self._write_rows(segments[i : i + step], buf)

    async def _write_rows(self, segments: list[tuple[int, int, int, int]], buf: np.ndarray) -> None:
        """One update of consecutive rows under their locks: plan every member write, then submit once."""
        async with self.locked([seg[0] for seg in segments]):
            while True:
                self.require_usable()
                try:
                    writes = await self.plan_write(segments, buf)
                except MemberFailed:
                    continue  # nothing was written yet; plan again without that member
                except BlockCorrupt as e:
                    await self.heal(e.blocks)  # old data or parity read wrong: mended first
                    continue
                await self.submit_member_writes(writes)
                return

    async def plan_write(self, segments: list[tuple[int, int, int, int]], buf: np.ndarray) -> list[MemberWrite]:
        """The member writes of (row, row offset, length, buffer offset) segments of buf.

        Whole rows take their parity straight from the caller's buffer, every row's
        in one call; partial rows (at most the first and the last) are planned one
        by one (read-modify-write, reconstruct-write or degraded).
        """
        writes: list[MemberWrite] = []
        full: list[tuple[int, int]] = []  # (row, buffer offset)
        C, k = self.chunk, self.k
        for row, start, n, at in segments:
            if n == self.row_bytes:
                full.append((row, at))
            else:
                writes += await self.plan_row_write(row, start, buf[at : at + n])
        if full:
            data = [buf[at : at + self.row_bytes].reshape(k, C) for _, at in full]
            parities = await run_kernel(len(full) * self.row_bytes, self._parity_of_rows, data)
            for (row, _), d, parity in zip(full, data, parities, strict=True):
                dmem, pmem = self.row_members(row)
                base = row * C
                writes += [(dmem[j], base, d[j]) for j in range(k)]
                writes += [(pmem[i], base, parity[i]) for i in range(self.nparity)]
        return writes

    def _parity_of_rows(self, rows: list[np.ndarray]) -> list[list[np.ndarray]]:
        """The parity chunks of each (k, chunk) data row, computed synchronously (one thread hop at most)."""
        return [self.parity_now(d) for d in rows]

    def parity_now(self, data: np.ndarray) -> list[np.ndarray]:
        """[P] or [P, Q] of a (k, span) data array, on the calling thread."""
        raise NotImplementedError

    async def plan_row_write(self, row: int, start: int, src: np.ndarray) -> list[MemberWrite]:
        """The member writes (data and parity) that store src at byte start of a row."""
        C, k = self.chunk, self.k
        dmem, pmem = self.row_members(row)
        base = row * C
        if start == 0 and len(src) == self.row_bytes:
            # Full stripe: parity straight from the caller's buffer, no reads.
            data = src.reshape(k, C)
            parity = await self.compute_parity(data)
            writes = [(dmem[j], base, data[j]) for j in range(k)]
            return writes + [(pmem[i], base, parity[i]) for i in range(self.nparity)]

        # Both ways below trust the row's parity or reconstruct from it (read-modify-write,
        # degraded): a row written at a crash and not yet resynced is resynced first.
        if self.resync is not None:
            await self.sync_rows([row])
        # Per data chunk j touched: bytes [a, b) of the chunk come from src[at:at+b-a].
        touched = [(c, s, s + n, at) for c, s, n, at in geometry.split_chunks(start, len(src), C)]
        c0 = min(t[1] for t in touched)
        c1 = max(t[2] for t in touched)
        span = c1 - c0
        writes: list[MemberWrite] = [
            (dmem[j], base + a, src[at : at + b - a]) for j, a, b, at in touched
        ]
        row_members = set(dmem) | set(pmem)

        lost = row_members & self.failed
        if (lost and set(pmem) <= lost and not lost & set(dmem) and not lost & self.rebuilding
                and not (self.journal is not None and self.journal.logs_parity)):
            # (A journal keeps the parity even so: replayed onto the member once it is
            # rebuilt, an older record's parity must not outlive this update.)
            # Every parity member of the row is gone and the data is whole: there is
            # no parity left to keep right, so the data alone is written.
            return writes
        if lost:
            # Degraded: rebuild the row's columns, overlay, recompute parity. Rare, so simple.
            data, _ = await self.read_row(row, c0, c1)
            for j, a, b, at in touched:
                data[j, a - c0 : b - c0] = src[at : at + b - a]
            parity = await self.compute_parity(data)
            return writes + [(pmem[i], base + c0, parity[i]) for i in range(self.nparity)]

        covering = {j for j, a, b, _ in touched if a == c0 and b == c1}
        rmw_reads = len(touched) + self.nparity
        rcw_reads = k - len(covering)
        if rmw_reads < rcw_reads or (
            rmw_reads == rcw_reads and sum(b - a for _, a, b, _ in touched) < (k - len(covering)) * span
        ):
            # Read-modify-write: old data of the touched ranges and the parity columns.
            reqs = [(dmem[j], base + a, b - a) for j, a, b, _ in touched]
            reqs += [(pmem[i], base + c0, span) for i in range(self.nparity)]
            got = await self.read_members(reqs)
            # Copy the parity: a member's read buffer may be shared with a cache.
            parity = [g.copy() for g in got[len(touched) :]]
            for (j, a, b, at), old in zip(touched, got, strict=False):
                cols = [p[a - c0 : b - c0] for p in parity]
                self.update_parity(cols, old, src[at : at + b - a], j)
        else:
            # Reconstruct-write: read the untouched data columns, compute parity afresh.
            data = np.empty((k, span), dtype=np.uint8)
            fill = [j for j in range(k) if j not in covering]
            got = await self.read_members([(dmem[j], base + c0, span) for j in fill])
            for j, g in zip(fill, got, strict=True):
                data[j] = g
            for j, a, b, at in touched:
                data[j, a - c0 : b - c0] = src[at : at + b - a]
            parity = await self.compute_parity(data)
        return writes + [(pmem[i], base + c0, parity[i]) for i in range(self.nparity)]

    async def resync_row(self, row: int, trusted: frozenset[int] | set[int] = frozenset()) -> None:
        """Recompute the row's parity from its data and write it (trusting the data, as md does).

        A data member that failed cannot be checked: its chunk is what the parity
        says (the write hole of a degraded array, which only a journal closes).
        """
        while True:
            self.require_usable()
            try:
                data, _ = await self.read_row(row, include=set(trusted) & self.rebuilding)
            except MemberFailed:
                continue
            break
        parity = await self.compute_parity(data)
        _, pmem = self.row_members(row)
        # An update like any other: a move's watcher sees it (the member may be being copied).
        await self.submit_member_writes([(m, row * self.chunk, parity[x]) for x, m in enumerate(pmem)])

    async def discard(self, offset: int, length: int) -> None:
        """A no-op: discarding member ranges would leave parity inconsistent."""
        self.check(offset, length)
