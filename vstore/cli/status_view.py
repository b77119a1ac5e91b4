"""Render `vstore status` as tables on the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from vstore.sizes import format_size

_STATE_STYLE = {"clean": "green", "active": "green", "degraded": "yellow", "failed": "red",
                "missing": "red", "bad": "red", "stale": "red", "standby": "cyan", "pending": "yellow",
                "rebuilding": "yellow"}


def render_status(st: dict[str, Any], console: Console | None = None) -> None:
    """Print a pool's status (as returned by Pool.status) as text."""
    if console is None:
        import sys

        console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    style = _STATE_STYLE.get(st["state"], "")
    console.print(
        f"pool [bold]{st['name']}[/] {st['level']}  state [{style}]{st['state']}[/]  "
        f"size {format_size(st['size'])}  used {format_size(st['used'])}  "
        f"free {format_size(st['free'])}  chunk {format_size(st['chunk'])}  "
        f"generation {st['generation']}"
    )
    if st.get("journal"):
        journal = {k: v for k, v in st["journal"].items() if k != "warning"}
        console.print(f"journal: {_flat(journal)}", markup=False)
        if st["journal"].get("warning"):
            console.print(f"warning: {st['journal']['warning']}", markup=False, style="yellow",
                          soft_wrap=True)
    if st.get("operation"):
        console.print(f"operation: {_operation(st['operation'])}", markup=False)
    if st.get("spares"):
        console.print("spares: " + ", ".join(f"{s['uri']} ({format_size(s['size'])})" for s in st["spares"]))
    if st.get("checksums"):
        console.print(f"checksums: {_flat(st['checksums'])}", markup=False)
    members = Table(title="members", title_justify="left")
    cksum = bool(st.get("checksums"))
    # CKSUM: blocks that failed their checksums on the member, as zpool status's column.
    for col in ("index", "uri", "state", "data_offset", "data_size", *(("cksum",) if cksum else ()), "note"):
        members.add_column(col)
    for m in st["members"]:
        s = _STATE_STYLE.get(m["state"], "")
        members.add_row(str(m["index"]), m["uri"], f"[{s}]{m['state']}[/]", str(m["data_offset"]),
                        format_size(m["data_size"]),
                        *((str(m.get("checksum_errors", 0)),) if cksum else ()), m.get("error", ""))
    console.print(members)
    _render_paths(st, console)
    vols = Table(title="volumes", title_justify="left")
    vols.add_column("name")
    vols.add_column("size")
    for v in st["volumes"]:
        vols.add_row(v["name"], format_size(v["size"]) + (" (incomplete)" if v.get("incomplete") else ""))
    if st["volumes"]:
        console.print(vols)
    else:
        console.print("volumes: none")


def _render_paths(st: dict[str, Any], console: Console) -> None:
    """The paths of multipath members (members with more than one path)."""
    rows = [(m, i, p) for m in st["members"] for i, p in enumerate(m.get("paths", []))
            if len(m.get("paths", [])) > 1]
    if not rows:
        return
    table = Table(title="paths", title_justify="left")
    for col in ("member", "path", "uri", "state", "selector", "inflight", "errors", "bytes", "note"):
        table.add_column(col)
    for m, i, p in rows:
        s = _STATE_STYLE.get(p["state"], "")
        table.add_row(str(m["index"]), str(i), p["uri"], f"[{s}]{p['state']}[/]",
                      str(p.get("selector", "")), str(p.get("inflight", "")),
                      str(p.get("errors", "")), format_size(p.get("bytes", 0)), p.get("error", ""))
    console.print(table)


def _operation(op: dict[str, Any]) -> str:
    """A rebuild, move or scrub (vstore.ops.lifecycle) as one line."""
    what = op.get("kind", "operation")
    if op.get("member") is not None:
        what += f" of member {op['member']}" + (f" onto {op['uri']}" if op.get("uri") else "")
    line = f"{what}: {op.get('state', '')}"
    if op.get("total"):
        line += (f", {format_size(int(op.get('done', 0)))} of {format_size(int(op['total']))} "
                 f"({op.get('percent', 0)}%)")
    if op.get("state") == "running":
        line += f", {op.get('rate', '')}"
        if op.get("eta_seconds") is not None:
            line += f", {op['eta_seconds']} s left"
    if op.get("state") == "interrupted" and op.get("cursor") is not None:
        unit = {"move": "region", "reshape": "chunk"}.get(op.get("kind", ""), "row")
        line += f" at {unit} {op['cursor']} (a mount resumes it; or `vstore resume`)"
        if op.get("regions_to_recopy"):
            line += f", {op['regions_to_recopy']} region(s) to copy again"
    if op.get("error"):
        line += f": {op['error']}"
    return line


def _flat(value: Any) -> str:
    """A nested status entry as one line: key value, key value, ..."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_flat(v)}" if not isinstance(v, dict) else f"{k} ({_flat(v)})"
                         for k, v in value.items())
    return str(value)
