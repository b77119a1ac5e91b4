"""Reshape a pool onto more members online (md's ``--grow --raid-devices``): raid0, raid5, raid6, raid10.

``start`` joins the new members (superblocks, pool record, as ``vstore.ops.grow``
does), puts a ``ReshapeLayout`` (``vstore.raid.reshape_layout``) in the pool's
stack with its cursor at 0 and commits ``meta["reshape"]`` together with the
new member table; from then on the pool serves every logical chunk from the
geometry the cursor says. ``run`` then copies, in the order that
``vstore.raid.reshape`` proves safe:

1. the critical rows: the chunks of the old rows they overwrite are copied to the
   top of every new member (``meta["reshape"]["backup"]``, with their CRC32C) and
   put on record before new row 0 is written; the whole critical section holds
   its chunks' locks;
2. then row batches of whole new rows (parity computed from the data alone; the
   last one padded with zeros; raid10: the chunks wholly in those rows, both
   copies, so with an odd member count a batch also writes the first copy of its
   first chunk in the row below, a row reshape_safe already allowed), each under
   the locks of the rows it reads and writes in both geometries: a batch
   overwrites old rows only once the committed cursor covers their chunks
   (otherwise the members are flushed and the cursor committed first), and the
   cursor is also committed every few seconds or megabytes, paced like a rebuild;
3. at the end the cursor is committed at the last chunk; only then (raid5/raid6)
   are the rows above the data, old rows under no parity, written as zero rows
   (they overwrite old rows: before that commit a crash would copy chunks again
   from rows already zeroed); then ``meta["reshape"]`` goes and the larger
   ``n_extents`` comes in one commit (the extent size stays: volumes' extent
   numbers keep their meaning).

After a restart, a crash or ``kill -9``, the pool opens with the reshape layout
at the committed cursor (or, with a backup on record, redoes the critical rows
from it) and the copy resumes: by the mount by itself, or ``vstore resume``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from vstore.consistency.journal import crc32c
from vstore.consistency.metadata import DATA_OFFSET
from vstore.errors import ConfigError, MetadataError, NotFoundError
from vstore.ops import grow as ops_grow
from vstore.ops.toolkit import (
    CHECKPOINT_BYTES,
    CHECKPOINT_SECONDS,
    Operation,
    PoolView,
    Progress,
    RateLimiter,
    speed_of,
)
from vstore.raid import reshape as plan
from vstore.raid.reshape_layout import ONLINE_LEVELS, ReshapeLayout
from vstore.sizes import format_size
from vstore.stack.offset import OffsetDevice
from vstore.uri import MemberURI

log = logging.getLogger("vstore.ops.reshape")

BATCH_BYTES = 1 << 20  # logical bytes moved per locked step (at most)


def interrupted(pool: PoolView) -> dict[str, Any] | None:
    """The reshape on record when none runs now (to resume), else None."""
    rec = pool.meta.get("reshape")
    cur = pool.lifecycle.current
    if not rec or (cur is not None and cur.kind in ("reshape", "grow")):
        return None
    return {"kind": "reshape", **rec}


def _shapes(pool: PoolView, n_old: int) -> tuple[plan.Shape, plan.Shape]:
    return plan.Shape(pool.level, n_old), plan.Shape(pool.level, len(pool.members))


CONVERSIONS = {("raid1", "raid5")}  # (from, to): the level changes and the reshape starts in one commit


def check_level_change(pool: PoolView, level: str | None) -> str:
    """The level the pool is reshaped into (``--level``); ConfigError for a conversion vstore does not do."""
    if level is None or level == pool.level:
        return pool.level
    if (pool.level, level) not in CONVERSIONS:
        raise ConfigError(f"vstore converts a raid1 pool of two members to raid5 only, not a {pool.level} "
                          f"pool to {level}")
    if len(pool.members) != 2:
        raise ConfigError(f"a raid1 pool converts to raid5 with two members (as md), not "
                          f"{len(pool.members)}: fail and remove the extra mirrors first")
    return level


async def start(pool: PoolView, uris: list[str], *, size: int | None = None, force: bool = False,
                level: str | None = None) -> None:
    """Join uris as new members and put the pool in the reshape layout, on record (cursor 0).

    With ``level="raid5"`` on a two-member raid1 pool (md's raid1 -> raid5): a
    2-member raid5 holds exactly a 2-member raid1's bytes (``vstore.raid.geometry``),
    so the same commit that records the reshape records the level raid5 with two
    old members, and the reshape onto n + k members is a raid5 one from there.
    """
    target = check_level_change(pool, level)
    converting = target != pool.level
    if target not in ONLINE_LEVELS:
        raise ConfigError(f"growing a {pool.level} pool onto more members needs a reshape, which vstore "
                          f"does online for {', '.join(ONLINE_LEVELS)} only so far (any pool takes members "
                          "that grew: --members-grew)")
    ops_grow._guard(pool)
    ops_grow.refuse_checksums(pool, "a reshape")
    if not uris:
        raise ConfigError("give at least one member to add (--add URI)")
    ops_grow._unique_uris(uris)
    layout = pool.layout
    C = int(pool.meta["chunk"])
    need = layout.rows * C
    if size is not None and size < DATA_OFFSET + need:
        raise ConfigError(f"--size {format_size(size)} is too small: a new member of pool {pool.name!r} "
                          f"needs {format_size(DATA_OFFSET + need)}")
    n0 = len(pool.members)
    old, new = plan.Shape(target, n0), plan.Shape(target, n0 + len(uris))
    ops_grow._check_journal_room(pool, new.n)
    await pool.consistency.wait_resynced()  # the rows of an unclean shutdown: consistent first
    if not plan.backup_fits(old, new, layout.rows):
        raise ConfigError(f"pool {pool.name!r} is too small to reshape onto {new.n} members "
                          f"({layout.rows} rows of {format_size(C)}): the copy needs room for its backup")
    joined: list[tuple[list[MemberURI], Any]] = []
    try:
        for k, text in enumerate(uris):
            joined.append(await ops_grow._join(pool, text, size=size, force=force, need=need, index=n0 + k))
    except BaseException:
        for _, dev in joined:
            await ops_grow._discard(dev)
        raise
    added = []
    try:
        labels = []
        for k, (_, dev) in enumerate(joined):
            data_size = ops_grow._data_size(pool, dev)
            labels.append((await ops_grow._label(pool, dev, n0 + k, new.n, data_size), data_size))
        ops_grow._record(pool, [paths for paths, _ in joined])
        for k, ((paths, dev), (member_uuid, data_size)) in enumerate(zip(joined, labels, strict=True)):
            data_dev = OffsetDevice(dev, DATA_OFFSET, data_size)
            added.append(ops_grow._new_member(pool, n0 + k, member_uuid, paths, "active", data_size,
                                              dev, data_dev))
        devs = [m.data_dev for m in pool.members] + [m.data_dev for m in added]
        if isinstance(layout, ReshapeLayout) and layout.finished:
            layout = layout.new  # a reshape finished in this process: its geometry is the old one now
        # (A converted raid1 stays the old geometry in this process: its bytes are the 2-member raid5's.)
        reshaping = ReshapeLayout(devs, C, level=target, n_old=n0, committed=0, old=layout,
                                  on_member_failed=layout.on_member_failed)
    except BaseException:
        for _, dev in joined:
            await ops_grow._discard(dev)
        raise
    ops_grow._members(pool).extend(added)
    pool.layout = reshaping
    pool.data_dev.inner = reshaping  # the volumes' device: the same object, a new layout below
    pool.meta["reshape"] = {"from": n0, "to": new.n, "cursor": 0, "backup": None,
                            "started": int(time.time())}
    if converting:
        pool.meta["reshape"]["converted_from"] = pool.level
        pool.meta["level"] = target  # one commit: raid1 before it, raid5 being reshaped after it
    # The journal or bitmap sees the updates of both geometries (and a parity level's rows).
    pool.consistency.attach(reshaping)
    await pool.commit()
    log.info("pool %s: %sreshaping from %d onto %d members", pool.name,
             f"converted from {pool.meta['reshape'].get('converted_from')} to {target}, " if converting else "",
             n0, new.n)


async def run(pool: PoolView, op: Operation, speed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy the pool into its new geometry from the recorded cursor to the end, then finish."""
    layout = pool.layout
    rec = pool.meta.get("reshape")
    if not isinstance(layout, ReshapeLayout) or not rec:
        raise NotFoundError(f"pool {pool.name!r} is not being reshaped")
    C = layout.chunk
    old, new = _shapes(pool, int(rec["from"]))
    total = layout.total
    data_rows = new.rows_for(total)
    rc = plan.critical_rows(old, new)
    B = plan.backup_chunks(old, new)
    start_cursor = int(rec["cursor"])
    resumed = start_cursor > 0 or rec.get("backup") is not None
    op.detail.update({"from": old.n, "to": new.n})
    op.base = start_cursor * C
    op.progress(start_cursor * C, total * C)
    t0 = time.monotonic()
    lo, hi = speed_of(speed)
    limiter = RateLimiter(layout, lo, hi)

    checkpoint = _checkpointer(pool, layout)
    # Stays after a stop too: a later write past the recorded cursor must still put it on record.
    layout.on_checkpoint = checkpoint
    # Rows dirty at a crash are resynced (each by the geometry owning it) before the copy moves on.
    await pool.consistency.wait_resynced()
    if int(pool.meta["reshape"]["cursor"]) == 0 and rc:
        await _critical_section(pool, layout, old, new, rc, B, checkpoint)
    r = new.rows_for(int(pool.meta["reshape"]["cursor"]))
    batch_rows = max(1, BATCH_BYTES // (new.k * C))
    since, last = 0, time.monotonic()
    while r < data_rows:
        if plan.needs_commit(old, r, layout.committed):
            await checkpoint(layout.done)
            since, last = 0, time.monotonic()
        r1 = r + 1
        while r1 < min(r + batch_rows, data_rows) and not plan.needs_commit(old, r1, layout.committed):
            r1 += 1
        c0, c1 = new.chunks_below(r), min(new.chunks_below(r1), total)
        await limiter.pace((c1 - c0) * C)
        async with layout.locked(layout.row_keys(c0, c1)):
            data = await _source(layout, c0, c1, new.chunks_below(r1))
            await layout.new.write(c0 * C, data)  # whole rows: parity from the data alone
            layout.advance(c1)
        op.progress(c1 * C, total * C)
        op.cursor = c1
        since += (c1 - c0) * C
        if since >= CHECKPOINT_BYTES or time.monotonic() - last > CHECKPOINT_SECONDS:
            await checkpoint(layout.done)
            since, last = 0, time.monotonic()
        r = r1
    # Every chunk on record in the new geometry first: the zero rows overwrite old rows, whose
    # chunks a crash before this checkpoint would copy again from there (the plan's model).
    await checkpoint(total)
    if new.n > new.k:  # parity: the rows above the data hold old rows under no parity: zeros
        await _zero_rows(layout, data_rows, layout.rows)
        await layout.flush_members()
    elif new.level == "raid10":  # old chunks under the new pairing (copies that differ): zeros
        await _zero_chunks(layout, new.chunks_below(data_rows), int(layout.new.size) // C)
        await layout.flush_members()
    # Done: the pool is its new geometry; one commit records the larger size.
    layout.finish()
    pool.data_dev.size = layout.size
    pool.meta.pop("reshape", None)
    pool.meta["n_extents"] = layout.size // pool.extent_size
    await pool.commit()
    seconds = time.monotonic() - t0
    nbytes = (total - start_cursor) * C
    log.info("pool %s: reshaped onto %d members (%s in %.1f s)", pool.name, new.n, format_size(nbytes), seconds)
    conv = {"converted_from": rec["converted_from"]} if rec.get("converted_from") else {}
    return {"kind": "reshape", "level": pool.level, **conv, "from": old.n, "to": new.n, "bytes": nbytes,
            "seconds": round(seconds, 3), "resumed": resumed, "resumed_at_chunk": start_cursor,
            "added_members": list(range(old.n, new.n)),
            "size": pool.n_extents * pool.extent_size, "pool_state": pool.state}


def _checkpointer(pool: PoolView, layout: ReshapeLayout) -> Any:
    """The reshape's checkpoint: flush the members, then put the cursor (never lower) on record."""

    async def checkpoint(cursor: int, **extra: Any) -> None:
        await layout.flush_members()
        rec_now = pool.meta["reshape"]
        cursor = max(cursor, int(rec_now["cursor"]))
        pool.meta["reshape"] = {**rec_now, "cursor": cursor, **extra}
        await pool.commit()
        layout.checkpointed(cursor)

    return checkpoint


async def redo_critical_section(pool: PoolView) -> bool:
    """At open, before anything is served: a crash in the critical section (backup on record) redone.

    The old rows below the critical row may be half overwritten by new rows, so
    the old geometry cannot serve their chunks: the new rows are written again
    from the backup and the cursor committed past them (as ``run`` would first).
    Whether there was one to redo.
    """
    layout = pool.layout
    rec = pool.meta.get("reshape")
    if not rec or rec.get("backup") is None or not isinstance(layout, ReshapeLayout) or pool.read_only:
        return False
    old, new = _shapes(pool, int(rec["from"]))
    await _critical_section(pool, layout, old, new, plan.critical_rows(old, new), plan.backup_chunks(old, new),
                            _checkpointer(pool, layout))
    log.info("pool %s: the reshape's critical section was redone from its backup", pool.name)
    return True


async def _source(layout: ReshapeLayout, c0: int, c1: int, row_end: int,
                  head: np.ndarray | None = None) -> np.ndarray:
    """Chunks [c0, c1) from the old geometry (``head`` first, if given), zeros up to row_end (a whole row)."""
    C = layout.chunk
    out = np.zeros((row_end - c0) * C, dtype=np.uint8)
    at = c0
    if head is not None:
        out[: len(head)] = head
        at = c0 + len(head) // C
    if c1 > at:
        out[(at - c0) * C : (c1 - c0) * C] = np.asarray(await layout.old.read(at * C, (c1 - at) * C))
    return out


async def _zero_rows(layout: ReshapeLayout, r0: int, r1: int) -> None:
    """Write whole zero rows [r0, r1) of the new geometry (nobody addresses them yet)."""
    row = int(layout.new.row_bytes or layout.chunk * layout.new.n)
    step = max(1, (4 << 20) // row)
    zeros = np.zeros(step * row, dtype=np.uint8)
    for r in range(r0, r1, step):
        n = min(step, r1 - r)
        await layout.new.write(r * row, zeros[: n * row])


async def _zero_chunks(layout: ReshapeLayout, c0: int, c1: int) -> None:
    """Write zeros over logical chunks [c0, c1) of the new geometry (raid10: both copies; nobody addresses them yet)."""
    C = layout.chunk
    step = max(1, (4 << 20) // C)
    zeros = np.zeros(step * C, dtype=np.uint8)
    for c in range(c0, c1, step):
        n = min(step, c1 - c)
        await layout.new.write(c * C, zeros[: n * C])


async def _critical_section(pool: PoolView, layout: ReshapeLayout, old: plan.Shape, new: plan.Shape,
                            rc: int, B: int, checkpoint: Any) -> None:
    """Copy the critical rows: from a backup on the new members, put on record first."""
    C = layout.chunk
    span = min(new.chunks_below(rc), layout.total)
    backup_at = (layout.rows - B) * C
    new_members = list(range(old.n, new.n))
    async with layout.locked(layout.row_keys(0, new.chunks_below(rc))):
        rec = pool.meta["reshape"]
        if rec.get("backup") is None:
            backup = np.asarray(await layout.old.read(0, B * C))
            for i in new_members:
                await layout.write_member(i, backup_at, backup)
            await layout.flush_members()
            pool.meta["reshape"] = {**rec, "backup": {"chunks": B, "offset": backup_at,
                                                      "crc": crc32c(backup.tobytes())}}
            await pool.commit()
        else:  # a crash in the critical section: the old rows below rc may be half overwritten
            backup = await _read_backup(pool, layout, new_members, rec["backup"])
        await layout.new.write(0, await _source(layout, 0, span, new.chunks_below(rc), head=backup))
        layout.advance(span)
        await checkpoint(span, backup=None)


async def _read_backup(pool: PoolView, layout: ReshapeLayout, members: list[int], rec: dict[str, Any]
                       ) -> np.ndarray:
    n = int(rec["chunks"]) * layout.chunk
    for i in members:
        try:
            got = np.asarray(await layout.read_member(i, int(rec["offset"]), n))
        except Exception as e:  # noqa: BLE001 - another copy may do
            log.warning("pool %s: reshape backup on member %d unreadable: %s", pool.name, i, e)
            continue
        if crc32c(got.tobytes()) == int(rec["crc"]):
            return got
        log.warning("pool %s: reshape backup on member %d is damaged", pool.name, i)
    raise MetadataError(f"pool {pool.name!r}: no new member holds a valid copy of the reshape's backup")


async def add(pool: PoolView, uris: list[str], *, size: int | None = None, force: bool = False,
              speed: dict[str, Any] | None = None, progress: Progress | None = None,
              level: str | None = None) -> dict[str, Any]:
    """Reshape onto the added members in this task (``level``: convert a raid1 to raid5 first)."""
    await start(pool, uris, size=size, force=force, level=level)
    return await pool.lifecycle.run("reshape", lambda op: run(pool, op, speed), progress)


async def start_add(pool: PoolView, uris: list[str], *, size: int | None = None, force: bool = False,
                    speed: dict[str, Any] | None = None, level: str | None = None) -> Operation:
    """Reshape onto the added members in the background (the mount process)."""
    pool.lifecycle.check_idle()
    await start(pool, uris, size=size, force=force, level=level)
    return pool.lifecycle.start("reshape", lambda op: run(pool, op, speed))


async def resume(pool: PoolView, *, speed: dict[str, Any] | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Resume an interrupted reshape in this task."""
    if interrupted(pool) is None:
        raise NotFoundError(f"pool {pool.name!r} has no interrupted reshape")
    return await pool.lifecycle.run("reshape", lambda op: run(pool, op, speed), progress)


def start_resume(pool: PoolView, *, speed: dict[str, Any] | None = None) -> Operation:
    """Resume an interrupted reshape in the background."""
    if interrupted(pool) is None:
        raise NotFoundError(f"pool {pool.name!r} has no interrupted reshape")
    return pool.lifecycle.start("reshape", lambda op: run(pool, op, speed))
