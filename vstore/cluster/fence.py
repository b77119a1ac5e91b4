"""The write fence of a pool owned through a lease: no member write after its deadline.

A process that owns a pool through an etcd lease may write to the members only
while it knows the lease is alive: until ``deadline``, a point on the monotonic
clock (CLOCK_BOOTTIME) that each renewal moves on (the time the renewal was *sent*, plus the TTL
etcd granted, minus a margin for writes already on their way). The clock keeps
running while the process is stopped (SIGSTOP) or starved, or the host suspended, so a process that
wakes up after its lease expired finds its fence shut before it issues anything.
Once a fence shuts it stays shut (``lose``): another host may own the pool now.

The armed fences are process-wide (``ARMED``), so every seam that issues member
writes checks them without knowing which pool it serves: the RAID layout before
it issues member writes and flushes, the metadata commit, and the I/O threads of
local members right before their ``pwritev`` (a batch queued before a SIGSTOP is
refused after it). The check is a clock compare; with no lease pool open it is
an empty-list test.
"""

from __future__ import annotations

import errno
import math
import time
from collections.abc import Callable

from vstore.errors import VstoreError


def now() -> float:
    """Seconds on the fence's clock: CLOCK_BOOTTIME, monotonic and running on through a suspend."""
    return time.clock_gettime(_CLOCK)


_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


class FencedError(VstoreError):
    """The pool's ownership lease lapsed (or was taken over): this process may not write."""


class Fence:
    """A deadline after which member writes are refused."""

    def __init__(self, pool: str, clock: Callable[[], float] = now) -> None:
        self.pool = pool
        self.clock = clock
        self.deadline = -math.inf  # shut until the lease is granted
        self.lost: str | None = None

    def open_until(self, deadline: float) -> None:
        """Allow writes until deadline (never reopens a fence that was lost)."""
        if self.lost is None:
            self.deadline = deadline

    def lose(self, why: str) -> None:
        """Shut the fence for good."""
        if self.lost is None:
            self.lost = why
        self.deadline = -math.inf

    def expired(self) -> bool:
        """Whether writes are refused now."""
        return self.clock() >= self.deadline

    def reason(self) -> str:
        """Why writes are refused (for the error)."""
        why = self.lost or "its ownership lease could not be renewed in time"
        return (f"pool {self.pool!r} is fenced: {why}; this process no longer writes to it "
                "(another host may own it now)")


ARMED: list[Fence] = []


def arm(fence: Fence) -> None:
    """Check fence before every member write of this process."""
    if fence not in ARMED:
        ARMED.append(fence)


def disarm(fence: Fence) -> None:
    """Stop checking fence (its pool is closed)."""
    if fence in ARMED:
        ARMED.remove(fence)


def fenced() -> Fence | None:
    """The first armed fence that refuses writes now, or None."""
    for f in ARMED:
        if f.clock() >= f.deadline:
            return f
    return None


def check_writes() -> None:
    """Raise FencedError when an armed fence refuses writes now (the seam before a member write)."""
    if ARMED:
        f = fenced()
        if f is not None:
            raise FencedError(f.reason())


def fenced_oserror() -> OSError | None:
    """For the I/O threads: an OSError to fail a write with when fenced, else None."""
    if ARMED:
        f = fenced()
        if f is not None:
            return OSError(errno.EPERM, f.reason())
    return None
