"""A fault-injecting wrapper device for tests, like QEMU's blkdebug.

``FaultDevice(dev)`` passes I/O through to ``dev`` until told otherwise:

    f.fail("read")                 # every read raises MemberIOError from now on
    f.fail("write", after=3)       # the 4th write from now, and every one after, fails
    f.fail("all", after=10, count=1)   # only the 11th operation fails (once)
    f.corrupt_reads(after=0, count=1)  # the next read returns flipped bytes
    f.short_reads()                # reads come back short (a backend's "short read" error)
    f.shrink(at=1 << 20)           # the member ends at 1 MiB: I/O reaching past it fails
    f.heal()                       # forget every rule

Operation kinds are ``read``, ``write``, ``flush``, ``discard``; ``all`` means
any of them. Counters (``ops``) record what passed through, so tests can check
that a layout did or did not touch a member. A failed write leaves the device
unchanged (``torn=True`` writes the first half first, as a crash might). The
vectored pair counts and fails as ``read``/``write``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trio

from vstore.errors import ConfigError, MemberIOError
from vstore.stack.device import BlockDevice, Buffer, FilterDevice, as_u8
from vstore.stack.iovec import total_bytes

KINDS = ("read", "write", "flush", "discard")


@dataclass
class FaultRule:
    """One armed fault: which operations, how many to let pass first, how many to hit."""

    kinds: frozenset[str]
    action: str  # "fail" or "corrupt"
    after: int = 0
    count: int | None = None  # None: forever
    torn: bool = False
    style: str = "error"  # "error", "short" (fewer bytes than asked) or "shrink" (the member ends)
    beyond: int | None = None  # shrink: only operations reaching past this offset are hit

    def matches(self, kind: str, end: int | None = None) -> bool:
        """Count this operation; True when the fault hits it."""
        if kind not in self.kinds:
            return False
        if self.beyond is not None and (end is None or end <= self.beyond):
            return False
        if self.after > 0:
            self.after -= 1
            return False
        if self.count is not None:
            if self.count <= 0:
                return False
            self.count -= 1
        return True


def _kinds(kind: str) -> frozenset[str]:
    if kind == "all":
        return frozenset(KINDS)
    if kind not in KINDS:
        raise ConfigError(f"unknown operation kind {kind!r} (known: all, {', '.join(KINDS)})")
    return frozenset([kind])


class FaultDevice(FilterDevice):
    """A BlockDevice that forwards to another and injects failures and corruption on command."""

    def __init__(self, inner: BlockDevice, name: str = "", delay: float = 0.0) -> None:
        super().__init__(inner)
        self.name = name or repr(inner)
        self.delay = delay  # seconds each operation sleeps first: widens race windows
        self.rules: list[FaultRule] = []
        self.ops = dict.fromkeys(KINDS, 0)
        self.faults_hit = 0
        self._last: FaultRule | None = None

    def fail(self, kind: str = "all", *, after: int = 0, count: int | None = None, torn: bool = False) -> None:
        """Make operations of a kind raise MemberIOError, after letting `after` pass."""
        self.rules.append(FaultRule(_kinds(kind), "fail", after, count, torn))

    def corrupt_reads(self, *, after: int = 0, count: int | None = None) -> None:
        """Make reads return their bytes inverted, after letting `after` reads pass."""
        self.rules.append(FaultRule(_kinds("read"), "corrupt", after, count))

    def short_reads(self, *, after: int = 0, count: int | None = None) -> None:
        """Make reads fail as a backend reports fewer bytes than asked (a short read)."""
        self.rules.append(FaultRule(_kinds("read"), "fail", after, count, style="short"))

    def shrink(self, at: int) -> None:
        """Make the member end at byte `at`: reads, writes and discards reaching past it fail."""
        self.rules.append(FaultRule(frozenset({"read", "write", "discard"}), "fail", style="shrink", beyond=at))

    def heal(self) -> None:
        """Forget every armed fault."""
        self.rules.clear()

    async def _pause(self) -> None:
        # Always a scheduling point, as a real device's I/O is: concurrent requests
        # through the wrapper interleave the way they would in production.
        if self.delay:
            await trio.sleep(self.delay)
        else:
            await trio.lowlevel.checkpoint()

    def _hit(self, kind: str, end: int | None = None) -> FaultRule | None:
        self.ops[kind] += 1
        hit = None
        for rule in self.rules:
            if rule.matches(kind, end) and hit is None:
                hit = rule
        if hit is not None:
            self.faults_hit += 1
            self._last = hit
        return hit

    def _error(self, kind: str, offset: int | None = None) -> MemberIOError:
        where = f" at {offset}" if offset is not None else ""
        rule = self._last
        if rule is not None and rule.style == "short":
            return MemberIOError(f"{self.name}: short {kind}{where}: fewer bytes than asked (injected)")
        if rule is not None and rule.style == "shrink":
            return MemberIOError(f"{self.name}: short {kind}{where}: the member ends at {rule.beyond} "
                                 "(injected shrink)")
        return MemberIOError(f"{self.name}: injected {kind} failure{where}")

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read, unless a rule fails or corrupts it."""
        self.check(offset, length)
        await self._pause()
        rule = self._hit("read", offset + length)
        if rule is not None and rule.action == "fail":
            raise self._error("read", offset)
        data = as_u8(await self.inner.read(offset, length))
        if rule is not None:  # corrupt
            data = data ^ np.uint8(0xFF)
        return data

    async def write(self, offset: int, data: Buffer) -> None:
        """Write, unless a rule fails it (possibly after writing half of it)."""
        buf = as_u8(data)
        self.check(offset, len(buf))
        await self._pause()
        rule = self._hit("write", offset + len(buf))
        if rule is not None:
            if rule.torn and len(buf) > 1:
                await self.inner.write(offset, buf[: len(buf) // 2])
            raise self._error("write", offset)
        await self.inner.write(offset, buf)

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Read into the views, unless a rule fails or corrupts it (counted and ruled as a read)."""
        self.check(offset, total_bytes(views))
        await self._pause()
        rule = self._hit("read", offset + total_bytes(views))
        if rule is not None and rule.action == "fail":
            raise self._error("read", offset)
        await self.inner.readv_into(offset, views)
        if rule is not None:  # corrupt
            for v in views:
                np.invert(v, out=v)

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Write the views, unless a rule fails it (counted and ruled as a write; torn: first half lands)."""
        n = total_bytes(views)
        self.check(offset, n)
        await self._pause()
        rule = self._hit("write", offset + n)
        if rule is not None:
            if rule.torn and n > 1:
                await self.inner.writev(offset, _first_bytes(views, n // 2))
            raise self._error("write", offset)
        await self.inner.writev(offset, views)

    async def flush(self) -> None:
        """Flush, unless a rule fails it."""
        if self._hit("flush") is not None:
            raise self._error("flush")
        await self.inner.flush()

    async def discard(self, offset: int, length: int) -> None:
        """Discard, unless a rule fails it."""
        self.check(offset, length)
        if self._hit("discard", offset + length) is not None:
            raise self._error("discard", offset)
        await self.inner.discard(offset, length)


def _first_bytes(views: list[np.ndarray], n: int) -> list[np.ndarray]:
    """The views cut down to their first n bytes together."""
    out = []
    for v in views:
        if n <= 0:
            break
        u = as_u8(v)
        out.append(u[:n])
        n -= len(u)
    return out
