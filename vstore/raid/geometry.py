"""RAID geometry: pure functions from logical offsets to (member, member offset).

Everything here is arithmetic on integers, with no I/O, so that an independent
program can check the bytes on the members. ``C`` is the chunk size in bytes,
``n`` the number of members, and a member's usable size is rounded down to a
multiple of ``C`` (except for linear). "Row" ``r`` of a striped layout is the
member byte range ``[r*C, (r+1)*C)`` on every member.

linear
    The members are concatenated in order: logical offset ``x`` lies on the
    first member ``i`` with ``x < sizes[0] + ... + sizes[i]``, at member offset
    ``x - (sizes[0] + ... + sizes[i-1])``. Each member keeps its own size.

raid0
    Logical chunk ``c = x // C`` is on member ``c mod n`` in row ``c // n``, at
    member offset ``(c // n) * C + x mod C``. Size ``n * rows * C`` where
    ``rows = min(member size) // C``.

raid1
    Every member holds the whole array at the same offsets: ``x`` is at member
    offset ``x`` on each member. Size ``rows * C``.

raid5 (md left-symmetric)
    ``k = n - 1`` data chunks per row; logical chunk ``c`` is data chunk
    ``j = c mod k`` of row ``r = c // k``. Parity of row ``r`` is on member
    ``p = n - 1 - (r mod n)``; data chunk ``j`` is on member ``(p + 1 + j) mod n``.
    P is the XOR of the row's data chunks. Size ``rows * k * C``. A layout over
    ``n = 2`` (not a new pool: the middle of a raid1 -> raid5 conversion) holds
    chunk ``r`` and its copy P in row ``r``: the bytes of a 2-member raid1.

raid6 (md left-symmetric, P then Q)
    ``k = n - 2``; P of row ``r`` on ``p = n - 1 - (r mod n)``, Q on
    ``(p + 1) mod n``, data chunk ``j`` on ``(p + 2 + j) mod n``.
    P = D0 ^ ... ^ D(k-1), Q = g^0*D0 ^ g^1*D1 ^ ... in GF(2^8) with polynomial
    0x11d and generator g = {02} (as Linux md and ISA-L). Size ``rows * k * C``.

raid10 (md "near" layout, 2 copies)
    Device chunks are numbered row-major across the members: device chunk
    position ``d`` is on member ``d mod n`` at row ``d // n``. The two copies of
    logical chunk ``c`` are at positions ``2c`` and ``2c + 1``. With an odd
    ``n`` a copy pair wraps to the next row, as md allows. There are
    ``(n * rows) // 2`` logical chunks. Two failed members lose data exactly
    when some chunk has both its copies on them: members ``(2i, 2i+1)`` for an
    even ``n``, any two cyclically adjacent members for an odd ``n``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from vstore.errors import ConfigError

LEVELS = ("linear", "raid0", "raid1", "raid5", "raid6", "raid10")

_MIN_MEMBERS = {"linear": 1, "raid0": 1, "raid1": 2, "raid5": 3, "raid6": 4, "raid10": 2}


def check_level(level: str) -> str:
    """Return the level name, or raise ConfigError naming the known levels."""
    if level not in _MIN_MEMBERS:
        raise ConfigError(f"unknown RAID level {level!r} (known: {', '.join(LEVELS)})")
    return level


def min_members(level: str) -> int:
    """The fewest members the level accepts."""
    return _MIN_MEMBERS[check_level(level)]


def redundancy(level: str, n: int) -> int:
    """How many failed members the level always survives with n members."""
    check_level(level)
    return {"linear": 0, "raid0": 0, "raid1": n - 1, "raid5": 1, "raid6": 2, "raid10": 1}[level]


def check_chunk(chunk: int) -> int:
    """Return the chunk size, or raise ConfigError unless it is a power of two >= 4096."""
    if not isinstance(chunk, int) or chunk < 4096 or chunk & (chunk - 1):
        raise ConfigError(f"chunk size must be a power of two of at least 4096 bytes, not {chunk}")
    return chunk


# raid6's Q gives data chunk j the coefficient g^j in GF(2^8), whose powers repeat
# after 255: with more data chunks two of them share a coefficient and a double
# failure of those two cannot be solved. Linux md caps raid6 lower still.
MAX_MEMBERS = {"raid6": 255 + 2}


# A transient layout (``RaidLayout.transient``: not a pool's own) takes a 2-member raid5, as md does: its rows hold one data chunk
# and P, a copy of it, on the two members in turn, which are exactly the bytes of a 2-member
# raid1 (row r = member bytes [r*C, (r+1)*C) = logical chunk r on both). It is the state a
# raid1 -> raid5 conversion passes through (vstore.ops.reshape), reshaped at once onto more.
_LAYOUT_MIN_MEMBERS = {"raid5": 2}


def check_member_count(level: str, n: int, *, layout: bool = False) -> None:
    """Raise ConfigError unless n members suit the level (``layout``: a transient layout, a 2-member raid5 too)."""
    need = _LAYOUT_MIN_MEMBERS.get(level, min_members(level)) if layout else min_members(level)
    if n < need:
        raise ConfigError(f"{level} needs at least {need} members, got {n}")
    most = MAX_MEMBERS.get(level)
    if most is not None and n > most:
        raise ConfigError(f"{level} takes at most {most} members ({most - 2} data chunks per row, one "
                          f"distinct Q coefficient each), got {n}")


def data_chunks_per_row(level: str, n: int) -> int:
    """Data chunks per row (k) of a striped layout."""
    return {"raid0": n, "raid5": n - 1, "raid6": n - 2}[level]


def usable_size(level: str, member_sizes: Sequence[int], chunk: int) -> int:
    """Logical size in bytes of a layout over members of these sizes."""
    check_level(level)
    check_chunk(chunk)
    n = len(member_sizes)
    check_member_count(level, n)
    if level == "linear":
        return sum(member_sizes)
    rows = min(member_sizes) // chunk
    if level == "raid1":
        return rows * chunk
    if level == "raid10":
        return (n * rows // 2) * chunk
    return rows * data_chunks_per_row(level, n) * chunk


# --- splitting a logical range ---------------------------------------------------------


def split_chunks(offset: int, length: int, chunk: int) -> Iterator[tuple[int, int, int, int]]:
    """Split [offset, offset+length) at chunk boundaries: (chunk index, start in chunk, length, start in request)."""
    pos = offset
    end = offset + length
    while pos < end:
        c, start = divmod(pos, chunk)
        n = min(chunk - start, end - pos)
        yield c, start, n, pos - offset
        pos += n


def split_rows(offset: int, length: int, row_bytes: int) -> Iterator[tuple[int, int, int, int]]:
    """Split a range at row boundaries: (row, start in row, length, start in request)."""
    return split_chunks(offset, length, row_bytes)


# --- linear ----------------------------------------------------------------------------


def linear_locate(offset: int, sizes: Sequence[int]) -> tuple[int, int]:
    """(member, member offset) of a logical offset of a linear layout."""
    base = 0
    for i, size in enumerate(sizes):
        if offset < base + size:
            return i, offset - base
        base += size
    raise ValueError(f"offset {offset} is past the end of the linear layout ({base})")


# --- raid0 -----------------------------------------------------------------------------


def raid0_locate(c: int, n: int) -> tuple[int, int]:
    """(member, row) of logical chunk c of raid0 over n members."""
    return c % n, c // n


# --- raid5 -----------------------------------------------------------------------------


def raid5_parity_member(row: int, n: int) -> int:
    """Member holding P of a raid5 row."""
    return n - 1 - (row % n)


def raid5_data_member(row: int, j: int, n: int) -> int:
    """Member holding data chunk j (0..n-2) of a raid5 row."""
    return (raid5_parity_member(row, n) + 1 + j) % n


def raid5_locate(c: int, n: int) -> tuple[int, int, int]:
    """(row, data index j, member) of logical chunk c of raid5 over n members."""
    row, j = divmod(c, n - 1)
    return row, j, raid5_data_member(row, j, n)


# --- raid6 -----------------------------------------------------------------------------


def raid6_p_member(row: int, n: int) -> int:
    """Member holding P of a raid6 row."""
    return n - 1 - (row % n)


def raid6_q_member(row: int, n: int) -> int:
    """Member holding Q of a raid6 row."""
    return (raid6_p_member(row, n) + 1) % n


def raid6_data_member(row: int, j: int, n: int) -> int:
    """Member holding data chunk j (0..n-3) of a raid6 row."""
    return (raid6_p_member(row, n) + 2 + j) % n


def raid6_locate(c: int, n: int) -> tuple[int, int, int]:
    """(row, data index j, member) of logical chunk c of raid6 over n members."""
    row, j = divmod(c, n - 2)
    return row, j, raid6_data_member(row, j, n)


def parity_row_members(level: str, row: int, n: int) -> tuple[list[int], list[int]]:
    """(data members in order j = 0.., parity members [P] or [P, Q]) of a raid5/raid6 row."""
    if level == "raid5":
        p = raid5_parity_member(row, n)
        return [(p + 1 + j) % n for j in range(n - 1)], [p]
    p = raid6_p_member(row, n)
    return [(p + 2 + j) % n for j in range(n - 2)], [p, (p + 1) % n]


# --- raid10 ----------------------------------------------------------------------------


def raid10_copies(c: int, n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two (member, row) places of logical chunk c of raid10-near over n members."""
    d0, d1 = 2 * c, 2 * c + 1
    return (d0 % n, d0 // n), (d1 % n, d1 // n)


def raid10_lost(failed: set[int] | frozenset[int], n: int) -> bool:
    """True when the failed members hold both copies of some chunk."""
    if n % 2 == 0:
        return any(2 * i in failed and 2 * i + 1 in failed for i in range(n // 2))
    return any(i in failed and (i + 1) % n in failed for i in range(n))


def survives(level: str, n: int, failed: set[int] | frozenset[int]) -> bool:
    """True when the layout still returns every byte with these members failed."""
    f = len(failed)
    if f == 0:
        return True
    if level == "raid10":
        return f < n and not raid10_lost(failed, n)
    return f <= redundancy(level, n)
