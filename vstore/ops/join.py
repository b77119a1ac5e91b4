"""A device joining a pool (a replacement, a moved member's new home, a hot spare): open it, check it.

What rebuild and move share: ``open_new_member`` opens the device from its URI
(creating it with a size where the backend can) and refuses one that is too
small, already a member or spare, the same storage as a member, or another
pool's (unless forced); ``check_index`` checks a member index given by a user.
"""

from __future__ import annotations

from vstore.consistency.metadata import DATA_OFFSET, scan_member
from vstore.errors import ConfigError, ExistsError, VstoreError
from vstore.ops.toolkit import PoolView
from vstore.owner import refuse_live_owner
from vstore.sizes import format_size
from vstore.stack.device import BlockDevice
from vstore.stack.members import open_member
from vstore.uri import MemberURI, split_paths

SPARE_INDEX = 0xFFFFFFFE  # a spare's superblock index (with n_members SPARE_INDEX + 1)
MOVE_INDEX = 0xFFFFFFFD  # the superblock index of a move's pending target (n_members MOVE_INDEX + 1)


def check_index(pool: PoolView, index: int) -> None:
    """ConfigError unless index names a member; VstoreError when the pool is open read-only."""
    if not 0 <= index < len(pool.members):
        raise ConfigError(f"pool {pool.name!r} has members 0..{len(pool.members) - 1}, not {index}")
    if pool.read_only:
        raise VstoreError(f"pool {pool.name!r} is open read-only")


async def open_new_member(pool: PoolView, uri_text: str, *, size: int | None, force: bool,
                          need: int, allow_uuid: str | None = None, replacing: int | None = None
                          ) -> tuple[list[MemberURI], BlockDevice]:
    """Open (creating with size) a device to join the pool; refuse one in use unless forced.

    The failed member being replaced may be given again (re-added after a transient fault).
    """
    paths = split_paths(uri_text)
    taken = {p.text for m in pool.members if m.index != replacing or m.state == "active"
             for p in m.paths}
    taken |= {t for s in pool.record.get("spares", []) for t in s}
    taken |= set(pool.record.get("move") or [])  # the target of a move under way
    for p in paths:
        if p.text in taken:
            raise ExistsError(f"{p.redacted()} is already a member or spare of pool {pool.name!r}")
    dev = await open_member(paths, size)
    try:
        if dev.size < DATA_OFFSET + need:
            raise ConfigError(f"{paths[0].redacted()} is too small: {format_size(dev.size)}, "
                              f"needs {format_size(DATA_OFFSET + need)}")
        ident = dev.identity()
        if ident is not None:
            for m in pool.members:
                if m.dev is not None and m.state == "active" and m.dev.identity() == ident:
                    raise ExistsError(f"{paths[0].redacted()} is the same storage as member {m.index}")
        scan = await scan_member(dev)
        sb = scan.superblock
        if sb is not None and sb.pool_uuid != pool.meta["pool_uuid"]:
            refuse_live_owner(scan.meta, paths[0].redacted())
        if sb is not None and not force:
            ours = sb.pool_uuid == pool.meta["pool_uuid"]
            if not ours or (allow_uuid and sb.member_uuid != allow_uuid) or (
                    not allow_uuid and sb.index not in (replacing, SPARE_INDEX)):
                raise ExistsError(f"{paths[0].redacted()} already belongs to vstore pool "
                                  f"{sb.pool_uuid} (use --force to overwrite)")
    except BaseException:
        await dev.aclose()
        raise
    return paths, dev
