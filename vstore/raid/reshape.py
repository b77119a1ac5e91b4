"""Reshape onto more members (md's ``--grow --raid-devices``): the geometry and the crash-safe step order.

This module is the pure part of a reshape of raid0/raid5/raid6/raid10 from ``n``
to ``n + k`` members: which member rows hold which logical chunks in each
geometry, which rows form the *critical section*, and the order of steps,
backups and metadata checkpoints that keeps every logical chunk recoverable
after a crash at any point. ``simulate`` runs the plan over a model of the
members and cuts the power anywhere (``tests/test_reshape_plan.py`` does, for
every cut). The online reshape that drives it over a live pool is built for
every level here (``vstore.raid.reshape_layout``, ``vstore.ops.reshape``): raid10's
own locks and resync are per chunk, but a reshape locks member rows of both
geometries (every row holding a copy of a chunk touched) and resyncs a dirty row
in the geometry owning it, as for the others. A raid5 of two members (the middle
of a raid1 -> raid5 conversion) is a shape too.

The rows above the moved data (old rows under the new parity or pairing) become
zero rows only after the cursor on record covers every chunk: they overwrite old
rows, which a crash before that commit would copy again (``ZERO_ROWS_FIRST``
flips the order for the test that the model catches it). After a crash in the
critical section the pool's open rewrites the critical rows from the backup
before it serves anything (the old rows there may be half overwritten).

The hazard
----------
Row ``r`` of every striped level is the member range ``[r*C, (r+1)*C)`` on every
member (``vstore.raid.geometry``). The new geometry holds more chunks per row,
so a forward reshape (logical chunk 0 upwards) writes new row ``r`` while old
row ``r`` still holds chunks not yet copied: for raid5 4 -> 5 members (3 -> 4 data
chunks per row), new row 0 = chunks 0..3 overwrites old row 0 = chunks 0..2, and
a crash while it is half written loses chunks 0..2 (on the members written, old
row 0 is gone; on the others the new row is not there). md either keeps a backup
of this *critical section* (``mdadm --backup-file``) or moves the data offset so
that new rows land on free space below the old ones.

The choice: a backup of the critical section, then md's "reshape_safe" rule
---------------------------------------------------------------------------
vstore's data offset is fixed by the superblock format (2 MiB, just above the
metadata and the bitmap), with nothing free below it, so moving it would need a
new format and space reserved at create. The backup works on every existing pool:

1. **Critical rows.** ``critical_rows(old, new)`` is the first row ``r_c`` from
   which every old row ``r >= r_c`` holds only chunks that the new rows below
   ``r`` hold entirely (``old.row_chunks(r).stop <= new.chunks_below(r)``). Below
   it, writing new row ``r`` destroys chunks that no committed cursor can cover.
   ``r_c = ceil(k_old / (k_new - k_old))`` for raid0/5/6 (3 for raid5 4 -> 5).
2. **Backup.** The chunks of old rows ``[0, r_c)`` (``backup_chunks``) are copied
   to the top rows of each new member (free until the reshape ends: the new
   geometry's data ends lower, ``backup_fits``), flushed, and recorded with their
   CRC in the metadata (``meta["reshape"]["backup"]``) by a commit, before new
   row 0 is written. After a crash with a backup on record, the rows of the
   critical section are written again from the backup (chunks below ``B``) and
   the old geometry (chunks above, in old rows ``>= r_c``, which the critical
   section never touched); then the cursor is committed past them and the
   backup dropped.
3. **reshape_safe.** Past the critical section, new row ``r`` may be written only
   once the *committed* cursor covers every chunk of old row ``r``; otherwise the
   rows written so far are flushed and the cursor committed first. The cursor
   grows by ``k_new`` chunks per row and the rule needs only ``k_old``, so the
   commits thin out as the reshape goes (a reshape of ``R`` rows commits about
   ``log(R) / log(k_new / k_old)`` times; a rate-limited one also every few
   seconds, to bound the work redone).
4. **Redo is idempotent.** A chunk at or above the committed cursor still has its
   old copy intact (rule 3 never lets a write destroy one), so after a crash the
   reshape restarts at the committed cursor and copies again; rows written after
   that checkpoint are simply written again.

Serving I/O during a reshape (the ``ReshapeLayout`` to build on this)
--------------------------------------------------------------------
A ``ReshapeLayout`` holds the old and the new layout over the same member
windows (the new members appended) and two cursors: ``committed`` (in the
metadata) and ``done`` (rows copied in memory). A logical chunk below ``done`` is
served by the new geometry, the rest by the old; a copy step holds the row locks
of its logical range in both layouts. A foreground write to ``[committed, done)``
goes to the new geometry and makes the next ``flush`` commit the cursor after the
member flush (else a crash would restart the copy below the write and lose it:
md blocks such writes until its superblock is updated). After a crash the
write-intent bitmap's dirty rows are resynced in the geometry that owns the row
on record: below the committed new rows by the new, at or above the first old row
holding a chunk at the cursor by the old, and rows between are skipped (the redo
rewrites them). When the last row is copied, the rows above the data (for the
parity levels: old data under a new parity) are zeroed as ``--members-grew``
zeroes grown rows, the layout serves the new geometry whole, and one commit drops
``meta["reshape"]`` and records the larger ``n_extents`` (the member table, with
the new members, was recorded when the reshape started). A member failing
mid-reshape is tolerated as each layout tolerates it (both share the failed
set); a rebuild, move or scrub is refused until the reshape ends.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vstore.errors import ConfigError

RESHAPE_LEVELS = ("raid0", "raid5", "raid6", "raid10")
ZERO_ROWS_FIRST = False  # (the unsafe order, for the test that the model catches it)


@dataclass(frozen=True)
class Shape:
    """A striped geometry: which logical chunks each member row holds (raid0/5/6: k data chunks; raid10: n/2)."""

    level: str
    n: int

    def __post_init__(self) -> None:
        if self.level not in RESHAPE_LEVELS:
            raise ConfigError(f"a {self.level} pool is not reshaped")
        if self.n < {"raid0": 1, "raid5": 2, "raid6": 4, "raid10": 2}[self.level]:
            raise ConfigError(f"{self.level} needs more than {self.n} members")

    @property
    def k(self) -> int:
        """Data chunks per row (raid10: device positions per row, two per chunk)."""
        return {"raid0": self.n, "raid5": self.n - 1, "raid6": self.n - 2, "raid10": self.n}[self.level]

    def row_chunks(self, r: int) -> range:
        """The logical chunks with a copy in member row r."""
        if self.level == "raid10":
            return range(r * self.n // 2, (r * self.n + self.n - 1) // 2 + 1)
        return range(r * self.k, (r + 1) * self.k)

    def chunks_below(self, r: int) -> int:
        """How many logical chunks lie wholly in member rows below r (all their copies)."""
        return r * self.n // 2 if self.level == "raid10" else r * self.k

    def rows_for(self, chunks: int) -> int:
        """Member rows that the first ``chunks`` logical chunks occupy."""
        if self.level == "raid10":
            return -(-2 * chunks // self.n)
        return -(-chunks // self.k)


def check_growth(old: Shape, new: Shape) -> None:
    """ConfigError unless new is the same level over more members."""
    if old.level != new.level:
        raise ConfigError(f"a reshape keeps the level ({old.level}, not {new.level})")
    if new.n <= old.n:
        raise ConfigError(f"a reshape grows the member count ({old.n} -> {new.n})")


def critical_rows(old: Shape, new: Shape) -> int:
    """The first row from which writing new rows in order never destroys a chunk no cursor covers."""
    check_growth(old, new)
    r = 0
    while old.row_chunks(r).stop > new.chunks_below(r):
        r += 1
    return r


def backup_chunks(old: Shape, new: Shape) -> int:
    """How many logical chunks (from 0) the backup of the critical section holds."""
    rc = critical_rows(old, new)
    return old.row_chunks(rc - 1).stop if rc else 0


def backup_fits(old: Shape, new: Shape, rows: int) -> bool:
    """Whether the backup fits on a new member above the rows the new geometry fills with the old data."""
    data_rows = new.rows_for(old.chunks_below(rows))
    return rows - data_rows >= backup_chunks(old, new) and data_rows >= critical_rows(old, new)


def needs_commit(old: Shape, row: int, committed: int) -> bool:
    """Whether the cursor must be committed before new row ``row`` is written (reshape_safe)."""
    return old.row_chunks(row).stop > committed


# --------------------------------------------------------------------------- a model, to prove the order


@dataclass
class Model:
    """Members as rows of chunk ids: ``rows[m][r]`` is what member m holds in row r (None: nothing)."""

    old: Shape
    new: Shape
    nrows: int

    def fresh(self) -> list[list[object]]:
        """The members before the reshape: the old geometry holding chunk ids 0.."""
        rows: list[list[object]] = [[None] * self.nrows for _ in range(self.new.n)]
        for r in range(self.nrows):
            for pos, c in enumerate(self._layout(self.old, r)):
                rows[pos][r] = c
        return rows

    def _layout(self, shape: Shape, r: int) -> list[object]:
        """What each member holds in row r of a geometry (chunk ids; raid10 the copies in position order)."""
        if shape.level == "raid10":
            return [(r * shape.n + p) // 2 for p in range(shape.n)]
        chunks = list(shape.row_chunks(r))
        extra = shape.n - shape.k  # parity: the row's chunk set, as a tuple
        return chunks + [tuple(chunks)] * extra

    def new_row(self, r: int) -> list[object]:
        """What each member must hold in new row r."""
        return self._layout(self.new, r)


def simulate(old: Shape, new: Shape, nrows: int, crash_at: int | None, rng: random.Random) -> list[str]:
    """Run the plan over the model, cut the power after ``crash_at`` member writes, recover, finish; problems found.

    A commit flushes the members first, so every write before it is durable; of
    the writes since, a power cut keeps any subset (lost, kept, in any order).
    Recovery knows only the committed metadata (cursor, backup) and the members.
    """
    model = Model(old, new, nrows)
    members = model.fresh()
    durable = [list(m) for m in members]
    pending: list[tuple[int, int, object]] = []
    total = old.chunks_below(nrows)
    data_rows = new.rows_for(total)
    rc = critical_rows(old, new)
    B = backup_chunks(old, new)
    meta: dict[str, int | None] = {"cursor": 0, "backup": None}
    backup_area: list[object] = []  # on the new members' top rows
    writes = 0
    armed = crash_at is not None  # one power cut per run
    problems: list[str] = []

    class Crash(Exception):
        pass

    def commit(**changes: int | None) -> None:
        """Flush the members, then write the metadata."""
        nonlocal durable
        durable = [list(m) for m in members]
        pending.clear()
        meta.update(changes)

    def read_chunk(c: int, cursor: int, use_backup: bool) -> object:
        """Chunk c from where the plan says it is: the backup, the new geometry below the cursor, else the old."""
        if use_backup and c < B:
            return backup_area[c]
        shape = new if c < cursor else old
        d = 2 * c if shape.level == "raid10" else c  # the model keeps data in row order (no rotation)
        r, pos = divmod(d, shape.k)
        return members[pos][r] if r < nrows else None

    def write_row(r: int, values: list[object]) -> None:
        nonlocal writes
        order = list(range(len(values)))
        rng.shuffle(order)
        for pos in order:
            if armed and writes == crash_at:
                raise Crash
            members[pos][r] = values[pos]
            pending.append((pos, r, values[pos]))
            writes += 1

    def row_values(r: int, cursor: int, use_backup: bool) -> list[object]:
        out: list[object] = []
        for x in model.new_row(r):
            if isinstance(x, tuple):
                out.append(tuple(read_chunk(c, cursor, use_backup) for c in x))
            else:
                out.append(read_chunk(int(x), cursor, use_backup))  # type: ignore[call-overload]
        return out

    def run(start: int) -> None:
        nonlocal backup_area
        if meta["cursor"] == 0 and rc and meta["backup"] is None:
            backup_area = [read_chunk(c, 0, False) for c in range(B)]
            commit(backup=B)  # the backup rows flushed, then on record
        r = start
        while r < data_rows:
            cursor = int(meta["cursor"] or 0)
            if r >= rc and needs_commit(old, r, cursor):  # reshape_safe: checkpoint first
                cursor = new.chunks_below(r)
                commit(cursor=cursor, backup=meta["backup"] if cursor < B else None)
            write_row(r, row_values(r, cursor, meta["backup"] is not None))
            r += 1
        if ZERO_ROWS_FIRST:
            zero_rows()
        commit(cursor=total, backup=None)
        # The rows above the data (old rows under the new pairing or parity) become zero rows:
        # only once the cursor on record covers every chunk, as they overwrite old rows.
        if not ZERO_ROWS_FIRST:
            zero_rows()
        commit()

    def zero_rows() -> None:
        for r in range(data_rows, nrows):
            write_row(r, [0] * new.n)

    try:
        run(0)
    except Crash:
        armed = False
        # The power fails: the durable bytes and any subset of the writes since the last commit.
        members[:] = [list(m) for m in durable]
        kept = [w for w in pending if rng.random() < 0.5]
        rng.shuffle(kept)
        for pos, r, value in kept:
            members[pos][r] = value
        pending.clear()
        cursor = int(meta["cursor"] or 0)
        start = 0 if meta["backup"] is not None else new.rows_for(cursor)
        if new.chunks_below(start) != cursor and meta["backup"] is None and cursor < total:
            problems.append(f"cursor {cursor} is not on a row boundary")
        try:
            run(min(start, data_rows))
        except Crash:
            problems.append("crashed twice")
    if meta["cursor"] != total or meta["backup"] is not None:
        problems.append(f"unfinished: {meta}")
    for r in range(data_rows, nrows):
        if any(members[pos][r] != 0 for pos in range(new.n)):
            problems.append(f"row {r} above the data is not a zero row")
    for r in range(data_rows):
        for pos, x in enumerate(model.new_row(r)):
            ids = x if isinstance(x, tuple) else (x,)
            if all(int(c) < total for c in ids) and members[pos][r] != x:  # type: ignore[call-overload]
                problems.append(f"new row {r} member {pos} holds {members[pos][r]!r}, not {x!r}")
    return problems


def count_writes(old: Shape, new: Shape, nrows: int) -> int:
    """Member writes of a whole reshape (each member of each new row: data rows, then zero rows)."""
    return nrows * new.n
