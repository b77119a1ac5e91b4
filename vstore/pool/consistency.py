"""How a pool stays consistent across crashes: its journal, or its write-intent bitmap and resync.

The pool holds one ``Consistency``. With a journal (``vstore create --journal URI``)
every stripe update is logged before the members are written, and an unclean
shutdown is recovered by replaying the log. Without one, parity pools keep a
write-intent bitmap on their members, and an unclean shutdown is recovered by
recomputing the parity of the regions that were dirty (a resync). Either way the
pool recovers when it is opened for writing, before anything else uses it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import trio

from vstore import owner as owner_mod
from vstore.consistency.bitmap import WriteIntentBitmap, choose_region, resync_rows, rows_of_regions
from vstore.consistency.journal import DEFAULT_SIZE, LOG_OFFSET, Journal, JournalError, record_size
from vstore.consistency.metadata import DATA_OFFSET, scan_member
from vstore.errors import ConfigError, ExistsError, MemberIOError, VstoreError
from vstore.ops.toolkit import MemberView
from vstore.sizes import format_size
from vstore.stack.device import BlockDevice
from vstore.uri import open_uri, split_paths

log = logging.getLogger("vstore.pool.consistency")

JOURNAL_LEVELS = ("raid1", "raid5", "raid6", "raid10")
PARITY_LEVELS = ("raid5", "raid6")
CHECKPOINT_INTERVAL = 2.0  # seconds between looks at the journal's fill
CHECKPOINT_FILL = 0.125  # fraction of the log in use that triggers a background checkpoint


async def _refuse_if_in_use(dev: BlockDevice, where: str) -> None:
    """ExistsError when the device holds a vstore member or journal (it may be someone's)."""
    if dev.size >= DATA_OFFSET + 4096:
        scan = await scan_member(dev)
        if scan.superblock is not None:
            raise ExistsError(f"journal {where} is a member of vstore pool {scan.superblock.pool_uuid} "
                              "(use --force to overwrite)")
    try:
        other = await Journal.open(dev, "00000000-0000-0000-0000-000000000000", uri=where)
    except JournalError as e:
        if "another pool" in str(e):
            raise ExistsError(f"journal {where} already holds the journal of another pool "
                              "(use --force to overwrite)") from None
        return
    raise ExistsError(f"journal {where} already holds a journal ({other.sb.pool_uuid})")


class ConsistentPool(Protocol):
    """What the consistency machinery uses of its pool (``vstore.pool.pool.Pool``)."""

    name: str
    meta: dict[str, Any]
    record: dict[str, Any]
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
        self.resync: dict[str, Any] | None = None
        self.started = False

    # --- create / open --------------------------------------------------------------------

    async def create(self, journal: str | None, journal_size: int | None,
                     member_devs: list[BlockDevice], *, force: bool = False) -> None:
        """Set up a new pool's journal (formatting its device) or its bitmap parameters."""
        pool = self.pool
        meta = pool.meta
        if journal and journal.strip().lower() != "none":
            if pool.level not in JOURNAL_LEVELS:
                raise ConfigError(f"a {pool.level} pool has no redundancy to keep consistent: "
                                  "--journal needs raid1, raid5, raid6 or raid10")
            paths = split_paths(journal)
            if len(paths) != 1:
                raise ConfigError("the journal takes one URI (one path)")
            uri = paths[0]
            members = {p.text for m in pool.members for p in m.paths}
            if uri.text in members:
                raise ConfigError(f"journal {uri.redacted()} is also a member")
            dev = await open_uri(uri, create_size=journal_size or DEFAULT_SIZE)
            try:
                ident = dev.identity()
                if ident is not None:
                    for i, mdev in enumerate(member_devs):
                        if mdev.identity() == ident:
                            raise ConfigError(f"journal {uri.redacted()} is the same storage as member {i}")
                # The log must hold two full-stripe updates (records in blocks of up to 4 KiB).
                biggest = record_size(len(pool.members), len(pool.members) * meta["chunk"], 4096)
                need = LOG_OFFSET + 2 * biggest
                need += -need % 4096
                if dev.size < need:
                    raise ConfigError(f"journal {uri.redacted()} is too small ({format_size(dev.size)}): this "
                                      f"pool needs at least {format_size(need)} (--journal-size {format_size(need)})")
                if not force:
                    await _refuse_if_in_use(dev, uri.redacted())
                jr = await Journal.format(dev, meta["pool_uuid"], uri=uri.redacted())
            except BaseException:
                await dev.aclose()
                if dev.created:  # made by this create: leave nothing behind
                    with contextlib.suppress(OSError):
                        os.unlink(dev.path)
                raise
            self.journal = jr
            meta["journal"] = {"uri": uri.redacted(), "uuid": jr.sb.journal_uuid, "size": jr.log_size}
            pool.record["journal"] = uri.text
        else:
            meta["journal"] = None
            if pool.level in PARITY_LEVELS:
                size = max(m.data_size for m in pool.members)
                meta["bitmap"] = {"region": choose_region(size, meta["chunk"])}
                self._make_bitmap()

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
            text = pool.record.get("journal") or jmeta["uri"]
            uri = split_paths(text)[0]
            try:
                dev = await open_uri(uri)
            except VstoreError as e:
                raise JournalError(f"pool {pool.name!r}: cannot open its journal {uri.redacted()}: {e}") from e
            try:
                self.journal = await Journal.open(dev, pool.meta["pool_uuid"], jmeta.get("uuid"),
                                                  uri=uri.redacted())
            except BaseException:
                await dev.aclose()
                raise
        elif pool.level in PARITY_LEVELS:
            self._make_bitmap()

    def warn_if_recovery_pending(self) -> None:
        """Read-only opens recover nothing: say so when the last owner died with writes in flight."""
        pool = self.pool
        token = pool.meta.get("owner")
        if pool.meta.get("clean", True) or not owner_mod.token_is_stale(token):
            return  # closed cleanly, or open in a live process right now
        what = ("journal replay" if pool.meta.get("journal")
                else "parity resync" if pool.level in PARITY_LEVELS else "recovery")
        log.warning("pool %s was not closed cleanly and is opened read-only: its %s is pending, so "
                    "%s; open it for writing once (e.g. vstore mount) to recover it", pool.name, what,
                    "acknowledged writes may be missing" if pool.meta.get("journal")
                    else "parity may be inconsistent")

    async def recover_and_start(self) -> None:
        """After an unclean shutdown replay the journal or resync; then start logging."""
        pool = self.pool
        layout = pool.layout
        unclean = pool.recovered_from is not None
        if self.journal is not None:
            if unclean:
                await self.journal.recover(self._replay_write, layout.flush)
            else:
                await self.journal.start()
        elif self.bitmap is not None:
            if unclean:
                await self._resync()
            await self.bitmap.reset()
        elif unclean and pool.level in ("raid1", "raid10"):
            log.warning("pool %s (%s, no journal) was not closed cleanly: mirror copies written at "
                        "the crash may differ until rewritten", pool.name, pool.level)
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
        if guard is None:
            return
        guard.checkpoint_allowed = lambda: not self.pool.failures_pending()
        guard.before_commit = self._record_failures
        if self.journal is not None:
            self.journal.flush_members = self._flush_for_checkpoint
        layout.journal = guard

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
        pool = self.pool
        layout = pool.layout
        assert self.bitmap is not None
        dirty = await self.bitmap.load_dirty()
        if dirty is None:
            rows = list(range(layout.rows))
            log.warning("pool %s: no valid write-intent bitmap; resyncing all %d rows", pool.name, len(rows))
        else:
            rows = rows_of_regions(dirty, self.bitmap.region, layout.chunk, layout.rows)
        self.resync = {"state": "running", "regions": len(dirty) if dirty is not None else "all",
                       "rows": len(rows), "done": 0, "started": int(time.time())}
        if layout.failed and rows:
            log.warning("pool %s was degraded when it stopped: resync restores parity, but rows "
                        "written at the crash may have lost their failed member's data (write hole)",
                        pool.name)
        log.info("pool %s: resync of %d rows in %s dirty regions", pool.name, len(rows),
                 self.resync["regions"])

        def progress(done: int, total: int) -> None:
            self.resync["done"] = done

        await resync_rows(layout, rows, progress)
        self.resync["state"] = "done"
        self.resync["done"] = len(rows)

    async def wait_resynced(self) -> None:
        """Return once no resync runs (the resync completes at open here, so at once)."""
        return

    async def run_background(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """The journal's background checkpoints (nothing to do for the bitmap) until cancelled."""
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

    # --- close and status -----------------------------------------------------------------

    async def close(self, clean: bool) -> None:
        """Close the journal (checkpointing it completely when clean and flushed)."""
        jr = self.journal
        if jr is None:
            return
        self.journal = None
        await jr.close(clean=clean)
        if self.pool.layout is not None:
            self.pool.layout.journal = None

    def status(self) -> dict[str, Any]:
        """The `journal` entry of `vstore status`."""
        pool = self.pool
        if self.journal is not None:
            return self.journal.status()
        jmeta = pool.meta.get("journal")
        unclean = not pool.meta.get("clean", True) and (pool.read_only or not self.started)
        if jmeta:
            return {"mode": "journal", "uri": jmeta.get("uri"), "size": jmeta.get("size"),
                    "state": "replay pending" if unclean else "closed"}
        if pool.level in PARITY_LEVELS:
            st: dict[str, Any] = {"mode": "none", "protection": "write-intent bitmap, resync after an unclean shutdown"}
            if self.bitmap is not None:
                st["bitmap"] = self.bitmap.status()
            if self.resync is not None:
                st["resync"] = dict(self.resync)
            elif unclean:
                st["resync"] = {"state": "pending"}
            return st
        return {"mode": "none"}
