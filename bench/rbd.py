"""Sequential 1 MiB read/write of one RBD image: vstore's RbdDevice next to ``rbd bench``.

Run ``python -m bench.rbd [--quick]``. Starts its own single-node Ceph cluster on
loopback (ceph-mon and one memstore ceph-osd, ``vstore.testing.ceph_cluster``),
creates one image and fills it with ``rbd bench --io-type write``, then takes
turns on that same image at queue depth 1 and 8: vstore (librbd's aio calls
bridged into trio, one task per request in flight) and ``rbd bench`` (librbd in
C++, ``--io-threads`` = the depth, sequential pattern). vstore's write figure
includes its final flush. Rounds alternate the two, so a noisy neighbour slows
both alike; the table shows the best round. Writes ``bench/results/rbd.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import trio

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "rbd.json"
MiB = 1 << 20
POOL, IMAGE = "bench", "img"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def rbd_bench(ceph, count: int, depth: int, write: bool) -> dict:
    """GB/s (and CPU s/GB of the rbd tool) of ``rbd bench`` moving count 1 MiB requests, depth at once."""
    c0 = _children_cpu()
    out = ceph.rbd("bench", "--io-type", "write" if write else "read", "--io-size", str(MiB),
                   "--io-threads", str(depth), "--io-total", str(count * MiB), "--io-pattern", "seq",
                   f"{POOL}/{IMAGE}", timeout=600)
    cpu = _children_cpu() - c0
    m = re.search(r"elapsed:\s*([0-9.]+)\s+ops:\s*(\d+)\s+ops/sec:\s*([0-9.]+)", out)
    if not m:
        raise RuntimeError(f"rbd bench: no summary in {out[-300:]!r}")
    gbps = float(m.group(3)) * MiB / 1e9
    return {"gbps": gbps, "cpu_per_gb": cpu / (count * MiB / 1e9)}


def vstore_bench(uri: str, count: int, depth: int, write: bool) -> dict:
    """GB/s of sequential 1 MiB requests through RbdDevice, depth requests in flight."""
    from backends import rbd

    result: dict = {}

    async def run() -> None:
        from vstore.uri import parse_uri

        dev = await rbd.open_uri(parse_uri(uri))
        try:
            data = np.random.default_rng(7).integers(0, 256, MiB, dtype=np.uint8)
            blocks = dev.size // MiB
            nxt = 0

            async def worker() -> None:
                nonlocal nxt
                while nxt < count:
                    i = nxt % blocks
                    nxt += 1
                    if write:
                        await dev.write(i * MiB, data)
                    else:
                        await dev.read(i * MiB, MiB)

            c0 = time.process_time()
            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(depth):
                    nursery.start_soon(worker)
            if write:
                await dev.flush()
            t1 = time.perf_counter()
            result.update(gbps=count * MiB / (t1 - t0) / 1e9,
                          cpu_per_gb=(time.process_time() - c0) / (count * MiB / 1e9))
        finally:
            await dev.aclose()

    trio.run(run)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table; write bench/results/rbd.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small image, one round")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from vstore.testing.ceph_cluster import CephCluster

    size = (128 if args.quick else 512) * MiB
    count = size // MiB
    rounds = 1 if args.quick else 3
    rows: list[dict] = []
    ceph = CephCluster(memstore_bytes=size * 2 + 256 * MiB)
    ceph.start()
    try:
        ceph.create_pool(POOL)
        ceph.rbd("create", f"{POOL}/{IMAGE}", "--size", f"{size // MiB}M")
        rbd_bench(ceph, count, 8, True)  # real data, not unallocated objects
        uri = ceph.rbd_uri(POOL, IMAGE)
        for op, depth in (("read", 1), ("read", 8), ("write", 1), ("write", 8)):
            write = op == "write"
            v: dict = {}
            b: dict = {}
            for _ in range(rounds):  # interleaved
                r = vstore_bench(uri, count, depth, write)
                v = r if r["gbps"] > v.get("gbps", 0) else v
                g = rbd_bench(ceph, count, depth, write)
                b = g if g["gbps"] > b.get("gbps", 0) else b
            rows.append({
                "op": op, "queue_depth": depth, "vstore_gbps": v["gbps"],
                "baseline": "rbd bench (librbd)", "baseline_gbps": b["gbps"],
                "ratio": v["gbps"] / b["gbps"],
                "vstore_cpu_s_per_gb": v["cpu_per_gb"], "baseline_cpu_s_per_gb": b["cpu_per_gb"],
            })
        startup = ceph.startup_seconds
    finally:
        ceph.stop()

    print(f"{'op':6} {'qd':>3} {'vstore GB/s':>12} {'rbd bench GB/s':>15} {'ratio':>6}"
          f" {'CPU s/GB: vstore':>17} {'rbd bench':>10}")
    for r in rows:
        print(f"{r['op']:6} {r['queue_depth']:>3} {r['vstore_gbps']:>12.3f} {r['baseline_gbps']:>15.3f} "
              f"{r['ratio']:>6.2f} {r['vstore_cpu_s_per_gb']:>17.2f} {r['baseline_cpu_s_per_gb']:>10.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "rbd sequential 1 MiB",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "quick": args.quick, "image_bytes": size, "rounds": rounds, "load_average": os.getloadavg(),
        "cluster": "ceph-mon + 1 memstore ceph-osd on 127.0.0.1, pool size 1",
        "cluster_startup_s": startup, "rows": rows,
    }, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
