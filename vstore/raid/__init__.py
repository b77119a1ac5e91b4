"""RAID layouts as BlockDevices over member BlockDevices, and the factory that builds them.

``make_layout(level, members, chunk, failed, on_member_failed, rebuilding)`` returns a
``RaidLayout``; ``usable_size``, ``min_members`` and ``redundancy`` answer
sizing questions without opening members. The exact on-member geometry of
every level is documented in ``vstore.raid.geometry``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vstore.raid.base import OnMemberFailed, RaidLayout
from vstore.raid.geometry import LEVELS, check_level, min_members, redundancy, usable_size
from vstore.stack.device import BlockDevice

__all__ = ["LEVELS", "RaidLayout", "make_layout", "min_members", "redundancy", "usable_size"]


def make_layout(
    level: str,
    members: Sequence[BlockDevice],
    chunk: int = 65536,
    failed: Iterable[int] = frozenset(),
    on_member_failed: OnMemberFailed | None = None,
    rebuilding: Iterable[int] = frozenset(),
) -> RaidLayout:
    """Build the layout of a level over members; ConfigError on a bad level, count or chunk."""
    from vstore.raid.linear import LinearLayout
    from vstore.raid.raid0 import Raid0Layout
    from vstore.raid.raid1 import Raid1Layout
    from vstore.raid.raid5 import Raid5Layout
    from vstore.raid.raid6 import Raid6Layout
    from vstore.raid.raid10 import Raid10Layout

    cls = {
        "linear": LinearLayout,
        "raid0": Raid0Layout,
        "raid1": Raid1Layout,
        "raid5": Raid5Layout,
        "raid6": Raid6Layout,
        "raid10": Raid10Layout,
    }[check_level(level)]
    return cls(members, chunk, failed, on_member_failed, rebuilding)
