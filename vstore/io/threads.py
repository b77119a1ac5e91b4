"""The I/O engine of local file and block-device members: long-lived threads fed in batches, one trio wake-up per batch.

``trio.to_thread.run_sync`` costs a thread-cache hand-off, a thread rename and a
``run_sync_soon`` (a lock and a wake-up write) per call; with one call per member
I/O that was more than half of the mount daemon's time (py-spy, raid0 1 MiB
writes). Here a request's member I/Os are ``Op`` objects handed over as ONE
batch (one ``SimpleQueue.put``); a pool of threads that live as long as the
process runs them with ``os.preadv``/``os.pwritev`` (the GIL is released in the
syscalls); and completions go back to the trio thread in groups, one
``run_sync_soon`` for all the ops finished since the trio thread last looked.
The waiting task parks with ``wait_task_rescheduled`` until every op of its
batch is done: no task per op, no ``trio.Event`` per op.

A short read or write (the file shrank under us, the device ended early) is an
error of that op, never zeros.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence
from typing import Any

import trio

from vstore.cluster.fence import fenced_oserror
from vstore.io.op import SYNC, WRITE, Op, ShortIOError, _Waiter, complete, finish

_IOV_MAX = 1024
# The copies into and out of the page cache are CPU work: more threads than cores
# only fight over them and the GIL (measured on 2 cores, raid0 of 4 tmpfs files at
# queue depth 8: 3 threads 4.5 GB/s, 8 threads 3.9). fdatasync, which waits for a
# disk, does not come here (LocalDevice.flush keeps its own thread hop).
THREADS = min(8, max(2, (os.cpu_count() or 2) + 1))

class _Completions:
    """Finished ops of one trio run, handed back to its thread in groups."""

    def __init__(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.lock = threading.Lock()
        self.done: list[Op] = []
        self.scheduled = False
        self.handoffs = 0  # wake-ups of the trio thread (one per group of completions)

    def post(self, ops: list[Op]) -> None:
        # Worker side: queue them and wake the trio thread only if it is not already due.
        with self.lock:
            self.done.extend(ops)
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.token.run_sync_soon(self.deliver)
        except trio.RunFinishedError:
            pass  # the run is gone; nobody waits any more

    def deliver(self) -> None:
        with self.lock:
            done, self.done, self.scheduled = self.done, [], False
        self.handoffs += 1
        finish(done)


_RUN_COMPLETIONS: trio.lowlevel.RunVar[_Completions] = trio.lowlevel.RunVar("vstore_local_io")
_QUEUE: queue.SimpleQueue[list[Op] | None] = queue.SimpleQueue()
_threads: list[threading.Thread] = []
_threads_lock = threading.Lock()


def _completions() -> _Completions:
    try:
        return _RUN_COMPLETIONS.get()
    except LookupError:
        c = _Completions()
        _RUN_COMPLETIONS.set(c)
        return c


def _ensure_threads() -> None:
    if len(_threads) >= THREADS:
        return
    with _threads_lock:
        while len(_threads) < THREADS:
            t = threading.Thread(target=_worker, name=f"vstore-io-{len(_threads)}", daemon=True)
            t.start()
            _threads.append(t)


def _worker() -> None:
    while True:
        batch = _QUEUE.get()
        if batch is None:
            return
        try:
            _run_batch(batch)
        except BaseException as e:  # noqa: BLE001 - a waiting task must hear of it, never hang
            for op in batch:
                if op.error is None:
                    op.error = OSError(5, f"internal error in the I/O thread: {e!r}")
        by_run: dict[int, tuple[_Completions, list[Op]]] = {}
        for op in batch:
            c = op._completions
            assert c is not None
            entry = by_run.get(id(c))
            if entry is None:
                by_run[id(c)] = (c, [op])
            else:
                entry[1].append(op)
        for c, ops in by_run.values():
            c.post(ops)


def _run_batch(batch: list[Op]) -> None:
    # Adjacent ops of one kind on one fd become one syscall (a request's pieces, or
    # sequential requests that arrived together).
    if len(batch) > 1:
        batch = sorted(batch, key=lambda o: (o.fd, o.kind, o.offset))
    i = 0
    while i < len(batch):
        first = batch[i]
        j = i + 1
        if first.kind != SYNC:
            end = first.offset + first.length
            while (j < len(batch) and batch[j].fd == first.fd and batch[j].kind == first.kind
                   and batch[j].offset == end and j - i < _IOV_MAX):
                end += batch[j].length
                j += 1
        run = batch[i:j]
        try:
            if first.kind == WRITE and (refused := fenced_oserror()) is not None:
                # Checked here, right before the syscall: a batch queued before the process was
                # stopped must not land after its pool's lease lapsed (vstore.cluster.fence).
                raise refused
            if first.kind == SYNC:
                os.fdatasync(first.fd)
            else:
                if first.kind == WRITE and first.min_size:
                    _check_size(first)
                _transfer(first.fd, first.kind == WRITE, first.offset,
                          run[0].views if len(run) == 1 else [v for op in run for v in op.views])
        except OSError as e:
            for op in run:
                op.error = e
        else:
            for op in run:
                complete(op)
        i = j


def _check_size(op: Op) -> None:
    size = os.fstat(op.fd).st_size
    if size < op.min_size:
        raise ShortIOError(5, f"the file shrank to {size} bytes (the member has {op.min_size}): "
                              "writing would leave holes that read as zeros")


def _transfer(fd: int, is_write: bool, offset: int, views: Sequence[memoryview]) -> None:
    total = sum(len(v) for v in views)
    done = 0
    k = 0  # first view not yet fully moved
    skip = 0  # bytes of views[k] already moved
    while done < total:
        iov = [views[k][skip:], *views[k + 1 : k + _IOV_MAX]] if skip else views[k : k + _IOV_MAX]
        n = os.pwritev(fd, iov, offset + done) if is_write else os.preadv(fd, iov, offset + done)
        if n <= 0:
            what = "write" if is_write else "read"
            raise ShortIOError(5, f"short {what}: {done} of {total} bytes (the file or device ended)")
        done += n
        skip += n
        while k < len(views) and skip >= len(views[k]):
            skip -= len(views[k])
            k += 1


def run_now(op: Op, nowait: bool = False) -> bool:
    """Do a small op on the calling (trio) thread; False when it must go to the I/O threads.

    For bytes that are in memory anyway (tmpfs members, or page-cache hits asked
    for with RWF_NOWAIT, which fails with EAGAIN rather than wait for a disk), a
    copy of a few KiB costs microseconds while a thread hand-off costs tens.
    """
    if op.kind == SYNC:
        return False
    try:
        if nowait:
            n = os.preadv(op.fd, op.views, op.offset, os.RWF_NOWAIT)
            if n != op.length:
                return False  # not all cached: the threads read it whole
        else:
            if op.kind == WRITE and (refused := fenced_oserror()) is not None:
                raise refused
            if op.kind == WRITE and op.min_size:
                _check_size(op)
            _transfer(op.fd, op.kind == WRITE, op.offset, op.views)
    except BlockingIOError:
        return False
    except OSError as e:
        if nowait:
            return False  # let the threads try (and report) it the ordinary way
        op.error = e
    if op.error is None:
        complete(op)
    op.finished = True
    HANDOFFS_SAVED[0] += 1
    return True


HANDOFFS_SAVED = [0]  # ops done on the trio thread instead


def submit(ops: Sequence[Op]) -> None:
    """Hand ops to the I/O engine as one batch (call from the trio thread, then ``wait``)."""
    ops = [op for op in ops if not op.finished]
    if not ops:
        return
    ring = _ring()
    if ring is not None:
        ring.submit(ops)
        return
    _ensure_threads()
    comp = _completions()
    for op in ops:
        op._completions = comp
    _QUEUE.put(ops)


async def wait(ops: Sequence[Op]) -> None:
    """Park until every op (already submitted) is done; errors stay on the ops.

    I/O under way cannot be abandoned: a cancellation is delivered once the ops
    are done, so the caller's buffers are never written after it returned.
    """
    pending = [op for op in ops if not op.finished]
    if not pending:
        # All done already (in memory, on this thread): no trip through the scheduler,
        # which would cost more than the I/O did.
        return
    ring = _ring()
    if ring is not None:
        await ring.wait(pending)
        return
    waiter = _Waiter(len(pending))
    for op in pending:
        op.waiter = waiter
    # deliver() runs on this thread, so nothing can finish between the count above
    # and parking below.
    await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)


async def run(ops: Sequence[Op]) -> None:
    """Submit ops as one batch and wait for all of them."""
    submit(ops)
    await wait(ops)


def handoffs() -> int:
    """Wake-ups of this trio run's thread by the I/O threads so far (for accounting)."""
    try:
        return _RUN_COMPLETIONS.get().handoffs
    except LookupError:
        return 0


# ---------------------------------------------------------------------------- io_uring

# threads (the default) | io_uring. Measured on 2 cores (raid0 of 4 tmpfs files through
# the mount, 1 MiB direct qd8): threads 1.55 GB/s write / 1.78 read, io_uring with
# IOSQE_ASYNC 0.29 / 0.60 — its kernel workers fault in every page of each request's
# buffer (259 minor faults per 1 MiB request against none). In isolation io_uring read
# tmpfs at 9.1 GB/s from one thread, two Python threads at 12.3.
ENGINE = os.environ.get("VSTORE_IO_ENGINE", "threads")
_RUN_RING: trio.lowlevel.RunVar[Any] = trio.lowlevel.RunVar("vstore_io_uring")


def _ring() -> Any:
    """This trio run's io_uring, or None when the threads serve (no liburing, disabled, refused)."""
    try:
        return _RUN_RING.get()
    except LookupError:
        pass
    ring = None
    if ENGINE == "io_uring":
        from vstore.io import uring as io_uring

        ring = io_uring.open_ring()
        if ring is None and ENGINE == "io_uring":
            why = io_uring.binding_fault() or "no liburing binding, or the kernel refuses io_uring"
            raise RuntimeError(f"VSTORE_IO_ENGINE=io_uring but io_uring cannot be set up here ({why})")
    _RUN_RING.set(ring)
    return ring


def engine() -> str:
    """The engine of this trio run's local member I/O: 'io_uring' or 'threads'."""
    return "io_uring" if _ring() is not None else "threads"
