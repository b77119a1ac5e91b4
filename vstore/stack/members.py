"""Opening a pool member from its paths: one path is its backend device, several a MultipathDevice."""

from __future__ import annotations

from vstore.stack.device import BlockDevice
from vstore.stack.multipath import MultipathDevice
from vstore.uri import MemberURI, open_uri


async def open_member(paths: list[MemberURI], create_size: int | None = None, *,
                      require_all: bool = True) -> BlockDevice:
    """Open a member's device from its paths (creating it with create_size where the backend can).

    Several paths give a ``MultipathDevice`` (identity proven; with require_all
    False, paths that do not open start failed); its options are configured by
    the pool from its metadata.
    """
    if len(paths) == 1:
        return await open_uri(paths[0], create_size=create_size)
    return await MultipathDevice.open(paths, create_size=create_size, require_all=require_all)
