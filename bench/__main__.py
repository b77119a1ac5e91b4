"""``python -m bench``: every benchmark in one run, each figure against a baseline of the same run.

Sections (``--only`` takes a comma-separated subset):

- ``kernels``: ``bench.kernels`` (numba vs numpy vs ISA-L vs memory copy, one thread),
  plus an all-cores column: the same kernel on one stripe per core, in threads
  (numba kernels release the GIL), GB/s summed;
- ``layouts``: ``bench.layouts`` (every RAID level over memory and file members vs one member);
- ``stack``: ``bench.stack`` (fio through FUSE mounts of raid0/raid5 pools of file
  members on tmpfs and on the disk, vs the empty pyfuse3 ceiling mounted like vstore and
  with pyfuse3's defaults, qemu-storage-daemon's FUSE export and plain files; ``--profile``
  adds a py-spy profile of the mount per vstore job, in ``OUT/stack-profiles/``);
- ``iscsi``, ``nfs``, ``rbd``, ``multipath``, ``journal``: the backend benchmarks, run as
  ``python -m bench.NAME [--quick]`` when the module exists; their JSON is folded
  in. They run by default in a full run only (``--quick`` runs them only when
  named in ``--only``).

Writes ``OUT/bench.json`` (machine description + every section; ``--json FILE``
writes it to FILE instead) and ``OUT/layouts.png`` (skipped, with a note, when
matplotlib is missing); ``--quick`` uses small sizes and few workloads (under a
minute). A missing baseline (fio, FUSE, qemu-storage-daemon, ISA-L) is reported as
missing; the exit code is 1 only when a benchmark itself broke. ``vstore bench``
runs this same program. OUT defaults to ``bench/results`` in a checkout and to
``./vstore-bench`` when vstore is installed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from bench import machine, report
from bench.fuse_ceiling import child_env

ROOT = Path(__file__).resolve().parent.parent
# In a checkout, bench/results (git-ignored); installed (site-packages), the working directory.
DEFAULT_OUT = ROOT / "bench" / "results" if (ROOT / "pyproject.toml").exists() else Path("vstore-bench")
CORE = ("kernels", "layouts", "stack")
PEERS = ("iscsi", "nfs", "rbd", "multipath", "journal")
PEER_TIMEOUT = 900


def _log(msg: str) -> None:
    report.console().print(f"[dim]{time.strftime('%H:%M:%S')} {msg}[/]")


def _kernel_call(op: str, k: int, st: tuple) -> None:
    """One call of kernel ``op`` on one prepared stripe (stripe, p, q, scratch)."""
    from vstore.raid import kernels

    s, p, q, scratch = st
    if op == "xor_parity":
        kernels.xor_parity(s[:k], out=s[k])
    elif op == "pq_syndrome":
        kernels.pq_syndrome(s[:k], s[k], s[k + 1])
    elif op == "recover_data2":
        kernels.recover_data2(scratch, p, q, 1, 2)
    else:
        kernels.recover_data_p(scratch, q, 1)


def _kernel_worker(barrier: threading.Barrier, op: str, k: int, st: tuple, n: int) -> None:
    barrier.wait()
    for _ in range(n):
        _kernel_call(op, k, st)


def kernels_all_cores(rows: list[dict], quick: bool) -> None:
    """Add ``all_cores_gbs`` to each kernel row: one stripe per core, kernels run in threads at once."""
    import numpy as np

    from vstore.raid import kernels

    threads = os.cpu_count() or 1
    reps = 3 if quick else 10
    for r in rows:
        k, chunk, op = r["k"], r["chunk"], r["op"]
        stripes = []
        for t in range(threads):
            s = kernels.aligned_empty((k + 2, chunk))
            s[:k] = np.random.default_rng(t).integers(0, 256, (k, chunk), dtype=np.uint8)
            p, q = kernels.pq_syndrome(s[:k])
            stripes.append((s, p, q, s[:k].copy()))
        _kernel_call(op, k, stripes[0])
        t0 = time.perf_counter()
        _kernel_call(op, k, stripes[0])
        single = max(time.perf_counter() - t0, 1e-7)
        n = max(1, int((0.004 if quick else 0.02) / single))
        best = float("inf")
        for _ in range(reps):
            barrier = threading.Barrier(threads + 1)
            ts = [threading.Thread(target=_kernel_worker, args=(barrier, op, k, st, n)) for st in stripes]
            for t in ts:
                t.start()
            barrier.wait()
            t0 = time.perf_counter()
            for t in ts:
                t.join()
            best = min(best, time.perf_counter() - t0)
        r["all_cores_gbs"] = threads * n * k * chunk / best / 1e9
        r["all_cores_threads"] = threads


def run_kernels(quick: bool) -> dict:
    """bench.kernels' rows, with the all-cores column."""
    from bench import kernels as kbench

    rows = kbench.run(quick)
    kernels_all_cores(rows, quick)
    return {"rows": rows, "checks": kernel_checks(rows)}


# The kernel targets: one core, numba against ISA-L on the same buffers.
KERNEL_TARGETS = (
    ("xor_parity", 0.9, "full-stripe XOR / ISA-L xor_gen (worst k, chunk)"),
    ("pq_syndrome", 0.8, "P+Q syndrome / ISA-L pq_gen (worst k, chunk)"),
    ("recover_data2", 0.25, "raid6 two-data recovery / ISA-L pq_gen (worst k, chunk)"),
)


def kernel_checks(rows: list[dict]) -> list[dict]:
    """The worst numba / ISA-L ratio of each targeted kernel (none when ISA-L is missing)."""
    checks = []
    for op, target, text in KERNEL_TARGETS:
        cands = [r for r in rows if r["op"] == op and r.get("numba_vs_isal")]
        if not cands:
            continue
        worst = min(cands, key=lambda r: r["numba_vs_isal"])
        checks.append({"check": text, "kind": f"k={worst['k']}, {worst['chunk'] // 1024} KiB",
                       "value": worst["numba_vs_isal"], "target": target,
                       "numerator_gbs": worst["numba_gbs"], "denominator_gbs": worst["isal_gbs"]})
    return checks


def run_peer(name: str, quick: bool, out: Path) -> dict:
    """Run ``python -m bench.NAME [--quick]`` and fold in the JSON it writes to bench/results/NAME.json."""
    path = ROOT / "bench" / "results" / f"{name}.json"
    before = path.stat().st_mtime if path.exists() else None
    cmd = [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if quick else [])
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=PEER_TIMEOUT,
                         env=child_env())
    sys.stdout.write(res.stdout)
    if res.returncode:
        return {"status": "failed", "returncode": res.returncode, "stderr": res.stderr.strip()[-2000:]}
    if not path.exists() or path.stat().st_mtime == before:
        return {"status": "ran", "note": f"no fresh {path.name} was written", "seconds": time.time() - t0}
    if out.resolve() != path.parent.resolve():
        shutil.copy(path, out / path.name)
    return {"status": "ok", "seconds": time.time() - t0, "report": json.loads(path.read_text())}


def chart(res: dict, path: Path) -> str | None:
    """Draw the layouts chart into path; None when drawn, else why not (matplotlib is optional)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no chart"
    report.layouts_chart(res, path)
    return None


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    """Run the selected benchmarks, print the tables, write JSON and the chart; 1 if a section failed."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few workloads (under a minute)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(CORE + PEERS)}")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    ap.add_argument("--json", type=Path, default=None, dest="json_path",
                    help="write the JSON report to this file (default OUT/bench.json)")
    ap.add_argument("--kinds", default="memory,file", help="member kinds for the layouts (memory,file)")
    ap.add_argument("--profile", action="store_true",
                    help="stack: py-spy on the vstore mount during each of its jobs (OUT/stack-profiles/)")
    args = ap.parse_args(argv)
    present = [p for p in PEERS if importlib.util.find_spec(f"bench.{p}") is not None]
    if args.only:
        sections = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in sections if s not in CORE + PEERS]
        if unknown:
            ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(CORE + PEERS)}")
    else:
        sections = list(CORE) + ([] if args.quick else present)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result: dict = {
        "benchmark": "vstore",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([prog, *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine.describe(),
        "sections": sections,
        "errors": {},
    }
    json_path = args.json_path or out / "bench.json"
    failed = False
    written: list[Path] = []
    for section in sections:
        _log(f"running {section}")
        t0 = time.time()
        try:
            if section == "kernels":
                result["kernels"] = run_kernels(args.quick)
                report.show_kernels(result["kernels"]["rows"])
                report.show_checks(result["kernels"]["checks"], "Kernel targets, one core (reported, not asserted)")
            elif section == "layouts":
                result["layouts"] = res = __import__("bench.layouts").layouts.run(
                    args.quick, tuple(args.kinds.split(",")), log=_log)
                report.show_layouts(res)
                skipped = chart(res, out / "layouts.png")
                if skipped:
                    res["chart_skipped"] = skipped
                    report.console().print(f"[yellow]layouts: {skipped}[/]")
                else:
                    res["chart"] = str(out / "layouts.png")
                    written.append(out / "layouts.png")
            elif section == "stack":
                from bench import stack

                result["stack"] = stack.run(args.quick, log=_log, profile=args.profile, out=out)
                report.show_stack(result["stack"])
            elif section not in present:
                result.setdefault("peers", {})[section] = {"status": "absent", "note": f"bench/{section}.py not there yet"}
            else:
                result.setdefault("peers", {})[section] = peer = run_peer(section, args.quick, out)
                if peer["status"] == "failed":
                    failed = True
                    report.console().print(f"[red]bench.{section} failed: {peer['stderr'][-500:]}[/]")
        except Exception as e:  # one broken section must not lose the others
            failed = True
            result["errors"][section] = "".join(traceback.format_exception(e))[-4000:]
            report.console().print(f"[red]{section} failed: {e}[/]")
        _log(f"{section} took {time.time() - t0:.1f} s")
    result["machine"]["load_average_end"] = machine.describe()["load_average"]
    result["seconds"] = time.time() - started
    report.write_json(json_path, result)
    written.insert(0, json_path)
    report.console().print(f"wrote {' and '.join(map(str, written))} in {result['seconds']:.0f} s")
    if failed:
        report.console().print(f"[red]failed: {', '.join(sorted(result['errors']) or ['a backend benchmark'])}[/]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
