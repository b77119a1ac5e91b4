"""RAID layouts through the engine (no FUSE), each workload against one member of the same kind.

Run ``python -m bench.layouts [--quick] [--kinds memory,file]``. For linear, raid0,
raid1, raid5, raid6 and raid10 over memory members and over file members (in a
temporary directory on the repository's disk, page cache included): sequential
read and write of 1 MiB requests (one in flight), random read and write of 4 KiB
and 64 KiB requests (several in flight, one trio task each), a degraded read
(one member failed), and a rebuild of one member (see ``rebuild``). Each figure
sits next to the same workload on a single member device of the same kind; the
ratio is layout / single member. Write workloads on file members end with a
flush, inside the timed part. Two further checks: raid5 full-stripe sequential
write against raid0 over the same members, and raid0 sequential read over
memory against a plain memory copy of the same bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trio

from backends.memory import MemoryDevice
from vstore.raid import kernels, make_layout
from vstore.stack.checksum import ChecksumDevice, unknown_area
from vstore.stack.device import BlockDevice

KiB, MiB = 1 << 10, 1 << 20
ROOT = Path(__file__).resolve().parent.parent
CHUNK = 64 * KiB

# Member counts: raid5 and raid6 have 4 data chunks per row, so a 1 MiB request
# is exactly 4 full stripes of 64 KiB chunks.
MEMBERS = {"linear": 4, "raid0": 4, "raid1": 2, "raid5": 5, "raid6": 6, "raid10": 4}
LEVELS = tuple(MEMBERS)


@dataclass(frozen=True)
class Workload:
    """One I/O pattern: operation, request size, requests in flight, sequential or random."""

    name: str
    op: str  # "read" or "write"
    bs: int
    qd: int
    sequential: bool


FULL_WORKLOADS = (
    Workload("seq read 1M", "read", MiB, 1, True),
    Workload("seq write 1M", "write", MiB, 1, True),
    Workload("rand read 4K qd16", "read", 4 * KiB, 16, False),
    Workload("rand write 4K qd16", "write", 4 * KiB, 16, False),
    Workload("rand read 64K qd16", "read", 64 * KiB, 16, False),
    Workload("rand write 64K qd16", "write", 64 * KiB, 16, False),
)
QUICK_WORKLOADS = (FULL_WORKLOADS[0], FULL_WORKLOADS[1], FULL_WORKLOADS[2], FULL_WORKLOADS[3])
DEGRADED = Workload("degraded read 1M", "read", MiB, 1, True)
# Block checksums (vstore create --checksums) against the same layout without: the issue's
# target is 0.85 for sequential reads and writes.
CHECKSUM_LEVELS = ("raid5", "raid1")
CHECKSUM_WORKLOADS = (FULL_WORKLOADS[1], FULL_WORKLOADS[0])
REBUILD = "rebuild 1 member"
REBUILD_API = "rebuild via replace"


def scratch_dir() -> Path:
    """A temporary directory on the repository's disk (not tmpfs) for file members."""
    tmp = Path(tempfile.gettempdir())
    try:
        same_disk = os.stat(tmp).st_dev == os.stat(ROOT).st_dev
    except OSError:
        same_disk = False
    base = tmp if same_disk else ROOT / "bench" / "results" / "tmp"  # git-ignored
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="vstore-bench-", dir=base))


class Members:
    """Makes member devices of one kind ("memory" or "file"), and closes them."""

    def __init__(self, kind: str, member_size: int, directory: Path | None) -> None:
        self.kind = kind
        self.member_size = member_size
        self.directory = directory
        self.opened: list[BlockDevice] = []
        self.count = 0

    async def make(self, n: int) -> list[BlockDevice]:
        """n fresh members, filled with random bytes (so reads touch real data)."""
        fill = np.random.default_rng(n).integers(0, 256, MiB, dtype=np.uint8)
        out: list[BlockDevice] = []
        for _ in range(n):
            self.count += 1
            if self.kind == "memory":
                store = np.empty(self.member_size, np.uint8)
                store.reshape(-1, MiB)[:] = fill
                dev: BlockDevice = MemoryDevice(store)
            else:
                from vstore.uri import open_uri

                assert self.directory is not None
                path = self.directory / f"m{self.count}.img"
                dev = await open_uri(f"file://{path}", create_size=self.member_size)
                for off in range(0, self.member_size, MiB):
                    await dev.write(off, fill)
                await dev.flush()
            self.opened.append(dev)
            out.append(dev)
        return out

    async def release(self, devs: list[BlockDevice]) -> None:
        """Close these members (and delete their files) to free memory and disk."""
        for dev in devs:
            with contextlib.suppress(Exception):
                await dev.aclose()
            if dev in self.opened:
                self.opened.remove(dev)
            path = getattr(dev, "path", None)
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    async def aclose(self) -> None:
        """Close every member made and delete file members."""
        for dev in self.opened:
            with contextlib.suppress(Exception):
                await dev.aclose()
        self.opened.clear()
        if self.directory is not None:
            for p in self.directory.glob("m*.img"):
                with contextlib.suppress(OSError):
                    p.unlink()


async def run_workload(dev: BlockDevice, w: Workload, seconds: float, span: int, *, flush: bool) -> dict:
    """Run one workload on a device for about ``seconds``; GB/s and IOPS (a write's flush included)."""
    span = max(w.bs, span - span % w.bs)
    slots = span // w.bs
    payload = np.random.default_rng(w.bs).integers(0, 256, w.bs, dtype=np.uint8)
    rng = np.random.default_rng(12345)
    offsets = (rng.integers(0, slots, 1 << 16) * w.bs).tolist()
    state = {"next": 0, "ios": 0}
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            i = state["next"]
            state["next"] = i + 1
            off = (i % slots) * w.bs if w.sequential else offsets[i & 0xFFFF]
            if w.op == "read":
                await dev.read(off, w.bs)
            else:
                await dev.write(off, payload)
            state["ios"] += 1
            # Memory members never block: let the other workers and trio run.
            await trio.lowlevel.checkpoint()

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(w.qd):
            nursery.start_soon(worker)
    if flush and w.op == "write":
        await dev.flush()
    elapsed = time.perf_counter() - t0
    ios = state["ios"]
    return {"gbs": ios * w.bs / elapsed / 1e9, "iops": ios / elapsed, "ios": ios, "seconds": elapsed}


async def rebuild(layout, spare: BlockDevice, member: int, seconds: float) -> dict:
    """Rebuild member ``member`` onto ``spare`` in 1 MiB steps with ``member_bytes``; member GB/s.

    ``member_bytes`` is the engine's rebuild primitive (what a replacement member
    must hold, computed from the others); the timed loop is what a rebuild does:
    compute, write to the spare. Stops after ``seconds`` or at the member's end.
    """
    end = min(layout.members[member].size, spare.size)
    done = 0
    t0 = time.perf_counter()
    while done < end and time.perf_counter() - t0 < seconds:
        n = min(MiB, end - done)
        await spare.write(done, await layout.member_bytes(member, done, n))
        done += n
    await spare.flush()
    elapsed = time.perf_counter() - t0
    return {"gbs": done / elapsed / 1e9, "bytes": done, "seconds": elapsed}


async def copy_member(src: BlockDevice, dst: BlockDevice, seconds: float) -> dict:
    """The single-member twin of a rebuild: copy one device to another in 1 MiB steps."""
    end = min(src.size, dst.size)
    done = 0
    t0 = time.perf_counter()
    while done < end and time.perf_counter() - t0 < seconds:
        n = min(MiB, end - done)
        await dst.write(done, await src.read(done, n))
        done += n
    await dst.flush()
    elapsed = time.perf_counter() - t0
    return {"gbs": done / elapsed / 1e9, "bytes": done, "seconds": elapsed}


async def pool_rebuild(level: str, n: int, kind: str, member_size: int, directory: Path | None) -> dict | None:
    """Rebuild rate of the pool's own API (``vstore.ops.rebuild.replace``): fail member 0, replace it.

    A pool of ``n`` fresh members of the kind is created in a scratch config
    directory, member 0 is failed and replaced by a new member; GB/s of member
    data rebuilt, as ``replace`` reports it. None when the API is not there.
    """
    try:
        from vstore.ops import rebuild as rb
        from vstore.pool.home import Home
        from vstore.pool.pool import Pool
    except ImportError:
        return None
    from backends import memory

    tag = uuid.uuid4().hex[:8]
    home = Path(tempfile.mkdtemp(prefix="vstore-bench-home-"))
    if kind == "memory":
        uris = [f"memory://bench-{tag}-{i}?size={member_size}" for i in range(n + 1)]
        size = None
    else:
        assert directory is not None
        uris = [f"file://{directory}/pool-{tag}-{i}.img" for i in range(n + 1)]
        size = member_size
    pool = None
    try:
        pool = await Pool.create(Home(home), "bench", level, uris[:n], chunk=CHUNK, size=size)
        await pool.fail_member(0)
        res = await rb.replace(pool, 0, uris[n], size=size, speed={"min": 0, "max": 0})
        return {"gbs": res["bytes"] / max(res["seconds"], 1e-6) / 1e9, "bytes": res["bytes"],
                "seconds": res["seconds"]}
    finally:
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.aclose()
        shutil.rmtree(home, ignore_errors=True)
        for i in range(n + 1):
            memory.forget(f"bench-{tag}-{i}")
        if directory is not None:
            for p in directory.glob(f"pool-{tag}-*.img"):
                with contextlib.suppress(OSError):
                    p.unlink()


def memcpy_bandwidth(span: int, seconds: float) -> float:
    """GB/s of copying 1 MiB pieces of a ``span``-byte buffer into fresh arrays (numpy)."""
    src = np.ones(span, np.uint8)
    n = span // MiB
    best = 0.0
    for _ in range(3):
        i, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            off = (i % n) * MiB
            src[off : off + MiB].copy()
            i += 1
        best = max(best, i * MiB / (time.perf_counter() - t0) / 1e9)
    return best


def _row(kind: str, level: str, n: int, workload: str, res: dict, base: dict, **extra) -> dict:
    row = {
        "kind": kind,
        "level": level,
        "members": n,
        "workload": workload,
        "gbs": res["gbs"],
        "single_gbs": base["gbs"],
        "ratio": res["gbs"] / base["gbs"],
    }
    if "iops" in res:
        row["iops"] = res["iops"]
        row["single_iops"] = base["iops"]
    row.update(extra)
    return row


async def best_of(cands: dict[str, Callable[[float], Awaitable[dict]]], seconds: float, rounds: int) -> dict[str, dict]:
    """Each candidate warmed up, then run in turns for ``rounds`` rounds of ``seconds / rounds``; best GB/s kept.

    Taking turns round by round means a noisy neighbour on a shared machine slows
    the layout and its baseline alike instead of skewing their ratio.
    """
    for fn in cands.values():
        await fn(min(0.03, seconds / 4))  # numba compiles on first use; caches warm
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, fn in cands.items():
            res = await fn(seconds / rounds)
            if name not in best or res["gbs"] > best[name]["gbs"]:
                best[name] = res
    return best


async def bench_kind(kind: str, quick: bool, log: Callable[[str], None]) -> tuple[list[dict], list[dict], list[dict]]:
    """Every level and workload over members of one kind, each next to one member: (rows, checks, skipped)."""
    member_size = (16 if quick else 64) * MiB
    seconds, rounds = (0.06, 1) if quick else (0.6, 3)
    workloads = QUICK_WORKLOADS if quick else FULL_WORKLOADS
    flush = kind == "file"
    directory = scratch_dir() if kind == "file" else None
    members = Members(kind, member_size, directory)
    rows: list[dict] = []
    checks: list[dict] = []
    skipped: list[dict] = []

    def wl(dev: BlockDevice, w: Workload) -> Callable[[float], Awaitable[dict]]:
        return lambda sec: run_workload(dev, w, sec, dev.size, flush=flush)

    try:
        kernels.precompile(sorted({MEMBERS["raid5"] - 1, MEMBERS["raid6"] - 2}))
        single, spare = await members.make(2)
        for level in LEVELS:
            n = MEMBERS[level]
            devs = await members.make(n)
            layout = make_layout(level, devs, CHUNK)
            log(f"layouts: {kind} {level} x{n}")
            for w in workloads:
                got = await best_of({"layout": wl(layout, w), "single": wl(single, w)}, seconds, rounds)
                rows.append(_row(kind, level, n, w.name, got["layout"], got["single"]))
                if level == "raid5" and w.name == "seq write 1M":
                    # raid0 over the very same members, the same 1 MiB (full-stripe) writes.
                    r0 = make_layout("raid0", devs, CHUNK)
                    both = await best_of({"raid5": wl(layout, w), "raid0": wl(r0, w)}, seconds, rounds)
                    checks.append(_check(kind, f"raid5 full-stripe seq write 1M / raid0 over the same {n} members",
                                         both["raid5"]["gbs"], both["raid0"]["gbs"], 0.8))
                if level == "raid0" and kind == "memory" and w.name == "seq read 1M":
                    span = layout.size

                    async def memcpy(sec: float, span: int = span) -> dict:
                        return {"gbs": memcpy_bandwidth(span, sec)}

                    both = await best_of({"raid0": wl(layout, w), "memcpy": memcpy}, seconds, rounds)
                    checks.append(_check(kind, "raid0 seq read 1M over memory / memory copy of 1 MiB pieces",
                                         both["raid0"]["gbs"], both["memcpy"]["gbs"], 0.7))
            if level in CHECKSUM_LEVELS:
                # The same layout with block checksums, over members of its own (filled through it
                # first, so that reads verify real checksums), next to the layout without.
                ckdevs = await members.make(n)
                for d in ckdevs:  # members full of random bytes: as after create --force
                    await unknown_area(d)
                ck = make_layout(level, [ChecksumDevice(d) for d in ckdevs], CHUNK)
                fill = np.random.default_rng(7).integers(0, 256, MiB, dtype=np.uint8)
                for off in range(0, ck.size - MiB + 1, MiB):
                    await ck.write(off, fill)
                await ck.flush()
                for w in CHECKSUM_WORKLOADS:
                    both = await best_of({"cksum": wl(ck, w), "plain": wl(layout, w)}, seconds, rounds)
                    rows.append(_row(kind, level, n, f"{w.name}, checksums", both["cksum"], both["plain"],
                                     method="block checksums (create --checksums); single: the same layout "
                                            "without"))
                    checks.append(_check(kind, f"{level} {w.name} with block checksums / without",
                                         both["cksum"]["gbs"], both["plain"]["gbs"], 0.85))
                assert not any(ck.checksum_errors), "a checksum error in the benchmark"
                await members.release(ckdevs)
            if layout.redundancy:
                degraded = make_layout(level, devs, CHUNK, failed=[0])
                got = await best_of({"layout": wl(degraded, DEGRADED), "single": wl(single, DEGRADED)},
                                    seconds, rounds)
                rows.append(_row(kind, level, n, DEGRADED.name, got["layout"], got["single"], failed=[0]))
                got = await best_of({"layout": lambda sec, d=degraded: rebuild(d, spare, 0, sec),
                                     "single": lambda sec: copy_member(single, spare, sec)}, seconds, rounds)
                rows.append(_row(kind, level, n, REBUILD, got["layout"], got["single"],
                                 method="member_bytes + write to a spare, 1 MiB steps; single: copy one member"))
                api = await pool_rebuild(level, n, kind, member_size, directory)
                if api is None:
                    skipped.append({"kind": kind, "level": level, "workload": REBUILD_API,
                                    "why": "no vstore.ops.rebuild (replace) API"})
                else:
                    rows.append(_row(kind, level, n, REBUILD_API, api, got["single"],
                                     method="vstore.ops.rebuild.replace on a pool, speed unlimited; "
                                            "single: copy one member"))
            else:
                for name in (DEGRADED.name, REBUILD, REBUILD_API):
                    skipped.append({"kind": kind, "level": level, "workload": name,
                                    "why": f"{level} has no redundancy"})
            await members.release(devs)
    finally:
        await members.aclose()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
    return rows, checks, skipped


def _check(kind: str, text: str, num: float, den: float, target: float) -> dict:
    return {"kind": kind, "check": text, "value": num / den, "target": target,
            "numerator_gbs": num, "denominator_gbs": den}


def run(quick: bool, kinds: tuple[str, ...] = ("memory", "file"), log: Callable[[str], None] = print) -> dict:
    """Measure every layout over each kind of member; a dict of rows, checks and skipped cases."""
    out: dict = {"rows": [], "checks": [], "skipped": [], "chunk": CHUNK, "members": MEMBERS}

    async def main() -> None:
        for kind in kinds:
            rows, checks, skipped = await bench_kind(kind, quick, log)
            out["rows"] += rows
            out["checks"] += checks
            out["skipped"] += skipped

    trio.run(main)
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the layout benchmark alone and print its table."""
    from bench import report

    ap = argparse.ArgumentParser(prog="python -m bench.layouts", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kinds", default="memory,file")
    args = ap.parse_args(argv)
    res = run(args.quick, tuple(args.kinds.split(",")))
    report.show_layouts(res)


if __name__ == "__main__":
    main()
