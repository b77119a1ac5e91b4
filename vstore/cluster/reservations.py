"""SCSI-3 persistent reservations: the storage side of a lease's fence, for members that have them.

When a process takes a pool through its lease (epoch E), every member that can
(iSCSI LUNs: ``pr_register`` and friends on the device) is reserved *Write
Exclusive - Registrants Only* under a key derived from the pool and E: each of
the member's I_T nexuses (its paths) registers the key, every other key is
preempted (its registrations removed, its reservation taken over). From then on
the target itself refuses a write from an older owner's session with
RESERVATION CONFLICT, even one that was already on the wire when that owner
stalled. A clean close clears the reservation again.

Members are duck-typed (this module sits below the device stack): a device with
``pr_register`` is one nexus; a multipath device is its paths' devices.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from typing import Any

from vstore.errors import VstoreError

log = logging.getLogger("vstore.cluster.reservations")


def reservation_key(pool_uuid: str, epoch: int) -> int:
    """The 8-byte reservation key of a pool's owner epoch: pool CRC32 high, epoch low (never 0)."""
    return (zlib.crc32(pool_uuid.encode()) << 32 | (epoch & 0xFFFFFFFF)) or 1


def nexuses(dev: Any) -> list[Any]:
    """The reservation-capable devices (one per I_T nexus) behind a member device."""
    paths = getattr(dev, "paths", None)
    devs = [getattr(p, "dev", None) for p in paths] if isinstance(paths, list) else [dev]
    return [d for d in devs if d is not None and hasattr(d, "pr_register")]


async def reserve_member(dev: Any, key: int) -> bool:
    """Reserve one member for key (see the module); False when it has no reservations."""
    found = nexuses(dev)
    if not found:
        return False
    for d in found:
        await d.pr_register(key)
    first = found[0]
    for other in await first.pr_keys():
        if other != key:
            await first.pr_preempt(key, other)
    if await first.pr_holder() != key:
        await first.pr_reserve(key)
    return True


async def reserve_members(devs: Sequence[tuple[int, Any]], key: int) -> list[int]:
    """Reserve every (index, device) member that can be; the indexes reserved. Failures are logged."""
    done = []
    for index, dev in devs:
        try:
            if await reserve_member(dev, key):
                done.append(index)
        except VstoreError as e:  # e.g. a target without PERSISTENT RESERVE: the lease's fence still holds
            log.warning("member %d: no persistent reservation: %s", index, e)
    return done


async def release_members(devs: Sequence[tuple[int, Any]], key: int) -> None:
    """Clear the reservations of a clean close (errors only logged)."""
    for index, dev in devs:
        found = nexuses(dev)
        if not found:
            continue
        try:
            await found[0].pr_clear(key)
        except VstoreError as e:
            log.warning("member %d: clearing its persistent reservation: %s", index, e)
