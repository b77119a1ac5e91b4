"""How a pool stays consistent across crashes: its journal, or its write-intent bitmap and resync.

The pool holds one ``Consistency``. With a journal (``vstore create --journal URI``)
every stripe update is logged before the members are written, and an unclean
shutdown is recovered by replaying the log when the pool is opened for writing,
before anything else uses it. Without one, redundant pools (raid1, raid5, raid6,
raid10: ``uses_bitmap``) keep a write-intent bitmap on their members, and an
unclean shutdown is recovered by a resync of the regions that were dirty (parity
recomputed from the data; mirror copies made equal from the first healthy one).
As md, the pool serves at once and the resync runs in the background
(``run_background``, paced like a rebuild), rows it has not reached being resynced
first by whatever would trust their redundancy; ``wait_resynced`` finishes it in the
caller. A command that opened the pool itself finishes the resync before it closes
the pool; a mount that stops leaves the regions not yet resynced marked in the
bitmap, and the next open goes on with them.

The layout is given a ``SwitchableLog`` over the journal or bitmap, so the mode can
change on a live pool (as md's ``--add-journal`` and consistency-policy change):

- a journal device that cannot be opened, or that fails under a live pool, is
  dropped: the pool goes on in bitmap mode (``meta["journal_lost"]`` says so in
  status). At open after an unclean shutdown every region is marked dirty first
  (what the journal had not checkpointed is unknown), so the resync covers all
  rows; on a live pool the members are flushed first, so nothing is pending;
- ``attach_journal`` adds or replaces a journal, ``detach_journal`` removes it.

Every switch holds updates back, waits for those under way, flushes the members
(so the mode being left has nothing pending), readies the new mode (a formatted
journal, or a clear bitmap on every member) and then commits the metadata: that
commit is the switch point, before it the old mode protects the pool and after
it the new one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import trio

from vstore import owner as owner_mod
from vstore.consistency.bitmap import Resync, WriteIntentBitmap, choose_region
from vstore.consistency.journal import (
    DEFAULT_SIZE,
    LOG_OFFSET,
    SB_OFFSETS,
    SB_SLOT_SIZE,
    Journal,
    JournalError,
    newest_superblock,
    record_size,
)
from vstore.consistency.metadata import DATA_OFFSET, scan_member
from vstore.consistency.switch import SwitchableLog
from vstore.errors import (
    ConfigError,
    ExistsError,
    MemberIOError,
    MetadataError,
    NotFoundError,
    VstoreError,
)
from vstore.ops.toolkit import DEFAULT_SPEED_MAX, DEFAULT_SPEED_MIN, MemberView, RateLimiter
from vstore.sizes import format_size
from vstore.stack.device import BlockDevice
from vstore.uri import MemberURI, open_uri, split_paths

log = logging.getLogger("vstore.pool.consistency")

JOURNAL_LEVELS = ("raid1", "raid5", "raid6", "raid10")
PARITY_LEVELS = ("raid5", "raid6")
CHECKPOINT_INTERVAL = 2.0  # seconds between looks at the journal's fill
CHECKPOINT_FILL = 0.125  # fraction of the log in use that triggers a background checkpoint


# The background resync's pace in bytes/s (md's speed_limit_min/max): at most MAX (0:
# unlimited), at most MIN while foreground I/O is seen.
RESYNC_SPEED_MIN_ENV = "VSTORE_RESYNC_SPEED_MIN"
RESYNC_SPEED_MAX_ENV = "VSTORE_RESYNC_SPEED_MAX"


def uses_bitmap(level: str) -> bool:
    """Whether a pool of this level keeps a write-intent bitmap (and resyncs) when it has no journal."""
    return level in JOURNAL_LEVELS


def resync_speed() -> tuple[int, int]:
    """(speed_min, speed_max) of a background resync, from the environment or the defaults."""
    def get(name: str, default: int) -> int:
        try:
            return max(0, int(os.environ.get(name, "") or default))
        except ValueError:
            log.warning("%s is not a number of bytes per second; using %d", name, default)
            return default

    return get(RESYNC_SPEED_MIN_ENV, DEFAULT_SPEED_MIN), get(RESYNC_SPEED_MAX_ENV, DEFAULT_SPEED_MAX)


async def _refuse_if_in_use(dev: BlockDevice, where: str, pool_uuid: str | None = None) -> None:
    """ExistsError when the device holds a vstore member or journal (it may be someone's).

    An old journal of pool_uuid itself (one the pool no longer uses) may be reused.
    """
    if dev.size >= DATA_OFFSET + 4096:
        scan = await scan_member(dev)
        if scan.superblock is not None:
            raise ExistsError(f"journal {where} is a member of vstore pool {scan.superblock.pool_uuid} "
                              "(use --force to overwrite)")
    try:
        slots = [bytes(await dev.read(off, SB_SLOT_SIZE)) for off in SB_OFFSETS]
        other = newest_superblock(slots)
    except (MemberIOError, MetadataError):
        return
    if other.pool_uuid != pool_uuid:
        raise ExistsError(f"journal {where} already holds the journal of another pool "
                          f"({other.pool_uuid}; use --force to overwrite)")


class ConsistentPool(Protocol):
    """What the consistency machinery uses of its pool (``vstore.pool.pool.Pool``)."""

    name: str
    meta: dict[str, Any]
    record: dict[str, Any]
    home: Any  # a vstore.pool.home.Home: where the pool's record is kept
    lifecycle: Any  # vstore.ops.lifecycle.Lifecycle: ``resident`` in the mount process
    layout: Any  # a RaidLayout (vstore.raid.base), None once too many members failed
    read_only: bool
    recovered_from: dict[str, Any] | None

    @property
    def members(self) -> Sequence[MemberView]:
        """The members, by index."""
        ...

    @property
    def level(self) -> str:
        """RAID level."""
        ...

    def on_member_failed(self, index: int, exc: BaseException | None = None) -> None:
        """A member failed: record it (committed before the next update)."""
        ...

    def failures_pending(self) -> bool:
        """Whether a member failure is not yet in the committed metadata."""
        ...

    async def commit(self) -> None:
        """Write a new generation of the metadata to every active member, durably."""
        ...

    async def flush(self) -> None:
        """Flush the whole stack, then persist any member failure seen meanwhile."""
        ...


class Consistency:
    """A pool's crash-consistency machinery (journal or bitmap), from creation to close."""

    def __init__(self, pool: ConsistentPool) -> None:
        self.pool = pool
        self.journal: Journal | None = None
        self.bitmap: WriteIntentBitmap | None = None
        self.resync: dict[str, Any] | None = None  # the last resync's record, for status
        self.resyncer: Resync | None = None  # the resync in progress (or finished)
        self._resync_wanted = trio.Event()
        # (speed_min, speed_max) of the background resync; None: resync_speed() when it starts.
        self.resync_speed: tuple[int, int] | None = None
        self.started = False
        # What the layout is given: the journal or the bitmap, swapped by the switches below.
        self.log = SwitchableLog(None, self._journal_failed)
        # The recorded journal could not be opened (set by open(), acted on at recovery).
        self.lost: dict[str, Any] | None = None
        self._switch_lock = trio.Lock()

    # --- create / open --------------------------------------------------------------------

    async def create(self, journal: str | None, journal_size: int | None,
                     member_devs: list[BlockDevice], *, force: bool = False) -> None:
        """Set up a new pool's journal (formatting its device) or its bitmap parameters."""
        pool = self.pool
        meta = pool.meta
        if journal and journal.strip().lower() != "none":
            jr, uri = await self._format_journal(journal, journal_size, member_devs, force=force)
            self.journal = jr
            meta["journal"] = {"uri": uri.redacted(), "uuid": jr.sb.journal_uuid, "size": jr.log_size}
            pool.record["journal"] = uri.text
        else:
            meta["journal"] = None
            if uses_bitmap(pool.level):
                size = max(m.data_size for m in pool.members)
                meta["bitmap"] = {"region": choose_region(size, meta["chunk"])}
                self._make_bitmap()

    async def _format_journal(self, text: str, size: int | None, member_devs: Sequence[BlockDevice], *,
                              force: bool) -> tuple[Journal, MemberURI]:
        """Open (creating with size) and format a journal device for this pool, after every check."""
        pool = self.pool
        meta = pool.meta
        if pool.level not in JOURNAL_LEVELS:
            raise ConfigError(f"a {pool.level} pool has no redundancy to keep consistent: "
                              "--journal needs raid1, raid5, raid6 or raid10")
        paths = split_paths(text)
        if len(paths) != 1:
            raise ConfigError("the journal takes one URI (one path)")
        uri = paths[0]
        members = {p.text for m in pool.members for p in m.paths}
        members |= {t for s in pool.record.get("spares", []) for t in s}
        if uri.text in members:
            raise ConfigError(f"journal {uri.redacted()} is also a member or spare of pool {pool.name!r}")
        dev = await open_uri(uri, create_size=size or DEFAULT_SIZE)
        try:
            ident = dev.identity()
            if ident is not None:
                for i, mdev in enumerate(member_devs):
                    if mdev is not None and mdev.identity() == ident:
                        raise ConfigError(f"journal {uri.redacted()} is the same storage as member {i}")
                if self.journal is not None and self.journal.dev.identity() == ident:
                    raise ExistsError(f"{uri.redacted()} is already the journal of pool {pool.name!r}")
            # The log must hold two full-stripe updates (records in blocks of up to 4 KiB).
            biggest = record_size(len(pool.members), len(pool.members) * meta["chunk"], 4096)
            need = LOG_OFFSET + 2 * biggest
            need += -need % 4096
            if dev.size < need:
                raise ConfigError(f"journal {uri.redacted()} is too small ({format_size(dev.size)}): this "
                                  f"pool needs at least {format_size(need)} (--journal-size {format_size(need)})")
            if not force:
                await _refuse_if_in_use(dev, uri.redacted(), meta["pool_uuid"])
            jr = await Journal.format(dev, meta["pool_uuid"], uri=uri.redacted())
        except BaseException:
            with trio.CancelScope(shield=True):
                await dev.aclose()
                if dev.created:  # made here: leave nothing behind
                    await dev.remove_created()
            raise
        return jr, uri

    def _make_bitmap(self) -> None:
        pool = self.pool
        size = max(m.data_size for m in pool.members)
        region = int((pool.meta.get("bitmap") or {}).get("region") or choose_region(size, pool.meta["chunk"]))
        self.bitmap = WriteIntentBitmap(pool.meta["pool_uuid"], size, region, self._active_devs,
                                        self._bitmap_error)

    def _active_devs(self) -> list[tuple[int, BlockDevice]]:
        return [(m.index, m.dev) for m in self.pool.members if m.state == "active" and m.dev is not None]

    async def _bitmap_error(self, index: int, exc: BaseException) -> None:
        layout = self.pool.layout
        if layout is not None:
            await layout.member_failed(index, exc)
        else:
            self.pool.on_member_failed(index, exc)

    async def open(self) -> None:
        """Open the journal device recorded for the pool (or prepare the bitmap)."""
        pool = self.pool
        jmeta = pool.meta.get("journal")
        if jmeta:
            try:
                self.journal = await self._open_journal()
            except VstoreError as e:
                # The pool goes on without it (recover_and_start records the switch).
                self.lost = {"uri": jmeta.get("uri"), "error": str(e)}
                log.warning("pool %s: %s; going on without the journal", pool.name, e)
                if uses_bitmap(pool.level):
                    self._make_bitmap()
        elif uses_bitmap(pool.level):
            self._make_bitmap()

    async def _open_journal(self) -> Journal:
        """Open the recorded journal device and check it is this pool's (JournalError if not).

        The config record names the journal with its secrets; during an attach it names
        the new one (and the previous one) before the metadata commit that makes the new
        one the pool's: whichever holds the journal the metadata names is opened.
        """
        pool = self.pool
        jmeta = pool.meta["journal"]
        texts = [t for t in (pool.record.get("journal"), pool.record.get("journal_previous"), jmeta["uri"])
                 if t]
        errors: list[JournalError] = []
        for text in dict.fromkeys(texts):
            uri = split_paths(text)[0]
            try:
                dev = await open_uri(uri)
            except VstoreError as e:
                errors.append(JournalError(f"cannot open journal {uri.redacted()}: {e}"))
                continue
            try:
                return await Journal.open(dev, pool.meta["pool_uuid"], jmeta.get("uuid"), uri=uri.redacted())
            except JournalError as e:
                errors.append(e)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await dev.aclose()
                raise
            with trio.CancelScope(shield=True):
                await dev.aclose()
        raise errors[0]

    async def probe_journal(self) -> None:
        """Read-only opens: check the recorded journal can be opened; warn (and say so in status) if not."""
        pool = self.pool
        if not pool.meta.get("journal"):
            return
        try:
            jr = await self._open_journal()
        except VstoreError as e:
            self.lost = {"uri": pool.meta["journal"].get("uri"), "error": str(e)}
            log.warning("pool %s: %s; the next open for writing goes on without it (in bitmap mode, "
                        "resyncing every row if it was not closed cleanly)", pool.name, e)
            return
        with trio.CancelScope(shield=True):
            await jr.dev.aclose()

    def warn_if_recovery_pending(self) -> None:
        """Read-only opens recover nothing: say so when the last owner died with writes in flight."""
        pool = self.pool
        token = pool.meta.get("owner")
        if pool.meta.get("clean", True) or not owner_mod.token_is_stale(token):
            return  # closed cleanly, or open in a live process right now
        what = ("journal replay" if pool.meta.get("journal")
                else "resync" if uses_bitmap(pool.level) else "recovery")
        log.warning("pool %s was not closed cleanly and is opened read-only: its %s is pending, so "
                    "%s; open it for writing once (e.g. vstore mount) to recover it", pool.name, what,
                    "acknowledged writes may be missing" if pool.meta.get("journal")
                    else "parity or mirror copies may be inconsistent")

    async def recover_and_start(self) -> None:
        """After an unclean shutdown replay the journal, or start the resync; then start logging."""
        pool = self.pool
        layout = pool.layout
        unclean = pool.recovered_from is not None
        if self.lost is not None:
            await self._record_lost_at_open(unclean)
        if self.journal is not None:
            jr = self.journal
            try:
                if unclean:
                    await jr.recover(self._replay_write, layout.flush)
                else:
                    await jr.start()
            except JournalError as e:
                if jr.broken is None:
                    raise
                # The device failed while it was replayed or started: go on without it
                # (the records replayed so far were whole; the full resync covers the rest).
                log.warning("pool %s: %s; going on without the journal", pool.name, e)
                self.journal = None
                await jr.close(clean=False)
                self.lost = {"uri": jr.uri, "error": str(e)}
                if uses_bitmap(pool.level):
                    self._make_bitmap()
                await self._record_lost_at_open(unclean)
        if self.journal is None and self.bitmap is not None:
            await self._resync()
        self._begin()

    async def start(self) -> None:
        """Start protecting a freshly created pool's writes."""
        if self.journal is not None:
            await self.journal.start()
        elif self.bitmap is not None:
            await self.bitmap.reset()
        self._begin()

    def _begin(self) -> None:
        self.started = True
        self.attach(self.pool.layout)

    def attach(self, layout: Any) -> None:
        """Route the layout's updates through the journal or bitmap (once started)."""
        if layout is None or not self.started:
            return
        guard = self.journal if self.journal is not None else self.bitmap
        if guard is None and self.pool.level not in JOURNAL_LEVELS:
            return
        self._hook(guard)
        self.log.backend = guard
        # Rows are member-offset windows of a chunk on every member of a parity layout.
        self.log.row_unit = self.pool.meta["chunk"] if self.pool.level in PARITY_LEVELS else None
        layout.journal = self.log

    def _hook(self, guard: Any) -> None:
        if guard is None:
            return
        guard.checkpoint_allowed = lambda: not self.pool.failures_pending()
        guard.before_commit = self._record_failures
        if isinstance(guard, Journal):
            guard.flush_members = self._flush_for_checkpoint

    async def _record_failures(self) -> None:
        """A member that failed is marked so in the metadata before any update goes on without it.

        Otherwise a crash could bring it back as active with stale bytes (as md updates its
        superblocks before completing writes to a degraded array).
        """
        pool = self.pool
        if pool.failures_pending() and not pool.read_only:
            await pool.commit()

    async def _flush_for_checkpoint(self) -> None:
        """Flush the members, then put any member failure seen on record (so the log may let go)."""
        await self.pool.flush()

    async def _replay_write(self, index: int, offset: int, buf: np.ndarray) -> None:
        pool = self.pool
        if not 0 <= index < len(pool.members):
            log.error("journal record names member %d of a %d-member pool; skipped", index,
                      len(pool.members))
            return
        m = pool.members[index]
        if m.state not in ("active", "rebuilding") or m.data_dev is None:
            return  # a failed member is rebuilt from the others, never written
        try:
            await m.data_dev.write(offset, buf)
        except MemberIOError as e:
            if pool.layout is not None:
                await pool.layout.member_failed(index, e)
        except VstoreError as e:
            log.error("journal record for member %d at %d (%d bytes) skipped: %s", index, offset,
                      len(buf), e)

    async def _resync(self) -> None:
        """Keep the dirty regions marked and start their resync (in the background)."""
        pool = self.pool
        bm = self.bitmap
        assert bm is not None
        unclean = pool.recovered_from is not None
        pool.meta.pop("resync", None)  # a stopped resync's note: it goes on now
        dirty = await bm.load_dirty()
        if dirty is None:
            # No valid bitmap: everything after a crash (a pool made before mirrors had one,
            # too); nothing after a clean close.
            regions = set(range(bm.nbits)) if unclean else set()
            if regions:
                log.warning("pool %s: no valid write-intent bitmap; resyncing every row", pool.name)
        else:
            regions = dirty  # after a clean close: the regions a stopped resync had not reached
        await bm.reset(regions)
        if regions:
            self._start(regions, "unclean shutdown" if unclean else "resync interrupted by a stop")

    async def start_resync(self, rows: Iterable[int] | None, reason: str) -> None:
        """Resync these member rows (None: every row) in the background, their regions marked first.

        Without a bitmap yet (a pool that loses its journal), one is made. Returns once
        the regions are durably marked; ``wait_resynced`` waits for the resync itself.
        """
        layout = self.pool.layout
        if layout is None or not uses_bitmap(self.pool.level):
            return
        fresh = self.bitmap is None
        if fresh:
            self._make_bitmap()
        bm = self.bitmap
        assert bm is not None
        per = max(1, bm.region // layout.chunk)
        regions = set(range(bm.nbits)) if rows is None else {int(r) // per for r in rows}
        if fresh:
            await bm.reset(regions)
            self.attach(layout)
        else:
            await bm.mark(regions)
        if regions:
            self._start(regions, reason)

    def _start(self, regions: set[int], reason: str) -> None:
        pool = self.pool
        layout = pool.layout
        rs = self.resyncer
        if rs is not None and not rs.finished.is_set():
            rs.add(regions)
        else:
            rs = self.resyncer = Resync(layout, self.bitmap, regions, self._trusted)
            self.resync = {"state": "running", "reason": reason, "started": int(time.time())}
        layout.resync = rs
        if layout.failed - layout.rebuilding and pool.level in PARITY_LEVELS:
            log.warning("pool %s is degraded with a resync pending: rows written at the crash may "
                        "have lost their failed member's data (the write hole)", pool.name)
        log.info("pool %s: resync of %d rows in %d regions (%s), in the background", pool.name,
                 rs.total, len(rs.todo), reason)
        self._resync_wanted.set()

    def _trusted(self, row: int) -> frozenset[int]:
        """Members being rebuilt whose content in this row is good: below the rebuild's cursor."""
        op = self.pool.meta.get("operation") or {}
        layout = self.pool.layout
        i = op.get("member")
        if op.get("kind") == "rebuild" and layout is not None and i in layout.rebuilding \
                and row < int(op.get("cursor") or 0):
            return frozenset({i})
        return frozenset()

    def resync_pending(self) -> bool:
        """Whether a resync has rows left."""
        return self.resyncer is not None and not self.resyncer.finished.is_set()

    async def wait_resynced(self) -> None:
        """Finish the pending resync in this task (sharing the work with the background); at once if none."""
        rs = self.resyncer
        if rs is None or self.pool.layout is None:
            return
        if not rs.finished.is_set():
            await rs.run()
        self._finished(rs)

    def _finished(self, rs: Resync) -> None:
        if rs is not self.resyncer or not rs.finished.is_set() or self.resync is None:
            return
        if self.resync.get("state") != "done":
            self.resync.update({"state": "done", **rs.status()})
            log.info("pool %s: resync done (%d rows)", self.pool.name, rs.total)
        layout = self.pool.layout
        if layout is not None and layout.resync is rs:
            layout.resync = None

    async def _resync_in_background(self) -> None:
        """Run the resync whenever one is pending, paced like a rebuild."""
        while True:
            rs = self.resyncer
            if rs is None or rs.finished.is_set() or self.pool.layout is None:
                await self._resync_wanted.wait()
                self._resync_wanted = trio.Event()
                continue
            lo, hi = self.resync_speed or resync_speed()
            limiter = RateLimiter(self.pool.layout, lo, hi)
            try:
                await rs.run(limiter.pace)
            except VstoreError as e:
                log.error("pool %s: resync stopped: %s", self.pool.name, e)
                if self.resync is not None:
                    self.resync.update({"state": "failed", "error": str(e)})
                await self._resync_wanted.wait()
                self._resync_wanted = trio.Event()
                continue
            self._finished(rs)

    async def run_background(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """The background resync and the journal's background checkpoints, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._resync_in_background)
            task_status.started()
            while True:
                await trio.sleep(CHECKPOINT_INTERVAL)
                jr = self.journal
                # Checkpoint early so writers seldom find the log full and wait for one.
                if jr is not None and self.started and jr.used() > jr.log_size * CHECKPOINT_FILL:
                    try:
                        await jr.checkpoint()
                    except VstoreError as e:
                        log.warning("journal %s: background checkpoint failed: %s", jr.uri, e)
                        if jr.broken is not None:  # the device failed: go on without it now
                            await self._journal_failed(jr, e)

    # --- close and status -----------------------------------------------------------------

    async def close(self, clean: bool) -> None:
        """Close the journal (checkpointing it completely when clean and flushed), or settle the bitmap.

        A clean close with a resync pending finishes it in a command that opened the pool
        itself; the mount process leaves the regions not yet resynced marked, for the next open.
        """
        pool = self.pool
        if clean and self.bitmap is not None and pool.layout is not None and not pool.read_only:
            rs = self.resyncer
            if rs is not None and not rs.finished.is_set():
                if pool.lifecycle.resident:
                    # Committed with the clean mark: status says so while the pool is closed.
                    pool.meta["resync"] = {"state": "interrupted", "regions": len(rs.todo)}
                else:
                    await self.wait_resynced()
                    await pool.layout.flush()
            # Everything is flushed: only the regions still awaiting their resync stay marked.
            await self.bitmap.settle()
        jr = self.journal
        if jr is None:
            return
        self.journal = None
        if self.log.backend is jr:
            self.log.backend = None
        await jr.close(clean=clean)
        if self.pool.layout is not None:
            self.pool.layout.journal = None

    def status(self) -> dict[str, Any]:
        """The `journal` entry of `vstore status`."""
        st = self._mode_status()
        warning = self._warning(st)
        if warning:
            st["warning"] = warning
        return st

    def _mode_status(self) -> dict[str, Any]:
        pool = self.pool
        if self.journal is not None:
            return self.journal.status()
        jmeta = pool.meta.get("journal")
        unclean = not pool.meta.get("clean", True) and (pool.read_only or not self.started)
        if jmeta:
            state = "unreachable" if self.lost else "replay pending" if unclean else "closed"
            return {"mode": "journal", "uri": jmeta.get("uri"), "size": jmeta.get("size"), "state": state}
        if uses_bitmap(pool.level):
            st: dict[str, Any] = {"mode": "none", "protection": "write-intent bitmap, resync after an unclean shutdown"}
            if self.bitmap is not None:
                st["bitmap"] = self.bitmap.status()
            if self.resync is not None:
                st["resync"] = dict(self.resync)
                if self.resyncer is not None and self.resync.get("state") == "running":
                    st["resync"].update(self.resyncer.status())
            elif pool.meta.get("resync") and (pool.read_only or not self.started):
                st["resync"] = dict(pool.meta["resync"])  # stopped with the mount; resumes at open
            elif unclean:
                st["resync"] = {"state": "pending"}
            return st
        return {"mode": "none"}

    def _warning(self, st: dict[str, Any]) -> str | None:
        """The line status shows when the pool lost its journal (or cannot reach it read-only)."""
        pool = self.pool
        lost = pool.meta.get("journal_lost")
        if pool.meta.get("journal") and self.lost:
            return (f"journal {self.lost.get('uri')} cannot be opened ({self.lost.get('error')}); "
                    "opened for writing, the pool goes on without it")
        if not lost or pool.meta.get("journal"):
            return None
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(int(lost.get("when", 0))))
        mode = ("running with a write-intent bitmap" if uses_bitmap(pool.level)
                else "running without crash protection")
        line = f"journal {lost.get('uri')} lost at {when} ({lost.get('error')}); {mode}"
        resync = st.get("resync")
        if lost.get("resync") == "all rows":
            line += (f"; resync of every row {resync.get('state')}" if resync
                     else "; every row was resynced")
        return line + "; `vstore journal attach` adds a new one"

    # --- changing the journal on a live pool ------------------------------------------------

    def _set_mode(self, journal: Journal | None, bitmap: WriteIntentBitmap | None) -> None:
        """Route updates through journal or bitmap from now on (called with updates held back)."""
        self.journal, self.bitmap = journal, bitmap
        guard = journal if journal is not None else bitmap
        self._hook(guard)
        self.log.backend = guard
        if self.pool.layout is not None and self.started:
            self.pool.layout.journal = self.log

    def _bitmap_for_switch(self) -> WriteIntentBitmap | None:
        """A bitmap for this pool, if its level keeps one without a journal."""
        if not uses_bitmap(self.pool.level):
            return None
        if "bitmap" not in self.pool.meta:
            size = max(m.data_size for m in self.pool.members)
            self.pool.meta["bitmap"] = {"region": choose_region(size, self.pool.meta["chunk"])}
        self._make_bitmap()
        bitmap, self.bitmap = self.bitmap, None
        return bitmap

    def _require_live(self) -> None:
        pool = self.pool
        if pool.read_only:
            raise VstoreError(f"pool {pool.name!r} is open read-only")
        if pool.layout is None or not self.started:
            raise VstoreError(f"pool {pool.name!r} is not serving data (too many members failed)")

    def _save_record(self, journal_text: str | None, previous: str | None = None) -> None:
        """Name the journal (with its secrets) in the config record; previous: the one still in use."""
        pool = self.pool
        pool.record.pop("journal_previous", None)
        if journal_text is None:
            pool.record.pop("journal", None)
        else:
            pool.record["journal"] = journal_text
            if previous and previous != journal_text:
                pool.record["journal_previous"] = previous
        pool.home.write_pool(pool.name, pool.record)

    async def _record_lost_at_open(self, unclean: bool) -> None:
        """The journal could not be opened: go on in bitmap mode, recorded in the metadata.

        After an unclean shutdown nobody knows what the journal had not checkpointed, so
        every region is marked dirty, durably, before the metadata stops naming the journal:
        the resync then covers every row, and a crash during it starts it again.
        """
        pool = self.pool
        lost = self.lost
        assert lost is not None
        if self.bitmap is not None and unclean:
            await self.bitmap.mark_all()
        pool.meta["journal"] = None
        pool.meta["journal_lost"] = {
            "uri": lost["uri"], "when": int(time.time()), "error": lost["error"],
            "resync": "all rows" if unclean and self.bitmap is not None else "none",
        }
        await pool.commit()
        self._save_record(None)
        log.warning("pool %s: journal %s lost (%s); running with %s%s", pool.name, lost["uri"],
                    lost["error"], "a write-intent bitmap" if self.bitmap is not None else "no journal",
                    "; resyncing every row" if unclean and self.bitmap is not None else "")
        self.lost = None

    async def _journal_failed(self, journal: Any, exc: BaseException) -> None:
        """The journal device failed under a live pool: go on in bitmap mode, no update lost.

        Updates are held back; those already logged finish in place; a member flush then
        puts everything the journal held on the members, so the new bitmap starts clear.
        Until the metadata commit a crash finds the journal recorded (replayed if it is
        back, else every row resynced); after it, the bitmap protects the pool.
        """
        async with self._switch_lock:
            if self.journal is not journal or self.pool.read_only:
                return  # switched already (by another writer that saw the failure first)
            pool = self.pool
            log.error("pool %s: journal %s failed (%s): switching to %s", pool.name, journal.uri, exc,
                      "a write-intent bitmap" if uses_bitmap(pool.level) else "no journal")
            with trio.CancelScope(shield=True):
                async with self.log.hold():
                    await pool.flush()
                    bitmap = self._bitmap_for_switch()
                    if bitmap is not None:
                        await bitmap.reset()
                    old_meta = pool.meta["journal"]
                    pool.meta["journal"] = None
                    pool.meta["journal_lost"] = {"uri": journal.uri, "when": int(time.time()),
                                                 "error": str(exc), "resync": "none"}
                    try:
                        await pool.commit()  # the switch point
                    except BaseException:
                        pool.meta["journal"] = old_meta
                        pool.meta.pop("journal_lost", None)
                        raise
                    self._set_mode(None, bitmap)
            self._save_record(None)
            await self._retire(journal, wipe=False)

    async def _retire(self, journal: Journal, *, wipe: bool) -> None:
        """Close a journal the pool no longer uses (see Journal.retire)."""
        await journal.retire(wipe=wipe)

    async def attach_journal(self, text: str, size: int | None = None, *, force: bool = False
                             ) -> dict[str, Any]:
        """Add a journal to a live pool, or replace its journal by a new one."""
        self._require_live()
        pool = self.pool
        # Rows a resync has yet to mend are known only to the bitmap: mend them first.
        await self.wait_resynced()
        async with self._switch_lock:
            jr, uri = await self._format_journal(text, size, [m.dev for m in pool.members], force=force)
            old_journal, old_bitmap = self.journal, self.bitmap
            old_meta = pool.meta.get("journal")
            old_text = pool.record.get("journal") if old_meta else None
            lost = pool.meta.get("journal_lost")
            switched = False
            try:
                # Named first (so the new journal's secrets outlive a crash after the commit),
                # the old one still beside it (the metadata names it until the commit).
                self._save_record(uri.text, old_text)
                await jr.start()
                self.log.next_limit = jr.max_update_bytes  # updates planned from now on fit it
                # Not cancelled half way (updates wait meanwhile, as they do for one another).
                with trio.CancelScope(shield=True):
                    async with self.log.hold():
                        # Nothing under way; the flush puts every update on the members, so the
                        # old mode (its log or its dirty bits) has nothing left to protect.
                        await pool.flush()
                        pool.meta["journal"] = {"uri": uri.redacted(), "uuid": jr.sb.journal_uuid,
                                                "size": jr.log_size}
                        pool.meta.pop("journal_lost", None)
                        try:
                            await pool.commit()  # the switch point
                        except BaseException:
                            pool.meta["journal"] = old_meta
                            if lost is not None:
                                pool.meta["journal_lost"] = lost
                            raise
                        switched = True
                        self._set_mode(jr, None)
            except BaseException:
                if not switched:
                    self._save_record(old_text)
                    with trio.CancelScope(shield=True):
                        await jr.close(clean=False)
                raise
            finally:
                self.log.next_limit = None
            self._save_record(uri.text)
            log.info("pool %s: journal %s attached%s", pool.name, uri.redacted(),
                     f" in place of {old_journal.uri}" if old_journal is not None else "")
            if old_journal is not None:
                await self._retire(old_journal, wipe=True)
            elif old_bitmap is not None:
                try:
                    await old_bitmap.reset()  # tidy: the bitmap is not read in journal mode
                except VstoreError as e:
                    log.warning("pool %s: clearing the old bitmap: %s", pool.name, e)
        return self.status()

    async def detach_journal(self, *, wipe: bool = True) -> dict[str, Any]:
        """Remove the journal of a live pool: it goes on in bitmap mode."""
        self._require_live()
        pool = self.pool
        async with self._switch_lock:
            jr = self.journal
            if jr is None:
                raise NotFoundError(f"pool {pool.name!r} has no journal")
            bitmap = self._bitmap_for_switch()
            old_meta = pool.meta.get("journal")
            with trio.CancelScope(shield=True):
                async with self.log.hold():
                    await pool.flush()  # every logged update is on the members, durably
                    if bitmap is not None:
                        await bitmap.reset()  # clear on every member before the metadata says "no journal"
                    pool.meta["journal"] = None
                    try:
                        await pool.commit()  # the switch point
                    except BaseException:
                        pool.meta["journal"] = old_meta
                        raise
                    self._set_mode(None, bitmap)
            self._save_record(None)
            log.info("pool %s: journal %s detached", pool.name, jr.uri)
            await self._retire(jr, wipe=wipe)
        return self.status()
