"""Per-layer accounting of the data path: where a request's time goes.

Each layer keeps a ``LayerStats``: requests, bytes and the wall time they spent
inside it (from entry to return, so a layer's time includes the layers below).
The RAID layout also counts what it waited for — stripe locks, the journal or
bitmap commit — and its member I/O (runs issued, and the time of the batch),
and the I/O threads count their wake-ups of the trio thread. ``snapshot``
gives the JSON that ``.vstore/fuse-stats`` and ``vstore status --json`` show.

Counting costs two ``perf_counter_ns`` calls and a few additions per request,
so it is always on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any

now_ns = perf_counter_ns


@dataclass
class OpStats:
    """One kind of operation in one layer: how many, how many bytes, how long in total."""

    count: int = 0
    bytes: int = 0
    ns: int = 0

    def add(self, nbytes: int, ns: int) -> None:
        """Count one operation of nbytes that took ns."""
        self.count += 1
        self.bytes += nbytes
        self.ns += ns

    def as_dict(self) -> dict[str, Any]:
        """JSON-able view with the mean time per operation in microseconds."""
        mean = self.ns / self.count / 1000 if self.count else 0.0
        return {"count": self.count, "bytes": self.bytes, "total_ms": round(self.ns / 1e6, 3),
                "mean_us": round(mean, 1)}


@dataclass
class LayerStats:
    """Counters of one layer: reads, writes, flushes and named waits."""

    read: OpStats = field(default_factory=OpStats)
    write: OpStats = field(default_factory=OpStats)
    flush: OpStats = field(default_factory=OpStats)
    waits: dict[str, OpStats] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    def bump(self, name: str, n: int = 1) -> None:
        """Add n to a plain counter (member runs issued, ...)."""
        self.counters[name] = self.counters.get(name, 0) + n

    def wait(self, name: str, ns: int, nbytes: int = 0) -> None:
        """Count time spent waiting for something (a lock, the journal, member I/O)."""
        w = self.waits.get(name)
        if w is None:
            w = self.waits[name] = OpStats()
        w.add(nbytes, ns)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able view."""
        out = {"read": self.read.as_dict(), "write": self.write.as_dict(), "flush": self.flush.as_dict()}
        for name, w in sorted(self.waits.items()):
            out[name] = w.as_dict()
        out.update(sorted(self.counters.items()))
        return out

    def reset(self) -> None:
        """Start counting afresh."""
        self.read, self.write, self.flush, self.waits, self.counters = OpStats(), OpStats(), OpStats(), {}, {}


# Hand-offs between the trio thread and other threads, process-wide.
HANDOFFS: dict[str, int] = {"kernel_thread_calls": 0}
