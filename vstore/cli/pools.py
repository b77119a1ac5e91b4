"""`vstore create|status|list|import-pool|forget|destroy|fail`: whole pools."""

from __future__ import annotations

import json
from typing import Any

import click

from vstore.cli.common import (
    LEVELS,
    POOL,
    SIZE,
    echo_json,
    home_of,
    refuse_if_open,
    run,
    run_pool_command,
)
from vstore.sizes import format_size


@click.command()
@POOL
@click.argument("members", nargs=-1, required=True, metavar="URI...")
@click.option("--level", type=click.Choice(LEVELS), required=True, help="RAID level.")
@click.option("--chunk", type=SIZE, default="64K", show_default=True, help="Chunk size.")
@click.option("--size", type=SIZE, default=None,
              help="Create missing file:// members with this size (sparse).")
@click.option("--force", is_flag=True, help="Overwrite members that belong to another pool.")
@click.option("--journal", "journal", default="none", show_default=True, metavar="URI",
              help="Write-ahead journal device (any member URI, not a member), or none: then "
                   "redundant pools resync their dirty regions in the background after a crash.")
@click.option("--journal-size", type=SIZE, default=None,
              help="Size of a journal file created by --journal (default 64M).")
@click.option("--checksums", is_flag=True,
              help="Keep a CRC32C of every 4 KiB block on the members: reads verify and heal bad "
                   "blocks from redundancy, scrub names the member at fault (raid1/5/6/10).")
@click.option("--selector", type=click.Choice(["round-robin", "queue-length", "service-time"]),
              default=None, help="Multipath path selector (default service-time).")
@click.option("--path-policy", type=click.Choice(["multibus", "failover"]), default=None,
              help="Multipath grouping: all paths active, or one priority group (default multibus).")
@click.option("--no-path-retry", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Queue I/O this long when every path is down, then fail (0: at once; default 30).")
@click.option("--lease", default=None, metavar="etcd://HOST[:PORT]/PREFIX[?ttl=S]",
              help="Own the pool through an etcd lease (host failover; see README, across hosts) "
                   "instead of only this host's lock.")
@click.option("--json", "as_json", is_flag=True,
              help="The new pool's status, as `status --json` (see README, Scripting).")
@click.pass_context
def create(ctx: click.Context, pool: str, members: tuple[str, ...], level: str, chunk: int,
           size: int | None, force: bool, selector: str | None, path_policy: str | None,
           no_path_retry: float | None, journal: str, journal_size: int | None, lease: str | None,
           checksums: bool,
           as_json: bool) -> None:
    """Create POOL from member URIs (comma-separate several paths to one member)."""
    from vstore.pool.pool import Pool

    mp = {"selector": selector, "policy": path_policy, "no_path_retry": no_path_retry}
    multipath = mp if any(v is not None for v in mp.values()) else None

    async def go() -> dict[str, Any]:
        p = await Pool.create(home_of(ctx), pool, level, list(members), chunk=chunk,
                              size=size, force=force, multipath=multipath, journal=journal,
                              journal_size=journal_size, lease=lease, checksums=checksums)
        try:
            return p.status()
        finally:
            await p.aclose()

    st = run(go)
    if as_json:
        echo_json(st)
        return
    jr = st.get("journal") or {}
    how = f", journal {jr['uri']}" if jr.get("mode") == "journal" else ""
    how += ", block checksums (CRC32C)" if st.get("checksums") else ""
    click.echo(f"created {level} pool {pool!r}: {len(members)} members, "
               f"{format_size(st['size'])} usable, chunk {format_size(chunk)}{how}")


@click.command()
@POOL
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable output (with --watch: one JSON document a line, per interval).")
@click.option("--watch", type=click.FloatRange(min=0.1), is_flag=False, flag_value=2.0, default=None,
              metavar="[SECONDS]", help="Redraw every SECONDS (default 2) until Ctrl-C.")
@click.option("--count", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --watch: stop after N frames.")
@click.pass_context
def status(ctx: click.Context, pool: str, as_json: bool, watch: float | None, count: int | None) -> None:
    """Show a pool's level, size, state, members and volumes (--watch: again and again)."""
    if watch is not None:
        _watch(ctx, pool, watch, count, as_json)
        return
    st = run_pool_command(ctx, pool, "status")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    from vstore.cli.status_view import render_status

    render_status(st)
    for m in st["members"]:
        if m["state"] in ("bad", "stale"):
            click.echo(f"vstore: warning: member {m['index']} ({m['uri']}) is {m['state']}: {m.get('error')}; "
                       f"rebuild it with `vstore replace {pool} {m['index']} URI`", err=True)


def _watch(ctx: click.Context, pool: str, interval: float, count: int | None, as_json: bool) -> None:
    """Show the status every interval seconds (as `watch`), count times or until Ctrl-C (exit 0)."""
    import sys
    import time

    from vstore.cli.status_view import render_status

    tty = sys.stdout.isatty()
    frames = 0
    try:
        while True:
            st = run_pool_command(ctx, pool, "status")
            if as_json:
                click.echo(json.dumps(st))
            else:
                if tty:
                    click.clear()
                elif frames:
                    click.echo()
                click.echo(f"every {interval:g}s: vstore status {pool}    {time.strftime('%Y-%m-%d %H:%M:%S')}")
                render_status(st)
            sys.stdout.flush()
            frames += 1
            if count is not None and frames >= count:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


@click.command()
@POOL
@click.pass_context
def forget(ctx: click.Context, pool: str) -> None:
    """Drop POOL from the config directory; its members are not touched (import-pool brings it back)."""
    home = home_of(ctx)
    home.read_pool(pool)  # NotFoundError for an unknown pool
    refuse_if_open(home, pool, "forget")
    home.remove_pool(pool)
    home.lock_path(pool).unlink(missing_ok=True)
    click.echo(f"forgot pool {pool!r}; its members are untouched (vstore import-pool brings it back)")


@click.command()
@POOL
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def destroy(ctx: click.Context, pool: str, yes: bool) -> None:
    """Wipe POOL's superblocks and metadata on every member, spare and journal, and forget it."""
    from vstore.pool.destroy import destroy_pool

    home = home_of(ctx)
    record = home.read_pool(pool)
    refuse_if_open(home, pool, "destroy")
    n = len(record["members"]) + len(record.get("spares", [])) + (1 if record.get("journal") else 0)
    if not yes:
        click.confirm(f"destroy pool {pool!r}: wipe the vstore metadata of its {n} device(s)? Their data "
                      "becomes unreachable", abort=True)
    wiped = run(destroy_pool, home, pool)
    home.lock_path(pool).unlink(missing_ok=True)
    click.echo(f"destroyed pool {pool!r}: metadata wiped on {wiped} device(s)")


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_pools(ctx: click.Context, as_json: bool) -> None:
    """List the pools known in the config directory."""
    home = home_of(ctx)
    rows = []
    for name in home.list_pools():
        rec = home.read_pool(name)
        from vstore.uri import split_paths

        uris = [",".join(p.redacted() for p in split_paths(",".join(m))) for m in rec["members"]]
        rows.append({"name": name, "uuid": rec.get("pool_uuid"), "members": uris})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo(f"no pools in {home.root}")
    else:
        for r in rows:
            click.echo(f"{r['name']}  {r['uuid']}  {len(r['members'])} members")


@click.command("import-pool")
@click.argument("members", nargs=-1, required=True, metavar="URI...")
@click.option("--name", default=None, help="Record the pool under this name.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result (see README, Scripting).")
@click.pass_context
def import_pool_cmd(ctx: click.Context, members: tuple[str, ...], name: str | None, as_json: bool) -> None:
    """Record a pool in the config directory from its members alone."""
    from vstore.pool.importer import import_pool

    result = run(import_pool, home_of(ctx), list(members), name)
    if as_json:
        echo_json(result)
        return
    click.echo(f"imported pool {result['name']!r} ({result['level']}, "
               f"{result['found']}/{result['members']} members found)")


@click.command()
@POOL
@click.argument("index", type=int)
@click.option("--force", is_flag=True, help="Fail it even if that loses the pool's data.")
@click.option("--json", "as_json", is_flag=True,
              help="The pool's status afterwards, as `status --json` (see README, Scripting).")
@click.pass_context
def fail(ctx: click.Context, pool: str, index: int, force: bool, as_json: bool) -> None:
    """Mark member INDEX of POOL failed (for tests and drills)."""
    st = run_pool_command(ctx, pool, "fail", index=index, force=force)
    if as_json:
        echo_json(st)
        return
    op = st.get("operation") or {}
    spare = ""
    if op.get("kind") == "rebuild" and op.get("how") == "spare" and op.get("member") == index:
        spare = (f"; spare {st['members'][index]['uri']} "
                 + ("rebuilt in its place" if op.get("state") == "done" else "is being rebuilt in its place"))
    click.echo(f"member {index} of pool {pool!r} marked failed{spare}; pool is {st['state']}")


COMMANDS = (create, status, list_pools, import_pool_cmd, forget, destroy, fail)
