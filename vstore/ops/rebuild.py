"""Replace and rebuild a member while the pool stays in use; hot spares.

A replacement (``vstore replace``, or a hot spare taking a failed member's place)
gets a superblock with a new member UUID and the old index, and becomes member
``i`` in state ``rebuilding``:

- the layout (``start_rebuild``) keeps ``i`` in ``failed`` for reads (they are
  reconstructed from the others) but lists it in ``rebuilding``, so every
  foreground update writes it too: rows the rebuild has passed stay current,
  rows it has not reached are overwritten when it gets there;
- the rebuild walks member ``i`` row by row; each row is computed by
  ``member_bytes`` and written while the row's lock is held, so no foreground
  update of that row can land between the two;
- the cursor (the lowest row not yet rebuilt) is checkpointed in the pool
  metadata (``meta["operation"]``), after the rows below it were flushed to the
  new member; after a restart the rebuild resumes there. After an unclean
  shutdown too, when the recovery brought the rows below the cursor up to date
  (``recovery_keeps_rebuilt_rows``: a journal replay writes rebuilding members);
  otherwise an update in flight at the crash may have reached the other members
  but not the new one, and the rebuild starts again from row 0;
- when the last row is written and flushed, ``i`` becomes ``active``
  (``finish_rebuild``).

The new device is opened and checked by ``vstore.ops.join`` (as a moved
member's is); replacing a healthy member is a move (``vstore.ops.move``).

A second failure while a raid6 pool rebuilds leaves two failed members, which
raid6 survives: the rebuild goes on computing from the rest. Where redundancy
does not allow it (raid5, raid10 partner), the rebuild stops with DegradedError.

Hot spares (``vstore spare add``) carry a superblock of the pool with index
``SPARE_INDEX``, so ``vstore create`` refuses them and ``import-pool`` ignores
them; they are listed in ``meta["spares"]`` (redacted) and the pool record (with
any secrets). When a member fails, a spare takes its place and is rebuilt: by the
mount process in the background, or by the command that saw the failure before
it closes the pool.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np

from vstore.consistency.metadata import DATA_OFFSET, Superblock, scan_member, write_superblock
from vstore.errors import (
    ConfigError,
    DegradedError,
    ExistsError,
    MemberIOError,
    NotFoundError,
    VstoreError,
)
from vstore.ops.join import SPARE_INDEX, check_index, open_new_member
from vstore.ops.move import give_up as give_up_move
from vstore.ops.move import move, start_move
from vstore.ops.toolkit import Operation, PoolView, Progress, RateLimiter, speed_of, sweep
from vstore.raid.base import MemberFailed
from vstore.raid.geometry import survives
from vstore.sizes import format_size
from vstore.stack.checksum import data_window
from vstore.stack.device import BlockDevice
from vstore.stack.members import open_member
from vstore.uri import MemberURI, split_paths

log = logging.getLogger("vstore.ops.rebuild")

WINDOW = 4  # batches of rows rebuilt concurrently
BATCH_BYTES = 1 << 20  # rows rebuilt together: one read of this size per surviving member


def BATCH_ROWS_FOR(chunk: int) -> int:  # noqa: N802 - a constant that depends on the chunk
    """Rows per rebuild batch for a chunk size."""
    return max(1, BATCH_BYTES // chunk)


# --------------------------------------------------------------------------- queries


def failed_members(pool: PoolView) -> list[int]:
    """Members that need a replacement (failed, missing or bad; not already rebuilding)."""
    return [m.index for m in pool.members if m.state not in ("active", "rebuilding")]


def interrupted(pool: PoolView) -> dict[str, Any] | None:
    """The checkpointed rebuild of the metadata when none runs now (to resume), else None."""
    rec = pool.meta.get("operation")
    cur = pool.lifecycle.current
    if not rec or rec.get("kind") != "rebuild" or (cur is not None and cur.kind == "rebuild"):
        return None
    i = int(rec["member"])
    if not 0 <= i < len(pool.members) or pool.members[i].state != "rebuilding":
        return None
    return dict(rec)


def recovery_keeps_rebuilt_rows(pool: PoolView) -> bool:
    """Whether the crash recovery of this pool brought a rebuilding member's rows below its cursor up to date.

    With a journal it does: every update is logged with its writes to the rebuilding
    member, and the replay writes them (``Consistency._replay_write``). With the
    write-intent bitmap too: the resync of a dirty row below the cursor brings this
    member in line with the others (``vstore.pool.consistency``).
    """
    return bool(pool.meta.get("journal")) or pool.consistency.bitmap is not None


def _rows_of(pool: PoolView) -> int:
    layout = pool.layout
    if layout is None:
        raise DegradedError(pool.degraded_message(set(failed_members(pool))))
    rows = layout.rows
    if rows is None or pool.level in ("linear", "raid0"):
        raise DegradedError(f"a {pool.level} pool has no redundancy to rebuild a member from; "
                            "a healthy member can still be moved (vstore move)")
    return int(rows)


def lock_keys(pool: PoolView, index: int, row: int) -> list[int]:
    """The layout lock keys that cover member index's row (what foreground updates of it hold)."""
    if pool.level == "raid10":
        return [(row * pool.layout.n + index) // 2]
    return [row]  # parity levels lock rows; raid1 locks chunks, and its row r is chunk r


async def rows_of_member(pool: PoolView, index: int, r0: int, count: int) -> np.ndarray:
    """What member index should hold in rows [r0, r0+count), computed from the others.

    The caller holds the rows' locks. Consecutive rows are contiguous on every
    member, so each surviving member is read once for the whole batch (what
    ``member_bytes`` does row by row); levels or shapes without that property go
    row by row through ``member_bytes``.
    """
    layout = pool.layout
    C = layout.chunk
    # Rows written at a crash and not resynced yet are resynced before they are trusted.
    await layout.sync_rows(range(r0, r0 + count))
    if pool.level == "raid1" or (pool.level == "raid10" and layout.n % 2 == 0):
        while True:
            if not survives(pool.level, layout.n, layout.failed | {index}):
                raise DegradedError(f"{pool.level}: member {index} cannot be computed from the "
                                    f"others (failed: {sorted(layout.failed)})")
            src = index ^ 1 if pool.level == "raid10" else min(
                (x for x in layout.healthy() if x != index), key=lambda x: layout.inflight[x])
            try:
                return await layout.read_member(src, r0 * C, count * C)
            except MemberFailed:
                continue
    if pool.level not in ("raid5", "raid6"):
        # Row by row in this task: member_bytes takes the row locks this task already holds.
        out = np.empty(count * C, dtype=np.uint8)
        for r in range(r0, r0 + count):
            out[(r - r0) * C : (r - r0 + 1) * C] = await layout.member_bytes(index, r * C, C)
        return out
    while True:
        gone = layout.failed | {index}
        layout.require_usable()
        live = [x for x in range(layout.n) if x not in gone]
        try:
            got = await layout.read_members([(x, r0 * C, count * C) for x in live])
        except MemberFailed:
            continue
        break
    bufs = {x: g.reshape(count, C) for x, g in zip(live, got, strict=True)}
    out = np.empty((count, C), dtype=np.uint8)
    for r in range(r0, r0 + count):
        dmem, pmem = layout.row_members(r)
        data = np.empty((layout.k, C), dtype=np.uint8)
        missing = []
        for j, x in enumerate(dmem):
            if x in bufs:
                data[j] = bufs[x][r - r0]
            else:
                missing.append(j)
        parity = [bufs[x][r - r0] if x in bufs else None for x in pmem]
        if len(missing) > sum(p is not None for p in parity):
            raise DegradedError(f"{pool.level} row {r}: too many failed members to rebuild member {index}")
        if missing:
            layout.recover(data, parity, missing)
        if index in dmem:
            out[r - r0] = data[dmem.index(index)]
        else:
            out[r - r0] = (await layout.compute_parity(data))[pmem.index(index)]
    return out.reshape(-1)


# --------------------------------------------------------------------------- new members


async def attach_replacement(pool: PoolView, index: int, paths: list[MemberURI], dev: BlockDevice,
                             *, how: str) -> None:
    """Make dev member index, state rebuilding: superblock, layout, metadata, pool record."""
    moving = pool.meta.get("operation") or {}
    if moving.get("kind") == "move":
        # Redundancy first: an interrupted move is given up (its member stays where it is).
        await give_up_move(pool, int(moving["member"]), f"member {index} is being rebuilt")
    m = pool.members[index]
    layout = pool.layout
    new_uuid = str(uuid.uuid4())
    sb = Superblock(pool.meta["pool_uuid"], new_uuid, index, len(pool.members), pool.level,
                    pool.meta["chunk"], DATA_OFFSET, m.data_size, int(pool.meta["generation"]))
    try:
        await write_superblock(dev, sb)
        await dev.flush()
    except MemberIOError:
        await dev.aclose()
        raise
    old_dev = m.dev
    # Reads of member index are reconstructed from now on; updates write the new device.
    data_dev = data_window(dev, DATA_OFFSET, m.data_size, bool(pool.meta.get("checksums")))
    layout.start_rebuild(index, data_dev)
    m.uuid, m.paths, m.dev, m.data_dev = new_uuid, paths, dev, data_dev
    m.state, m.error, m.scan = "rebuilding", None, None
    rows = _rows_of(pool)
    pool.meta["operation"] = {"kind": "rebuild", "member": index, "cursor": 0, "rows": rows,
                              "how": how, "uri": ",".join(p.redacted() for p in paths),
                              "started": int(time.time())}
    await pool.commit()
    pool.record["members"][index] = [p.text for p in paths]
    pool.home.write_pool(pool.name, pool.record)
    if old_dev is not None and old_dev is not dev:
        try:
            await old_dev.aclose()
        except VstoreError as e:
            log.warning("closing the old member %d: %s", index, e)
    log.info("pool %s: member %d replaced by %s (%s); rebuilding", pool.name, index,
             m.uri_text, how)


# --------------------------------------------------------------------------- the rebuild


async def rebuild_member(pool: PoolView, op: Operation, index: int, speed: dict[str, Any] | None = None
                         ) -> dict[str, Any]:
    """Rebuild member index (state rebuilding) from its checkpoint to the end, then activate it."""
    layout = pool.layout
    m = pool.members[index]
    if m.state != "rebuilding" or index not in layout.rebuilding:
        raise ConfigError(f"member {index} of pool {pool.name!r} is not being rebuilt")
    rows = _rows_of(pool)
    # Rows still dirty from a crash are resynced first: the rebuild computes from the others.
    await pool.consistency.wait_resynced()
    rec = pool.meta.get("operation") or {}
    if rec.get("kind") != "rebuild":
        rec = {}
    start = int(rec.get("cursor", 0)) if rec.get("member") == index else 0
    unclean = pool.recovered_from is not None
    if start and unclean and not recovery_keeps_rebuilt_rows(pool):
        # An update in flight at the crash may have reached the others but not this member.
        log.warning("pool %s was not closed cleanly: the rebuild of member %d starts again",
                    pool.name, index)
        start = 0
    C = layout.chunk
    op.detail.update({"member": index, "uri": m.uri_text, "rows": rows})
    if start:
        op.detail["resumed_at_row"] = start
    op.base = start * C
    op.progress(start * C, rows * C)
    t0 = time.monotonic()
    lo, hi = speed_of(speed)
    limiter = RateLimiter(layout, lo, hi)
    started = rec.get("started", int(time.time()))

    def record(cursor: int) -> None:
        pool.meta["operation"] = {**rec, "kind": "rebuild", "member": index, "cursor": cursor,
                                  "rows": rows, "uri": m.uri_text, "started": started}

    async def checkpoint(cursor: int) -> None:
        record(cursor)
        # The rows below the cursor must be durable on the new member before the cursor is.
        await layout.members[index].flush()
        await pool.commit()

    def alive() -> None:
        if index not in layout.rebuilding:
            raise MemberIOError(f"the new member {index} failed during its rebuild ({m.error})")

    async def batch(r0: int) -> None:
        count = min(BATCH_ROWS_FOR(C), rows - r0)
        keys = sorted({k for r in range(r0, r0 + count) for k in lock_keys(pool, index, r)})
        async with layout.locked(keys):
            alive()
            data = await rows_of_member(pool, index, r0, count)
            await layout.write_member(index, r0 * C, data)
        alive()

    step = BATCH_ROWS_FOR(C)
    try:
        await sweep(list(range(start, rows, step)), batch, unit_bytes=step * C, op=op,
                    limiter=limiter, checkpoint=checkpoint, window=WINDOW)
    except BaseException:
        if index in layout.rebuilding:
            record(op.cursor)  # committed with the next metadata change (at the latest on close)
        else:
            pool.meta["operation"] = None  # the new member failed: nothing left to resume
        raise
    await layout.members[index].flush()
    if index not in layout.rebuilding:
        raise MemberIOError(f"the new member {index} failed during its rebuild ({m.error})")
    # Done: the member serves reads again.
    layout.finish_rebuild(index)
    m.state, m.error = "active", None
    pool.meta["operation"] = None
    await pool.commit()
    seconds = time.monotonic() - t0
    nbytes = (rows - start) * C
    log.info("pool %s: member %d rebuilt (%s in %.1f s)", pool.name, index, format_size(nbytes), seconds)
    return {"kind": "rebuild", "member": index, "uri": m.uri_text, "bytes": nbytes,
            "seconds": round(seconds, 3), "resumed_at_row": start, "pool_state": pool.state}


def _guard_replace(pool: PoolView, index: int) -> None:
    check_index(pool, index)
    _rows_of(pool)
    if pool.meta.get("operation") and interrupted(pool) is not None:
        raise ConfigError(f"pool {pool.name!r} has an interrupted rebuild of member "
                          f"{pool.meta['operation']['member']}: resume it first (vstore resume)")
    m = pool.members[index]
    if m.state == "rebuilding":
        raise ConfigError(f"member {index} of pool {pool.name!r} is already being rebuilt")
    failed = {x.index for x in pool.members if x.state != "active"} | {index}
    if not survives(pool.level, len(pool.members), failed):
        raise DegradedError(f"member {index} of {pool.level} pool {pool.name!r} cannot be rebuilt: "
                            f"members {sorted(failed - {index})} are failed too")


async def _prepare_replace(pool: PoolView, index: int, uri: str, size: int | None, force: bool) -> None:
    _guard_replace(pool, index)
    m = pool.members[index]
    paths, dev = await open_new_member(pool, uri, size=size, force=force, need=m.data_size,
                                       replacing=index)
    await attach_replacement(pool, index, paths, dev, how="replace")


async def replace(pool: PoolView, index: int, uri: str, *, size: int | None = None, force: bool = False,
                  speed: dict[str, Any] | None = None, progress: Progress | None = None
                  ) -> dict[str, Any]:
    """Replace member index by uri and rebuild it, in this task (a healthy member is moved)."""
    check_index(pool, index)
    if pool.members[index].state == "active":
        return await move(pool, index, uri, size=size, force=force, speed=speed, progress=progress)
    return await pool.lifecycle.run(
        "rebuild", lambda op: _replace_op(pool, op, index, uri, size, force, speed), progress,
        member=index)


async def _replace_op(pool: PoolView, op: Operation, index: int, uri: str, size: int | None,
                      force: bool, speed: dict[str, Any] | None) -> dict[str, Any]:
    await _prepare_replace(pool, index, uri, size, force)
    return await rebuild_member(pool, op, index, speed)


async def start_replace(pool: PoolView, index: int, uri: str, *, size: int | None = None,
                        force: bool = False, speed: dict[str, Any] | None = None) -> Operation:
    """Replace member index by uri and rebuild it in the background (the mount process)."""
    check_index(pool, index)
    if pool.members[index].state == "active":
        return await start_move(pool, index, uri, size=size, force=force, speed=speed)
    _guard_replace(pool, index)
    pool.lifecycle.check_idle()
    await _prepare_replace(pool, index, uri, size, force)
    return pool.lifecycle.start("rebuild", lambda op: rebuild_member(pool, op, index, speed),
                                member=index)


async def resume(pool: PoolView, *, speed: dict[str, Any] | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Resume an interrupted rebuild in this task."""
    rec = interrupted(pool)
    if rec is None:
        raise NotFoundError(f"pool {pool.name!r} has no interrupted rebuild")
    index = int(rec["member"])
    return await pool.lifecycle.run("rebuild", lambda op: rebuild_member(pool, op, index, speed),
                                    progress, member=index)


def start_resume(pool: PoolView, *, speed: dict[str, Any] | None = None) -> Operation:
    """Resume an interrupted rebuild in the background."""
    rec = interrupted(pool)
    if rec is None:
        raise NotFoundError(f"pool {pool.name!r} has no interrupted rebuild")
    index = int(rec["member"])
    return pool.lifecycle.start("rebuild", lambda op: rebuild_member(pool, op, index, speed),
                                member=index)


# --------------------------------------------------------------------------- hot spares


async def add_spare(pool: PoolView, uri: str, *, size: int | None = None, force: bool = False
                    ) -> dict[str, Any]:
    """Record uri as a hot spare of the pool (its superblock marks it so)."""
    if pool.read_only:
        raise VstoreError(f"pool {pool.name!r} is open read-only")
    need = max(m.data_size for m in pool.members)
    paths, dev = await open_new_member(pool, uri, size=size, force=force, need=need)
    try:
        sb_now = (await scan_member(dev)).superblock
        spares = {s["uuid"]: s["uri"] for s in pool.meta.get("spares", [])}
        if sb_now is not None and sb_now.pool_uuid == pool.meta["pool_uuid"] and sb_now.member_uuid in spares:
            raise ExistsError(f"{paths[0].redacted()} is already a spare of pool {pool.name!r} "
                              f"(as {spares[sb_now.member_uuid]})")
        spare_uuid = str(uuid.uuid4())
        sb = Superblock(pool.meta["pool_uuid"], spare_uuid, SPARE_INDEX, SPARE_INDEX + 1, pool.level,
                        pool.meta["chunk"], DATA_OFFSET, dev.size - DATA_OFFSET, 0)
        await write_superblock(dev, sb)
        await dev.flush()
        size_now = dev.size
    finally:
        await dev.aclose()
    entry = {"uuid": spare_uuid, "uri": ",".join(p.redacted() for p in paths), "size": size_now}
    pool.meta.setdefault("spares", []).append(entry)
    await pool.commit()
    pool.record.setdefault("spares", []).append([p.text for p in paths])
    pool.home.write_pool(pool.name, pool.record)
    if pool.lifecycle.resident and failed_members(pool) and pool.lifecycle.current is None:
        start_spare_takeover(pool)  # a pool already degraded takes its new spare at once
    return {"spares": pool.status()["spares"]}


def _spare_index(pool: PoolView, uri: str) -> int:
    want = {p.text for p in split_paths(uri)} | {p.redacted() for p in split_paths(uri)}
    for k, s in enumerate(pool.meta.get("spares", [])):
        texts = set(s["uri"].split(","))
        rec = pool.record.get("spares", [])
        if k < len(rec):
            texts |= set(rec[k])
        if want & texts:
            return k
    raise NotFoundError(f"{uri} is not a spare of pool {pool.name!r}")


async def remove_spare(pool: PoolView, uri: str) -> dict[str, Any]:
    """Forget a hot spare (its superblock is wiped, so it can be used elsewhere)."""
    if pool.read_only:
        raise VstoreError(f"pool {pool.name!r} is open read-only")
    k = _spare_index(pool, uri)
    texts = _record_spare(pool, k)
    _drop_spare(pool, k)
    await pool.commit()
    pool.home.write_pool(pool.name, pool.record)
    try:
        dev = await open_member(split_paths(",".join(texts)), None)
        try:
            await dev.write(0, bytes(4096))
            await dev.flush()
        finally:
            await dev.aclose()
    except VstoreError as e:
        log.warning("could not wipe the superblock of the removed spare: %s", e)
    return {"spares": pool.status()["spares"]}


def _record_spare(pool: PoolView, k: int) -> list[str]:
    rec = pool.record.get("spares", [])
    return rec[k] if k < len(rec) else pool.meta["spares"][k]["uri"].split(",")


def _drop_spare(pool: PoolView, k: int) -> None:
    del pool.meta["spares"][k]
    if k < len(pool.record.get("spares", [])):
        del pool.record["spares"][k]


async def _take_one(pool: PoolView, index: int) -> bool:
    """Attach the first spare that fits as member index; False when none does."""
    need = pool.members[index].data_size
    for k, s in enumerate(list(pool.meta.get("spares", []))):
        if int(s["size"]) < DATA_OFFSET + need:
            continue
        texts = _record_spare(pool, k)
        _drop_spare(pool, k)
        pool.home.write_pool(pool.name, pool.record)
        try:
            paths, dev = await open_new_member(pool, ",".join(texts), size=None, force=False,
                                               need=need, allow_uuid=s["uuid"])
        except VstoreError as e:
            log.error("pool %s: spare %s unusable: %s", pool.name, s["uri"], e)
            await pool.commit()
            continue
        await attach_replacement(pool, index, paths, dev, how="spare")
        return True
    return False


async def _takeover_op(pool: PoolView, op: Operation, speed: dict[str, Any] | None) -> dict[str, Any]:
    results = []
    while True:
        todo = [i for i in failed_members(pool)
                if survives(pool.level, len(pool.members),
                            {m.index for m in pool.members if m.state != "active"})]
        if not todo or not pool.meta.get("spares"):
            break
        index = todo[0]
        if not await _take_one(pool, index):
            break
        op.detail["member"] = index
        results.append(await rebuild_member(pool, op, index, speed))
    pool.lifecycle.pending_spares.clear()
    if not results:
        return {"kind": "rebuild", "rebuilt": []}
    return {**results[-1], "rebuilt": [r["member"] for r in results]}


def start_spare_takeover(pool: PoolView, speed: dict[str, Any] | None = None) -> Operation:
    """Rebuild failed members onto spares in the background (the mount process)."""
    return pool.lifecycle.start("rebuild", lambda op: _takeover_op(pool, op, speed), how="spare")


async def take_spares(pool: PoolView, progress_factory: Any = None,
                      speed: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rebuild failed members onto spares in this task (a command that saw the failure)."""
    if not failed_members(pool) or not pool.meta.get("spares") or pool.layout is None:
        return []
    if interrupted(pool) is not None or pool.lifecycle.current is not None:
        return []
    index = failed_members(pool)[0]
    label = f"rebuild member {index} onto a spare"
    if progress_factory is None:
        res = await pool.lifecycle.run("rebuild", lambda op: _takeover_op(pool, op, speed), None,
                                       how="spare")
    else:
        with progress_factory(label) as cb:
            res = await pool.lifecycle.run("rebuild", lambda op: _takeover_op(pool, op, speed), cb,
                                           how="spare")
    return [res] if res.get("rebuilt") else []
