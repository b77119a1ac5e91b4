"""Ownership of a pool through an etcd lease, with an owner epoch and a write fence.

Keys, under the lease URI's prefix, per pool (by its UUID):

- ``PREFIX/POOL-UUID/owner``: who owns the pool (host, pid, time, epoch), attached
  to the owner's lease, so it vanishes when the lease expires or is revoked;
- ``PREFIX/POOL-UUID/epoch``: the owner epoch, a counter that outlives leases.

Taking the pool is one transaction: *owner is absent and epoch is unchanged since
I read it* -> put owner (with my lease) and epoch + 1. A second host therefore
either owns the pool with a newer epoch or is told who owns it; ``takeover``
waits until the owner's lease expires. The owner renews its lease every TTL/4 and
moves its fence (vstore.cluster.fence) to *when the renewal was sent + TTL -
TTL/4*; a renewal that fails, comes back late, finds the lease gone or the owner
key holding another epoch shuts the fence for good. etcd expires the lease no
earlier than the fence shuts, so by the time another host can take over, the old
owner has stopped issuing member writes, even if it was stopped or starved.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from vstore import owner as owner_mod
from vstore.cluster.etcd import EtcdClient, EtcdError, LeaseURI, compare_revision, put_op
from vstore.cluster.fence import Fence, arm, disarm, now
from vstore.errors import PoolBusyError

log = logging.getLogger("vstore.cluster.lease")


def describe_holder(raw: bytes) -> str:
    """Who an owner key names."""
    try:
        token = json.loads(raw)
    except ValueError:
        return "an unknown owner"
    return f"{owner_mod.describe(token)} (epoch {token.get('epoch', '?')})"


class OwnershipLease:
    """The lease by which this process owns one pool."""

    def __init__(self, uri: LeaseURI, pool: str, pool_uuid: str, *, client: Any = None,
                 clock: Callable[[], float] = now) -> None:
        self.uri = uri
        self.pool = pool
        self.ttl = uri.ttl
        self.client = client or EtcdClient(uri.host, uri.port, timeout=min(2.0, uri.ttl / 4))
        self.clock = clock
        self.owner_key = f"{uri.prefix}/{pool_uuid}/owner"
        self.epoch_key = f"{uri.prefix}/{pool_uuid}/epoch"
        self.fence = Fence(pool, clock)
        self.lease_id = 0
        self.epoch = 0
        self.reserved: list[int] = []  # members under a persistent reservation (vstore.cluster.reservations)
        self._scope: trio.CancelScope | None = None

    @property
    def interval(self) -> float:
        """Seconds between renewals."""
        return self.ttl / 4

    @property
    def margin(self) -> float:
        """How long before etcd could expire the lease the fence shuts."""
        return self.ttl / 4

    async def acquire(self, owner: dict[str, Any], *, takeover: bool = False, min_epoch: int = 0,
                      wait_limit: float | None = None) -> int:
        """Take the pool's owner key with a new epoch (> min_epoch); arm the fence. The epoch.

        With takeover, wait (up to wait_limit, default 2 TTL + 10 s) for the current
        owner's lease to expire; without, PoolBusyError names the owner.
        """
        limit = self.clock() + (wait_limit if wait_limit is not None else 2 * self.ttl + 10)
        told = False
        while True:
            cur = await self.client.get(self.epoch_key)
            seen = int(cur.value or b"0") if cur else 0
            epoch = max(seen, min_epoch) + 1
            sent = self.clock()
            lease_id, ttl = await self.client.grant(self.ttl)
            value = json.dumps({**owner, "epoch": epoch})
            ok = await self.client.txn(
                [compare_revision(self.owner_key, "CREATE", 0),
                 compare_revision(self.epoch_key, "MOD", cur.mod_revision if cur else 0)],
                [put_op(self.owner_key, value, lease_id), put_op(self.epoch_key, str(epoch))])
            if ok:
                self.lease_id, self.epoch, self.ttl = lease_id, epoch, ttl
                self.fence.open_until(sent + ttl - self.margin)
                arm(self.fence)
                log.info("pool %s: owned through %s, epoch %d", self.pool, self.uri, epoch)
                return epoch
            await self.client.revoke(lease_id)
            holder = await self.client.get(self.owner_key)
            if holder is None and self.clock() < limit:
                continue  # the epoch moved under us (another taker): read it again
            who = describe_holder(holder.value) if holder is not None else "another taker"
            if not takeover:
                raise PoolBusyError(f"pool {self.pool!r} is owned through its lease at {self.uri} by {who}; "
                                    "use --takeover to wait for that lease to expire and take the pool over")
            if self.clock() >= limit:
                raise PoolBusyError(f"pool {self.pool!r}: the lease of {who} at {self.uri} is still "
                                    "being renewed (its owner is alive); not taking over")
            if not told:
                log.warning("pool %s: waiting for the lease of %s to expire", self.pool, who)
                told = True
            await trio.sleep(min(0.5, self.ttl / 4))

    async def renew_once(self) -> bool:
        """One renewal: move the fence on, or shut it for good. Whether the pool is still ours."""
        if self.fence.lost is not None:
            return False
        if self.fence.expired():
            self.fence.lose("its ownership lease was not renewed in time")
            return False
        sent = self.clock()
        try:
            ttl = await self.client.keepalive(self.lease_id)
            holder = await self.client.get(self.owner_key) if ttl > 0 else None
        except EtcdError as e:
            log.warning("pool %s: renewing the lease: %s", self.pool, e)
            if self.fence.expired():
                self.fence.lose(f"its ownership lease could not be renewed ({e})")
                return False
            return True
        if ttl <= 0:
            self.fence.lose("its ownership lease expired at etcd")
            return False
        mine = False
        if holder is not None and holder.lease == self.lease_id:
            try:
                mine = int(json.loads(holder.value).get("epoch", -1)) == self.epoch
            except (ValueError, AttributeError):
                mine = False
        if not mine:
            who = describe_holder(holder.value) if holder is not None else "another taker" if holder else "nobody"
            self.fence.lose(f"epoch {self.epoch} is no longer current (the owner key names {who})")
            return False
        if self.fence.expired():  # the answer came too late to count
            self.fence.lose("its ownership lease was renewed too late")
            return False
        self.fence.open_until(sent + ttl - self.margin)
        return True

    async def renew_forever(self) -> None:
        """Renew until the lease is lost or this is cancelled."""
        while True:
            await trio.sleep(self.interval)
            try:
                if not await self.renew_once():
                    log.error("%s", self.fence.reason())
                    return
            except Exception as e:  # noqa: BLE001 - a renewer that dies must shut the fence
                self.fence.lose(f"the lease renewer failed: {e!r}")
                log.error("%s", self.fence.reason())
                return

    def start(self) -> None:
        """Renew in a task of its own for as long as the pool is open (a system task of this trio run)."""
        scope = self._scope = trio.CancelScope()

        async def runner() -> None:
            with scope:
                await self.renew_forever()

        trio.lowlevel.spawn_system_task(runner, name=f"vstore-lease-{self.pool}")

    def stop(self) -> None:
        """Stop renewing."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    def abandon(self) -> None:
        """Stop renewing and checking, as a killed process would (the lease expires by itself)."""
        self.stop()
        disarm(self.fence)

    async def release(self) -> None:
        """Give the pool up: stop renewing, revoke the lease (its owner key goes with it)."""
        self.stop()
        self.fence.lose("the pool was closed")
        disarm(self.fence)
        if self.lease_id:
            try:
                with trio.CancelScope(shield=True):
                    await self.client.revoke(self.lease_id)
            except EtcdError as e:
                log.warning("pool %s: revoking the lease: %s (it expires by itself in %ds)",
                            self.pool, e, self.ttl)
            self.lease_id = 0

    def status(self) -> dict[str, Any]:
        """What `vstore status` shows of the lease."""
        left = self.fence.deadline - self.clock()
        return {"uri": str(self.uri), "epoch": self.epoch, "ttl": self.ttl, "reserved": self.reserved,
                "fenced": self.fence.expired(), **({"reason": self.fence.lost} if self.fence.lost else {}),
                **({"fence_in": round(left, 2)} if math.isfinite(left) and left > 0 else {})}


async def take_pool_lease(meta: dict[str, Any], pool: str, *, takeover: bool,
                          client: Any = None) -> OwnershipLease:
    """Own the pool whose metadata names a lease: acquire it (a newer epoch than the metadata's) and renew it."""
    lease_meta = meta["lease"]
    uri = LeaseURI.parse(lease_meta["uri"])
    lease = OwnershipLease(uri, pool, meta["pool_uuid"], client=client)
    await lease.acquire(owner_mod.my_token(), takeover=takeover,
                        min_epoch=int(lease_meta.get("epoch", 0)))
    lease.start()
    return lease
