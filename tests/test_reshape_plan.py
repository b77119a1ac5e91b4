"""The reshape's crash-safe order (vstore.raid.reshape): a power cut at every member write loses no chunk."""

from __future__ import annotations

import random

import pytest
import trio

from vstore.errors import ConfigError
from vstore.raid import reshape
from vstore.raid.reshape import (
    Shape,
    backup_chunks,
    backup_fits,
    count_writes,
    critical_rows,
    simulate,
)

GROWTHS = [("raid0", 1, 2), ("raid0", 2, 3), ("raid0", 3, 5), ("raid5", 2, 3), ("raid5", 2, 4),
           ("raid5", 3, 4), ("raid5", 4, 5),
           ("raid6", 4, 5), ("raid6", 5, 7), ("raid10", 2, 3), ("raid10", 3, 4), ("raid10", 4, 6)]


def test_critical_rows_and_backup_size() -> None:
    # raid5 4 -> 5 members: 3 -> 4 data chunks per row; new row r destroys old row r, whose
    # chunks 3r..3r+2 are all in new rows below r only from r = 3 on.
    assert critical_rows(Shape("raid5", 4), Shape("raid5", 5)) == 3
    assert backup_chunks(Shape("raid5", 4), Shape("raid5", 5)) == 9
    assert critical_rows(Shape("raid0", 2), Shape("raid0", 3)) == 2
    assert critical_rows(Shape("raid0", 1), Shape("raid0", 2)) == 1
    assert critical_rows(Shape("raid0", 2), Shape("raid0", 4)) == 1  # k doubles: one row
    assert critical_rows(Shape("raid6", 5), Shape("raid6", 6)) == 3
    for level, a, b in GROWTHS:
        old, new = Shape(level, a), Shape(level, b)
        rc = critical_rows(old, new)
        for r in range(rc, rc + 50):  # past the critical rows the rule holds for ever
            assert old.row_chunks(r).stop <= new.chunks_below(r)
    assert backup_fits(Shape("raid5", 4), Shape("raid5", 5), 64)
    assert not backup_fits(Shape("raid5", 4), Shape("raid5", 5), 20)


def test_shapes_refuse_what_is_not_a_growth() -> None:
    with pytest.raises(ConfigError, match="keeps the level"):
        critical_rows(Shape("raid5", 4), Shape("raid6", 5))
    with pytest.raises(ConfigError, match="grows the member count"):
        critical_rows(Shape("raid5", 5), Shape("raid5", 4))
    with pytest.raises(ConfigError):
        Shape("raid1", 3)
    with pytest.raises(ConfigError):
        Shape("raid6", 3)


def test_a_two_member_raid5_is_a_raid1() -> None:
    """The middle of a raid1 -> raid5 conversion: chunk r and its parity (a copy) in row r of both members."""
    from vstore.raid import geometry

    for c in range(40):
        row, j, m = geometry.raid5_locate(c, 2)
        assert (row, j) == (c, 0) and geometry.raid5_parity_member(row, 2) == 1 - m
    geometry.check_member_count("raid5", 2, layout=True)
    with pytest.raises(ConfigError, match="at least 3"):
        geometry.check_member_count("raid5", 2)  # no new pool of two: only a conversion passes there
    assert critical_rows(Shape("raid5", 2), Shape("raid5", 3)) == 1


@pytest.mark.parametrize(("level", "a", "b"), GROWTHS)
def test_power_cut_at_every_write_loses_nothing(level: str, a: int, b: int) -> None:
    old, new = Shape(level, a), Shape(level, b)
    rows = 24
    assert simulate(old, new, rows, None, random.Random(0)) == []
    for cut in range(count_writes(old, new, rows) + 1):
        for seed in range(3):
            problems = simulate(old, new, rows, cut, random.Random(cut * 7 + seed))
            assert problems == [], f"{level} {a}->{b}, cut after {cut} writes: {problems[:5]}"


@pytest.mark.parametrize("broken", ["no backup", "no checkpoint", "zero rows first"])
def test_the_model_catches_an_unsafe_order(monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    """Without the backup of the critical rows, reshape_safe's checkpoints, or the cursor on record before
    the rows above the data are zeroed, some cut loses chunks."""
    if broken == "zero rows first":
        monkeypatch.setattr(reshape, "ZERO_ROWS_FIRST", True)
    elif broken == "no backup":
        monkeypatch.setattr(reshape, "critical_rows", lambda old, new: 0)
        monkeypatch.setattr(reshape, "backup_chunks", lambda old, new: 0)
    else:
        monkeypatch.setattr(reshape, "needs_commit", lambda old, row, committed: False)
    old, new = Shape("raid5", 4), Shape("raid5", 5)
    rows = 24
    found = [simulate(old, new, rows, cut, random.Random(cut)) for cut in range(count_writes(old, new, rows) + 1)]
    assert any(found)


def test_a_raid10_reshape_fails_when_either_geometry_loses_a_pair() -> None:
    """raid10 3 -> 4: members 0 and 2 hold both copies of a chunk in the old (odd) geometry, not in the new."""
    import numpy as np

    from backends.memory import MemoryDevice
    from vstore.raid.reshape_layout import ReshapeLayout

    devs = [MemoryDevice(np.zeros(1 << 20, np.uint8)) for _ in range(4)]
    lay = ReshapeLayout(devs, 16384, level="raid10", n_old=3, committed=0, failed={0})
    assert lay.state == "degraded"
    lay.failed.add(2)  # new pairs (0, 1) and (2, 3) keep a copy each; the old pair (2, 0) is gone
    assert lay.state == "failed"
    lay.finish()
    assert lay.state == "degraded"  # all in the new geometry now
    # Rows locked for a chunk: both copies' rows in both geometries (chunk 1: old positions 2, 3 -> rows 0, 1).
    assert ReshapeLayout(devs, 16384, level="raid10", n_old=3, committed=0).row_keys(1, 2) == [0, 1]


def test_a_raid10_row_across_the_cursor_is_resynced_chunk_by_chunk() -> None:
    """raid10 2 -> 3, cursor at chunk 1: new row 0 holds chunk 0 (new geometry) and chunk 1 (still old)."""
    import numpy as np

    from backends.memory import MemoryDevice
    from vstore.raid.reshape_layout import ReshapeLayout

    C = 4096
    stores = [np.zeros(64 * C, np.uint8) for _ in range(3)]
    lay = ReshapeLayout([MemoryDevice(s) for s in stores], C, level="raid10", n_old=2, committed=1)
    # Chunk 0 in the new geometry, torn at a crash: positions 0, 1 (members 0, 1 of row 0) differ.
    stores[0][:C], stores[1][:C] = 1, 2
    # Chunk 1 still in the old geometry: old positions 2, 3 = row 1 of members 0, 1 (a torn write too);
    # its new positions (member 2 of row 0, member 0 of row 1) must not be written from old bytes.
    stores[0][C : 2 * C], stores[1][C : 2 * C], stores[2][:C] = 3, 4, 9
    trio.run(lay.resync_row, 0)
    assert stores[1][:C].tolist() == stores[0][:C].tolist() == [1] * C  # chunk 0: first copy over the other
    assert (stores[2][:C] == 9).all()  # new position of chunk 1: left to the copy
    trio.run(lay.resync_row, 1)
    assert (stores[1][C : 2 * C] == 3).all()  # old row 1 (chunk 1, old geometry): its copies agree
