"""Presenting benchmark results: rich tables on the terminal, one JSON file, a PNG chart of the layouts."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

_console: Console | None = None


def console() -> Console:
    """The shared terminal console (at least 110 columns wide so tables are not squeezed)."""
    global _console
    if _console is None:
        _console = Console(width=max(Console().width, 110))
    return _console


def _gbs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _iops(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _target(value: float, target: float) -> str:
    mark = "[green]met[/]" if value >= target else "[red]below[/]"
    return f"{value:.2f} (≥ {target:g}: {mark})"


def show_layouts(res: dict) -> None:
    """Table of the layout rows: GB/s (and IOPS for small requests) vs a single member."""
    c = console()
    for kind in dict.fromkeys(r["kind"] for r in res["rows"]):
        t = Table(title=f"RAID layouts over {kind} members, chunk {res['chunk'] // 1024} KiB "
                        f"(ratio = layout / one {kind} member, same workload)")
        for col in ("level", "n", "workload", "GB/s", "IOPS", "1 member GB/s", "1 member IOPS", "ratio"):
            t.add_column(col, justify="left" if col in ("level", "workload") else "right", no_wrap=True)
        last = None
        for r in res["rows"]:
            if r["kind"] != kind:
                continue
            small = "4K" in r["workload"]
            t.add_row(
                r["level"] if r["level"] != last else "", str(r["members"]), r["workload"],
                _gbs(r["gbs"]), _iops(r.get("iops")) if small else "",
                _gbs(r["single_gbs"]), _iops(r.get("single_iops")) if small else "",
                f"{r['ratio']:.2f}",
            )  # fmt: skip
            last = r["level"]
        c.print(t)
    show_checks(res.get("checks", []), "Layout targets (reported, not asserted)")


def show_checks(checks: list[dict], title: str) -> None:
    """Table of the ratio-against-target checks."""
    if not checks:
        return
    t = Table(title=title)
    for col in ("check", "on", "GB/s", "baseline GB/s", "ratio vs target"):
        t.add_column(col, justify="left" if col in ("check", "kind") else "right")
    for ch in checks:
        t.add_row(ch["check"], ch.get("kind", ""), _gbs(ch["numerator_gbs"]), _gbs(ch["denominator_gbs"]),
                  _target(ch["value"], ch["target"]))
    console().print(t)


def show_stack(res: dict) -> None:
    """Table of the fio jobs on every target, with ratios against the plain file and the FUSE ceiling."""
    targets = res["targets"]
    t = Table(title=f"Whole stack: fio on a {res['size'] // (1 << 20)} MiB file, {res['runtime']} s per job "
                    f"({res['pool']['level']} pool of {res['pool']['members']} file members through FUSE)")
    t.add_column("job", no_wrap=True)
    t.add_column("unit", no_wrap=True)
    short = {"plain file": "plain", "FUSE ceiling": "ceiling", "qemu FUSE": "qemu"}
    for name in targets:
        t.add_column(short.get(name, name), justify="right", no_wrap=True)
    for col in ("vs plain", "vs ceiling", "vs qemu"):
        t.add_column(col, justify="right", no_wrap=True)
    t.caption = ("plain: fio on a plain file on the same disk; ceiling: empty pyfuse3 filesystem; "
                 "qemu: qemu-storage-daemon FUSE export of a plain file; vs X = vstore / X")
    for job in res["jobs"]:
        small = "4K" in job
        cells = [("k" if small else "") + ("IOPS" if small else "GB/s")]
        for name in targets:
            r = res["results"].get(name, {}).get(job)
            if r is None:
                cells.append("-")
            elif small:
                cells.append(f"{r['iops'] / 1000:.1f}")
            else:
                cells.append(f"{r['gbs']:.2f}")
        ratios = res["ratios"].get(job, {})
        cells += [f"{ratios[k]:.2f}" if ratios.get(k) else "-" for k in ("plain", "ceiling", "qemu")]
        t.add_row(job, *cells)
    console().print(t)
    for name, why in res.get("missing", {}).items():
        console().print(f"[yellow]{name}: {why}[/]")
    show_checks(res.get("checks", []), "Whole-stack targets (reported, not asserted)")


def show_kernels(rows: list[dict]) -> None:
    """The kernel table of bench.kernels, plus the all-cores column when measured."""
    t = Table(title="RAID kernels, GB/s of data consumed (k chunks per call)")
    t.add_column("kernel", no_wrap=True)
    cols = ("k", "chunk", "numba 1 thr", "all cores", "numpy ref", "memcpy", "ISA-L", "numba / ISA-L")
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        if r.get("isal_gbs") is None:
            isal_cell, ratio = "missing", "-"
        else:
            isal_cell = f"{r['isal_gbs']:.1f} {r['isal_baseline']}"
            ratio = f"{r['numba_vs_isal']:.2f}x"
        allc = r.get("all_cores_gbs")
        t.add_row(
            r["op"], str(r["k"]), f"{r['chunk'] // 1024} KiB", f"{r['numba_gbs']:.1f}",
            f"{allc:.1f} ({r['all_cores_threads']})" if allc else "-",
            f"{r['numpy_gbs']:.2f}", f"{r['memcpy_gbs']:.1f}", isal_cell, ratio,
        )  # fmt: skip
    console().print(t)


def write_json(path: Path, report: dict) -> None:
    """Write the whole report as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def layouts_chart(res: dict, path: Path) -> None:
    """A PNG of the layouts: GB/s per level and workload, one panel per member kind, single member dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in res["rows"]))
    workloads = list(dict.fromkeys(r["workload"] for r in res["rows"]))
    levels = list(dict.fromkeys(r["level"] for r in res["rows"]))
    fig, axes = plt.subplots(len(kinds), 1, figsize=(13, 4.2 * len(kinds)), squeeze=False)
    width = 0.8 / max(len(levels), 1)
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        by = {(r["level"], r["workload"]): r for r in res["rows"] if r["kind"] == kind}
        for li, level in enumerate(levels):
            xs, ys = [], []
            for wi, w in enumerate(workloads):
                r = by.get((level, w))
                if r is not None:
                    xs.append(wi - 0.4 + width * (li + 0.5))
                    ys.append(r["gbs"])
            ax.bar(xs, ys, width, label=level)
        for wi, w in enumerate(workloads):
            singles = [r["single_gbs"] for r in res["rows"] if r["kind"] == kind and r["workload"] == w]
            if singles:
                ax.hlines(singles[0], wi - 0.45, wi + 0.45, colors="black", linestyles="dashed",
                          label="one member" if wi == 0 else None)
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads, rotation=15, fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_yscale("log")
        ax.set_title(f"vstore RAID layouts over {kind} members (chunk {res['chunk'] // 1024} KiB); "
                     "dashed: one member, same workload", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The README's Performance tables, in Markdown, from a ``bench.json`` report."""
    m = result["machine"]
    out = [f"Run {result['date'][:16].replace('T', ' ')} UTC: `{result['command']}` on {m['cores']} cores "
           f"({m['cpu']}, {m['memory_bytes'] / 2**30:.0f} GiB, Linux {m['kernel']}, Python {m['python']}, "
           f"numpy {m['numpy']}, numba {m['numba']}, fio {m['fio']}); load average "
           f"{m['load_average']} at the start, {m.get('load_average_end')} at the end.", ""]
    if "kernels" in result:
        out += ["**Kernels** (GB/s of data consumed; numba on one core, and on all cores at once with one "
                "stripe each; ISA-L on the same buffers, one core; recovery is compared with `pq_gen`, as "
                "ISA-L has no recovery call):", "",
                "| kernel | k | chunk | numba | numba, all cores | numpy ref | memcpy | ISA-L | numba / ISA-L |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in result["kernels"]["rows"]:
            isal = f"{r['isal_gbs']:.1f} ({r['isal_baseline']})" if r.get("isal_gbs") else "missing"
            ratio = f"{r['numba_vs_isal']:.2f}" if r.get("numba_vs_isal") else "-"
            allc = f"{r['all_cores_gbs']:.1f}" if r.get("all_cores_gbs") else "-"
            out.append(f"| {r['op']} | {r['k']} | {r['chunk'] // 1024} KiB | {r['numba_gbs']:.1f} | {allc} | "
                       f"{r['numpy_gbs']:.2f} | {r['memcpy_gbs']:.1f} | {isal} | {ratio} |")
        out.append("")
    if "layouts" in result:
        lay = result["layouts"]
        members = ", ".join(f"{k} {v}" for k, v in lay["members"].items())
        for kind in dict.fromkeys(r["kind"] for r in lay["rows"]):
            rows = [r for r in lay["rows"] if r["kind"] == kind]
            workloads = list(dict.fromkeys(r["workload"] for r in rows))
            out += [f"**Layouts over {kind} members** through the engine, no FUSE (chunk "
                    f"{lay['chunk'] // 1024} KiB; members: {members}). Each cell: GB/s (IOPS for 4 KiB) "
                    f"and, in brackets, the ratio to the same workload on one {kind} member in the same run:", "",
                    "| level | " + " | ".join(workloads) + " |", "|---" * (len(workloads) + 1) + "|"]
            for level in dict.fromkeys(r["level"] for r in rows):
                cells = []
                for w in workloads:
                    r = next((x for x in rows if x["level"] == level and x["workload"] == w), None)
                    if r is None:
                        cells.append("-")
                    elif "4K" in w:
                        cells.append(f"{r['iops'] / 1000:.0f}k ({r['ratio']:.2f})")
                    else:
                        cells.append(f"{r['gbs']:.2f} ({r['ratio']:.2f})")
                out.append(f"| {level} | " + " | ".join(cells) + " |")
            singles = []
            for w in workloads:
                vals = [x for x in rows if x["workload"] == w]
                if vals:
                    best = max(vals, key=lambda x: x["single_gbs"])
                    singles.append(f"{best['single_iops'] / 1000:.0f}k" if "4K" in w and best.get("single_iops")
                                   else f"{best['single_gbs']:.2f}")
            out += ["| *one member (best of its rounds)* | " + " | ".join(singles) + " |", ""]
    if "stack" in result:
        st = result["stack"]
        targets = st["targets"]
        out += [f"**Whole stack**: fio on a {st['size'] // 2**20} MiB file, {st['runtime']:g} s per job, "
                f"vstore = a volume of a {st['pool']['level']} pool of {st['pool']['members']} file members "
                f"(chunk {st['pool']['chunk'] // 1024} KiB) mounted with `vstore mount`; plain = a plain file "
                f"on the same disk, no FUSE; ceiling = an empty pyfuse3 filesystem (reads return a zero buffer, "
                f"writes are dropped); qemu = qemu-storage-daemon's FUSE export of a plain file on the same disk. "
                f"GB/s (kIOPS for 4 KiB); the last three columns are vstore / each baseline.", ""]
        for mode, title in (("direct", "Direct I/O (`--direct=1`, libaio, queue depth 8)"),
                            ("buffered", "Buffered I/O (psync; the write ends with fsync, reads drop the cache first)")):
            jobs = [j for j in st["jobs"] if j.startswith(mode)]
            if not jobs:
                continue
            out += [f"{title}:", "",
                    "| job | " + " | ".join(targets) + " | vstore / plain | vstore / ceiling | vstore / qemu |",
                    "|---" * (len(targets) + 4) + "|"]
            for job in jobs:
                cells = []
                for name in targets:
                    r = st["results"].get(name, {}).get(job)
                    cells.append("-" if r is None else
                                 (f"{r['iops'] / 1000:.1f}k" if "4K" in job else f"{r['gbs']:.2f}"))
                ratios = st["ratios"].get(job, {})
                cells += [f"{ratios[k]:.2f}" if ratios.get(k) else "-" for k in ("plain", "ceiling", "qemu")]
                out.append(f"| {job.removeprefix(mode).strip()} | " + " | ".join(cells) + " |")
            out.append("")
    checks = []
    for sec in ("kernels", "layouts", "stack"):
        checks += [(sec, c) for c in result.get(sec, {}).get("checks", [])]
    if checks:
        out += ["**Targets** (reported by the benchmark, never asserted):", "",
                "| check | on | measured | baseline | ratio | target |", "|---|---|---|---|---|---|"]
        for _, c in checks:
            out.append(f"| {c['check']} | {c.get('kind', '')} | {c['numerator_gbs']:.2f} GB/s | "
                       f"{c['denominator_gbs']:.2f} GB/s | {c['value']:.2f} | ≥ {c['target']:g} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    print(markdown(json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/bench.json").read_text())))
