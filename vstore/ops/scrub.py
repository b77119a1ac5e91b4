"""`vstore scrub`: read every stripe in use, verify parity and mirror copies, report and repair.

Like md's ``check``/``repair`` sync actions, but each mismatch is reported with
where it is: the stripe row, the member and the byte offset on that member (as
an absolute offset on the member device, and relative to its data area).

Which member is at fault:

- raid6: from P and Q, as md's raid6check (``vstore.raid.kernels.locate_pq_error``).
  With Pd = P xor P' and Qd = Q xor Q' (P', Q' recomputed from the data as read),
  only Pd nonzero means P is wrong, only Qd means Q is wrong; both mean one data
  chunk z is wrong when Qd = g^z * Pd bytewise for one z (its error is Pd).
  Anything else: not known.
- raid1 with three or more copies: the copies outvoted by a strict majority.
- raid5, raid10 and two-way raid1: not known.

With block checksums (``vstore create --checksums``) every level knows: a block
that fails its checksum is the one at fault (``what: "checksum"``), whatever the
parity or the other copies say; it is rebuilt from the rest of its row (or a copy
that passes), and a raid6 finding also says whether P and Q's own verdict named the
same member (``pq``). Blocks that all pass but disagree with their parity are a
parity at fault (the data vouched for). Each block that failed is counted on its
member as a read's would be (status's CKSUM).

``repair`` rewrites the member at fault where it is known; else, as md does, the
parity from the data (raid5/6) or the other copies from the first (raid1/10).

What is scrubbed: the extents allocated to volumes and the extents known to be
zeroed; the other extents may hold bytes from before the pool and are never read
by a volume before they are zeroed. The cursor is checkpointed in the pool
metadata (``meta["scrub"]``); a scrub that was stopped resumes where it was.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from vstore.consistency.metadata import DATA_OFFSET
from vstore.errors import ConfigError, DegradedError
from vstore.ops.toolkit import Operation, PoolView, Progress, RateLimiter, speed_of, sweep
from vstore.raid.base import MemberFailed
from vstore.raid.kernels import locate_pq_error
from vstore.stack.volume import runs_to_list

PAGE = 4096  # mismatches are located to this granularity
WINDOW = 16  # units verified concurrently
MAX_REPORTED = 256  # mismatches kept in the result and the checkpoint


def scrub_units(pool: PoolView) -> tuple[list[int], int]:
    """(sorted units to verify, bytes of pool address space per unit) of the pool's level."""
    layout = pool.layout
    level = pool.level
    if level in ("linear", "raid0"):
        raise ConfigError(f"a {level} pool has no redundancy to verify")
    if layout is None:
        raise DegradedError(f"pool {pool.name!r} has failed: nothing to scrub")
    ext = pool.extent_size
    extents = sorted(pool.used_extents() | set(runs_to_list(pool.meta.get("zeroed", []))))
    unit = layout.row_bytes if level in ("raid5", "raid6") else layout.chunk
    units: list[int] = []
    for e in extents:
        lo, hi = e * ext // unit, -(-((e + 1) * ext) // unit)
        units.extend(range(lo, hi))
    limit = layout.rows if level in ("raid5", "raid6", "raid1") else layout.chunks
    return [u for u in units if u < limit], unit


def _pages(diff: np.ndarray) -> list[int]:
    """Page indexes of a chunk-long difference mask that hold a nonzero byte."""
    n = len(diff) // PAGE * PAGE
    bad = np.flatnonzero(diff[:n].reshape(-1, PAGE).any(axis=1)).tolist()
    if len(diff) > n and diff[n:].any():
        bad.append(n // PAGE)
    return bad


class _Scrub:
    """One scrub pass over a pool."""

    def __init__(self, pool: PoolView, repair: bool) -> None:
        self.pool = pool
        self.layout = pool.layout
        self.repair = repair
        self.found: list[dict[str, Any]] = []
        self.count = 0
        self.repaired = 0

    def _report(self, unit: int, member: int, member_off: int, length: int, what: str,
                culprit: int | None, fixed: bool, **extra: Any) -> None:
        self.count += 1
        self.repaired += int(fixed)
        if len(self.found) < MAX_REPORTED:
            self.found.append({"row": unit, "member": member, "offset": DATA_OFFSET + member_off,
                               "data_offset": member_off, "length": length, "what": what,
                               "culprit": culprit, "repaired": fixed, **extra})

    async def _count(self, bad: list[list[int]], members: list[int], fixable: bool) -> None:
        """Count the blocks that failed their checksums on their members (as a read would)."""
        for x, offs in enumerate(bad):
            if offs:
                outcome = ("repaired" if self.repair else "check") if fixable else "lost"
                await self.layout.note_checksum_errors(members[x], offs, outcome)

    async def _fix(self, writes: list[tuple[int, int, np.ndarray]]) -> None:
        if self.repair and writes:
            await self.layout.submit_member_writes(writes)

    async def unit(self, u: int) -> None:
        """Verify (and repair) one unit under its lock; retried once a member fails is known."""
        layout = self.layout
        while True:
            layout.require_usable()
            if layout.failed:
                raise DegradedError(f"pool {self.pool.name!r} is degraded (failed members "
                                    f"{sorted(layout.failed)}): replace them before a scrub")
            try:
                # A row written at a crash and not resynced yet is resynced, not reported.
                await layout.sync_keys([u])
                if self.pool.level in ("raid5", "raid6"):
                    await self._parity_row(u)
                elif self.pool.level == "raid1":
                    await self._mirror(u, [(m, u * layout.chunk) for m in range(layout.n)], [u])
                else:
                    await self._mirror(u, layout.copies(u), [u])
                return
            except MemberFailed:
                continue

    async def _parity_row(self, row: int) -> None:
        layout = self.layout
        C, k = layout.chunk, layout.k
        dmem, pmem = layout.row_members(row)
        base = row * C
        async with layout.locked([row]):
            if layout.checksummed:
                await self._parity_row_checked(row)
                return
            got = await layout.read_members([(m, base, C) for m in dmem + pmem])
            data = np.stack(got[:k])
            fresh = await layout.compute_parity(data)
            diffs = [np.bitwise_xor(got[k + x], fresh[x]) for x in range(layout.nparity)]
            bad = sorted(set().union(*(_pages(d) for d in diffs)))
            writes: list[tuple[int, int, np.ndarray]] = []
            for pg in bad:
                a, b = pg * PAGE, min((pg + 1) * PAGE, C)
                if layout.nparity == 1:
                    self._report(row, pmem[0], base + a, b - a, "parity", None, self.repair)
                    writes.append((pmem[0], base + a, fresh[0][a:b]))
                    continue
                who = locate_pq_error(diffs[0][a:b], diffs[1][a:b], k)
                if who in ("P", "Q"):
                    x = 0 if who == "P" else 1
                    self._report(row, pmem[x], base + a, b - a, who, pmem[x], self.repair)
                    writes.append((pmem[x], base + a, fresh[x][a:b]))
                elif isinstance(who, int):
                    fixed = np.bitwise_xor(data[who, a:b], diffs[0][a:b])
                    self._report(row, dmem[who], base + a, b - a, "data", dmem[who], self.repair)
                    writes.append((dmem[who], base + a, fixed))
                else:
                    self._report(row, pmem[0], base + a, b - a, "parity", None, self.repair)
                    writes += [(pmem[x], base + a, fresh[x][a:b]) for x in range(2)]
            await self._fix(writes)

    async def _parity_row_checked(self, row: int) -> None:
        """A parity row of a checksummed pool: the blocks failing their checksums are the culprits."""
        layout = self.layout
        C, k, npar = layout.chunk, layout.k, layout.nparity
        dmem, pmem = layout.row_members(row)
        members = dmem + pmem
        base = row * C
        got, bad = await layout.read_members_checked([(m, base, C) for m in members])
        bad_pages: dict[int, set[int]] = {}
        for x, offs in enumerate(bad):
            for off in offs:
                bad_pages.setdefault((off - base) // PAGE, set()).add(x)
        data = np.stack(got[:k])
        fresh = await layout.compute_parity(data)
        diffs = [np.bitwise_xor(got[k + x], fresh[x]) for x in range(npar)]
        pages = sorted(set(bad_pages) | set().union(*(_pages(d) for d in diffs)))
        writes: list[tuple[int, int, np.ndarray]] = []
        unfixable = False
        for pg in pages:
            a, b = pg * PAGE, min((pg + 1) * PAGE, C)
            culprits = sorted(bad_pages.get(pg, ()))
            if not culprits:
                # Every block vouched for by its checksum, the parity disagreeing: a parity
                # written from other data (a crash's torn row the resync missed); the data wins.
                for x in range(npar):
                    if diffs[x][a:b].any():
                        self._report(row, pmem[x], base + a, b - a, "parity", pmem[x], self.repair)
                        writes.append((pmem[x], base + a, fresh[x][a:b]))
                continue
            if len(culprits) > npar:
                unfixable = True
                for x in culprits:
                    self._report(row, members[x], base + a, b - a, "checksum", members[x], False,
                                 note="more blocks of the row fail their checksums than parity can rebuild")
                continue
            # Rebuild the failing blocks from the others of the page: data first, then parity.
            page = np.ascontiguousarray(data[:, a:b])
            par: list[np.ndarray | None] = [None if (k + x) in culprits else
                                            np.ascontiguousarray(got[k + x][a:b]) for x in range(npar)]
            missing = [x for x in culprits if x < k]
            if missing:
                layout.recover(page, par, missing)
            good_par = await layout.compute_parity(page)
            pq = None
            if npar == 2 and len(culprits) == 1:
                who = locate_pq_error(diffs[0][a:b], diffs[1][a:b], k)
                mine = culprits[0] if culprits[0] < k else ("P" if culprits[0] == k else "Q")
                pq = "agrees" if who == mine else f"says {who if who is not None else 'unknown'}"
            for x in culprits:
                right = page[x] if x < k else good_par[x - k]
                extra = {"pq": pq} if pq is not None else {}
                self._report(row, members[x], base + a, b - a, "checksum", members[x], self.repair, **extra)
                writes.append((members[x], base + a, right.copy()))
        await self._count(bad, members, not unfixable)
        await self._fix(writes)

    async def _mirror(self, unit: int, copies: list[tuple[int, int]], keys: list[int]) -> None:
        layout = self.layout
        C = layout.chunk
        async with layout.locked(keys):
            if layout.checksummed:
                await self._mirror_checked(unit, copies)
                return
            got = await layout.read_members([(m, off, C) for m, off in copies])
            if all(np.array_equal(got[0], g) for g in got[1:]):
                return
            writes: list[tuple[int, int, np.ndarray]] = []
            pages = sorted(set().union(*(_pages(np.bitwise_xor(got[0], g)) for g in got[1:])))
            for pg in pages:
                a, b = pg * PAGE, min((pg + 1) * PAGE, C)
                votes: dict[bytes, list[int]] = {}
                for x, g in enumerate(got):
                    votes.setdefault(g[a:b].tobytes(), []).append(x)
                best = max(votes.values(), key=len)
                known = len(best) * 2 > len(got) and len(got) >= 3
                good = best[0] if known else 0
                for x, g in enumerate(got):
                    # With a majority the outvoted copies are wrong; else those unlike the first.
                    agrees = x in best if known else np.array_equal(g[a:b], got[0][a:b])
                    if agrees:
                        continue
                    m, off = copies[x]
                    self._report(unit, m, off + a, b - a, "copy", m if known else None, self.repair)
                    writes.append((m, off + a, got[good][a:b]))
            await self._fix(writes)


    async def _mirror_checked(self, unit: int, copies: list[tuple[int, int]]) -> None:
        """Copies of a checksummed pool: a copy failing its checksum is at fault; one that passes wins."""
        layout = self.layout
        C = layout.chunk
        got, bad = await layout.read_members_checked([(m, off, C) for m, off in copies])
        bad_pages: dict[int, set[int]] = {}
        for x, offs in enumerate(bad):
            for off in offs:
                bad_pages.setdefault((off - copies[x][1]) // PAGE, set()).add(x)
        pages = set(bad_pages)
        for g in got[1:]:
            pages |= set(_pages(np.bitwise_xor(got[0], g)))
        writes: list[tuple[int, int, np.ndarray]] = []
        unfixable = False
        for pg in sorted(pages):
            a, b = pg * PAGE, min((pg + 1) * PAGE, C)
            failing = bad_pages.get(pg, set())
            good = [x for x in range(len(got)) if x not in failing]
            if not good:
                unfixable = True
                for x in sorted(failing):
                    m, off = copies[x]
                    self._report(unit, m, off + a, b - a, "checksum", m, False,
                                 note="every copy fails its checksum")
                continue
            src = got[good[0]][a:b]
            for x, g in enumerate(got):
                if x in failing:
                    m, off = copies[x]
                    self._report(unit, m, off + a, b - a, "checksum", m, self.repair)
                    writes.append((m, off + a, src))
                elif not np.array_equal(g[a:b], src):
                    # Both pass yet differ (a discard one member could not do): the first wins.
                    m, off = copies[x]
                    self._report(unit, m, off + a, b - a, "copy", None, self.repair)
                    writes.append((m, off + a, src))
        await self._count(bad, [m for m, _ in copies], not unfixable)
        await self._fix(writes)


async def scrub(pool: PoolView, op: Operation, *, repair: bool = False, restart: bool = False,
                speed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Verify (and repair) every unit in use; checkpoints and resumes; returns the findings."""
    units, unit_bytes = scrub_units(pool)
    job = _Scrub(pool, repair)
    saved = pool.meta.get("scrub") or {}
    start_at = 0
    if not restart and saved.get("state") == "running" and bool(saved.get("repair")) == repair:
        start_at = int(saved.get("cursor", 0))
        job.count = int(saved.get("mismatches", 0))
        job.repaired = int(saved.get("repaired", 0))
        job.found = list(saved.get("found", []))
    todo = [u for u in units if u >= start_at]
    total = len(units) * unit_bytes
    op.base = (len(units) - len(todo)) * unit_bytes
    op.detail.update({"repair": repair, "resumed_at": start_at} if start_at else {"repair": repair})
    op.progress(op.base, total)
    lo, hi = speed_of(speed)
    limiter = RateLimiter(pool.layout, lo, hi)
    started = saved.get("started") if start_at else None

    def record(cursor: int, final: str = "running") -> dict[str, Any]:
        rec = {"state": final, "repair": repair, "cursor": cursor, "mismatches": job.count,
               "repaired": job.repaired, "found": job.found[:MAX_REPORTED],
               "started": started or int(time.time())}
        pool.meta["scrub"] = rec
        return rec

    async def checkpoint(cursor: int) -> None:
        record(cursor)
        await pool.commit()

    await checkpoint(start_at)
    try:
        if job.layout.failed:
            raise DegradedError(f"pool {pool.name!r} is degraded (failed members "
                                f"{sorted(job.layout.failed)}): replace them before a scrub")
        await sweep(todo, job.unit, unit_bytes=unit_bytes, op=op, limiter=limiter,
                    checkpoint=checkpoint, window=WINDOW)
    except BaseException:
        record(op.cursor)  # persisted by the next commit (at the latest when the pool closes)
        raise
    if repair and job.repaired:
        await pool.data_dev.flush()
    result = record(units[-1] + 1 if units else 0, "done")
    result["finished"] = int(time.time())
    await pool.commit()
    remaining = job.count - job.repaired
    return {"kind": "scrub", "level": pool.level, "scrubbed": total, "units": len(units),
            "unit_bytes": unit_bytes, "mismatches": job.count, "repaired": job.repaired,
            "remaining": remaining, "found": job.found, "truncated": job.count > len(job.found),
            "repair": repair, "resumed_at": start_at}


async def run_scrub(pool: PoolView, *, repair: bool = False, restart: bool = False,
                    speed: dict[str, Any] | None = None, progress: Progress | None = None
                    ) -> dict[str, Any]:
    """Scrub in this task, to completion."""
    return await pool.lifecycle.run(
        "scrub", lambda op: scrub(pool, op, repair=repair, restart=restart, speed=speed), progress)


def start_scrub(pool: PoolView, *, repair: bool = False, restart: bool = False,
                speed: dict[str, Any] | None = None) -> Operation:
    """Scrub in the background (the mount process)."""
    scrub_units(pool)  # a clear error now rather than in the background
    return pool.lifecycle.start(
        "scrub", lambda op: scrub(pool, op, repair=repair, restart=restart, speed=speed))
