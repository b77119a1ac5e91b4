"""`vstore journal attach|detach|status`: add, replace or remove a pool's write-ahead journal.

Like md's ``--add-journal`` and its consistency-policy change, on a live pool: with
the pool mounted the mount process switches it (through the control socket) while
its volumes stay in use; otherwise the command opens the pool itself. The switch
holds updates back for a moment, flushes the members and commits the new mode.
"""

from __future__ import annotations

import json
from typing import Any

import click

from vstore.cli.common import POOL, SIZE, echo_json, run_pool_command
from vstore.sizes import format_size


def describe(st: dict[str, Any]) -> str:
    """A pool's crash-consistency mode in a few words."""
    if st.get("mode") == "journal":
        size = f", {format_size(int(st['size']))} of log" if st.get("size") else ""
        return f"journal {st.get('uri')} ({st.get('state', 'active')}{size})"
    if "bitmap" in str(st.get("protection", "")):
        return "write-intent bitmap (no journal)"
    return "no journal"


@click.group()
def journal() -> None:
    """The write-ahead journal of a pool: add, replace or remove it while the pool is in use."""


@journal.command("attach")
@POOL
@click.argument("uri")
@click.option("--size", type=SIZE, default=None,
              help="Create a missing file:// journal of this size (default 64M).")
@click.option("--force", is_flag=True, help="Use URI even if it holds another pool's journal or member.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result (see README, Scripting).")
@click.pass_context
def attach(ctx: click.Context, pool: str, uri: str, size: int | None, force: bool, as_json: bool) -> None:
    """Give POOL a journal on URI (replacing its journal, if it has one)."""
    r = run_pool_command(ctx, pool, "journal_attach", uri=uri, size=size, force=force)
    if as_json:
        echo_json(r["journal"])
        return
    click.echo(f"pool {pool!r}: {describe(r['journal'])}")


@journal.command("detach")
@POOL
@click.option("--keep-superblock", is_flag=True,
              help="Leave the old journal's superblock in place (it is wiped by default).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result (see README, Scripting).")
@click.pass_context
def detach(ctx: click.Context, pool: str, keep_superblock: bool, as_json: bool) -> None:
    """Remove POOL's journal; the pool goes on with a write-intent bitmap."""
    r = run_pool_command(ctx, pool, "journal_detach", keep_superblock=keep_superblock)
    if as_json:
        echo_json(r["journal"])
        return
    click.echo(f"pool {pool!r}: journal detached; now {describe(r['journal'])}")


@journal.command("status")
@POOL
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, pool: str, as_json: bool) -> None:
    """Show POOL's crash-consistency mode (journal, bitmap or none) and any warning."""
    st = run_pool_command(ctx, pool, "journal_status")["journal"]
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"pool {pool!r}: {describe(st)}")
    if st.get("warning"):
        click.echo(f"warning: {st['warning']}")
