"""Multipath: one member reached over several paths, as dm-multipath does it inside the engine.

A ``MultipathDevice`` is a BlockDevice over path devices that reach the same
storage (proven at open by equal ``identity()``). Each I/O goes to one path
picked by a selector (``round-robin``, ``queue-length``: fewest in flight,
``service-time``: least (in-flight bytes + this I/O) / measured throughput)
among the active group of a grouping policy (``multibus``: every healthy path;
``failover``: only the healthy paths of the highest priority, the others stand
by). An I/O error (``MemberIOError``) or a timeout on a path marks the path
failed and the I/O goes to another path; the caller never sees it. With no path
left, I/O waits up to ``no_path_retry`` seconds counted from the loss of the
last path (0: fail at once) and then fails with ``NoPathError``; after that,
new I/O fails at once until a path returns.

Lost writes. A write that failed on a path may still land there late (a target
can run a command whose connection is already gone). Retrying the same bytes
on another path is harmless even if the lost copy lands afterwards, since both
carry the same bytes; what must never happen is *newer* data to that range
being overtaken by the lost copy. So the failed attempt leaves a fence (a
"ghost" write) over its range: later writes to that range wait until the failed
path is reinstated (a fresh probe/session on a path means its old commands are
gone) or ``stale_write_hold`` seconds have passed. Apart from that, requests to
overlapping ranges are ordered by arrival (``vstore.io.ordering``: writes exclude reads and writes), so
overlapping writes are never in flight on two paths at once. A vectored request
(``readv_into``/``writev``) is one request on one path, ordered, fenced, retried
and counted exactly as a read or write of the same range. A failed attempt
is retried only after it has returned (a timed-out attempt is cancelled and
unwound first).

Flush. Every path that carried writes since its last flush is flushed. A
path that went down with writes not yet flushed stays "dirty": a flush
through a live path covers its writes at once where the paths share the
storage's cache (an iSCSI LU, a file on one NFS server), and the checker
flushes the path itself before reinstating it (a backend that keeps unstable
writes per connection, as NFS does for resending, commits them then).

The path checker (``run_background``) lives in a nursery of the device's owner: it probes
failed paths (``probe()``, or a read of block 0 for devices without it) every
``check_interval`` seconds, and healthy ones every ``healthy_check_interval``,
and reinstates a failed path once it has answered continuously for
``failback_delay`` seconds (0: at once), or ``flap_hold`` seconds when it
failed ``flap_threshold`` times within ``flap_window`` (damping). A path is
reinstated at once, whatever its history, when no other path is usable. When
nobody runs the checker (a short CLI command), I/O waiting for a path probes
the failed paths itself. ``fail_path``/``reinstate_path`` are the drills: an
administratively failed path stays failed until reinstated by hand.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import trio

from vstore.errors import (
    ConfigError,
    DeviceTimeoutError,
    MemberIOError,
    NoPathError,
    OutOfRangeError,
    ReadOnlyError,
    VstoreError,
)
from vstore.io.aio import run_all
from vstore.io.ordering import Entry, RangeOrder
from vstore.stack.device import Buffer, DeviceBase, as_u8
from vstore.stack.iovec import total_bytes
from vstore.uri import MemberURI, open_uri

log = logging.getLogger("vstore.stack.multipath")

SELECTORS = ("round-robin", "queue-length", "service-time")
POLICIES = ("multibus", "failover")

ACTIVE = "active"
FAILED = "failed"
PENDING = "pending"  # answers probes again, held back by failback delay or flap damping

# SCSI sense keys that describe the medium or the request, not the path: never fail over on them.
_TARGET_SENSE_KEYS = frozenset({0x3, 0x4, 0x5, 0x7, 0x8})
# Errors about the request itself: the same on every path.
_REQUEST_ERRORS = (OutOfRangeError, ReadOnlyError, ConfigError)

# I/O kinds: 0 read, 1 write, 2 discard, 3 flush, and the vectored pair.
_READV = 4
_WRITEV = 5
_CHANGES = (1, 2, _WRITEV)  # kinds that change the storage: fenced when lost, make a path dirty

_RATE_SAMPLE = 0.02  # seconds of busy time per service-time throughput sample
_RATE_ALPHA = 0.3  # weight of a new sample in the moving average
_NOMINAL_RATE = 1e8  # bytes/s assumed before a path has been measured

DEFAULTS: dict[str, Any] = {
    "selector": "service-time",
    "policy": "multibus",
    "no_path_retry": 30.0,
    "io_timeout": 30.0,
    "probe_timeout": 5.0,
    "check_interval": 1.0,
    "healthy_check_interval": 5.0,
    "failback_delay": 0.0,
    "flap_threshold": 3,
    "flap_window": 60.0,
    "flap_hold": 30.0,
    "stale_write_hold": 5.0,
}

Opener = Callable[..., Awaitable[Any]]


def validate_options(options: dict[str, Any]) -> dict[str, Any]:
    """Check multipath options (selector, policy, no_path_retry, timings); return them complete."""
    out = dict(DEFAULTS)
    for key, value in options.items():
        if key not in DEFAULTS:
            raise ConfigError(f"unknown multipath option {key!r} (known: {', '.join(DEFAULTS)})")
        if value is None:
            continue
        if key == "selector":
            if value not in SELECTORS:
                raise ConfigError(f"unknown path selector {value!r} (choose from {', '.join(SELECTORS)})")
        elif key == "policy":
            if value not in POLICIES:
                raise ConfigError(f"unknown path policy {value!r} (choose from {', '.join(POLICIES)})")
        else:
            try:
                value = int(value) if key == "flap_threshold" else float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"multipath option {key} must be a number, got {value!r}") from None
            if value < 0 or (value == 0 and key in ("probe_timeout", "check_interval")):
                raise ConfigError(f"multipath option {key} must be positive, got {value!r}")
        out[key] = value
    return out


_PRIO_RE = re.compile(r"([?&])prio=[^&]*(&?)")


def strip_priority(uri: MemberURI) -> tuple[MemberURI, int | None]:
    """Split a ``prio=N`` query parameter (a path priority) off a path URI."""
    prio = uri.params.get("prio")
    if prio is None:
        return uri, None
    try:
        value = int(prio)
    except ValueError:
        raise ConfigError(f"path priority must be an integer: {uri.redacted()!r}") from None

    def cut(m: re.Match) -> str:
        return m.group(1) if m.group(2) else ""

    text = _PRIO_RE.sub(cut, uri.text, count=1)
    return replace(uri, query=tuple(q for q in uri.query if q[0] != "prio"), text=text), value


async def open_path(uri: MemberURI, *, create_size: int | None = None) -> Any:
    """Open one path: an iSCSI path fails its I/O at once on a lost connection (we fail over)."""
    opts: dict[str, Any] = {}
    if uri.scheme == "iscsi" and "recovery_timeout" not in uri.params:
        opts["recovery_timeout"] = 0
    return await open_uri(uri, create_size=create_size, **opts)


class Path:
    """One path of a multipath device: its device, state and counters."""

    __slots__ = (
        "index", "uri", "dev", "state", "priority", "admin", "error", "inflight", "inflight_bytes",
        "ios", "bytes", "errors", "fail_times", "healthy_since", "rate", "busy_mark", "acc_bytes",
        "acc_time", "dirty", "last_check", "own_timeout",
    )

    def __init__(self, index: int, uri: MemberURI, dev: Any, priority: int) -> None:
        self.index = index
        self.uri = uri
        self.state = ACTIVE if dev is not None else FAILED
        self.priority = priority
        self.admin = False  # failed by the administrator: the checker leaves it alone
        self.error: str | None = None if dev is not None else "not opened"
        self.inflight = 0
        self.inflight_bytes = 0
        self.ios = 0
        self.bytes = 0
        self.errors = 0
        self.fail_times: deque[float] = deque()
        self.healthy_since: float | None = None
        self.rate = _NOMINAL_RATE
        self.busy_mark = 0.0
        self.acc_bytes = 0
        self.acc_time = 0.0
        self.dirty = False  # carried writes since its last flush
        self.last_check = trio.current_time()  # it was just opened: healthy for now
        self.own_timeout = 0.0
        self.set_device(dev)

    def set_device(self, dev: Any) -> None:
        """Attach the opened path device (and note the command timeout its backend enforces)."""
        self.dev = dev
        own = dev.timeout if dev is not None else 0.0  # None: the path could not be opened yet
        self.own_timeout = float(own) if own > 0 else 0.0


class MultipathDevice(DeviceBase):
    """A BlockDevice over several paths to the same storage: balances, fails over, recovers."""

    def __init__(self, paths: list[Path], identity: str, *, size: int, block_size: int,
                 opener: Opener = open_path, explicit_priorities: bool = False,
                 **options: Any) -> None:
        self.paths = paths
        self.explicit_priorities = explicit_priorities
        self._identity = identity
        self.size = size
        self.block_size = block_size
        self._opener = opener
        self.selector = DEFAULTS["selector"]
        self.policy = DEFAULTS["policy"]
        self._group: list[Path] = []
        self._rr = 0
        self._order = RangeOrder()  # requests in flight (reads shared, changes exclusive) and fences
        self._fences: list[tuple[Path, Entry]] = []  # the ranges of writes lost on a path
        self._path_back = trio.Event()
        self._no_path_since: float | None = None
        self._checker_scope: trio.CancelScope | None = None
        self._checker_done: trio.Event | None = None
        self._paths_nursery: trio.Nursery | None = None  # where the paths' own background work runs
        self._inline_probe = trio.Lock()
        self._closed = False
        self.configure(**options)

    # ------------------------------------------------------------ opening

    @classmethod
    async def open(cls, uris: Sequence[MemberURI], *, create_size: int | None = None,
                   require_all: bool = True, opener: Opener = open_path,
                   **options: Any) -> MultipathDevice:
        """Open every path, prove they reach the same storage, and build the device.

        With require_all, any path that fails to open is an error; otherwise such
        paths start failed and the checker keeps trying to open them.
        """
        if not uris:
            raise ConfigError("a multipath member needs at least one path")
        stripped = [strip_priority(u) for u in uris]
        devs: list[Any] = [None] * len(uris)
        errors: list[VstoreError | None] = [None] * len(uris)

        async def open_one(i: int, size: int | None) -> None:
            devs[i] = await opener(stripped[i][0], create_size=size)

        def failed(i: int, e: BaseException) -> None:
            errors[i] = e  # type: ignore[assignment]

        try:
            start = 0
            if create_size is not None:  # the first path creates a missing file; then the rest
                await run_all([partial(open_one, 0, create_size)], catch=VstoreError, on_error=failed)
                start = 1
            rest = list(range(start, len(uris)))
            await run_all([partial(open_one, i, None) for i in rest], catch=VstoreError,
                          on_error=lambda k, e: failed(rest[k], e))
            failed = [i for i, d in enumerate(devs) if d is None]
            if len(failed) == len(uris) or (failed and require_all):
                first = errors[failed[0]]
                raise _same_kind(
                    first, f"multipath member: cannot open path {stripped[failed[0]][0].redacted()}: {first}"
                ) from first
            identity = _check_identity([(stripped[i][0], d) for i, d in enumerate(devs) if d is not None])
            ref = next(d for d in devs if d is not None)
            for i, d in enumerate(devs):
                if d is not None and (d.size, d.block_size) != (ref.size, ref.block_size):
                    raise ConfigError(
                        f"paths {stripped[0][0].redacted()} and {stripped[i][0].redacted()} report "
                        f"different sizes ({ref.size}/{ref.block_size} vs {d.size}/{d.block_size})"
                    )
        except BaseException:
            with trio.CancelScope(shield=True):
                for d in devs:
                    if d is not None:
                        await _close_quietly(d)
            raise
        paths = []
        for i, ((uri, prio), dev) in enumerate(zip(stripped, devs, strict=True)):
            p = Path(i, uri, dev, prio if prio is not None else 0)
            if dev is None:
                p.error = str(errors[i])
                log.warning("multipath %s: path %d unavailable at open: %s", identity, i, p.error)
            paths.append(p)
        explicit = any(prio is not None for _u, prio in stripped)
        return cls(paths, identity, size=ref.size, block_size=ref.block_size, opener=opener,
                   explicit_priorities=explicit, **options)

    def configure(self, **options: Any) -> None:
        """Set selector, policy, no_path_retry and the timings (see DEFAULTS)."""
        opts = validate_options(options) if options else dict(DEFAULTS)
        for key, value in opts.items():
            setattr(self, key, value)
        if self.paths:
            self._regroup()

    # ------------------------------------------------------------ identity and status

    def identity(self) -> str:
        """The identity every path shares."""
        return self._identity

    def path_stats(self) -> list[dict[str, Any]]:
        """Per-path state, selector, in-flight I/Os, bytes and errors (URIs redacted)."""
        group = set(self._group)
        out = []
        for p in self.paths:
            state = p.state
            if state == ACTIVE and p not in group:
                state = "standby"
            out.append({
                "uri": p.uri.redacted(), "state": state, "selector": self.selector,
                "policy": self.policy, "priority": p.priority, "inflight": p.inflight,
                "ios": p.ios, "bytes": p.bytes, "errors": p.errors,
                **({"error": p.error} if p.error and p.state != ACTIVE else {}),
                **({"admin": True} if p.admin else {}),
            })
        return out

    # ------------------------------------------------------------ path states

    def _priority(self, p: Path) -> int:
        # Failover without explicit priorities: the order of the paths is the preference.
        if self.policy == "failover" and not self.explicit_priorities:
            return -p.index
        return p.priority

    def _regroup(self) -> None:
        usable = [p for p in self.paths if p.state == ACTIVE]
        if self.policy == "failover" and usable:
            top = max(self._priority(p) for p in usable)
            usable = [p for p in usable if self._priority(p) == top]
        self._group = usable
        if usable:
            self._no_path_since = None
        elif self._no_path_since is None:
            self._no_path_since = trio.current_time()

    def _fail(self, p: Path, reason: str, *, admin: bool = False) -> None:
        p.errors += 0 if admin else 1
        if admin:
            p.admin = True
        if p.state == FAILED:
            p.error = reason
            return
        now = trio.current_time()
        p.state = FAILED
        p.error = reason
        p.healthy_since = None
        if not admin:
            p.fail_times.append(now)
            while p.fail_times and p.fail_times[0] < now - self.flap_window:
                p.fail_times.popleft()
        log.log(logging.INFO if admin else logging.WARNING, "multipath %s: path %d (%s) failed: %s",
                self._identity, p.index, p.uri.redacted(), reason)
        self._regroup()

    def _reinstate(self, p: Path) -> None:
        p.state = ACTIVE
        p.error = None
        p.healthy_since = None
        p.admin = False
        # A path that answers again has a fresh session: its lost writes are gone.
        for _, fence in [f for f in self._fences if f[0] is p]:
            self._order.leave(fence)
        self._fences = [f for f in self._fences if f[0] is not p and not f[1].finished]
        log.info("multipath %s: path %d (%s) reinstated", self._identity, p.index, p.uri.redacted())
        self._regroup()
        self._path_back.set()
        self._path_back = trio.Event()

    def _flapping(self, p: Path, now: float) -> bool:
        while p.fail_times and p.fail_times[0] < now - self.flap_window:
            p.fail_times.popleft()
        return self.flap_threshold > 0 and len(p.fail_times) >= self.flap_threshold

    def fail_path(self, index: int, *, force: bool = False) -> None:
        """Drill: fail a path now; it stays failed until reinstate_path (the last one only if forced)."""
        p = self._path(index)
        others = [q for q in self.paths if q is not p and q.state == ACTIVE]
        if p.state == ACTIVE and not others and not force:
            raise ConfigError(
                f"path {index} ({p.uri.redacted()}) is the last usable path of this member; "
                "use --force to fail it anyway"
            )
        self._fail(p, "failed by administrator", admin=True)

    async def reinstate_path(self, index: int) -> None:
        """Drill: probe a path and put it back into service now (bypassing any hold)."""
        p = self._path(index)
        p.admin = False
        if p.state == ACTIVE:
            return
        try:
            await self._probe(p)
        except VstoreError as e:
            p.state, p.error = FAILED, str(e)
            raise MemberIOError(
                f"path {index} ({p.uri.redacted()}) does not answer: {e}; "
                "the checker reinstates it once it does"
            ) from None
        self._reinstate(p)

    def _path(self, index: int) -> Path:
        if not 0 <= index < len(self.paths):
            raise ConfigError(f"this member has paths 0..{len(self.paths) - 1}, not {index}")
        return self.paths[index]

    # ------------------------------------------------------------ the checker

    async def run_background(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """Run the path checker, and the paths' own background work, until cancelled or closed."""
        if self._checker_scope is not None:
            raise VstoreError("internal: the path checker of this device is already running")
        self._checker_done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._checker_scope = scope
                async with trio.open_nursery() as nursery:
                    for p in self.paths:
                        if p.dev is not None:
                            await nursery.start(p.dev.run_background)
                    self._paths_nursery = nursery  # and a path opened later starts its own there
                    task_status.started()
                    while not self._closed:
                        try:
                            await self.check_paths()
                        except Exception:  # a bug here must not take the pool (or its mount) down
                            log.exception("multipath %s: path checker round failed", self._identity)
                        await trio.sleep(self.check_interval)
                    nursery.cancel_scope.cancel()
        finally:
            self._checker_scope = None
            self._paths_nursery = None
            self._checker_done.set()

    async def check_paths(self) -> None:
        """One checker round: probe failed and held paths (and healthy ones when due)."""
        now = trio.current_time()
        due = []
        for p in self.paths:
            if p.admin:
                continue
            if p.state != ACTIVE:
                due.append(p)
            elif self.healthy_check_interval and now - p.last_check >= self.healthy_check_interval \
                    and p.inflight == 0:
                due.append(p)
        if not due:
            return
        async with trio.open_nursery() as nursery:  # the probes of one round, all bounded
            for p in due:
                nursery.start_soon(self._check_one, p)

    async def _check_one(self, p: Path) -> None:
        p.last_check = trio.current_time()
        try:
            await self._probe(p)
        except VstoreError as e:  # MemberIOError, or NotFoundError/AuthError from a new login
            if p.state == ACTIVE:
                self._fail(p, f"path checker: {e}")
            else:
                p.state, p.error, p.healthy_since = FAILED, str(e), None
            return
        if p.state == ACTIVE or p.admin:
            return
        if p.dirty:  # writes it acknowledged before it failed: make them stable through it
            try:
                with trio.fail_after(self.probe_timeout):
                    await p.dev.flush()
            except (VstoreError, trio.TooSlowError) as e:
                p.state, p.error, p.healthy_since = FAILED, f"flush after recovery: {e}", None
                return
            p.dirty = False
        now = trio.current_time()
        if p.healthy_since is None:
            p.healthy_since = now
        hold = self.failback_delay
        if self._flapping(p, now):
            hold = max(hold, self.flap_hold)
        if not self._group or now - p.healthy_since >= hold:
            self._reinstate(p)
        else:
            p.state = PENDING

    async def _probe(self, p: Path) -> None:
        """Raise MemberIOError unless the path answers (opening it first if it never was)."""
        with trio.move_on_after(self.probe_timeout) as cs:
            if p.dev is None:
                dev = await self._opener(p.uri)
                ident = dev.identity()
                if ident != self._identity or dev.size != self.size:
                    await _close_quietly(dev)
                    raise MemberIOError(
                        f"{p.uri.redacted()} reaches other storage ({ident}, not {self._identity})")
                if self._paths_nursery is not None:
                    await self._paths_nursery.start(dev.run_background)
                p.set_device(dev)
                return
            await p.dev.probe(self.probe_timeout)
        if cs.cancelled_caught:
            raise DeviceTimeoutError(f"no answer to the path probe within {self.probe_timeout:g} s")

    # ------------------------------------------------------------ choosing a path

    def _pick(self, nbytes: int) -> Path | None:
        group = self._group
        n = len(group)
        if n <= 1:
            return group[0] if n else None
        self._rr = rr = (self._rr + 1) % n
        sel = self.selector
        if sel == "round-robin":
            return group[rr]
        best = group[rr]
        if sel == "queue-length":
            for k in range(1, n):
                p = group[(rr + k) % n]
                if p.inflight < best.inflight:
                    best = p
            return best
        best_score = (best.inflight_bytes + nbytes) / best.rate
        for k in range(1, n):
            p = group[(rr + k) % n]
            score = (p.inflight_bytes + nbytes) / p.rate
            if score < best_score:
                best, best_score = p, score
        return best

    async def _wait_for_path(self) -> None:
        since = self._no_path_since
        if since is None:
            if self._group:
                return
            since = self._no_path_since = trio.current_time()
        deadline = since + self.no_path_retry
        if self._closed or trio.current_time() >= deadline:
            raise NoPathError(self._no_path_message())
        with trio.move_on_at(deadline):
            if self._checker_scope is not None or self._inline_probe.locked():
                await self._path_back.wait()
                return
            async with self._inline_probe:  # nobody runs the checker: probe from here
                while not self._group:
                    await self.check_paths()
                    if self._group:
                        return
                    await trio.sleep(self.check_interval)
            return
        if not self._group:
            raise NoPathError(self._no_path_message())

    def _no_path_message(self) -> str:
        detail = "; ".join(f"path {p.index} {p.uri.redacted()}: {p.error or p.state}" for p in self.paths)
        return f"no usable path to {self._identity} (waited {self.no_path_retry:g} s): {detail}"

    # ------------------------------------------------------------ ordering of ranges

    def _fence(self, p: Path, start: int, end: int, entry: Entry | None) -> None:
        # The write may still land through p: later changes of the range wait (reads do
        # not) until p is reinstated or stale_write_hold has passed. The fence takes the
        # write's place in line, so a change already waiting for the write waits for it too.
        if entry is None:
            return
        deadline = trio.current_time() + self.stale_write_hold
        self._fences = [f for f in self._fences if not f[1].finished]
        self._fences.append((p, self._order.fence(start, end, deadline, behind=entry)))

    # ------------------------------------------------------------ I/O on one path

    async def _attempt(self, p: Path, kind: int, offset: int, arg: Any, nbytes: int) -> Any:
        dev = p.dev
        if kind == 0:
            coro = dev.read(offset, arg)
        elif kind == 1:
            coro = dev.write(offset, arg)
        elif kind == 2:
            coro = dev.discard(offset, arg)
        elif kind == _READV:
            coro = dev.readv_into(offset, arg)
        elif kind == _WRITEV:
            coro = dev.writev(offset, arg)
        else:
            coro = dev.flush()
        # A cancel scope per I/O costs more than the rest of this layer: skip it when the path's
        # backend enforces a command timeout no longer than ours (iSCSI's session watchdog).
        if not self.io_timeout or 0 < p.own_timeout <= self.io_timeout:
            return await coro
        with trio.move_on_after(self.io_timeout):
            return await coro
        raise DeviceTimeoutError(f"no answer within {self.io_timeout:g} s")

    async def _io(self, kind: int, offset: int, arg: Any, nbytes: int,
                  entry: Entry | None = None) -> Any:
        """Run one I/O on some path, failing over until it succeeds or no path is left."""
        while True:
            p = self._pick(nbytes)
            if p is None:
                await self._wait_for_path()
                continue
            if p.inflight == 0:
                p.busy_mark = trio.current_time()
            p.inflight += 1
            p.inflight_bytes += nbytes
            try:
                result = await self._attempt(p, kind, offset, arg, nbytes)
            except VstoreError as e:
                p.inflight -= 1
                p.inflight_bytes -= nbytes
                if _target_error(e) or isinstance(e, _REQUEST_ERRORS):
                    p.errors += 1
                    raise
                if kind in _CHANGES:
                    self._fence(p, offset, offset + nbytes, entry)
                self._fail(p, str(e))
                continue
            except BaseException:
                p.inflight -= 1
                p.inflight_bytes -= nbytes
                if kind in _CHANGES:  # abandoned (cancelled): it may still land
                    self._fence(p, offset, offset + nbytes, entry)
                raise
            p.inflight -= 1
            p.inflight_bytes -= nbytes
            p.ios += 1
            p.bytes += nbytes
            if kind in _CHANGES:
                p.dirty = True
                # Paths that keep unstable writes of their own (NFS) must not lay those older
                # bytes over this newer write when they read the range later.
                for q in self.paths:
                    if q is not p and q.dev is not None:
                        q.dev.forget_range(offset, nbytes)
            # Throughput over busy time (time with something in flight), as a moving average;
            # a flush moves no bytes and would only drag the estimate down.
            now = trio.current_time()
            if kind != 3:
                p.acc_time += now - p.busy_mark
                p.acc_bytes += nbytes
            p.busy_mark = now
            if p.acc_time >= _RATE_SAMPLE:
                sample = p.acc_bytes / p.acc_time
                p.rate += _RATE_ALPHA * (sample - p.rate)
                p.acc_bytes = 0
                p.acc_time = 0.0
            return result

    # ------------------------------------------------------------ BlockDevice

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read length bytes at offset through some path."""
        self.check(offset, length)
        async with self._order.hold(offset, offset + length, shared=True) as entry:
            return await self._io(0, offset, length, length, entry)

    async def write(self, offset: int, data: Buffer) -> None:
        """Write the bytes at offset through some path (never overlapping another path's write)."""
        buf = as_u8(data)
        n = len(buf)
        self.check(offset, n)
        async with self._order.hold(offset, offset + n, shared=False) as entry:
            await self._io(1, offset, buf, n, entry)

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Read consecutive bytes at offset into the views through some path (one request, as read)."""
        n = total_bytes(views)
        self.check(offset, n)
        async with self._order.hold(offset, offset + n, shared=True) as entry:
            await self._io(_READV, offset, views, n, entry)

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Write the views as consecutive bytes at offset through some path (one request, as write)."""
        n = total_bytes(views)
        self.check(offset, n)
        async with self._order.hold(offset, offset + n, shared=False) as entry:
            await self._io(_WRITEV, offset, views, n, entry)

    async def discard(self, offset: int, length: int) -> None:
        """Discard a range through some path (ordered like a write)."""
        self.check(offset, length)
        async with self._order.hold(offset, offset + length, shared=False) as entry:
            await self._io(2, offset, length, length, entry)

    async def flush(self) -> None:
        """Every acknowledged write is stable: flush each path that carried writes since its last flush."""
        # A dirty path that is down hands what it acknowledged but kept unstable (NFS resends
        # those after a server restart) to a live path, whose flush below proves it stable.
        # It stays dirty: the checker flushes it through itself when it answers again.
        live = [p for p in self.paths if p.state == ACTIVE and p.dev is not None]
        for p in self.paths:
            if p.dirty and p.state != ACTIVE and p.dev is not None and live:
                unstable = p.dev.take_unstable()
                if unstable:
                    live[0].dev.adopt_unstable(unstable)
                    live[0].dirty = True
        targets = [p for p in self.paths if p.dirty and p.state == ACTIVE]
        need_any = any(p.dirty and p.state != ACTIVE for p in self.paths)
        for p in targets:
            p.dirty = False
        failed: list[Path] = []

        async def one(p: Path) -> None:
            try:
                await self._attempt(p, 3, 0, None, 0)
            except VstoreError as e:
                p.dirty = True
                if _target_error(e) or isinstance(e, _REQUEST_ERRORS):
                    raise
                self._fail(p, str(e))
                failed.append(p)

        if targets:
            await run_all([partial(one, p) for p in targets])
        if (need_any or failed) and len(failed) == len(targets):
            # The storage's cache is shared by its paths (a LUN's cache, a file on the server):
            # a flush through a live path makes what the lost path carried stable now.
            await self._io(3, 0, None, 0)

    async def aclose(self) -> None:
        """Stop the checker and close every path."""
        if self._closed:
            return
        self._closed = True
        self._path_back.set()
        if self._checker_scope is not None:
            self._checker_scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self._checker_done.wait()
        with trio.CancelScope(shield=True):
            for p in self.paths:
                if p.dev is not None:
                    await _close_quietly(p.dev)

    def __repr__(self) -> str:
        return f"<MultipathDevice {self._identity} paths={len(self.paths)} size={self.size}>"


def _same_kind(exc: VstoreError, message: str) -> VstoreError:
    """An error of exc's class (so its exit code holds) with a new message."""
    try:
        return type(exc)(message)
    except TypeError:  # a class that needs more than a message (ScsiError)
        return MemberIOError(message)


def _target_error(exc: BaseException) -> bool:
    """An error about the medium or the request (same on every path), not about the path."""
    return getattr(exc, "sense_key", None) in _TARGET_SENSE_KEYS


def _check_identity(opened: list[tuple[MemberURI, Any]]) -> str:
    idents = []
    for uri, dev in opened:
        ident = dev.identity()
        if ident is None:
            raise ConfigError(
                f"cannot prove that the paths reach the same storage: {uri.redacted()} "
                "has no identity (its backend does not support multipath)"
            )
        idents.append(ident)
    ref = idents[0]
    odd = [(uri, ident) for (uri, _d), ident in zip(opened, idents, strict=True) if ident != ref]
    if odd:
        detail = ", ".join(f"{u.redacted()} is {i}" for u, i in odd)
        raise ConfigError(
            f"the paths of one member reach different storage: {opened[0][0].redacted()} is {ref}, "
            f"but {detail}"
        )
    return ref


async def _close_quietly(dev: Any) -> None:
    try:
        await dev.aclose()
    except VstoreError as e:
        log.warning("closing path %r: %s", dev, e)
