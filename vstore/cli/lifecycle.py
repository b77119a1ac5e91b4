"""`vstore replace|move|resume|scrub|spare`: member lifecycle commands (see vstore.ops.lifecycle).

Each goes through ``pool_command``: with the pool mounted, the mount process
starts the operation in the background and this command follows its progress
through the control socket (or returns at once with ``--background``); with no
mount, the command opens the pool and runs the operation to completion itself
(so ``--background`` needs a mount; without one the command says so and waits).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from vstore.cli.progress import progress_bar
from vstore.errors import ConfigError, VstoreError
from vstore.sizes import format_size, parse_size

FOLLOW_INTERVAL = 0.5


class _Size(click.ParamType):
    """A size such as 64K or 1G (vstore.cli.main's SIZE, which this module cannot import early)."""

    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ConfigError as e:
            self.fail(str(e), param, ctx)


_SIZE = _Size()


def _size_type() -> Any:
    return _SIZE


def _speed(speed_min: int | None, speed_max: int | None) -> dict[str, int] | None:
    if speed_min is None and speed_max is None:
        return None
    return {k: v for k, v in (("min", speed_min), ("max", speed_max)) if v is not None}


def speed_options(fn: Any) -> Any:
    """--speed-min / --speed-max (md's sync_speed_min/max)."""
    fn = click.option("--speed-max", type=_size_type(), default=None, metavar="SIZE",
                      help="At most this many bytes per second (default: unlimited).")(fn)
    return click.option("--speed-min", type=_size_type(), default=None, metavar="SIZE",
                        help="While foreground I/O runs, slow down to this many bytes per "
                             "second, not less (default 16M).")(fn)


def member_target_options(fn: Any) -> Any:
    """POOL INDEX NEW_URI [--size] [--background] [--force] [--speed-*]: replace and move."""
    for deco in reversed([
        click.argument("pool"),
        click.argument("index", type=int),
        click.argument("new_uri"),
        click.option("--size", type=_size_type(), default=None,
                     help="Create a missing file:// member of this size."),
        click.option("--background", is_flag=True,
                     help="Return once started (the pool must be mounted)."),
        click.option("--force", is_flag=True, help="Use NEW_URI even if it belongs to another pool."),
        speed_options,
        click.pass_context,
    ]):
        fn = deco(fn)
    return fn


def _follow(ctx: click.Context, pool: str, label: str) -> dict[str, Any]:
    """Show the progress of the mount process's running operation until it ends; its result."""
    from vstore.cli.main import mounted_call

    home = ctx.obj["home"]
    with progress_bar(label) as cb:
        while True:
            reply = mounted_call(home, pool, {"cmd": "operation"})
            if reply is None:
                raise VstoreError(f"pool {pool!r} was unmounted while the operation ran")
            cur = reply.get("current")
            if cur is None:
                last = reply.get("last") or {}
                if last.get("state") != "done":
                    raise VstoreError(f"{last.get('kind', 'operation')} {last.get('state')}: "
                                      f"{last.get('error', 'see the mount log')}")
                return last
            cb(int(cur.get("done", 0)), int(cur.get("total", 0)))
            time.sleep(FOLLOW_INTERVAL)


def _execute(ctx: click.Context, pool: str, request: dict[str, Any], local: Any, label: str,
             background: bool) -> dict[str, Any] | None:
    """Run through the mount (following it unless background) or locally; None if left running."""
    from vstore.cli.main import _mount_socket, pool_command

    mounted = _mount_socket(ctx.obj["home"], pool) is not None
    if background and not mounted:
        click.echo(f"note: pool {pool!r} is not mounted: --background needs the mount process; "
                   "running to completion here", err=True)
    reply = pool_command(ctx, pool, request, local)
    if "started" not in reply:
        return reply
    if background:
        st = reply["started"]
        click.echo(f"{st['kind']} started in the mount process of pool {pool!r}; "
                   f"see `vstore status {pool}`")
        return None
    return _follow(ctx, pool, label)


# --------------------------------------------------------------------------- replace / move


@click.command()
@member_target_options
def replace(ctx: click.Context, pool: str, index: int, new_uri: str, size: int | None,
            background: bool, force: bool, speed_min: int | None, speed_max: int | None) -> None:
    """Replace member INDEX of POOL by NEW_URI and rebuild it online (a healthy one is moved)."""
    speed = _speed(speed_min, speed_max)

    async def local(p: Any) -> dict[str, Any]:
        from vstore.ops.rebuild import replace as do_replace

        with progress_bar(f"rebuild member {index}") as cb:
            return await do_replace(p, index, new_uri, size=size, force=force, speed=speed,
                                    progress=cb)

    request = {"cmd": "replace", "index": index, "uri": new_uri, "size": size, "force": force,
               "speed": speed}
    r = _execute(ctx, pool, request, local, f"rebuild member {index}", background)
    if r is not None:
        _echo_done(pool, r)


@click.command()
@member_target_options
def move(ctx: click.Context, pool: str, index: int, new_uri: str, size: int | None,
         background: bool, force: bool, speed_min: int | None, speed_max: int | None) -> None:
    """Move healthy member INDEX of POOL to NEW_URI while the pool stays in use (like pvmove)."""
    speed = _speed(speed_min, speed_max)

    async def local(p: Any) -> dict[str, Any]:
        from vstore.ops.move import move as do_move

        with progress_bar(f"move member {index}") as cb:
            return await do_move(p, index, new_uri, size=size, force=force, speed=speed, progress=cb)

    request = {"cmd": "move", "index": index, "uri": new_uri, "size": size, "force": force,
               "speed": speed}
    r = _execute(ctx, pool, request, local, f"move member {index}", background)
    if r is not None:
        _echo_done(pool, r)


@click.command()
@click.argument("pool")
@click.option("--background", is_flag=True, help="Return once started (the pool must be mounted).")
@speed_options
@click.pass_context
def resume(ctx: click.Context, pool: str, background: bool, speed_min: int | None,
           speed_max: int | None) -> None:
    """Resume POOL's interrupted rebuild from its checkpoint (a mount resumes it by itself)."""
    speed = _speed(speed_min, speed_max)

    async def local(p: Any) -> dict[str, Any]:
        from vstore.ops.rebuild import resume as do_resume

        with progress_bar("rebuild") as cb:
            return await do_resume(p, speed=speed, progress=cb)

    r = _execute(ctx, pool, {"cmd": "resume", "speed": speed}, local, "rebuild", background)
    if r is not None:
        _echo_done(pool, r)


@click.command()
@click.argument("pool")
@click.pass_context
def stop(ctx: click.Context, pool: str) -> None:
    """Stop POOL's running rebuild, move or scrub (a rebuild or scrub resumes from its checkpoint)."""
    from vstore.cli.main import pool_command

    async def local(p: Any) -> dict[str, Any]:
        return {"stopped": await p.lifecycle.stop()}  # unmounted, nothing runs between commands

    r = pool_command(ctx, pool, {"cmd": "operation_stop"}, local)
    click.echo(f"pool {pool!r}: " + ("operation stopped" if r.get("stopped") else "nothing running"))


def _echo_done(pool: str, r: dict[str, Any]) -> None:
    kind = r.get("kind", "operation")
    secs = float(r.get("seconds", 0) or 0)
    nbytes = int(r.get("bytes", 0) or 0)
    rate = f", {format_size(int(nbytes / secs))}/s" if secs > 0 else ""
    if kind == "move":
        click.echo(f"member {r['member']} of pool {pool!r} moved to {r['uri']}: "
                   f"{format_size(nbytes)} in {secs:.1f} s{rate}, {len(r.get('rounds', []))} rounds, "
                   f"final pause {float(r.get('pause_seconds', 0)) * 1000:.0f} ms")
    elif r.get("rebuilt") == []:
        click.echo(f"pool {pool!r}: nothing to rebuild")
    else:
        extra = f" (resumed at row {r['resumed_at_row']})" if r.get("resumed_at_row") else ""
        click.echo(f"member {r.get('member')} of pool {pool!r} rebuilt onto {r.get('uri')}: "
                   f"{format_size(nbytes)} in {secs:.1f} s{rate}{extra}; pool is {r.get('pool_state', 'clean')}")


# --------------------------------------------------------------------------- spares


@click.group()
def spare() -> None:
    """Hot spares: taken (and rebuilt) automatically when a member fails."""


@spare.command("add")
@click.argument("pool")
@click.argument("uri")
@click.option("--size", type=_size_type(), default=None, help="Create a missing file:// spare of this size.")
@click.option("--force", is_flag=True, help="Use URI even if it belongs to another pool.")
@click.pass_context
def spare_add(ctx: click.Context, pool: str, uri: str, size: int | None, force: bool) -> None:
    """Add URI to POOL as a hot spare."""
    from vstore.cli.main import pool_command

    async def local(p: Any) -> dict[str, Any]:
        from vstore.ops.rebuild import add_spare

        return await add_spare(p, uri, size=size, force=force)

    r = pool_command(ctx, pool, {"cmd": "spare_add", "uri": uri, "size": size, "force": force}, local)
    click.echo(f"pool {pool!r} has {len(r['spares'])} spare(s): "
               + ", ".join(s["uri"] for s in r["spares"]))


@spare.command("remove")
@click.argument("pool")
@click.argument("uri")
@click.pass_context
def spare_remove(ctx: click.Context, pool: str, uri: str) -> None:
    """Remove hot spare URI from POOL (its superblock is wiped)."""
    from vstore.cli.main import pool_command

    async def local(p: Any) -> dict[str, Any]:
        from vstore.ops.rebuild import remove_spare

        return await remove_spare(p, uri)

    r = pool_command(ctx, pool, {"cmd": "spare_remove", "uri": uri}, local)
    click.echo(f"removed spare {uri} from pool {pool!r}; {len(r['spares'])} left")


# --------------------------------------------------------------------------- scrub


@click.command()
@click.argument("pool")
@click.option("--repair", is_flag=True, help="Rewrite what is wrong (the member at fault where known).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--restart", is_flag=True, help="Start from the beginning, not from a checkpoint.")
@click.option("--background", is_flag=True, help="Return once started (the pool must be mounted).")
@speed_options
@click.pass_context
def scrub(ctx: click.Context, pool: str, repair: bool, as_json: bool, restart: bool, background: bool,
          speed_min: int | None, speed_max: int | None) -> None:
    """Verify parity and mirror copies of POOL; exit 0 clean (or repaired), 1 mismatches, 2+ errors."""
    speed = _speed(speed_min, speed_max)

    async def local(p: Any) -> dict[str, Any]:
        from vstore.ops.scrub import run_scrub

        with progress_bar("scrub") as cb:
            return await run_scrub(p, repair=repair, restart=restart, speed=speed, progress=cb)

    request = {"cmd": "scrub", "repair": repair, "restart": restart, "speed": speed}
    try:
        r = _execute(ctx, pool, request, local, "scrub", background)
    except VstoreError as e:
        # fsck-like: 1 means mismatches, so every error is 2 or more.
        click.echo(f"vstore: error: {e}", err=True)
        sys.exit(max(2, e.exit_code))
    if r is None:
        return
    if as_json:
        click.echo(json.dumps(r, indent=2))
    else:
        _echo_scrub(pool, r)
    sys.exit(1 if int(r.get("remaining", 0)) else 0)


def _echo_scrub(pool: str, r: dict[str, Any]) -> None:
    what = {"P": "P wrong", "Q": "Q wrong", "data": "data wrong", "parity": "parity disagrees",
            "copy": "copy differs"}
    resumed = f", resumed at unit {r['resumed_at']}" if r.get("resumed_at") else ""
    click.echo(f"scrub of pool {pool!r} ({r.get('level')}): {format_size(int(r.get('scrubbed', 0)))} "
               f"in {r.get('units')} stripes{resumed}; {r.get('mismatches')} mismatch(es), "
               f"{r.get('repaired')} repaired")
    for f in r.get("found", []):
        who = f"member {f['culprit']} at fault" if f.get("culprit") is not None else "member at fault unknown"
        click.echo(f"  row {f['row']}: member {f['member']} offset {f['offset']} "
                   f"(data +{f['data_offset']}), {f['length']} bytes: {what.get(f['what'], f['what'])}; "
                   f"{who}" + ("; repaired" if f.get("repaired") else ""))
    if r.get("truncated"):
        click.echo(f"  ... (only the first {len(r.get('found', []))} listed)")


COMMANDS = (replace, move, resume, stop, spare, scrub)
