"""Rebuild throughput of `vstore replace` next to a plain copy of a member of the same size.

Run ``python -m bench.rebuild [--quick]``. For each level, a pool of file
members is created in a scratch directory on the repository's disk, the members'
data areas are filled with random bytes, member 0 is failed and replaced by a new
file (``vstore.ops.rebuild.replace``, speed unlimited); the figure is member bytes
rebuilt per second. The baseline, measured in the same run on the same disk, is
a plain copy of one member of the same size through the same file backend (1 MiB
reads and writes, four in flight, then fdatasync) — the ceiling of any rebuild,
which must also read the other members and compute. A scrub of the rebuilt pool
(every allocated and zeroed stripe read and verified) is reported too, in pool
bytes verified per second. Writes a table and ``bench/results/rebuild.json``.

Next to them, the rate of a reshape (``vstore grow --add``, ``vstore.ops.reshape``)
of a raid0 pool of two such members onto a third and of a raid5 pool of four
onto a fifth: pool bytes moved into the new geometry per second, against the
rebuild of a member of the same size in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

from vstore.consistency.metadata import DATA_OFFSET
from vstore.ops import reshape
from vstore.ops.rebuild import replace
from vstore.ops.scrub import run_scrub
from vstore.pool.home import Home
from vstore.pool.pool import Pool
from vstore.uri import open_uri, parse_uri

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CHUNK = 64 << 10
CASES = [("raid1", 2), ("raid5", 4), ("raid6", 6), ("raid10", 4)]
UNLIMITED = {"min": 0, "max": 0}


def scratch_dir() -> Path:
    """A temporary directory on the repository's disk (bench/results is git-ignored)."""
    base = RESULTS / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="vstore-rebuild-", dir=base))


def fill(path: Path, member_size: int, seed: int) -> None:
    """Random bytes over a member file's data area (so every read touches real data)."""
    rng = np.random.default_rng(seed)
    with open(path, "r+b") as f:
        f.seek(DATA_OFFSET)
        left = member_size - DATA_OFFSET
        while left:
            n = min(8 * MiB, left)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
        f.flush()
        os.fsync(f.fileno())


async def plain_copy(src: Path, dst: Path, size: int) -> float:
    """Seconds to copy size bytes of src to a new dst through the file backend (4 x 1 MiB in flight)."""
    a = await open_uri(parse_uri(f"file://{src}"))
    b = await open_uri(parse_uri(f"file://{dst}"), create_size=a.size)
    try:
        t0 = time.perf_counter()
        limiter = trio.Semaphore(4)

        async def one(off: int) -> None:
            try:
                n = min(MiB, size - off)
                await b.write(off, await a.read(off, n))
            finally:
                limiter.release()

        async with trio.open_nursery() as nursery:
            for off in range(0, size, MiB):
                await limiter.acquire()
                nursery.start_soon(one, off)
        await b.flush()
        return time.perf_counter() - t0
    finally:
        await a.aclose()
        await b.aclose()


async def one_case(level: str, n: int, member_size: int, d: Path) -> dict:
    """Rebuild, copy and scrub figures of one level."""
    home = Home(d / f"home-{level}")
    uris = [f"file://{d}/{level}-{i}.img" for i in range(n)]
    pool = await Pool.create(home, "bench", level, uris, chunk=CHUNK, size=member_size)
    await pool.aclose()
    for i in range(n):
        fill(d / f"{level}-{i}.img", member_size, i)
    pool = await Pool.open(home, "bench")
    try:
        data_bytes = pool.members[0].data_size
        await pool.fail_member(0)
        t0 = time.perf_counter()
        res = await replace(pool, 0, f"file://{d}/{level}-new.img", size=member_size, speed=UNLIMITED)
        rebuild_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sc = await run_scrub(pool, repair=True, speed=UNLIMITED)  # parity of the random fill: made right
        scrub_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sc2 = await run_scrub(pool, speed=UNLIMITED)
        scrub2_s = time.perf_counter() - t0
        assert sc2["mismatches"] == 0, "a scrub after repair must be clean"
    finally:
        await pool.aclose()
    copy_s = await plain_copy(d / f"{level}-1.img", d / f"{level}-copy.img", member_size)
    for p in d.glob(f"{level}-*.img"):
        p.unlink()
    rebuild_gbs = res["bytes"] / rebuild_s / 1e9
    copy_gbs = member_size / copy_s / 1e9
    return {"level": level, "members": n, "member_bytes": data_bytes, "chunk": CHUNK,
            "rebuild_seconds": round(rebuild_s, 3), "rebuild_gbs": rebuild_gbs,
            "copy_seconds": round(copy_s, 3), "copy_gbs": copy_gbs, "ratio": rebuild_gbs / copy_gbs,
            "scrub_bytes": sc2["scrubbed"], "scrub_gbs": sc2["scrubbed"] / scrub2_s / 1e9,
            "scrub_repair_seconds": round(scrub_s, 3), "repaired_on_first_scrub": sc["repaired"]}


RESHAPES = [("raid0", 2), ("raid5", 4), ("raid10", 4)]


async def reshape_case(level: str, n: int, member_size: int, d: Path) -> dict:
    """A pool of n filled members reshaped onto one more, speed unlimited."""
    home = Home(d / f"home-reshape-{level}")
    uris = [f"file://{d}/reshape-{i}.img" for i in range(n)]
    pool = await Pool.create(home, "bench", level, uris, chunk=CHUNK, size=member_size)
    await pool.aclose()
    for i in range(n):
        fill(d / f"reshape-{i}.img", member_size, 10 + i)
    pool = await Pool.open(home, "bench")
    try:
        t0 = time.perf_counter()
        res = await reshape.add(pool, [f"file://{d}/reshape-new.img"], size=member_size, speed=UNLIMITED)
        seconds = time.perf_counter() - t0
    finally:
        await pool.aclose()
    for p in d.glob("reshape-*.img"):
        p.unlink()
    return {"level": level, "from": n, "to": n + 1, "member_bytes": member_size - DATA_OFFSET,
            "moved_bytes": res["bytes"], "seconds": round(seconds, 3), "gbs": res["bytes"] / seconds / 1e9}


async def warm_up(d: Path) -> None:
    """One small rebuild and scrub per level first, so no figure includes loading the kernels."""
    for level, n in CASES:
        home = Home(d / f"warm-{level}")
        pool = await Pool.create(home, "warm", level, [f"memory://warm-{level}-{i}?size={8 * MiB}"
                                                       for i in range(n)], chunk=CHUNK)
        try:
            await pool.fail_member(0)
            await replace(pool, 0, f"memory://warm-{level}-new?size={8 * MiB}", speed=UNLIMITED)
            await run_scrub(pool, speed=UNLIMITED)
        finally:
            await pool.aclose()


def run(quick: bool) -> dict:
    """Measure every case; the result dict (also written as JSON)."""
    member_size = (64 if quick else 256) * MiB
    d = scratch_dir()
    rows: list[dict] = []
    reshaped: list[dict] = []

    async def main() -> None:
        await warm_up(d)
        for level, n in CASES:
            rows.append(await one_case(level, n, member_size, d))
        for level, n in RESHAPES:
            reshaped.append(await reshape_case(level, n, member_size, d))

    try:
        trio.run(main)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    out = {"bench": "rebuild", "quick": quick, "member_size": member_size, "chunk": CHUNK,
           "baseline": "plain copy of one member of the same size through the same file backend",
           "rows": rows, "reshape": reshaped}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rebuild.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def show(res: dict) -> None:
    """Print the table."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"rebuild of one member ({res['member_size'] // MiB} MiB file members, chunk "
                    f"{res['chunk'] // 1024} KiB) vs a plain copy of a member, same disk, same run")
    for col in ("level", "n", "rebuild GB/s", "copy GB/s", "rebuild / copy", "rebuild s", "scrub GB/s"):
        t.add_column(col, justify="left" if col == "level" else "right")
    for r in res["rows"]:
        t.add_row(r["level"], str(r["members"]), f"{r['rebuild_gbs']:.3f}", f"{r['copy_gbs']:.3f}",
                  f"{r['ratio']:.2f}", f"{r['rebuild_seconds']:.2f}", f"{r['scrub_gbs']:.3f}")
    Console(width=max(Console().width, 100)).print(t)
    for r in res.get("reshape") or []:
        same = next((x for x in res["rows"] if x["level"] == ("raid1" if r["level"] == "raid0" else r["level"])),
                    None)
        versus = (f"; {same['level']} rebuild of a member of the same size {same['rebuild_gbs']:.3f} GB/s"
                  if same else "")
        print(f"reshape {r['level']} {r['from']} -> {r['to']} members: {r['moved_bytes'] // MiB} MiB moved in "
              f"{r['seconds']:.2f} s, {r['gbs']:.3f} GB/s{versus}")


def main(argv: list[str] | None = None) -> None:
    """Run the rebuild benchmark and print its table."""
    ap = argparse.ArgumentParser(prog="python -m bench.rebuild", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB members instead of 256 MiB")
    args = ap.parse_args(argv)
    res = run(args.quick)
    show(res)
    print(f"wrote {RESULTS / 'rebuild.json'}")


if __name__ == "__main__":
    main()
