"""Growing a live layout in place: a member appended, or more rows on every member.

Both keep every existing logical offset where it is, so requests in flight, the
row locks and the volumes' extent maps need no remapping:

- ``append_member``: linear puts the new member's space after the last byte;
  raid1 gets one more mirror (failed for reads until ``vstore.ops.rebuild`` has
  copied it). The striped levels would need a reshape (their rows change width),
  which this module refuses.
- ``set_rows``: every striped level and raid1 keep row ``r`` at member offset
  ``r * chunk`` on every member (``vstore.raid.geometry``), so more rows append
  logical space at the end (raid10 with an odd member count too: device chunk
  positions do not depend on the row count). Linear grows its last member only
  (``grow_last_member``): a larger earlier member would shift all after it.

Nothing here does I/O; ``vstore.ops.grow`` prepares the members, commits the
metadata and calls these.
"""

from __future__ import annotations

from vstore.errors import ConfigError
from vstore.raid.base import RaidLayout
from vstore.stack.device import BlockDevice

APPENDABLE = ("linear", "raid1")


def check_block_size(layout: RaidLayout, dev: BlockDevice) -> None:
    """ConfigError when dev's block size does not fit the layout (a larger block would move offsets)."""
    if dev.block_size > layout.block_size or layout.chunk % dev.block_size:
        raise ConfigError(f"the new member's block size {dev.block_size} does not fit this pool "
                          f"(block size {layout.block_size}, chunk {layout.chunk})")


def append_member(layout: RaidLayout, dev: BlockDevice, *, failed: bool) -> int:
    """Add dev as the last member of a linear or raid1 layout; its index.

    ``failed``: the member takes no I/O yet (a new mirror, before its rebuild starts).
    """
    if layout.level not in APPENDABLE:
        raise ConfigError(f"a {layout.level} layout cannot take a member without a reshape")
    check_block_size(layout, dev)
    if layout.level == "raid1" and dev.size < layout.size:
        raise ConfigError(f"the new mirror holds {dev.size} bytes, the pool {layout.size}")
    i = layout.n
    layout.members.append(dev)
    layout.inflight.append(0)
    if failed:
        layout.failed.add(i)
    layout.n += 1
    if layout.level == "linear":
        size = dev.size - dev.size % layout.block_size
        layout.member_sizes.append(size)  # type: ignore[attr-defined]
        layout.starts.append(layout.starts[-1] + size)  # type: ignore[attr-defined]
        layout.size = layout.starts[-1]  # type: ignore[attr-defined]
    return i


def drop_last_member(layout: RaidLayout, i: int) -> None:
    """Undo ``append_member`` (nothing was committed; no I/O reached the member)."""
    if i != layout.n - 1:
        raise ConfigError(f"internal: member {i} is not the last of the layout")
    layout.members.pop()
    layout.inflight.pop()
    layout.failed.discard(i)
    layout.rebuilding.discard(i)
    layout.n -= 1
    if layout.level == "linear":
        layout.member_sizes.pop()  # type: ignore[attr-defined]
        layout.starts.pop()  # type: ignore[attr-defined]
        layout.size = layout.starts[-1]  # type: ignore[attr-defined]


def rows_size(level: str, n: int, rows: int, chunk: int) -> int:
    """Logical bytes of a striped (or raid1) layout of n members with this many rows."""
    if level == "raid1":
        return rows * chunk
    if level == "raid0":
        return rows * n * chunk
    if level == "raid10":
        return (n * rows // 2) * chunk
    if level == "raid5":
        return rows * (n - 1) * chunk
    if level == "raid6":
        return rows * (n - 2) * chunk
    raise ConfigError(f"a {level} layout has no rows")


def set_rows(layout: RaidLayout, rows: int) -> None:
    """Give a striped or raid1 layout more rows (its members' windows already hold them)."""
    from vstore.raid.reshape_layout import ReshapeLayout

    if isinstance(layout, ReshapeLayout):  # a reshape finished in this process: its new geometry serves
        if not layout.finished:
            raise ConfigError("a layout being reshaped does not take more rows")
        set_rows(layout.new, rows)
        layout.rows, layout.size = layout.new.rows, layout.new.size
        return
    if layout.rows is None:
        raise ConfigError(f"a {layout.level} layout has no rows")
    if rows < layout.rows:
        raise ConfigError(f"a layout never shrinks ({layout.rows} rows, {rows} asked)")
    C = layout.chunk
    short = [i for i, m in enumerate(layout.members) if m.size < rows * C]
    if short:
        raise ConfigError(f"members {short} are too small for {rows} rows")
    layout.rows = rows
    if layout.level == "raid10":
        layout.chunks = layout.n * rows // 2  # type: ignore[attr-defined]
    layout.size = rows_size(layout.level, layout.n, rows, C)


def grow_last_member(layout: RaidLayout) -> None:
    """Linear: take the last member's (already enlarged) window whole."""
    if layout.level != "linear":
        raise ConfigError(f"internal: {layout.level} is not linear")
    dev = layout.members[-1]
    size = dev.size - dev.size % layout.block_size
    layout.member_sizes[-1] = size  # type: ignore[attr-defined]
    layout.starts[-1] = layout.starts[-2] + size  # type: ignore[attr-defined]
    layout.size = layout.starts[-1]  # type: ignore[attr-defined]
