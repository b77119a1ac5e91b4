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


def _target(value: float, target: float | None) -> str:
    if target is None:
        return f"{value:.2f} (no target)"
    mark = "[green]met[/]" if value >= target else "[red]below[/]"
    return f"{value:.2f} (≥ {target:g}: {mark})"


def _figure(value: float | None, unit: str) -> str:
    """A GB/s figure, or kIOPS when the unit is IOPS."""
    if value is None:
        return "-"
    return f"{value / 1000:.1f}k" if unit == "iops" else f"{value:.2f}"


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
    """Table of the ratio-against-target checks (GB/s, or IOPS where the check's unit says so)."""
    if not checks:
        return
    t = Table(title=title)
    for col in ("check", "on", "measured", "baseline", "ratio vs target"):
        t.add_column(col, justify="left" if col in ("check", "on") else "right")
    for ch in checks:
        unit = ch.get("unit", "gbs")
        num = ch.get("numerator", ch["numerator_gbs"])
        den = ch.get("denominator", ch["denominator_gbs"])
        suffix = " IOPS" if unit == "iops" else " GB/s"
        t.add_row(ch["check"], ch.get("kind", ""), _figure(num, unit) + suffix, _figure(den, unit) + suffix,
                  _target(ch["value"], ch.get("target")))
    _print_wide(t)


def _print_wide(table: Table, cap: int = 220) -> None:
    """Print a table at its natural width (up to cap) even when the console is narrower: nothing truncated."""
    c = console()
    natural = c.measure(table, options=c.options.update_width(cap)).maximum
    if natural <= c.width:
        c.print(table)
    else:
        Console(width=natural, force_terminal=c.is_terminal, no_color=c.no_color).print(table)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _unit(job: str) -> str:
    return "iops" if "4K" in job else "gbs"


def show_stack(res: dict) -> None:
    """One table per comparison: fio jobs (rows) on its targets, then its ratio columns; missing targets, checks, profiles."""
    c = console()
    c.print(f"Whole stack: fio on a {res['size'] // (1 << 20)} MiB file per target, {res['runtime']:g} s per job; "
            "GB/s, k = thousand IOPS (4K jobs); ratios from the same run"
            + (" [yellow](profiled: py-spy slowed the vstore jobs)[/]" if res.get("profiles") else ""))
    for g in res["groups"]:
        t = Table(title=f"Whole stack, {g['key']}: {g['title']}")
        t.add_column("job", no_wrap=True)
        for name in g["targets"]:
            t.add_column(name, justify="right")
        for col in g["ratio_columns"]:
            t.add_column(col["label"], justify="right", style="bold")
        for job in g["jobs"]:
            cells = [_figure(res["results"].get(name, {}).get(job, {}).get(_unit(job)), _unit(job))
                     for name in g["targets"]]
            ratios = g["ratios"].get(job, {})
            cells += [f"{ratios[col['label']]:.2f}" if ratios.get(col["label"]) else "-" for col in g["ratio_columns"]]
            t.add_row(job, *cells)
        t.caption = "; ".join(f"{col['label']} = {col['numerator']} / {col['denominator']}"
                              for col in g["ratio_columns"])
        _print_wide(t)
    for name, why in res.get("missing", {}).items():
        c.print(f"[yellow]missing: {name}: {why}[/]")
    c.print(_targets_line(res))
    show_checks(res.get("checks", []), "Whole-stack targets (reported, not asserted)")
    show_profiles(res)


def _settings_text(fs: dict) -> str:
    ra = "untouched" if fs.get("read_ahead_kb") is None else f"set to {fs['read_ahead_kb']}"
    return (f"options {','.join(fs['options'])}, tasks {fs['min_tasks']}-{fs['max_tasks']}, "
            f"writeback_cache {fs['writeback_cache']}, read_ahead_kb {ra}")


def _targets_line(res: dict) -> str:
    """What each target is, with the FUSE settings and read-ahead in effect."""
    lines = []
    for name, t in res.get("targets", {}).items():
        extra = [_settings_text(t["fuse_settings"])] if t.get("fuse_settings") else []
        if t.get("bdi_read_ahead_kb") is not None:
            extra.append(f"BDI read_ahead_kb {t['bdi_read_ahead_kb']}")
        lines.append(f"  {name}: {t['note']}" + (f" ({'; '.join(extra)})" if extra else ""))
    vs = res.get("fuse_settings", {}).get("vstore")
    head = f"[dim]targets; vstore's fuse_settings(): {_settings_text(vs)}" if vs else "[dim]targets:"
    return "\n".join([head, *lines]) + "[/]"


def show_profiles(res: dict) -> None:
    """Per profiled vstore job: trio main thread vs other threads, and the main thread's top own-time frames."""
    profiles = res.get("profiles")
    if not profiles:
        return
    t = Table(title="py-spy on the vstore mount, per job: shares of the samples of running threads (trio main "
                    "thread, of which in epoll; the other threads), the main thread's top own-time frames")
    for col in ("target", "job", "main", "epoll", "others", "top own-time frames of the main thread"):
        t.add_column(col, justify="right" if col in ("main", "epoll", "others") else "left")
    for target, jobs in profiles.items():
        for job, s in jobs.items():
            if "error" in s:
                t.add_row(target, job, "-", "-", "-", s["error"][:80])
                continue
            top = "\n".join(f"{_pct(f['share'])} {f['frame']}" for f in s["main_top_own"][:5])
            t.add_row(target, job, _pct(s["main_share"]), _pct(s["main_epoll_share"]), _pct(s["worker_share"]), top)
    _print_wide(t)
    first = next(s for jobs in profiles.values() for s in jobs.values())
    if "raw" in first:
        console().print(f"[dim]raw profiles, full summaries and fuse-stats per job "
                        f"in {Path(first['raw']).parent}[/]")


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
        out += stack_markdown(result["stack"])
    checks = []
    for sec in ("kernels", "layouts", "stack"):
        checks += [(sec, c) for c in result.get(sec, {}).get("checks", [])]
    if checks:
        out += ["**Targets** (reported by the benchmark, never asserted):", "",
                "| check | on | measured | baseline | ratio | target |", "|---|---|---|---|---|---|"]
        for _, c in checks:
            unit = c.get("unit", "gbs")
            suffix = " IOPS" if unit == "iops" else " GB/s"
            num = _figure(c.get("numerator", c["numerator_gbs"]), unit) + suffix
            den = _figure(c.get("denominator", c["denominator_gbs"]), unit) + suffix
            target = "-" if c.get("target") is None else f"≥ {c['target']:g}"
            out.append(f"| {c['check']} | {c.get('kind', '')} | {num} | {den} | {c['value']:.2f} | {target} |")
        out.append("")
    return "\n".join(out)


def stack_markdown(st: dict) -> list[str]:
    """The whole-stack tables in Markdown: one per comparison, figures then ratio columns."""
    out = [f"**Whole stack**: fio on a {st['size'] // 2**20} MiB file, {st['runtime']:g} s per job, through "
           f"`vstore mount` (pools of file members, chunk {st['chunk'] // 1024} KiB). GB/s (kIOPS for 4 KiB); "
           "the last columns are ratios measured in the same run. Targets:", ""]
    for name, t in st.get("targets", {}).items():
        out.append(f"- {name}: {t['note']}" + (f" (BDI read_ahead_kb {t['bdi_read_ahead_kb']})"
                                               if t.get("bdi_read_ahead_kb") is not None else ""))
    vs = st.get("fuse_settings", {}).get("vstore")
    if vs:
        out.append(f"- vstore's FUSE settings (`fuse_settings()`), applied by `ceiling` too: `{json.dumps(vs)}`")
    out.append("")
    for g in st["groups"]:
        cols = [c["label"] for c in g["ratio_columns"]]
        out += [f"{g['key']}: {g['title']} (" + "; ".join(f"{c['label']} = {c['numerator']} / {c['denominator']}"
                                                        for c in g["ratio_columns"]) + "):", "",
                "| job | " + " | ".join(g["targets"] + cols) + " |", "|---" * (len(g["targets"]) + len(cols) + 1) + "|"]
        for job in g["jobs"]:
            cells = [_figure(st["results"].get(name, {}).get(job, {}).get(_unit(job)), _unit(job))
                     for name in g["targets"]]
            ratios = g["ratios"].get(job, {})
            cells += [f"{ratios[c]:.2f}" if ratios.get(c) else "-" for c in cols]
            out.append(f"| {job} | " + " | ".join(cells) + " |")
        out.append("")
    for name, why in st.get("missing", {}).items():
        out.append(f"Missing: {name}: {why}")
    if st.get("missing"):
        out.append("")
    return out


if __name__ == "__main__":
    import sys

    print(markdown(json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/bench.json").read_text())))
