"""Pools that grow: members added (``vstore grow --add``), members that grew (``--members-grew``).

As ``mdadm --grow`` and LVM's ``vgextend``, on a live (mounted) pool or an unmounted one:

- **linear**, ``--add URI...``: each new member gets a superblock (index ``n``,
  the pool's UUID), the pool record lists it, then the layout appends its space
  (``vstore.raid.grow.append_member``) and one metadata commit records the
  member and the larger ``n_extents``; ``vstore volume resize`` can use the space
  at once. Extents wholly on members this command created (sparse files) are
  recorded as zeroed; the others are zeroed when allocated, as always.
- **raid1**, ``--add URI...``: each new mirror joins as a member in state
  ``rebuilding`` and is copied exactly as a replacement is (``vstore.ops.rebuild``:
  row locks, checkpointed cursor in ``meta["operation"]``, rate limit, progress
  in status, resumed after a restart or a crash by the same code). The commit
  that records the member comes before any write reaches it; only then does the
  layout list it in ``rebuilding``, so every update also writes it. Several URIs
  are added one after the other (each committed, then rebuilt).
- ``--members-grew`` (``mdadm --grow --size=max``): the members' current sizes
  are read again (a file truncated larger, a LUN resized); every striped level
  keeps row ``r`` at member offset ``r * chunk``, so more rows on every member
  append logical space. The rows gained are zeroed where they are not already
  zero (md resyncs them; here parity of zeros is zeros, so scrub stays clean and
  the new extents are recorded as zeroed), the write-intent bitmap is made to
  cover them (its header rewritten first), the layout takes them, and one commit
  records the members' data sizes and the new ``n_extents``. A linear pool can
  only grow its last member in place (a larger earlier member would move all
  that follows); growth of the others is reported as unusable. A pool that keeps
  per-member block checksums (``meta["checksums"]``: their area sits at the tail
  of each member's data window) is refused.

The order of the steps keeps a crash harmless: a new member's superblock and the
pool record come first (a crash then leaves an extra record entry that the pool
metadata does not name, which the next open ignores), the commit makes the
growth real, and nothing is written into new space before the layout covers it.

raid0, raid5, raid6 and raid10 pools take new members by a reshape
(``vstore.ops.reshape``, md's ``--grow --raid-devices``), and so does a two-member
raid1 converted to raid5 (``--level raid5``, md's raid1 -> raid5).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import struct
import time
import uuid
from typing import Any, cast

import numpy as np

from vstore.consistency.metadata import DATA_OFFSET, Superblock, write_slot, write_superblock
from vstore.errors import ConfigError, DegradedError, ExistsError, VstoreError
from vstore.ops import move as ops_move
from vstore.ops import rebuild
from vstore.ops.join import open_new_member
from vstore.ops.toolkit import MemberView, Operation, PoolView, Progress
from vstore.raid import grow as raid_grow
from vstore.sizes import format_size
from vstore.stack.device import BlockDevice
from vstore.stack.offset import OffsetDevice
from vstore.stack.volume import list_to_runs, runs_to_list
from vstore.uri import MemberURI, split_paths

log = logging.getLogger("vstore.ops.grow")

ZERO_IO = 4 << 20  # bytes per read (and zero write) of the rows a member grew by
BLKGETSIZE64 = 0x80081272
# Levels whose rows must agree across members (parity, copies): rows a member grew by are zeroed.
ZEROED_LEVELS = ("raid1", "raid5", "raid6", "raid10")



# --------------------------------------------------------------------------- checks


def _guard(pool: PoolView) -> None:
    """VstoreError unless the pool may grow now: writable, serving, clean, nothing running or pending."""
    if pool.read_only:
        raise VstoreError(f"pool {pool.name!r} is open read-only")
    if pool.layout is None or pool.data_dev is None:
        raise DegradedError(f"pool {pool.name!r} cannot serve its data: repair it before growing it")
    bad = [m.index for m in pool.members if m.state != "active"]
    if bad:
        raise DegradedError(f"pool {pool.name!r} has members {bad} not active: replace them (or let "
                            "their rebuild finish) before growing the pool")
    pool.lifecycle.check_idle()
    if pool.meta.get("reshape"):
        raise ConfigError(f"pool {pool.name!r} is being reshaped: let it finish first (vstore resume "
                          "resumes an interrupted one)")
    if rebuild.interrupted(pool) is not None or ops_move.interrupted(pool) is not None:
        raise ConfigError(f"pool {pool.name!r} has an interrupted operation: resume it first "
                          "(vstore resume)")


def _unique_uris(uris: list[str]) -> None:
    seen: set[str] = set()
    for text in uris:
        for p in split_paths(text):
            if p.text in seen:
                raise ConfigError(f"{p.redacted()} is given twice")
            seen.add(p.text)


def _check_journal_room(pool: PoolView, n_after: int) -> None:
    """ConfigError when the pool's journal cannot hold a full-stripe update of n_after members."""
    journal = getattr(pool.consistency, "journal", None)
    if journal is None:
        return
    from vstore.consistency.journal import LOG_OFFSET, record_size

    need = LOG_OFFSET + 2 * record_size(n_after, n_after * pool.meta["chunk"], 4096)
    if journal.dev.size < need:
        raise ConfigError(f"the journal of pool {pool.name!r} ({format_size(journal.dev.size)}) is too small "
                          f"for {n_after} members: it needs {format_size(need)} (attach a larger one first)")


def _bitmap_cap(pool: PoolView) -> int | None:
    """The largest member data area the write-intent bitmap covers (None: no bitmap)."""
    bm = pool.consistency.bitmap
    if bm is None:
        return None
    from vstore.consistency.bitmap import CAPACITY_BITS

    return int(bm.region) * CAPACITY_BITS


# --------------------------------------------------------------------------- --add


async def _join(pool: PoolView, uri: str, *, size: int | None, force: bool, need: int, index: int
                ) -> tuple[list[MemberURI], BlockDevice]:
    # A device labelled as this member index of this pool by a grow that never committed (a
    # crash) is taken again without --force.
    paths, dev = await open_new_member(pool, uri, size=size, force=force, need=need, replacing=index)
    try:
        raid_grow.check_block_size(pool.layout, dev)
        for other in pool.members:  # a member that failed or was given under another spelling
            if other.dev is not None and dev.identity() is not None and other.dev.identity() == dev.identity():
                raise ExistsError(f"{paths[0].redacted()} is the same storage as member {other.index}")
    except BaseException:
        await _discard(dev)
        raise
    return paths, dev


async def _discard(dev: BlockDevice) -> None:
    """Close a device that did not join; a file this command created is removed again."""
    try:
        await dev.aclose()
    except VstoreError as e:
        log.warning("closing a device that did not join: %s", e)
    if getattr(dev, "created", False):
        try:
            os.unlink(dev.path)  # type: ignore[attr-defined]
        except OSError:
            pass


def _data_size(pool: PoolView, dev: BlockDevice) -> int:
    """The data window of a new member: all of it (rounded to the chunk, and to what the bitmap covers)."""
    size = dev.size - DATA_OFFSET
    if pool.level != "linear":
        size -= size % pool.meta["chunk"]
    else:
        size -= size % pool.layout.block_size
    cap = _bitmap_cap(pool)
    if cap is not None and size > cap:
        size = cap - cap % pool.meta["chunk"]
    return size


async def _label(pool: PoolView, dev: BlockDevice, index: int, n_members: int, data_size: int) -> str:
    """Write a new member's superblock (new member UUID, this index) and the current metadata; the UUID.

    The metadata slot (this generation, as on the other members) makes the member
    current should the commit that adds it be cut short: a crash after another
    member got the new generation leaves it one generation behind, which the next
    open accepts when that commit never finished (with no slot it would be stale).
    """
    member_uuid = str(uuid.uuid4())
    gen = int(pool.meta["generation"])
    sb = Superblock(pool.meta["pool_uuid"], member_uuid, index, n_members, pool.level,
                    pool.meta["chunk"], DATA_OFFSET, data_size, gen)
    await write_slot(dev, gen, pool.meta)
    await write_superblock(dev, sb)
    await dev.flush()
    return member_uuid


def _record(pool: PoolView, paths_list: list[list[MemberURI]]) -> None:
    """The pool record lists the new members (before the commit: a crash then leaves an unused entry)."""
    n = len(pool.members)
    pool.record["members"] = list(pool.record["members"][:n]) + [[p.text for p in paths]
                                                                  for paths in paths_list]
    pool.home.write_pool(pool.name, pool.record)


def _new_member(pool: PoolView, index: int, member_uuid: str, paths: list[MemberURI], state: str,
                data_size: int, dev: BlockDevice, data_dev: BlockDevice) -> MemberView:
    """A member record of the pool's own kind (``vstore.pool.pool.Member``), from its first member."""
    return dataclasses.replace(cast(Any, pool.members[0]), index=index, uuid=member_uuid, paths=paths,
                               state=state, data_size=data_size, dev=dev, data_dev=data_dev,
                               error=None, scan=None)


def _members(pool: PoolView) -> list[MemberView]:
    return cast(list, pool.members)


def _zeroed_from(pool: PoolView, first_byte: int, n_extents: int) -> None:
    """Record the extents from the one starting at or after first_byte up to n_extents as zeroed."""
    ext = int(pool.meta["extent_size"])
    first = -(-first_byte // ext)
    if first < n_extents:
        zeroed = set(runs_to_list(pool.meta["zeroed"])) | set(range(first, n_extents))
        pool.meta["zeroed"] = list_to_runs(sorted(zeroed))


async def add_linear(pool: PoolView, uris: list[str], *, size: int | None = None,
                     force: bool = False) -> dict[str, Any]:
    """Append members to a linear pool; their space is the pool's at once."""
    _guard(pool)
    _unique_uris(uris)
    layout = pool.layout
    joined: list[tuple[list[MemberURI], BlockDevice]] = []
    try:
        for k, text in enumerate(uris):
            joined.append(await _join(pool, text, size=size, force=force, need=pool.meta["chunk"],
                                      index=len(pool.members) + k))
    except BaseException:
        for _, dev in joined:
            await _discard(dev)
        raise
    n0 = len(pool.members)
    old_size = layout.size
    old_extents = pool.n_extents
    appended: list[int] = []
    try:
        labels = []
        for k, (_, dev) in enumerate(joined):
            data_size = _data_size(pool, dev)
            labels.append((await _label(pool, dev, n0 + k, n0 + len(joined), data_size), data_size))
        _record(pool, [paths for paths, _ in joined])
        for k, ((paths, dev), (member_uuid, data_size)) in enumerate(zip(joined, labels, strict=True)):
            data_dev = OffsetDevice(dev, DATA_OFFSET, data_size)
            appended.append(raid_grow.append_member(layout, data_dev, failed=False))
            _members(pool).append(_new_member(pool, n0 + k, member_uuid, paths, "active", data_size,
                                              dev, data_dev))
    except BaseException:
        for i in reversed(appended):
            raid_grow.drop_last_member(layout, i)
        del _members(pool)[n0:]
        for _, dev in joined:
            await _discard(dev)
        raise
    pool.data_dev.size = layout.size
    n_extents = layout.size // pool.extent_size
    pool.meta["n_extents"] = n_extents
    if all(getattr(dev, "created", False) for _, dev in joined):
        _zeroed_from(pool, old_size, n_extents)  # sparse files made here read as zeros
    await pool.commit()
    added = (n_extents - old_extents) * pool.extent_size
    log.info("pool %s: %d member(s) added, %s more", pool.name, len(joined), format_size(added))
    return {"kind": "grow", "level": "linear", "added_members": list(range(n0, n0 + len(joined))),
            "added_bytes": added, "size": n_extents * pool.extent_size, "pool_state": pool.state}


async def _attach_mirror(pool: PoolView, uri: str, *, size: int | None, force: bool) -> int:
    """Join uri as a new raid1 member in state rebuilding (committed); its index."""
    layout = pool.layout
    n0 = len(pool.members)
    _check_journal_room(pool, n0 + 1)
    paths, dev = await _join(pool, uri, size=size, force=force, need=layout.size, index=n0)
    index = -1
    try:
        data_size = _data_size(pool, dev)
        if data_size < layout.size:
            raise ConfigError(f"{paths[0].redacted()} is too small: the mirror needs "
                              f"{format_size(DATA_OFFSET + layout.size)}")
        member_uuid = await _label(pool, dev, n0, n0 + 1, data_size)
        _record(pool, [paths])
        data_dev = OffsetDevice(dev, DATA_OFFSET, data_size)
        # Failed for reads and not yet written by updates: nothing reaches it before the commit.
        index = raid_grow.append_member(layout, data_dev, failed=True)
        _members(pool).append(_new_member(pool, index, member_uuid, paths, "rebuilding", data_size,
                                          dev, data_dev))
    except BaseException:
        if index >= 0:
            raid_grow.drop_last_member(layout, index)
        del _members(pool)[n0:]
        await _discard(dev)
        raise
    pool.meta["operation"] = {"kind": "rebuild", "member": index, "cursor": 0, "rows": int(layout.rows),
                              "how": "grow", "uri": ",".join(p.redacted() for p in paths),
                              "started": int(time.time())}
    await pool.commit()
    layout.rebuilding.add(index)  # from now on every update writes the new mirror too
    log.info("pool %s: mirror %d added (%s); copying", pool.name, index, pool.members[index].uri_text)
    return index


async def _add_mirrors_op(pool: PoolView, op: Operation, uris: list[str], size: int | None, force: bool,
                          speed: dict[str, Any] | None) -> dict[str, Any]:
    results = []
    for text in uris:
        _guard_idle_ok(pool)
        index = await _attach_mirror(pool, text, size=size, force=force)
        op.detail.update({"member": index, "how": "grow"})
        results.append(await rebuild.rebuild_member(pool, op, index, speed))
    return {**results[-1], "kind": "grow", "level": "raid1",
            "added_members": [r["member"] for r in results], "added_bytes": 0,
            "size": pool.n_extents * pool.extent_size, "pool_state": pool.state}


def _guard_idle_ok(pool: PoolView) -> None:
    """_guard, but inside the grow operation itself (it is the running one)."""
    bad = [m.index for m in pool.members if m.state != "active"]
    if bad or pool.layout is None:
        raise DegradedError(f"pool {pool.name!r} has members {bad} not active: the next mirror is not added")


def refuse_checksums(pool: PoolView, what: str) -> None:
    """ConfigError for a pool that keeps per-member block checksums (their area: the tail of each window)."""
    if pool.meta.get("checksums"):
        raise ConfigError(f"pool {pool.name!r} keeps block checksums at the tail of each member: {what} "
                          "is not supported for it yet")


def _check_add(pool: PoolView, uris: list[str], size: int | None) -> None:
    _guard(pool)
    refuse_checksums(pool, "adding members")
    if not uris:
        raise ConfigError("give at least one member to add (--add URI)")
    _unique_uris(uris)
    need = DATA_OFFSET + (pool.layout.size if pool.level == "raid1" else int(pool.meta["chunk"]))
    if size is not None and size < need:  # before any file is created
        raise ConfigError(f"--size {format_size(size)} is too small: a new member of pool {pool.name!r} "
                          f"needs {format_size(need)}")
    if pool.level not in raid_grow.APPENDABLE:
        raise ConfigError(f"growing a {pool.level} pool onto more members needs a reshape, which vstore "
                          "does not do yet for this level (linear, raid1, raid0, raid5, raid6 and raid10 pools take new members; "
                          "any pool takes members that grew: --members-grew)")


async def add(pool: PoolView, uris: list[str], *, size: int | None = None, force: bool = False,
              speed: dict[str, Any] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Add members to the pool in this task (a raid1 mirror is copied before this returns)."""
    _check_add(pool, uris, size)
    if pool.level == "linear":
        return await add_linear(pool, uris, size=size, force=force)
    return await pool.lifecycle.run("grow", lambda op: _add_mirrors_op(pool, op, uris, size, force, speed),
                                    progress, how="add")


async def start_add(pool: PoolView, uris: list[str], *, size: int | None = None, force: bool = False,
                    speed: dict[str, Any] | None = None) -> Operation | dict[str, Any]:
    """Add members in the mount process: linear at once (the result), raid1 copied in the background (its op)."""
    _check_add(pool, uris, size)
    if pool.level == "linear":
        return await add_linear(pool, uris, size=size, force=force)
    return pool.lifecycle.start("grow", lambda op: _add_mirrors_op(pool, op, uris, size, force, speed),
                                how="add")


# --------------------------------------------------------------------------- --members-grew


def current_size(dev: BlockDevice) -> int | None:
    """The device's size now (a file truncated larger since it was opened); None when unknown here.

    A local file or block device is asked again (fstat, BLKGETSIZE64); other
    devices report what they found when opened.
    """
    fd = getattr(dev, "fd", None)
    if not isinstance(fd, int) or fd < 0 or not hasattr(dev, "path"):
        return None
    import fcntl

    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
    else:
        size = st.st_size
    return size - size % dev.block_size


async def _zero_tail(m: MemberView, start: int, end: int) -> None:
    """Make member bytes [start, end) of m's data window zero (reading first: zeros stay unwritten)."""
    zeros = np.zeros(min(ZERO_IO, max(end - start, 1)), dtype=np.uint8)
    pos = start
    while pos < end:
        n = min(ZERO_IO, end - pos)
        got = np.asarray(await m.data_dev.read(pos, n))
        if got.any():
            await m.data_dev.write(pos, zeros[:n])
        pos += n
    await m.data_dev.flush()


async def members_grew(pool: PoolView, *, progress: Progress | None = None) -> dict[str, Any]:
    """Give the pool the space its members' devices grew by (as mdadm --grow --size=max)."""
    _guard(pool)
    refuse_checksums(pool, "growing its members in place")
    await pool.consistency.wait_resynced()
    layout = pool.layout
    C = int(pool.meta["chunk"])
    cap = _bitmap_cap(pool)
    unchecked: list[int] = []
    new_sizes: dict[int, int] = {}
    for m in pool.members:
        now = current_size(m.dev)
        if now is None:
            if pool.lifecycle.resident:  # opened at mount time: its size then says nothing new
                unchecked.append(m.index)
                continue
            now = m.dev.size
        data = now - DATA_OFFSET
        data -= data % (layout.block_size if pool.level == "linear" else C)
        if cap is not None and data > cap:
            data = cap - cap % C
        if data < m.data_size:
            raise VstoreError(f"member {m.index} of pool {pool.name!r} shrank ({format_size(now)}, its data "
                              f"area is {format_size(m.data_size)}): put its storage back as it was")
        if data > m.data_size:
            new_sizes[m.index] = data
    unusable: list[int] = []
    if pool.level == "linear":
        last = len(pool.members) - 1
        unusable = sorted(i for i in new_sizes if i != last)
        new_sizes = {i: s for i, s in new_sizes.items() if i == last}
    result: dict[str, Any] = {"kind": "grow", "level": pool.level, "grown_members": sorted(new_sizes),
                              "added_bytes": 0, "size": pool.n_extents * pool.extent_size,
                              "pool_state": pool.state}
    if unusable:
        result["unusable"] = unusable
    if unchecked:
        result["unchecked"] = unchecked
    if not new_sizes:
        return result
    old_extents = pool.n_extents
    old_size = layout.size
    sizes = {m.index: new_sizes.get(m.index, m.data_size) for m in pool.members}
    new_rows = None if pool.level == "linear" else min(sizes.values()) // C
    # The windows first: the layout addresses nothing beyond its rows yet.
    for i, s in new_sizes.items():
        m = pool.members[i]
        now = current_size(m.dev)
        if now is not None and now > m.dev.size:
            m.dev.size = now  # an opened local device: let it address its new size
        m.data_dev.size = s
    zero = pool.level in ZEROED_LEVELS and new_rows is not None and new_rows > layout.rows
    if zero:
        # The rows gained hold what the devices had there: make them zero on every member, so
        # parity and copies agree before anything trusts them (md resyncs them).
        total = (new_rows - layout.rows) * C * len(pool.members)
        for k, m in enumerate(pool.members):
            await _zero_tail(m, layout.rows * C, new_rows * C)
            if progress is not None:
                progress((k + 1) * (new_rows - layout.rows) * C, total)
    bm = pool.consistency.bitmap
    if bm is not None:
        await bm.grow(max(sizes.values()))
    for i, s in new_sizes.items():
        pool.members[i].data_size = s
    if pool.level == "linear":
        raid_grow.grow_last_member(layout)
    else:
        raid_grow.set_rows(layout, new_rows)
    pool.data_dev.size = layout.size
    n_extents = layout.size // pool.extent_size
    pool.meta["n_extents"] = n_extents
    if zero:
        _zeroed_from(pool, old_size, n_extents)
    await pool.commit()
    added = (n_extents - old_extents) * pool.extent_size
    log.info("pool %s: members %s grew; %s more", pool.name, sorted(new_sizes), format_size(added))
    result.update({"added_bytes": added, "size": n_extents * pool.extent_size})
    return result


def describe_unusable(result: dict[str, Any]) -> list[str]:
    """Notes on members whose growth was not used (for the CLI)."""
    notes = []
    if result.get("unusable"):
        notes.append(f"members {result['unusable']} grew, but a linear pool can only grow its last member "
                     "in place (add members instead)")
    if result.get("unchecked"):
        notes.append(f"members {result['unchecked']} are not local files: their new size is read when the "
                     "pool is opened (unmount it and run grow --members-grew again)")
    return notes

