"""RAID geometry: hand-computed placements for every level, sizes and bad configurations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vstore.errors import ConfigError
from vstore.raid import geometry as g
from vstore.raid import make_layout, min_members, redundancy, usable_size


def test_raid5_four_members_left_symmetric():
    # md's left-symmetric table for 4 members (D = logical chunk number):
    #   row 0:  D0  D1  D2  P
    #   row 1:  D4  D5  P   D3
    #   row 2:  D8  P   D6  D7
    #   row 3:  P   D9  D10 D11
    table = [
        ["D0", "D1", "D2", "P"],
        ["D4", "D5", "P", "D3"],
        ["D8", "P", "D6", "D7"],
        ["P", "D9", "D10", "D11"],
    ]
    for row in range(8):
        expect = table[row % 4]
        assert expect[g.raid5_parity_member(row, 4)] == "P"
        for j in range(3):
            c = row * 3 + j
            assert expect[g.raid5_data_member(row, j, 4)] == f"D{c % 12}"
            assert g.raid5_locate(c, 4) == (row, j, g.raid5_data_member(row, j, 4))


def test_raid5_five_members():
    assert g.parity_row_members("raid5", 0, 5) == ([0, 1, 2, 3], [4])
    assert g.parity_row_members("raid5", 1, 5) == ([4, 0, 1, 2], [3])
    assert g.parity_row_members("raid5", 2, 5) == ([3, 4, 0, 1], [2])
    assert g.parity_row_members("raid5", 4, 5) == ([1, 2, 3, 4], [0])
    assert g.parity_row_members("raid5", 5, 5) == ([0, 1, 2, 3], [4])
    assert g.raid5_locate(9, 5) == (2, 1, 4)


def test_raid6_four_and_five_members():
    #        members:  0    1    2    3
    #   row 0:         Q    D0   D1   P
    #   row 1:         D2   D3   P    Q
    #   row 2:         D5   P    Q    D4
    #   row 3:         P    Q    D6   D7
    assert g.parity_row_members("raid6", 0, 4) == ([1, 2], [3, 0])
    assert g.parity_row_members("raid6", 1, 4) == ([0, 1], [2, 3])
    assert g.parity_row_members("raid6", 2, 4) == ([3, 0], [1, 2])
    assert g.parity_row_members("raid6", 3, 4) == ([2, 3], [0, 1])
    assert g.raid6_locate(5, 4) == (2, 1, 0)
    assert (g.raid6_p_member(6, 5), g.raid6_q_member(6, 5)) == (3, 4)
    assert g.parity_row_members("raid6", 0, 5) == ([1, 2, 3], [4, 0])
    assert g.parity_row_members("raid6", 1, 5) == ([0, 1, 2], [3, 4])
    assert g.parity_row_members("raid6", 2, 5) == ([4, 0, 1], [2, 3])
    assert g.parity_row_members("raid6", 4, 5) == ([2, 3, 4], [0, 1])
    assert g.raid6_data_member(3, 2, 5) == 0


def test_raid0_and_linear():
    assert [g.raid0_locate(c, 3) for c in range(7)] == [
        (0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2)
    ]
    sizes = [100, 50, 200]
    assert g.linear_locate(0, sizes) == (0, 0)
    assert g.linear_locate(99, sizes) == (0, 99)
    assert g.linear_locate(100, sizes) == (1, 0)
    assert g.linear_locate(150, sizes) == (2, 0)
    assert g.linear_locate(349, sizes) == (2, 199)
    with pytest.raises(ValueError):
        g.linear_locate(350, sizes)


def test_raid10_near_odd_and_even():
    # 3 members, copies at device-chunk positions 2c, 2c+1 counted row-major:
    #   row 0:  C0  C0  C1
    #   row 1:  C1  C2  C2
    #   row 2:  C3  C3  C4 ...
    assert g.raid10_copies(0, 3) == ((0, 0), (1, 0))
    assert g.raid10_copies(1, 3) == ((2, 0), (0, 1))
    assert g.raid10_copies(2, 3) == ((1, 1), (2, 1))
    assert g.raid10_copies(3, 3) == ((0, 2), (1, 2))
    assert g.raid10_copies(0, 4) == ((0, 0), (1, 0))
    assert g.raid10_copies(1, 4) == ((2, 0), (3, 0))
    assert g.raid10_copies(2, 4) == ((0, 1), (1, 1))
    assert g.raid10_copies(3, 2) == ((0, 3), (1, 3))
    # Which pairs of failures lose data.
    assert g.raid10_lost({0, 1}, 4) and g.raid10_lost({2, 3}, 4)
    assert not g.raid10_lost({0, 2}, 4) and not g.raid10_lost({1, 2}, 4)
    assert g.raid10_lost({2, 0}, 3) and g.raid10_lost({1, 2}, 3)
    assert not g.raid10_lost({1}, 3)
    assert g.survives("raid10", 4, {0, 3}) and not g.survives("raid10", 4, {0, 1})
    assert not g.survives("raid10", 5, {4, 0}) and g.survives("raid10", 5, {0, 2})


def test_split_chunks():
    assert list(g.split_chunks(4000, 5000, 4096)) == [(0, 4000, 96, 0), (1, 0, 4096, 96), (2, 0, 808, 4192)]
    assert list(g.split_chunks(8192, 4096, 4096)) == [(2, 0, 4096, 0)]
    assert list(g.split_chunks(10, 0, 4096)) == []


def test_sizes_and_counts():
    C = 65536
    sizes = [10 * C + 5, 12 * C, 11 * C]
    assert usable_size("linear", sizes, C) == sum(sizes)
    assert usable_size("raid0", sizes, C) == 3 * 10 * C
    assert usable_size("raid1", sizes, C) == 10 * C
    assert usable_size("raid5", sizes, C) == 2 * 10 * C
    assert usable_size("raid6", sizes + [C * 20], C) == 2 * 10 * C
    assert usable_size("raid10", sizes, C) == (3 * 10 // 2) * C
    assert usable_size("raid10", [3 * C] * 3, C) == 4 * C  # 9 positions, 4 whole pairs
    assert [min_members(x) for x in g.LEVELS] == [1, 1, 2, 3, 4, 2]
    assert redundancy("raid1", 3) == 2
    assert redundancy("raid5", 5) == 1 and redundancy("raid6", 5) == 2
    assert redundancy("raid0", 4) == 0 and redundancy("linear", 2) == 0
    assert redundancy("raid10", 4) == 1


@pytest.mark.parametrize(
    ("level", "n"), [("raid1", 1), ("raid5", 2), ("raid6", 3), ("raid10", 1), ("linear", 0)]
)
def test_too_few_members(level, n):
    with pytest.raises(ConfigError, match="at least"):
        usable_size(level, [1 << 20] * n, 65536)
    with pytest.raises(ConfigError, match="at least"):
        make_layout(level, [_Dev(1 << 20) for _ in range(n)])


@pytest.mark.parametrize("chunk", [0, 1000, 2048, 4096 + 512, 3 << 12])
def test_bad_chunk(chunk):
    with pytest.raises(ConfigError, match="chunk"):
        make_layout("raid5", [_Dev(1 << 20) for _ in range(3)], chunk=chunk)


def test_bad_level_and_block_size():
    with pytest.raises(ConfigError, match="unknown RAID level"):
        make_layout("raid4", [_Dev(1 << 20)] * 3)
    with pytest.raises(ConfigError, match="block size"):
        make_layout("raid1", [_Dev(1 << 20), _Dev(1 << 20, block_size=8192)], chunk=4096)
    with pytest.raises(ConfigError, match="out of range"):
        make_layout("raid5", [_Dev(1 << 20)] * 3, failed={3})


class _Dev:
    def __init__(self, size: int, block_size: int = 512) -> None:
        self.size = size
        self.block_size = block_size


@given(
    level=st.sampled_from(g.LEVELS),
    n=st.integers(1, 9),
    rows=st.lists(st.integers(1, 40), min_size=9, max_size=9),
    extra=st.lists(st.integers(0, 7), min_size=9, max_size=9),
    chunk_shift=st.integers(12, 16),
)
def test_layout_size_is_usable_size(level, n, rows, extra, chunk_shift):
    chunk = 1 << chunk_shift
    n = max(n, min_members(level))
    sizes = [rows[i] * chunk + extra[i] * 512 for i in range(n)]
    lay = make_layout(level, [_Dev(s) for s in sizes], chunk=chunk)
    assert lay.size == usable_size(level, sizes, chunk)
    assert lay.size % lay.block_size == 0


@given(n=st.integers(3, 12), row=st.integers(0, 1000))
def test_parity_rows_use_every_member_once(n, row):
    for level in ("raid5", "raid6"):
        if n < min_members(level):
            continue
        data, parity = g.parity_row_members(level, row, n)
        assert sorted(data + parity) == list(range(n))
        assert len(parity) == (1 if level == "raid5" else 2)


@given(n=st.integers(2, 9), chunks=st.integers(1, 200))
def test_raid10_positions_are_used_once(n, chunks):
    seen = set()
    for c in range(chunks):
        a, b = g.raid10_copies(c, n)
        assert a[0] != b[0]  # the two copies are on different members
        seen.update([a, b])
    assert len(seen) == 2 * chunks
