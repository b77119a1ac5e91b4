"""One local I/O operation (``Op``) and the hand-back of finished ones to the tasks waiting for them.

Shared by the I/O engines (``vstore.io.threads``, ``vstore.io.uring``): an engine runs
ops anywhere, then calls ``finish`` on the trio thread, which wakes each waiting task
once its last op is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import trio

READ, WRITE, SYNC = 0, 1, 2


class ShortIOError(OSError):
    """A read or write that moved fewer bytes than asked, with no error from the kernel."""


class Op:
    """One vectored read or write (or an fdatasync) of one file descriptor."""

    __slots__ = ("kind", "fd", "offset", "views", "length", "error", "finished", "waiter", "_completions",
                 "label", "scatter", "min_size", "after", "result")

    def __init__(self, kind: int, fd: int, offset: int = 0, views: Sequence[memoryview] = (),
                 label: str = "") -> None:
        self.label = label  # the file's path, for error messages
        # Read through a bounce buffer (O_DIRECT needs aligned memory): after the
        # transfer, its bytes are copied out to these caller views.
        self.scatter: list[np.ndarray] | None = None
        # A regular file's size may not drop below this (the member's size): a write into a
        # truncated file would grow it again with holes that read back as zeros.
        self.min_size = 0
        # Run by the engine where the op completed (an I/O thread, or the trio thread) once
        # its bytes are in place: a checksummed read's CRCs, off the trio thread (its result in
        # ``result``). Numba kernels release the GIL, so it runs beside the trio thread.
        self.after: Any = None
        self.result: Any = None
        self.kind = kind
        self.fd = fd
        self.offset = offset
        self.views = views
        self.length = sum(len(v) for v in views)
        self.error: OSError | None = None
        self.finished = False  # set on the trio thread once the result is delivered
        self.waiter: _Waiter | None = None
        self._completions: Any = None  # the engine's completion queue (vstore.io.threads)


    @classmethod
    def completed(cls, label: str = "") -> Op:
        """An op already done: what a device that moves bytes at once (memory) hands back."""
        op = cls(READ, -1, label=label)
        op.finished = True
        return op

    def failure(self) -> str | None:
        """What went wrong, as one line naming the file and the range (None when it went well)."""
        if self.error is None:
            return None
        what = ("read", "write", "flush")[self.kind]
        where = "" if self.kind == SYNC else f" at {self.offset}"
        return f"{self.label}: {what}{where}: {self.error.strerror or self.error}"


def views_of(bufs: Sequence[np.ndarray]) -> list[memoryview]:
    """Byte memoryviews of uint8 buffers (contiguous copies where a buffer is strided: for writes only)."""
    out = []
    for b in bufs:
        if len(b):
            if not b.flags.c_contiguous:
                b = np.ascontiguousarray(b)
            out.append(memoryview(b).cast("B") if b.ndim != 1 else memoryview(b))
    return out


class _Waiter:
    __slots__ = ("task", "pending")

    def __init__(self, pending: int) -> None:
        self.task = trio.lowlevel.current_task()
        self.pending = pending


def finish(done: Sequence[Op]) -> None:
    """Mark ops done and wake the tasks whose last op this was (on the trio thread)."""
    for op in done:
        op.finished = True
        w = op.waiter
        if w is not None:
            w.pending -= 1
            if w.pending == 0:
                trio.lowlevel.reschedule(w.task)


def complete(op: Op) -> None:
    """A successful transfer's epilogue, where the engine ran it: copy out a bounce buffer, run ``after``."""
    if op.scatter is not None:
        copy_out(op)
    if op.after is not None:
        try:
            op.after(op)
        except Exception as e:  # a bug in the hook: the op fails rather than the engine
            op.error = OSError(5, f"after-I/O step failed: {e!r}")


def copy_out(op: Op) -> None:
    """Copy a bounce-buffered read out to the caller's views."""
    src = np.frombuffer(op.views[0], dtype=np.uint8)
    pos = 0
    for v in op.scatter or ():
        v[:] = src[pos : pos + len(v)]
        pos += len(v)


