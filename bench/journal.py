"""The cost of crash consistency: write throughput of raid5 and raid6 with and without the journal.

Run ``python -m bench.journal [--quick] [--members memory|file]``. For each level,
three pools of the same shape are built in the same run:

- ``raw``: the layout with no crash protection at all (the baseline: what a
  write costs in parity work and member I/O alone);
- ``bitmap``: ``--journal none``, the default: the write-intent bitmap (a member
  flush the first time a region is written, then nothing);
- ``journal``: ``--journal`` on a separate device of the same kind: every update
  logged and the log flushed before the members are written.

Workloads (through the pool device): 1 MiB sequential writes (full stripes), and
4 KiB random writes (read-modify-write) by 1 and by 16 concurrent writers (16
writers share journal flushes: group commit). Rounds are interleaved across the
modes so a noisy neighbour slows them alike; the best round counts. Prints a table
and writes ``bench/results/journal.json`` with each figure as a ratio to ``raw``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

from vstore.pool.home import Home
from vstore.pool.pool import Pool

MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results" / "journal.json"
LEVELS = {"raid5": 5, "raid6": 6}
MODES = ("raw", "bitmap", "journal")
CHUNK = 64 << 10


async def build(home: Home, name: str, level: str, n: int, mode: str, members: str,
                scratch: Path, member_size: int) -> Pool:
    """Create and open one pool of the benchmark."""
    if members == "memory":
        uris = [f"memory://{name}-{i}?size={member_size}" for i in range(n)]
        juri = f"memory://{name}-j?size={256 * MiB}"
    else:
        uris = [f"file://{scratch}/{name}-{i}.img" for i in range(n)]
        juri = f"file://{scratch}/{name}-j.img"
    p = await Pool.create(home, name, level, uris, chunk=CHUNK, size=member_size,
                          journal=juri if mode == "journal" else None, journal_size=256 * MiB)
    await p.aclose()
    if members == "memory":
        from backends import memory

        for key in [k for k in memory._STORES if k.startswith(f"{name}-")]:
            store = memory._STORES[key]
            store[::4096] = store[::4096].copy()  # fault every page in now, not while measuring
    p = await Pool.open(home, name)
    if mode == "raw":
        p.layout.journal = None  # no bitmap, no journal: the bare layout
    return p


async def seq_write(pool: Pool, total: int) -> float:
    """Seconds to write total bytes in 1 MiB requests, then flush."""
    buf = np.random.default_rng(1).integers(0, 256, MiB, dtype=np.uint8)
    dev = pool.data_dev
    t0 = time.perf_counter()
    for off in range(0, total, MiB):
        await dev.write(off % (dev.size - MiB), buf)
    await pool.flush()
    return time.perf_counter() - t0


async def rand_write(pool: Pool, ops: int, writers: int, span: int) -> float:
    """Seconds for ops random 4 KiB writes by concurrent writers, then a flush."""
    rng = np.random.default_rng(2)
    offsets = rng.integers(0, span // 4096, ops) * 4096
    buf = rng.integers(0, 256, 4096, dtype=np.uint8)
    dev = pool.data_dev

    async def writer(k: int) -> None:
        for off in offsets[k::writers]:
            await dev.write(int(off), buf)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(writers):
            nursery.start_soon(writer, k)
    await pool.flush()
    return time.perf_counter() - t0


async def run(quick: bool, members: str) -> dict:
    """Every workload on every pool, interleaved; the results document."""
    rounds = 2 if quick else 3
    seq_total = (32 if quick else 128) * MiB
    ops = 1000 if quick else 4000
    member_size = (64 if quick else 160) * MiB
    scratch = Path(tempfile.mkdtemp(prefix="vstore-bench-journal-"))
    home = Home(scratch / "home")
    pools: dict[tuple[str, str], Pool] = {}
    workloads = {
        "seq write 1M": lambda p: seq_write(p, seq_total),
        "rand write 4K x1": lambda p: rand_write(p, ops // 4, 1, 64 * MiB),
        "rand write 4K x16": lambda p: rand_write(p, ops, 16, 64 * MiB),
    }
    best: dict[str, dict[str, dict[str, float]]] = {}
    stats: dict[str, dict] = {}
    try:
        for level, n in LEVELS.items():
            for mode in MODES:
                pools[(level, mode)] = await build(home, f"{level}-{mode}", level, n, mode, members,
                                                   scratch, member_size)
        for _ in range(rounds):
            for wl, fn in workloads.items():
                for (level, mode), p in pools.items():
                    secs = await fn(p)
                    nbytes = seq_total if wl.startswith("seq") else (
                        ops // 4 if "x1" in wl and "x16" not in wl else ops) * 4096
                    mbs = nbytes / secs / MiB
                    slot = best.setdefault(level, {}).setdefault(wl, {})
                    slot[mode] = max(slot.get(mode, 0.0), mbs)
        for (level, mode), p in pools.items():
            if mode == "journal":
                stats[level] = p.consistency.journal.status()
    finally:
        for p in pools.values():
            await p.aclose()
        shutil.rmtree(scratch, ignore_errors=True)
    table = []
    for level, wls in best.items():
        for wl, by_mode in wls.items():
            raw = by_mode["raw"]
            table.append({"level": level, "workload": wl,
                          **{f"{m}_mbs": round(by_mode[m], 1) for m in MODES},
                          "bitmap_vs_raw": round(by_mode["bitmap"] / raw, 3),
                          "journal_vs_raw": round(by_mode["journal"] / raw, 3),
                          "journal_vs_bitmap": round(by_mode["journal"] / by_mode["bitmap"], 3)})
    return {"members": members, "quick": quick, "chunk": CHUNK, "rounds": rounds,
            "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
            "results": table,
            "journal_stats": {lvl: {k: v for k, v in st.items() if k in ("records", "batches", "flushes", "checkpoints")}
                              for lvl, st in stats.items()}}


def main() -> None:
    """Run the benchmark, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (about a minute)")
    ap.add_argument("--members", choices=["memory", "file"], default="memory")
    args = ap.parse_args()
    doc = trio.run(run, args.quick, args.members)
    print(f"{'level':6} {'workload':18} {'raw MB/s':>9} {'bitmap':>9} {'journal':>9} "
          f"{'bitmap/raw':>10} {'journal/raw':>11} {'journal/bitmap':>14}")
    for r in doc["results"]:
        print(f"{r['level']:6} {r['workload']:18} {r['raw_mbs']:9.1f} {r['bitmap_mbs']:9.1f} "
              f"{r['journal_mbs']:9.1f} {r['bitmap_vs_raw']:10.2f} {r['journal_vs_raw']:11.2f} "
              f"{r['journal_vs_bitmap']:14.2f}")
    for lvl, st in doc["journal_stats"].items():
        print(f"{lvl} journal: {st['records']} records in {st['batches']} batches "
              f"({st['flushes']} journal flushes), {st['checkpoints']} checkpoints")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing[doc["members"]] = doc
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
