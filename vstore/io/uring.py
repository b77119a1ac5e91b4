"""io_uring for local member I/O: the kernel's own workers move the bytes, the trio thread only submits.

With ``vstore.io.threads``' threads, every member I/O needs the GIL before and
after its syscall, and waits for it while the trio thread runs Python or pyfuse3
copies a request. Here a request's ops become SQEs (``readv``/``writev`` over the
caller's buffers, flagged ``IOSQE_ASYNC`` so the kernel's io-wq workers do the
copies in parallel rather than the submitting thread), submitted with one
``io_uring_enter``; an eventfd registered with the ring wakes one of the tasks
waiting for their ops (no task of the ring's own), which reaps every ready CQE
and wakes the other waiters. No Python thread takes part.

Opt-in (``VSTORE_IO_ENGINE=io_uring``): measured through the mount it is slower
than the threads on this machine (see ``vstore.io.threads.ENGINE``). Binding: the
``liburing`` package on PyPI (a test extra). ``open_ring`` returns None when it
is missing, when it cannot run on this CPU (its wheel may use instructions this
machine lacks and die with SIGILL: it is tried once in a child process first), or
when the kernel refuses io_uring (``kernel.io_uring_disabled``, seccomp).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import trio

from vstore.io.op import WRITE, Op, ShortIOError, complete, finish

log = logging.getLogger(__name__)

ENTRIES = 256


class Ring:
    """One io_uring of a trio run, reaped by the tasks that wait for it, woken through an eventfd."""

    def __init__(self, liburing: Any) -> None:
        self.L = liburing
        self.ring = liburing.Ring()
        liburing.io_uring_queue_init(ENTRIES, self.ring, 0)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            liburing.io_uring_register_eventfd(self.ring, self.efd)
        except BaseException:
            os.close(self.efd)
            liburing.io_uring_queue_exit(self.ring)
            raise
        self.cqe = liburing.Cqe()
        # user_data -> (op, its iovec kept alive, the views still to move, bytes moved so far)
        self.inflight: dict[int, tuple[Op, Any, Sequence[memoryview], int]] = {}
        self.next_id = 1
        self.submitted = 0
        self.closed = False
        self.reaping = False  # a waiter is parked on the eventfd
        self.reaped = trio.Event()  # set (and replaced) after each reap

    def submit(self, ops: Sequence[Op]) -> None:
        """Queue the ops' SQEs and enter the kernel once."""
        for op in ops:
            self._queue(op, op.views, 0)
        self._enter()

    def _enter(self) -> None:
        self.L.io_uring_submit(self.ring)
        self.submitted += 1

    def _queue(self, op: Op, views: Sequence[memoryview], done: int) -> None:
        L = self.L
        sqe = L.io_uring_get_sqe(self.ring)
        if sqe is None:  # the submission queue is full: hand what is there to the kernel
            self._enter()
            sqe = L.io_uring_get_sqe(self.ring)
        iov = L.Iovec(list(views))
        uid = self.next_id
        self.next_id += 1
        self.inflight[uid] = (op, iov, views, done)
        prep = L.io_uring_prep_writev if op.kind == WRITE else L.io_uring_prep_readv
        prep(sqe, op.fd, iov, op.offset + done)
        L.io_uring_sqe_set_data64(sqe, uid)
        sqe.flags = L.IOSQE_ASYNC

    async def wait(self, ops: Sequence[Op]) -> None:
        """Wait for the ops, reaping the ring meanwhile unless another waiter already does.

        No task of its own: whoever waits reaps (one at a time, through the eventfd),
        and every reap wakes the other waiters to look at their ops again. I/O under
        way cannot be abandoned, so a cancellation is delivered once the ops are done.
        """
        with trio.CancelScope(shield=True):
            while not all(op.finished for op in ops):
                if self.reaping:
                    await self.reaped.wait()
                    continue
                self.reaping = True
                try:
                    await trio.lowlevel.wait_readable(self.efd)
                    try:
                        os.eventfd_read(self.efd)
                    except BlockingIOError:
                        pass
                    self._reap()
                finally:
                    self.reaping = False
                    self.reaped.set()
                    self.reaped = trio.Event()
        await trio.lowlevel.checkpoint_if_cancelled()

    def _reap(self) -> None:
        L = self.L
        finished: list[Op] = []
        again = False
        while L.io_uring_cq_ready(self.ring):
            L.io_uring_wait_cqe(self.ring, self.cqe)  # ready: returns at once
            c = self.cqe[0]
            uid = c.user_data
            error: OSError | None = None
            try:
                res = c.res  # the binding raises the errno of a failed op
            except OSError as e:
                res, error = -1, e
            L.io_uring_cq_advance(self.ring, 1)
            entry = self.inflight.pop(uid, None)
            if entry is None:
                continue
            op, _, views, done = entry
            if error is not None or res is None or res < 0:
                op.error = error or OSError(5, os.strerror(5))
                finished.append(op)
            elif done + res >= op.length:
                complete(op)
                finished.append(op)
            elif res == 0:
                what = "write" if op.kind == WRITE else "read"
                op.error = ShortIOError(5, f"short {what}: {done} of {op.length} bytes (the file or device ended)")
                finished.append(op)
            else:  # a partial transfer: the rest as a new SQE
                self._queue(op, _skip(views, res), done + res)
                again = True
        if again:
            self._enter()
        finish(finished)

    def close(self) -> None:
        """Release the ring (the kernel waits for what is still in flight) and the eventfd."""
        if self.closed:
            return
        self.closed = True
        try:
            self.L.io_uring_queue_exit(self.ring)
        finally:
            os.close(self.efd)


def _skip(views: Sequence[memoryview], n: int) -> list[memoryview]:
    out: list[memoryview] = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


# What the child process does to find out whether the binding runs on this machine.
PROBE = ("import liburing\n"
         "r = liburing.Ring()\n"
         "liburing.io_uring_queue_init(8, r, 0)\n"
         "liburing.io_uring_queue_exit(r)\n")
_fault: str | None = None  # None: not tried yet; "": the binding runs; else why it does not


def binding_fault() -> str:
    """Why the liburing binding cannot run here ("" when it can); tried once, in a child process."""
    global _fault
    if _fault is None:
        try:
            res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                 timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            _fault = f"the liburing binding could not be tried: {e}"
        else:
            if res.returncode < 0:
                try:
                    name = signal.Signals(-res.returncode).name
                except ValueError:
                    name = f"signal {-res.returncode}"
                _fault = f"the liburing binding dies with {name} on this machine"
            elif res.returncode:
                lines = res.stderr.strip().splitlines()
                _fault = f"the liburing binding fails here: {lines[-1] if lines else res.returncode}"
            else:
                _fault = ""
    return _fault


def open_ring() -> Ring | None:
    """A ring for this trio run (closed when the run ends), or None where io_uring cannot be had."""
    try:
        import liburing
    except ImportError:
        return None
    fault = binding_fault()
    if fault:
        log.warning("io_uring not available (%s): member I/O uses threads", fault)
        return None
    try:
        ring = Ring(liburing)
    except Exception as e:  # noqa: BLE001 - any refusal means: use the threads
        log.info("io_uring not available (%s): member I/O uses threads", e)
        return None
    trio.lowlevel.add_instrument(_CloseAtRunEnd(ring))
    return ring


class _CloseAtRunEnd(trio.abc.Instrument):
    """Closes the run's ring when the trio run ends."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring

    def after_run(self) -> None:
        """Release the ring."""
        self.ring.close()
