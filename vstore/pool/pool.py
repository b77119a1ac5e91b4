"""A pool: members -> RAID layout -> logical volumes, with its metadata and its owner.

``Pool.create`` writes a new pool onto its members; ``Pool.open`` assembles one
from the member URIs recorded in the config directory (``vstore import-pool``
records them again from the members alone). The pool object then owns the
device graph and every metadata change (``commit``); the commands that the CLI (or
the control socket of a mounted pool) carries out on it are in ``vstore.pool.commands``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from vstore import owner as owner_mod
from vstore.cluster import fence as fence_mod
from vstore.consistency.metadata import (
    DATA_OFFSET,
    LEVEL_CODES,
    MemberScan,
    Superblock,
    scan_member,
    write_slot,
    write_superblock,
)
from vstore.errors import (
    ConfigError,
    DegradedError,
    ExistsError,
    MemberIOError,
    MetadataError,
    NoSpaceError,
    NotFoundError,
    PoolBusyError,
    VstoreError,
)
from vstore.io.aio import run_all
from vstore.ops.lifecycle import Lifecycle
from vstore.pool.consistency import Consistency
from vstore.pool.home import Home, check_name
from vstore.raid import make_layout, redundancy, usable_size
from vstore.raid.base import CHECKSUM_OUTCOMES
from vstore.raid.geometry import check_member_count, survives
from vstore.sizes import format_size
from vstore.stack.align import AlignedDevice
from vstore.stack.checksum import data_bytes, data_window, unknown_area
from vstore.stack.device import BlockDevice, DeviceBase
from vstore.stack.members import open_member
from vstore.stack.multipath import MultipathDevice, validate_options
from vstore.stack.offset import OffsetDevice
from vstore.stack.volume import EXTENT_SIZE, Volume, list_to_runs, runs_to_list
from vstore.uri import MemberURI, split_paths

log = logging.getLogger("vstore.pool.pool")

DEFAULT_CHUNK = 64 << 10
# Levels that can keep block checksums: those with redundancy to heal a bad block from.
CHECKSUM_LEVELS = ("raid1", "raid5", "raid6", "raid10")
CHECKSUM_FORMAT = {"algorithm": "crc32c", "block": 4096, "area": "tail of each data window"}
ZERO_IO = 4 << 20

Progress = Callable[[int, int], None]


@dataclass
class Member:
    """One member of an open pool: its paths, its device and its state."""

    index: int
    uuid: str
    paths: list[MemberURI]
    state: str = "active"  # active | failed | missing | bad
    data_size: int = 0
    dev: BlockDevice | None = None
    data_dev: BlockDevice | None = None
    error: str | None = None
    scan: MemberScan | None = field(default=None, repr=False)
    checksum_errors: int = 0  # blocks that failed their checksums on it, ever (status's CKSUM)

    @property
    def uri_text(self) -> str:
        """All paths, redacted, comma-separated."""
        return ",".join(p.redacted() for p in self.paths)

    def to_meta(self) -> dict[str, Any]:
        """The member's record in the pool metadata (no secrets)."""
        rec = {"index": self.index, "uuid": self.uuid, "paths": [p.redacted() for p in self.paths],
               "state": self.state if self.state in ("active", "rebuilding") else "failed",
               "data_size": self.data_size}
        if self.checksum_errors:
            rec["checksum_errors"] = self.checksum_errors
        if self.state not in ("active", "rebuilding"):
            # A failed member's reason is kept as it is (it was "failed: ..." already), so
            # it does not grow by a "failed: " at every commit.
            if not self.error:
                rec["reason"] = self.state
            elif self.state == "failed" or self.error.startswith(f"{self.state}"):
                rec["reason"] = self.error
            else:
                rec["reason"] = f"{self.state}: {self.error}"
        return rec


def extent_size_for(level: str, n: int, chunk: int) -> int:
    """Extent size: about 4 MiB, a whole number of full stripes so zeroing never reads."""
    width = chunk * {"raid5": n - 1, "raid6": n - 2, "raid0": n, "raid10": n}.get(level, 1)
    if level == "raid10":
        width = chunk * n // 2 if n % 2 == 0 else chunk * n  # odd n: rows repeat every 2 rows
    return max(1, -(-EXTENT_SIZE // width)) * width


class Pool:
    """An open pool."""

    def __init__(self, home: Home, name: str, record: dict[str, Any]) -> None:
        self.home = home
        self.name = name
        self.record = record
        self.meta: dict[str, Any] = {}
        self.members: list[Member] = []
        self.layout: Any = None
        self.data_dev: BlockDevice | None = None
        self.volumes: dict[str, Volume] = {}
        self.read_only = True
        self.lock: owner_mod.PoolLock | None = None
        self.lease: Any = None  # vstore.cluster.lease.OwnershipLease of a pool created with --lease
        self.recovered_from: dict[str, Any] | None = None
        # Crash consistency: the journal, or the write-intent bitmap and resync (vstore.pool.consistency).
        self.consistency = Consistency(self)
        self._commit_lock = trio.Lock()
        self._pending_failures: set[int] = set()
        self._counts_changed = False  # checksum error counts not yet committed
        self._closed = False
        # Rebuilds, hot spares, moves and scrubs (vstore.ops.lifecycle).
        self.lifecycle = Lifecycle(self)

    # ------------------------------------------------------------------ properties
    @property
    def level(self) -> str:
        """RAID level."""
        return self.meta["level"]

    @property
    def extent_size(self) -> int:
        """Bytes per extent."""
        return int(self.meta["extent_size"])

    @property
    def n_extents(self) -> int:
        """Extents in the pool's address space."""
        return int(self.meta["n_extents"])

    def used_extents(self) -> set[int]:
        """Extents allocated to some volume."""
        used: set[int] = set()
        for v in self.meta["volumes"]:
            used.update(runs_to_list(v["extents"]))
        return used

    @property
    def state(self) -> str:
        """clean, degraded or failed."""
        failed = {m.index for m in self.members if m.state != "active"}
        if not failed:
            return "clean"
        return "degraded" if survives(self.level, len(self.members), failed) else "failed"

    # ------------------------------------------------------------------ create
    @classmethod
    async def create(cls, home: Home, name: str, level: str, member_args: list[str], *,
                     chunk: int = DEFAULT_CHUNK, size: int | None = None,
                     force: bool = False, multipath: dict[str, Any] | None = None,
                     journal: str | None = None, journal_size: int | None = None,
                     lease: str | None = None, checksums: bool = False) -> Pool:
        """Write a new pool onto its members and record it in the config directory."""
        check_name("pool", name)
        if level not in LEVEL_CODES:
            raise ConfigError(f"unknown RAID level {level!r} (choose from {', '.join(LEVEL_CODES)})")
        if home.pool_record_path(name).exists():
            raise ExistsError(f"pool {name!r} already exists in {home.root}")
        n = len(member_args)
        check_member_count(level, n)  # before any member is opened or created
        if chunk < 4096 or chunk & (chunk - 1):
            raise ConfigError(f"chunk size must be a power of two >= 4K, got {chunk}")
        if checksums and level not in CHECKSUM_LEVELS:
            raise ConfigError(f"--checksums needs redundancy to heal from ({', '.join(CHECKSUM_LEVELS)}); "
                              f"a {level} pool has none")
        paths_list = [split_paths(a) for a in member_args]
        seen: set[str] = set()
        for paths in paths_list:
            for p in paths:
                if p.text in seen:
                    raise ConfigError(f"member {p.redacted()} is listed twice")
                seen.add(p.text)
        if size is not None and size <= DATA_OFFSET:
            raise ConfigError(f"--size must be larger than the {format_size(DATA_OFFSET)} metadata area")
        if lease is not None:
            from vstore.cluster.etcd import LeaseURI

            lease = str(LeaseURI.parse(lease))
        mp_options = None
        if multipath is not None or any(len(p) > 1 for p in paths_list):
            mp_options = validate_options({k: v for k, v in (multipath or {}).items() if v is not None})
        devs: list[BlockDevice] = []
        pool: Pool | None = None
        try:
            for paths in paths_list:
                devs.append(await open_member(paths, size))
            # The same storage under two spellings (//, ./, a symlink, a second path).
            seen_ident: dict[str, int] = {}
            for i, dev in enumerate(devs):
                ident = dev.identity()
                if ident is None:
                    continue
                other = seen_ident.setdefault(ident, i)
                if other != i:
                    raise ConfigError(f"members {other} ({paths_list[other][0].redacted()}) and {i} "
                                      f"({paths_list[i][0].redacted()}) are the same storage")
            for paths, dev in zip(paths_list, devs, strict=True):
                if dev.size < DATA_OFFSET + chunk:
                    raise ConfigError(f"member {paths[0].redacted()} is too small ({dev.size} bytes)")
                scan = await scan_member(dev)
                owner_mod.refuse_live_owner(scan.meta, f"member {paths[0].redacted()}")
                if scan.superblock is not None and not force:
                    raise ExistsError(
                        f"member {paths[0].redacted()} already belongs to vstore pool "
                        f"{scan.superblock.pool_uuid} (use --force to overwrite)"
                    )
            sizes = [dev.size - DATA_OFFSET for dev in devs]
            sizes = [s - s % chunk for s in sizes] if level != "linear" else sizes
            # With checksums the tail of each data window holds them (vstore.stack.checksum).
            total = usable_size(level, [data_bytes(s) if checksums else s for s in sizes], chunk)
            ext = extent_size_for(level, n, chunk)
            n_extents = total // ext
            if n_extents < 1:
                raise ConfigError(
                    f"pool too small: {format_size(total)} usable, one extent is {format_size(ext)}"
                )
            pool_uuid = str(uuid.uuid4())
            pool = cls(home, name, {})
            pool.read_only = False
            # The creating process owns the pool as an opening one does (lock and owner
            # token): should it die before closing, the next open recovers the pool.
            pool.lock = owner_mod.PoolLock(home.lock_path(name))
            pool.lock.acquire(name)
            pool.members = [
                Member(i, str(uuid.uuid4()), paths_list[i], "active", sizes[i], devs[i],
                       data_window(devs[i], DATA_OFFSET, sizes[i], checksums))
                for i in range(n)
            ]
            if checksums:
                for dev, size_i in zip(devs, sizes, strict=True):
                    if not dev.created:  # a fresh file is sparse: its checksum area reads as zeros
                        await unknown_area(OffsetDevice(dev, DATA_OFFSET, size_i, close_inner=False))
            # Every extent counts as zeroed: members created here are sparse; with checksums,
            # the blocks of members that held other bytes are UNKNOWN and read as zeros.
            pool.meta = {
                "format": 1, "name": name, "pool_uuid": pool_uuid, "generation": 0,
                "level": level, "chunk": chunk, "extent_size": ext, "n_extents": n_extents,
                "created": int(time.time()), "members": [m.to_meta() for m in pool.members],
                # Extents known to read as zeros: all of them when every member was created
                # here (sparse); else none, and each is zeroed when a volume first takes it.
                "volumes": [], "zeroed": [[0, n_extents]] if n_extents else [],
                "owner": owner_mod.my_token(), "clean": False,
            }
            if checksums:
                pool.meta["checksums"] = dict(CHECKSUM_FORMAT)
            if lease is not None:  # owned through an etcd lease from the first write on
                from vstore.cluster.lease import take_pool_lease

                pool.meta["lease"] = {"uri": lease, "epoch": 0}
                pool.lease = await take_pool_lease(pool.meta, name, takeover=False)
                pool.meta["lease"]["epoch"] = pool.meta["owner"]["epoch"] = pool.lease.epoch
                await pool._reserve()
            if mp_options is not None:
                pool.meta["multipath"] = mp_options
                pool._configure_multipath()
            pool.record = {"name": name, "pool_uuid": pool_uuid,
                           "members": [[p.text for p in paths] for paths in paths_list]}
            await pool.consistency.create(journal, journal_size, devs, force=force)
            pool._build_stack()
            await pool.commit()
            await pool.consistency.start()
            home.write_pool(name, pool.record, new=True)
            return pool
        except BaseException:
            if pool is not None and pool.lease is not None and pool.lease.reserved:
                with trio.CancelScope(shield=True):
                    await pool._reserve(release=True)
            for dev in devs:
                with trio.CancelScope(shield=True):
                    await dev.aclose()
                    if dev.created:  # storage this create made: leave nothing behind
                        await dev.remove_created()
            if pool is not None and pool.lock is not None:
                pool.lock.release()
            if pool is not None and pool.lease is not None:
                await pool.lease.release()
            raise

    # ------------------------------------------------------------------ open
    @classmethod
    async def open(cls, home: Home, name: str, *, read_only: bool = False, takeover: bool = False) -> Pool:
        """Assemble a pool from its recorded members; take ownership unless read-only.

        A pool with a lease (``create --lease``) is owned through it: with takeover,
        wait for another owner's lease to expire (vstore.cluster.lease).
        """
        record = home.read_pool(name)
        pool = cls(home, name, record)
        pool.read_only = read_only
        pool.lock = owner_mod.PoolLock(home.lock_path(name))
        pool.lock.acquire(name)
        try:
            await pool._assemble()
            if not read_only and pool.meta.get("lease"):
                await pool._take_lease(takeover)
            if not read_only:
                await pool.consistency.open()
                await pool._take_ownership()
                await pool.consistency.recover_and_start()
                pool.lifecycle.reattach()  # before anything writes: an interrupted move records them
                if (pool.meta.get("reshape") or {}).get("backup") is not None:
                    from vstore.ops.reshape import redo_critical_section

                    # Half-written critical rows: rewritten from the reshape's backup before any read.
                    await redo_critical_section(pool)
            else:
                await pool.consistency.probe_journal()
                pool.consistency.warn_if_recovery_pending()
            return pool
        except BaseException:
            with trio.CancelScope(shield=True):
                if pool.lease is not None and pool.lease.reserved:
                    await pool._reserve(release=True)
                await pool._close_devices()
                if pool.lease is not None:
                    await pool.lease.release()
            raise

    async def _take_lease(self, takeover: bool) -> None:
        """Own the pool through its etcd lease, then read the members again (the last owner may have
        written until its lease expired)."""
        from vstore.cluster.lease import take_pool_lease

        self.lease = await take_pool_lease(self.meta, self.name, takeover=takeover)
        for m in self.members:
            if m.dev is not None:
                await m.dev.aclose()
                m.dev = m.data_dev = None
        await self._assemble()
        self.meta["lease"]["epoch"] = self.lease.epoch
        await self._reserve()

    async def _reserve(self, *, release: bool = False) -> None:
        """Persistent reservations of the lease's epoch on the members that have them (or clear them)."""
        from vstore.cluster import reservations as pr

        devs = [(m.index, m.dev) for m in self.members if m.dev is not None]
        key = pr.reservation_key(self.meta["pool_uuid"], self.lease.epoch)
        if release:
            await pr.release_members([(i, d) for i, d in devs if i in self.lease.reserved], key)
        else:
            self.lease.reserved = await pr.reserve_members(devs, key)

    async def _assemble(self) -> None:
        paths_list = [split_paths(",".join(m)) for m in self.record["members"]]
        n_recorded = len(paths_list)
        if self.record.get("move"):
            # The target of a move (vstore.ops.move): should the move have switched members
            # without the record saying so yet (a crash in between), the member is there.
            paths_list.append(split_paths(",".join(self.record["move"])))
        devs: list[BlockDevice | None] = [None] * len(paths_list)
        errors: list[str | None] = [None] * len(paths_list)
        scans: list[MemberScan | None] = [None] * len(paths_list)

        async def open_one(i: int) -> None:
            devs[i] = await open_member(paths_list[i], None, require_all=False)
            scans[i] = await scan_member(devs[i])

        def failed(i: int, e: BaseException) -> None:
            errors[i] = str(e)

        await run_all([lambda i=i: open_one(i) for i in range(len(paths_list))],
                      catch=VstoreError, on_error=failed)
        want_uuid = self.record.get("pool_uuid")
        best: MemberScan | None = None
        for s in scans[:n_recorded]:
            if s and s.meta and s.superblock and s.superblock.pool_uuid == want_uuid:
                if best is None or s.generation > best.generation:
                    best = s
        if best is None:
            for d in devs:
                if d is not None:
                    await d.aclose()
            detail = "; ".join(f"member {i}: {e or (s and s.error)}"
                               for i, (e, s) in enumerate(zip(errors[:n_recorded], scans, strict=False)))
            raise MetadataError(f"pool {self.name!r}: no member holds valid metadata ({detail})")
        self.meta = best.meta
        # A commit writes its metadata slot to every active member before any superblock:
        # once one member's superblock has the newest generation, every member got its
        # slot, and a member one generation behind lost it (an old copy put back). With
        # no such superblock the newest commit may have been cut short by a crash, which
        # leaves members one generation behind that are current.
        newest_done = any(s and s.superblock and s.superblock.pool_uuid == want_uuid
                          and s.superblock.generation >= best.generation for s in scans[:n_recorded])
        by_uuid = {}
        for i, s in enumerate(scans):
            if s and s.superblock and s.superblock.pool_uuid == want_uuid:
                by_uuid[s.superblock.member_uuid] = i
        self.members = []
        for mm in self.meta["members"]:
            idx = mm["index"]
            slot = by_uuid.get(mm["uuid"], idx if idx < n_recorded else None)
            if slot == n_recorded:  # the move's target is this member now
                self.record["members"][idx] = self.record.pop("move")
                if not self.read_only:
                    self.home.write_pool(self.name, self.record)
            paths = paths_list[slot] if slot is not None else split_paths(",".join(mm["paths"]))
            m = Member(idx, mm["uuid"], paths, "active", int(mm["data_size"]))
            dev = devs[slot] if slot is not None else None
            scan = scans[slot] if slot is not None else None
            m.dev, m.scan = dev, scan
            if mm["state"] == "rebuilding" and scan and scan.superblock \
                    and scan.superblock.member_uuid == mm["uuid"]:
                m.state = "rebuilding"  # vstore.ops.rebuild resumes it
            elif mm["state"] != "active":
                m.state, m.error = "failed", mm.get("reason", "marked failed in pool metadata")
            elif dev is None:
                m.state, m.error = "missing", errors[slot] if slot is not None else "no path"
            elif scan is None or scan.superblock is None:
                m.state, m.error = "bad", scan.error if scan else "unreadable"
            elif scan.superblock.pool_uuid != want_uuid or scan.superblock.member_uuid != mm["uuid"]:
                m.state, m.error = "bad", "superblock belongs to another pool or member"
            elif dev.size < DATA_OFFSET + m.data_size:
                # Truncated or swapped for a smaller device: what is missing cannot be read.
                m.state = "bad"
                m.error = (f"shorter than the pool's data area ({format_size(dev.size)} of "
                           f"{format_size(DATA_OFFSET + m.data_size)})")
            elif scan.generation < best.generation - 1 or (scan.generation < best.generation
                                                            and newest_done):
                # Every metadata change reaches every active member, so an active member
                # that missed a completed commit (a restored old copy, a member that was
                # away) is stale: like md's event count, it is never read again until
                # rebuilt. Recorded as failed at the next commit. One behind with the
                # newest commit unfinished (a crash in its middle: nothing after it was
                # written) is current.
                m.state = "stale"
                m.error = f"stale (generation {scan.generation}, pool at {best.generation})"
                log.warning("pool %s: member %d is %s", self.name, idx, m.error)
            m.checksum_errors = int(mm.get("checksum_errors", 0))
            if m.state in ("active", "rebuilding"):
                m.data_dev = data_window(dev, DATA_OFFSET, m.data_size, self.checksums)
            self.members.append(m)
        used = {m.dev for m in self.members}
        for d in devs:
            if d is not None and d not in used:
                await d.aclose()
        self._configure_multipath()
        self._build_stack()

    def _configure_multipath(self) -> None:
        options = self.meta.get("multipath") or {}
        for m in self.members:
            if isinstance(m.dev, MultipathDevice):
                m.dev.configure(**options)

    async def run_background(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """Run the pool's background tasks (path checkers, journal checkpoints) until cancelled."""
        async with trio.open_nursery() as nursery:
            for m in self.members:
                if m.dev is not None:  # path checkers, iSCSI answering pings while idle
                    await nursery.start(m.dev.run_background)
            await nursery.start(self.consistency.run_background)
            await nursery.start(self.lifecycle.run_background)
            task_status.started()
            await trio.sleep_forever()

    def _build_stack(self) -> None:
        failed = {m.index for m in self.members if m.state != "active"}
        if not survives(self.level, len(self.members), failed):
            self.layout = None
            self.data_dev = None
            self.volumes = {}
            if not self.read_only:
                raise DegradedError(self.degraded_message(failed))
            return
        devs = [m.data_dev if m.data_dev is not None
                else _AbsentDevice(data_bytes(m.data_size) if self.checksums else m.data_size)
                for m in self.members]
        # A member being rebuilt is failed for reads but takes every write (vstore.ops.rebuild).
        self.layout = make_layout(self.level, devs, self.meta["chunk"], failed=failed,
                                  on_member_failed=self.on_member_failed,
                                  rebuilding={m.index for m in self.members if m.state == "rebuilding"})
        if self.meta.get("reshape"):  # a reshape under way (vstore.ops.reshape): two geometries by its cursor
            from vstore.raid.reshape_layout import ReshapeLayout

            rec = self.meta["reshape"]
            if rec.get("backup") is not None and self.read_only:
                # A crash inside the critical section: its old rows may be half overwritten, and
                # only a read-write open rewrites them from the backup (vstore.ops.reshape).
                log.warning("pool %s: a reshape's critical section awaits its redo: open it read-write "
                            "to serve its data", self.name)
                self.layout, self.data_dev, self.volumes = None, None, {}
                return
            self.layout = ReshapeLayout(devs, self.meta["chunk"], level=self.level, n_old=int(rec["from"]),
                                        committed=int(rec["cursor"]), failed=failed,
                                        on_member_failed=self.on_member_failed)
        self.layout.on_checksum_error = self.on_checksum_error
        self.layout.read_only = self.read_only
        # Volumes take any offset and length; iSCSI members only whole blocks.
        self.data_dev = AlignedDevice(self.layout)
        self.consistency.attach(self.layout)
        self.volumes = {
            v["name"]: Volume(v["name"], v["size"], runs_to_list(v["extents"]), self.data_dev,
                              self.extent_size, read_only=self.read_only)
            for v in self.meta["volumes"]
        }

    def degraded_message(self, failed: set[int]) -> str:
        """Why the pool cannot serve data with these members failed (a DegradedError's text)."""
        detail = ", ".join(f"member {m.index} {m.state}" + (f" ({m.error})" if m.error else "")
                           for m in self.members if m.index in failed)
        return (f"pool {self.name!r} ({self.level}) has {len(failed)} failed members, more than "
                f"it can survive ({redundancy(self.level, len(self.members))}): {detail}")

    async def _take_ownership(self) -> None:
        token = self.meta.get("owner")
        if token and not owner_mod.token_is_stale(token) and self.lease is None:  # a lease decides alone
            raise PoolBusyError(f"pool {self.name!r} is in use by {owner_mod.describe(token)}")
        if token or not self.meta.get("clean", True):
            # The previous owner died without closing: remember it for recovery.
            self.recovered_from = token or {}
            log.warning("pool %s was not closed cleanly (owner %s)", self.name,
                        owner_mod.describe(token))
        self.meta["owner"] = owner_mod.my_token()
        if self.lease is not None:
            self.meta["owner"]["epoch"] = self.lease.epoch
        self.meta["clean"] = False
        await self.commit()

    # ------------------------------------------------------------------ metadata
    def on_member_failed(self, index: int, exc: BaseException | None = None) -> None:
        """A member failed (the layout's hook): record it, to be committed before the next update."""
        fence_mod.check_writes()  # refused by the lease's fence: not the member's fault
        m = self.members[index]
        if m.state in ("active", "rebuilding"):
            m.state, m.error = "failed", f"I/O error: {exc}" if exc else "failed"
            log.error("pool %s: member %d failed: %s", self.name, index, exc)
        self._pending_failures.add(index)
        self.lifecycle.member_failed(index)

    @property
    def checksums(self) -> bool:
        """Whether the pool keeps a CRC32C per 4 KiB block on its members (vstore.stack.checksum)."""
        return bool(self.meta.get("checksums"))

    def on_checksum_error(self, index: int, offsets: list[int], outcome: str) -> None:
        """Blocks of a member failed their checksums (the layout's hook): count them, say so."""
        m = self.members[index]
        m.checksum_errors += len(offsets)
        self._counts_changed = True
        where = ", ".join(str(DATA_OFFSET + o) for o in offsets[:4]) + (" ..." if len(offsets) > 4 else "")
        log.warning("pool %s: member %d (%s): %d block(s) failed their checksums at byte %s%s",
                    self.name, index, m.uri_text, len(offsets), where,
                    f"; {CHECKSUM_OUTCOMES.get(outcome, outcome)}")

    def failures_pending(self) -> bool:
        """Whether a member failure is not yet in the committed metadata."""
        return bool(self._pending_failures)

    async def commit(self) -> None:
        """Write a new generation of the metadata to every active member, durably."""
        if self.read_only:
            raise VstoreError("internal: commit on a read-only pool")
        async with self._commit_lock:
            for _ in range(len(self.members) + 1):
                self.meta["members"] = [m.to_meta() for m in self.members]
                self.meta["generation"] = gen = int(self.meta["generation"]) + 1
                active = [m for m in self.members if m.state in ("active", "rebuilding")]
                if not active:
                    raise DegradedError(f"pool {self.name!r}: no member left to hold metadata")
                failures: list[tuple[Member, MemberIOError]] = []

                async def slot(m: Member, gen=gen) -> None:
                    fence_mod.check_writes()
                    await write_slot(m.dev, gen, self.meta)
                    await m.dev.flush()

                async def superblock(m: Member, gen=gen) -> None:
                    sb = Superblock(self.meta["pool_uuid"], m.uuid, m.index, len(self.members),
                                    self.level, self.meta["chunk"], DATA_OFFSET, m.data_size, gen)
                    fence_mod.check_writes()
                    await write_superblock(m.dev, sb)
                    await m.dev.flush()

                for fn in (slot, superblock):
                    targets = [m for m in active if m not in [f[0] for f in failures]]
                    await run_all([lambda m=m, fn=fn: fn(m) for m in targets], catch=MemberIOError,
                                  on_error=lambda k, e, t=targets, f=failures: f.append((t[k], e)))
                if not failures:
                    self._pending_failures.clear()
                    return
                for m, err in failures:
                    if self.layout is not None:
                        self.layout.fail_member(m.index)
                    self.on_member_failed(m.index, err)
                failed = {m.index for m in self.members if m.state != "active"}
                if not survives(self.level, len(self.members), failed):
                    raise DegradedError(self.degraded_message(failed))
            raise MetadataError("metadata commit kept failing")

    async def flush(self) -> None:
        """Flush the whole stack, then persist any member failure seen meanwhile."""
        if self.data_dev is not None:
            await self.data_dev.flush()
        if (self._pending_failures or self._counts_changed) and not self.read_only:
            self._counts_changed = False
            await self.commit()

    # ------------------------------------------------------------------ volumes
    def _require_writable(self) -> None:
        if self.read_only:
            raise VstoreError(f"pool {self.name!r} is open read-only")
        if self.data_dev is None:
            raise DegradedError(self.degraded_message(
                {m.index for m in self.members if m.state != "active"}))

    def free_extents(self) -> list[int]:
        """Unallocated extents, those already zeroed first."""
        used = self.used_extents()
        zeroed = set(runs_to_list(self.meta["zeroed"]))
        free = [e for e in range(self.n_extents) if e not in used]
        return sorted(free, key=lambda e: (e not in zeroed, e))

    async def _allocate(self, count: int, progress: Progress | None) -> list[int]:
        free = self.free_extents()
        if count > len(free):
            raise NoSpaceError(
                f"pool {self.name!r} has {format_size(len(free) * self.extent_size)} free, "
                f"{format_size(count * self.extent_size)} needed"
            )
        chosen = sorted(free[:count])
        zeroed = set(runs_to_list(self.meta["zeroed"]))
        dirty = [e for e in chosen if e not in zeroed]
        # A fresh extent must never show a removed volume's bytes: zero it first
        # (an extent is whole stripes, so these are full-stripe writes).
        zeros = np.zeros(min(ZERO_IO, self.extent_size), dtype=np.uint8)
        total = len(dirty) * self.extent_size
        done = 0
        for e in dirty:
            pos = 0
            while pos < self.extent_size:
                n = min(len(zeros), self.extent_size - pos)
                await self.data_dev.write(e * self.extent_size + pos, zeros[:n])
                pos += n
                done += n
                if progress:
                    progress(done, total)
        if dirty:
            await self.data_dev.flush()
        return chosen

    async def create_volume(self, name: str, size: int, progress: Progress | None = None, *,
                            incomplete: bool = False) -> Volume:
        """Create a volume of at least size bytes (rounded up to 4 KiB), reading as zeros.

        ``incomplete`` records it as not yet filled (an import under way): status and
        volume list say so until ``mark_complete``, so a copy cut short is never
        mistaken for a whole one.
        """
        self._require_writable()
        check_name("volume", name)
        if name in self.volumes:
            raise ExistsError(f"volume {name!r} already exists in pool {self.name!r}")
        if size <= 0:
            raise ConfigError("volume size must be positive")
        size = -(-size // 4096) * 4096
        count = -(-size // self.extent_size)
        extents = await self._allocate(count, progress)
        vol = Volume(name, size, extents, self.data_dev, self.extent_size)
        entry = vol.to_meta()
        if incomplete:
            entry["incomplete"] = True
        self.meta["volumes"].append(entry)
        self.meta["zeroed"] = list_to_runs(
            sorted(set(runs_to_list(self.meta["zeroed"])) - set(extents)))
        self.volumes[name] = vol
        await self.commit()
        return vol

    def volume_incomplete(self, name: str) -> bool:
        """Whether the volume is recorded as not yet filled (an import that did not finish)."""
        return any(v["name"] == name and v.get("incomplete") for v in self.meta["volumes"])

    async def mark_complete(self, name: str) -> None:
        """Record that the volume holds all its data now."""
        for v in self.meta["volumes"]:
            if v["name"] == name and v.pop("incomplete", None):
                await self.commit()

    def get_volume(self, name: str) -> Volume:
        """The named volume or NotFoundError (DegradedError when the pool has failed)."""
        try:
            return self.volumes[name]
        except KeyError:
            if self.layout is None and any(v.get("name") == name for v in self.meta.get("volumes", [])):
                failed = {m.index for m in self.members if m.state != "active"}
                raise DegradedError(self.degraded_message(failed)) from None
            raise NotFoundError(f"volume {name!r} not found in pool {self.name!r}") from None

    async def remove_volume(self, name: str) -> None:
        """Remove a volume; its extents become free (and are zeroed before reuse)."""
        self._require_writable()
        self.get_volume(name)
        self.meta["volumes"] = [v for v in self.meta["volumes"] if v["name"] != name]
        del self.volumes[name]
        await self.commit()

    async def rename_volume(self, name: str, new: str) -> None:
        """Give a volume another name (its data and extents stay)."""
        self._require_writable()
        check_name("volume", new)
        vol = self.get_volume(name)
        if new in self.volumes:
            raise ExistsError(f"volume {new!r} already exists in pool {self.name!r}")
        for v in self.meta["volumes"]:
            if v["name"] == name:
                v["name"] = new
        vol.name = new
        self.volumes = {(new if k == name else k): v for k, v in self.volumes.items()}
        await self.commit()

    async def resize_volume(self, name: str, size: int, progress: Progress | None = None) -> Volume:
        """Grow a volume (shrinking would cut a filesystem short, so it is refused)."""
        self._require_writable()
        vol = self.get_volume(name)
        size = -(-size // 4096) * 4096
        if size < vol.size:
            raise ConfigError(f"volume {name!r} is {format_size(vol.size)}: shrinking is not supported")
        need = -(-size // self.extent_size) - len(vol.extents)
        if need > 0:
            new = await self._allocate(need, progress)
            vol.extents.extend(new)
            self.meta["zeroed"] = list_to_runs(
                sorted(set(runs_to_list(self.meta["zeroed"])) - set(new)))
        vol.size = size
        for v in self.meta["volumes"]:
            if v["name"] == name:
                v.update(vol.to_meta())
        await self.commit()
        return vol

    # ------------------------------------------------------------------ members
    async def fail_member(self, index: int, *, force: bool = False) -> None:
        """Mark a member failed (for drills and tests); refuses to lose data unless forced."""
        if self.read_only:
            raise VstoreError(f"pool {self.name!r} is open read-only")
        if not 0 <= index < len(self.members):
            raise ConfigError(f"pool {self.name!r} has members 0..{len(self.members) - 1}, not {index}")
        m = self.members[index]
        if m.state != "active":
            raise ConfigError(f"member {index} is already {m.state}")
        failed = {x.index for x in self.members if x.state != "active"} | {index}
        lost = not survives(self.level, len(self.members), failed)
        if lost and not force:
            raise DegradedError(
                f"failing member {index} would leave {self.level} pool {self.name!r} without "
                f"its data ({len(failed) - 1} member(s) already failed); use --force to insist"
            )
        # Rows written at a crash and not yet resynced need this member to be resynced: do
        # it now, while it can still be read (after, its data there would be the parity's guess).
        await self.consistency.wait_resynced()
        m.state, m.error = "failed", "failed by administrator"
        if self.layout is not None:
            self.layout.fail_member(index)
        if lost:
            self.layout = self.data_dev = None
            self.volumes = {}
        await self.commit()
        self.lifecycle.member_failed(index)

    def _multipath_member(self, index: int) -> MultipathDevice:
        if not 0 <= index < len(self.members):
            raise ConfigError(f"pool {self.name!r} has members 0..{len(self.members) - 1}, not {index}")
        dev = self.members[index].dev
        if not isinstance(dev, MultipathDevice):
            raise ConfigError(f"member {index} of pool {self.name!r} has a single path"
                              if len(self.members[index].paths) == 1
                              else f"member {index} of pool {self.name!r} is not open")
        return dev

    async def set_path_state(self, member: int, path: int | str, *, fail: bool,
                             force: bool = False) -> None:
        """Drill: fail or reinstate one path (index or URI) of a multipath member (not persisted)."""
        dev = self._multipath_member(member)
        index = path
        if not isinstance(path, int):
            text = str(path)
            if text.isdigit():
                index = int(text)
            else:
                given = self.members[member].paths
                matches = [i for i, p in enumerate(dev.paths)
                           if text in (p.uri.text, p.uri.redacted(), given[i].text, given[i].redacted())]
                if not matches:
                    raise ConfigError(f"member {member} has no path {text!r}")
                index = matches[0]
        if fail:
            dev.fail_path(index, force=force)
        else:
            await dev.reinstate_path(index)

    # ------------------------------------------------------------------ status
    def io_stats(self) -> dict[str, Any]:
        """Per-layer accounting of the data path (vstore.io.stats), by layer name."""
        out: dict[str, Any] = {}
        if self.layout is not None:
            out["layout"] = {"level": self.level, **self.layout.iostats.as_dict()}
        journal = self.layout.journal if self.layout is not None else None
        if journal is not None and journal.stats:
            out["journal" if journal.logs_parity else "bitmap"] = dict(journal.stats)
        return out

    def status(self) -> dict[str, Any]:
        """Everything `vstore status --json` shows (never any secret)."""
        used = len(self.used_extents())
        ext = self.extent_size
        return {
            "name": self.name,
            "uuid": self.meta.get("pool_uuid"),
            "level": self.level,
            "chunk": self.meta["chunk"],
            "state": self.state,
            "size": self.n_extents * ext,
            "used": used * ext,
            "free": (self.n_extents - used) * ext,
            "extent_size": ext,
            "generation": self.meta["generation"],
            "owner": self.meta.get("owner"),
            **({"lease": self.lease.status()} if self.lease is not None  # held, else as recorded
               else {"lease": dict(self.meta["lease"])} if self.meta.get("lease") else {}),
            "recovered": self.recovered_from is not None,
            "journal": self.consistency.status(),
            "checksums": self.meta.get("checksums"),
            "operation": self.lifecycle.status(),
            "io": self.io_stats(),  # per-layer accounting of this process's requests
            "spares": [{"uri": s["uri"], "size": s["size"]} for s in self.meta.get("spares", [])],
            "members": [
                {"index": m.index, "uri": m.uri_text, "state": m.state,
                 "data_offset": DATA_OFFSET, "data_size": m.data_size,
                 **({"checksum_errors": m.checksum_errors} if self.checksums else {}),
                 **({"error": m.error} if m.error else {}),
                 "paths": (m.dev.path_stats() if isinstance(m.dev, MultipathDevice)
                           else [{"uri": p.redacted(), "state": m.state} for p in m.paths])}
                for m in self.members
            ],
            "volumes": [{"name": v["name"], "size": v["size"], **({"incomplete": True} if v.get("incomplete") else {})}
                        for v in self.meta["volumes"]],
        }

    # ------------------------------------------------------------------ close
    async def _close_devices(self) -> None:
        for m in self.members:
            if m.dev is not None:
                try:
                    await m.dev.aclose()
                except VstoreError as e:
                    log.warning("closing member %d: %s", m.index, e)
                m.dev = m.data_dev = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def abandon(self) -> None:
        """Drop the pool as a killed process would: no flush, no close, no metadata; only the lock goes."""
        self._closed = True
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.lease is not None:
            self.lease.abandon()

    async def aclose(self, clean: bool = True) -> None:
        """Flush, mark the pool clean and unowned (when clean), release everything."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.read_only:
                try:
                    await self.flush()
                finally:
                    if clean and any(m.state == "active" for m in self.members):
                        await self.consistency.close(clean=True)
                        self.meta["owner"] = None
                        self.meta["clean"] = True
                        await self.commit()
        finally:
            with trio.CancelScope(shield=True):
                await self.consistency.close(clean=False)
                if self.lease is not None and self.lease.reserved and not self.lease.fence.expired():
                    await self._reserve(release=True)
                await self._close_devices()
                if self.lease is not None:  # only now: nothing of ours writes any more
                    await self.lease.release()


class _AbsentDevice(DeviceBase):
    """Stands in for a member that could not be opened; the layout never touches it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.block_size = 512

    async def read(self, offset: int, length: int) -> np.ndarray:
        raise MemberIOError("member is not present")

    async def write(self, offset: int, data: Any) -> None:
        raise MemberIOError("member is not present")

    async def flush(self) -> None:
        raise MemberIOError("member is not present")

    async def discard(self, offset: int, length: int) -> None:
        raise MemberIOError("member is not present")

    async def aclose(self) -> None:
        return None
