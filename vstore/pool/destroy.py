"""`vstore destroy`: wipe a pool's superblocks and metadata slots from its devices, then forget it."""

from __future__ import annotations

import numpy as np

from vstore.consistency.journal import LOG_OFFSET
from vstore.consistency.metadata import DATA_OFFSET, scan_member
from vstore.errors import VstoreError
from vstore.owner import refuse_live_owner
from vstore.pool.home import Home
from vstore.uri import open_uri, split_paths


async def destroy_pool(home: Home, name: str) -> int:
    """Zero the metadata area of every member and spare (and the journal's header); return how many."""
    record = home.read_pool(name)
    pool_uuid = record.get("pool_uuid")
    targets = [(texts, DATA_OFFSET) for texts in record["members"]]
    targets += [(texts, DATA_OFFSET) for texts in record.get("spares", [])]
    if record.get("journal"):
        targets.append(([record["journal"]], LOG_OFFSET))
    wiped = 0
    problems: list[str] = []
    for texts, span in targets:
        uri = split_paths(",".join(texts))[0]
        try:
            dev = await open_uri(uri)
        except VstoreError as e:
            problems.append(f"{uri.redacted()}: {e}")
            continue
        try:
            if span == DATA_OFFSET:
                scan = await scan_member(dev)
                if scan.superblock is not None and scan.superblock.pool_uuid == pool_uuid:
                    refuse_live_owner(scan.meta, uri.redacted())  # open on another host
                if scan.superblock is not None and scan.superblock.pool_uuid != pool_uuid:
                    problems.append(f"{uri.redacted()}: belongs to another pool now, left alone")
                    continue
            n = min(span, dev.size)
            await dev.write(0, np.zeros(n - n % dev.block_size, np.uint8))
            await dev.flush()
            wiped += 1
        finally:
            await dev.aclose()
    home.remove_pool(name)
    if problems:
        raise VstoreError(f"pool {name!r} forgotten, but not every device was wiped: " + "; ".join(problems))
    return wiped
