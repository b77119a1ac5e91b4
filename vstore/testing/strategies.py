"""Hypothesis strategies for storage workloads: writes, reads, flushes, discards, failures, crashes.

Every strategy draws ``vstore.testing.torture.Op`` values (the steps of a torture
schedule; ``str(op)`` is their text) bounded by a device size. Offsets and
lengths come in any size and alignment, biased towards the boundaries where
layers go wrong: sectors, chunks and stripe rows.

    from vstore.testing import strategies as vs
    @given(vs.schedules(1 << 20, with_crashes=True))
    def test_something(ops): ...
"""

from __future__ import annotations

from hypothesis import strategies as st

from vstore.testing.torture import MODES, Op

__all__ = [
    "concurrent_writes",
    "crashes",
    "discards",
    "extents",
    "flushes",
    "heals",
    "member_failures",
    "path_failures",
    "reads",
    "schedules",
    "slow_members",
    "workload",
    "writes",
]


@st.composite
def extents(draw: st.DrawFn, size: int, *, block_size: int = 512, chunk: int = 4096,
            row: int | None = None, max_length: int | None = None) -> tuple[int, int]:
    """(offset, length) inside [0, size): arbitrary, or aligned to a sector, chunk or row."""
    if size < 1:
        raise ValueError("size must be positive")
    row = row or chunk
    top_len = max_length or max(block_size, 3 * row)
    unit = draw(st.sampled_from([1, block_size, chunk, row]), label="alignment")
    off = draw(st.integers(0, size - 1), label="offset")
    if unit > 1 and draw(st.booleans(), label="aligned"):
        off -= off % unit
    top = max(1, min(size - off, top_len))
    length = draw(st.one_of(
        st.integers(1, top),
        st.sampled_from(sorted({min(top, unit), min(top, 2 * unit), top})),
        st.integers(1, min(top, 600)),
    ), label="length")
    return off, length


@st.composite
def writes(draw: st.DrawFn, size: int, **kw: int) -> Op:
    """A write of random bytes (``w:OFF:LEN:SEED``)."""
    return Op("w", (*draw(extents(size, **kw)), draw(st.integers(0, 2**16 - 1), label="seed")))


@st.composite
def concurrent_writes(draw: st.DrawFn, size: int, **kw: int) -> Op:
    """2-4 writes issued at once (``c:...``); overlapping ones are dropped when run."""
    n = draw(st.integers(2, 4), label="writes")
    return Op("c", tuple((*draw(extents(size, **kw)), draw(st.integers(0, 2**16 - 1)))
                         for _ in range(n)))


@st.composite
def reads(draw: st.DrawFn, size: int, **kw: int) -> Op:
    """A read checked against the model (``r:OFF:LEN``)."""
    return Op("r", draw(extents(size, **kw)))


@st.composite
def discards(draw: st.DrawFn, size: int, **kw: int) -> Op:
    """A discard (``d:OFF:LEN``): the range then holds its old bytes or zeros."""
    return Op("d", draw(extents(size, **kw)))


def flushes() -> st.SearchStrategy[Op]:
    """A flush (``f``)."""
    return st.just(Op("f"))


@st.composite
def crashes(draw: st.DrawFn) -> Op:
    """A power cut somewhere in the previous operation, in any crash mode."""
    # Cuts right after a step (1.0) find lost acknowledged data most directly; the rest
    # land inside the step's member I/O.
    frac = draw(st.one_of(st.just(1.0), st.just(0.0), st.floats(0, 1)), label="where")
    return Op("crash", (round(frac, 3), draw(st.sampled_from(MODES), label="mode"),
                        draw(st.integers(0, 2**16 - 1), label="seed")))


@st.composite
def member_failures(draw: st.DrawFn, members: int) -> Op:
    """Member M fails (``x:M``); the runner skips it beyond the target's redundancy."""
    return Op("x", (draw(st.integers(0, max(0, members - 1))),))


@st.composite
def heals(draw: st.DrawFn, members: int) -> Op:
    """Member M is healed and, if dropped, rebuilt (``h:M``)."""
    return Op("h", (draw(st.integers(0, max(0, members - 1))),))


@st.composite
def path_failures(draw: st.DrawFn, members: int, paths: int = 2) -> Op:
    """A path of a multipath member fails or is reinstated (``p:M:P`` / ``q:M:P``)."""
    return Op(draw(st.sampled_from("pq")), (draw(st.integers(0, max(0, members - 1))),
                                            draw(st.integers(0, paths - 1))))


@st.composite
def slow_members(draw: st.DrawFn, members: int) -> Op:
    """Member M answers MS milliseconds late (``s:M:MS``)."""
    return Op("s", (draw(st.integers(0, max(0, members - 1))), draw(st.sampled_from([0, 1, 3]))))


def workload(size: int, *, discard: bool = True, **kw: int) -> st.SearchStrategy[Op]:
    """One I/O step: write, concurrent writes, read, flush or discard."""
    parts = [writes(size, **kw), writes(size, **kw), concurrent_writes(size, **kw),
             reads(size, **kw), flushes()]
    if discard:
        parts.append(discards(size, **kw))
    return st.one_of(parts)


def schedules(size: int, *, members: int = 0, with_crashes: bool = False, with_failures: bool = False,
              max_ops: int = 30, **kw: int) -> st.SearchStrategy[list[Op]]:
    """Whole schedules for ``vstore.testing.torture.run_schedule`` (and ``vstore torture --replay``)."""
    steps = [workload(size, **kw)]
    if with_failures and members:
        steps += [member_failures(members), heals(members)]
    if with_crashes:
        steps.append(crashes())
    return st.lists(st.one_of(steps), min_size=1, max_size=max_ops)
