"""Render `vstore status` as tables on the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from vstore.sizes import format_size

_STATE_STYLE = {"clean": "green", "active": "green", "degraded": "yellow", "failed": "red",
                "missing": "red", "bad": "red"}


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
    for key in ("journal", "operation"):
        if st.get(key):
            console.print(f"{key}: {st[key]}")
    members = Table(title="members", title_justify="left")
    for col in ("index", "uri", "state", "data_offset", "data_size", "note"):
        members.add_column(col)
    for m in st["members"]:
        s = _STATE_STYLE.get(m["state"], "")
        members.add_row(str(m["index"]), m["uri"], f"[{s}]{m['state']}[/]", str(m["data_offset"]),
                        format_size(m["data_size"]), m.get("error", ""))
    console.print(members)
    vols = Table(title="volumes", title_justify="left")
    vols.add_column("name")
    vols.add_column("size")
    for v in st["volumes"]:
        vols.add_row(v["name"], format_size(v["size"]))
    if st["volumes"]:
        console.print(vols)
    else:
        console.print("volumes: none")
