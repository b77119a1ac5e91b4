"""Consistency checks for a pool's bytes: parity scrub and degraded reads.

``verify_parity(layout)`` reads every row of a raid5/raid6 layout straight from
its members (no reconstruction), recomputes the parity and lists the rows whose
stored parity differs. ``degraded_views(layout)`` yields layouts over the same
members with every allowed combination of failed members, so a test can check
that each returns the same bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from vstore.raid import make_layout
from vstore.raid.base import ParityLayout, RaidLayout
from vstore.raid.geometry import survives


async def verify_parity(layout: ParityLayout, rows: Sequence[int] | None = None,
                        batch: int = 64) -> list[int]:
    """Rows whose stored parity differs from the parity of their data (healthy members only)."""
    bad: list[int] = []
    rows = range(layout.rows) if rows is None else rows
    C = layout.chunk
    for row in rows:
        dmem, pmem = layout.row_members(row)
        if (set(dmem) | set(pmem)) & layout.failed:
            continue  # a degraded row has nothing to compare against
        data = np.empty((layout.k, C), np.uint8)
        for j, m in enumerate(dmem):
            data[j] = await layout.members[m].read(row * C, C)
        want = await layout.compute_parity(data)
        for i, m in enumerate(pmem):
            if not np.array_equal(np.asarray(await layout.members[m].read(row * C, C)), want[i]):
                bad.append(row)
                break
    return bad


def failure_sets(layout: RaidLayout, most: int | None = None) -> list[frozenset[int]]:
    """Every set of members the layout survives losing (besides those already failed), smallest first."""
    most = layout.redundancy if most is None else most
    out: list[frozenset[int]] = []
    healthy = layout.healthy()
    for k in range(1, most + 1):
        for combo in itertools.combinations(healthy, k):
            failed = set(layout.failed) | set(combo)
            if survives(layout.level, layout.n, failed):
                out.append(frozenset(failed))
    return out


def degraded_views(layout: RaidLayout, most: int | None = None) -> Iterator[tuple[frozenset[int], RaidLayout]]:
    """(failed set, layout over the same members with those failed), for every survivable set."""
    for failed in failure_sets(layout, most):
        yield failed, make_layout(layout.level, layout.members, layout.chunk, failed=failed)
