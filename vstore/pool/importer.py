"""`vstore import-pool`: rebuild a pool's record in the config directory from its members."""

from __future__ import annotations

from typing import Any

from vstore.consistency.metadata import scan_member
from vstore.errors import ConfigError, ExistsError, MetadataError
from vstore.owner import refuse_live_owner
from vstore.pool.home import Home, check_name
from vstore.uri import open_uri, split_paths


async def import_pool(home: Home, member_args: list[str], name: str | None = None) -> dict[str, Any]:
    """Scan the given members, find their pool's newest metadata and record the pool."""
    found: dict[str, list[tuple[int, int, list[str], dict[str, Any]]]] = {}
    problems: list[str] = []
    for arg in member_args:
        paths = split_paths(arg)
        dev = await open_uri(paths[0])
        try:
            scan = await scan_member(dev)
        finally:
            await dev.aclose()
        if scan.superblock is None or scan.meta is None:
            problems.append(f"{paths[0].redacted()}: {scan.error}")
            continue
        sb = scan.superblock
        found.setdefault(sb.pool_uuid, []).append((sb.index, scan.generation,
                                                   [p.text for p in paths], scan.meta))
    if not found:
        raise MetadataError("no vstore member among the given URIs: " + "; ".join(problems))
    if len(found) > 1:
        raise ConfigError(f"the URIs belong to {len(found)} different pools: "
                          + ", ".join(sorted(found)) + "; import one pool at a time")
    pool_uuid, entries = next(iter(found.items()))
    meta = max(entries, key=lambda e: e[1])[3]
    if not meta.get("lease"):  # a pool owned through a lease: opening it needs the lease, not this
        refuse_live_owner(meta, "the given members' pool")
    name = check_name("pool", name or meta["name"])
    if home.pool_record_path(name).exists():
        raise ExistsError(f"pool {name!r} already exists in {home.root} (use --name)")
    n = len(meta["members"])
    by_index: dict[int, list[str]] = {idx: uris for idx, _, uris, _ in entries}
    # Members not given keep the (redacted) paths stored in the metadata.
    members = [by_index.get(i, meta["members"][i]["paths"]) for i in range(n)]
    home.write_pool(name, {"name": name, "pool_uuid": pool_uuid, "members": members}, new=True)
    return {"name": name, "level": meta["level"], "members": n, "found": len(by_index)}
