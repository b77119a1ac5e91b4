"""`vstore replace|move|resume|stop|scrub|spare`: member lifecycle commands (see vstore.ops.lifecycle).

Each goes through ``run_pool_command``: with the pool mounted, the mount process
starts the operation in the background and this command follows its progress
through the control socket (or returns at once with ``--background``); with no
mount, the command opens the pool and runs the operation to completion itself
(so ``--background`` needs a mount; without one the command says so and waits).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from vstore.cli.common import POOL, SIZE, echo_json, run_pool_command
from vstore.errors import VstoreError
from vstore.sizes import format_size


def _speed(speed_min: int | None, speed_max: int | None) -> dict[str, int] | None:
    if speed_min is None and speed_max is None:
        return None
    return {k: v for k, v in (("min", speed_min), ("max", speed_max)) if v is not None}


def speed_options(fn: Any) -> Any:
    """--speed-min / --speed-max (md's sync_speed_min/max)."""
    fn = click.option("--speed-max", type=SIZE, default=None, metavar="SIZE",
                      help="At most this many bytes per second (default: unlimited).")(fn)
    return click.option("--speed-min", type=SIZE, default=None, metavar="SIZE",
                        help="While foreground I/O runs, slow down to this many bytes per "
                             "second, not less (default 16M).")(fn)


def json_option(fn: Any) -> Any:
    """--json: the result as one JSON document on stdout (progress stays on stderr)."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Machine-readable result (see README, Scripting).")(fn)


def member_target_options(fn: Any) -> Any:
    """POOL INDEX NEW_URI [--size] [--background] [--force] [--speed-*]: replace and move."""
    for deco in reversed([
        POOL,
        click.argument("index", type=int),
        click.argument("new_uri"),
        click.option("--size", type=SIZE, default=None,
                     help="Create a missing file:// member of this size."),
        click.option("--background", is_flag=True,
                     help="Return once started (the pool must be mounted)."),
        click.option("--force", is_flag=True, help="Use NEW_URI even if it belongs to another pool."),
        json_option,
        speed_options,
        click.pass_context,
    ]):
        fn = deco(fn)
    return fn


# --------------------------------------------------------------------------- replace / move


@click.command()
@member_target_options
def replace(ctx: click.Context, pool: str, index: int, new_uri: str, size: int | None,
            background: bool, force: bool, as_json: bool, speed_min: int | None,
            speed_max: int | None) -> None:
    """Replace member INDEX of POOL by NEW_URI and rebuild it online (a healthy one is moved)."""
    speed = _speed(speed_min, speed_max)
    r = run_pool_command(ctx, pool, "replace", background=background, as_json=as_json, index=index,
                         uri=new_uri, size=size, force=force, speed=speed)
    _report_done(pool, r, as_json)


@click.command()
@member_target_options
def move(ctx: click.Context, pool: str, index: int, new_uri: str, size: int | None,
         background: bool, force: bool, as_json: bool, speed_min: int | None,
         speed_max: int | None) -> None:
    """Move healthy member INDEX of POOL to NEW_URI while the pool stays in use (like pvmove)."""
    speed = _speed(speed_min, speed_max)
    r = run_pool_command(ctx, pool, "move", background=background, as_json=as_json, index=index,
                         uri=new_uri, size=size, force=force, speed=speed)
    _report_done(pool, r, as_json)


@click.command()
@POOL
@click.option("--background", is_flag=True, help="Return once started (the pool must be mounted).")
@json_option
@speed_options
@click.pass_context
def resume(ctx: click.Context, pool: str, background: bool, as_json: bool, speed_min: int | None,
           speed_max: int | None) -> None:
    """Resume POOL's interrupted rebuild or move from its checkpoint (a mount resumes it by itself)."""
    speed = _speed(speed_min, speed_max)
    r = run_pool_command(ctx, pool, "resume", background=background, as_json=as_json, speed=speed)
    _report_done(pool, r, as_json)


@click.command()
@POOL
@json_option
@click.pass_context
def stop(ctx: click.Context, pool: str, as_json: bool) -> None:
    """Stop POOL's running rebuild, move or scrub (each resumes from its checkpoint)."""
    r = run_pool_command(ctx, pool, "operation_stop")
    if as_json:
        echo_json({"pool": pool, "stopped": bool(r.get("stopped"))})
        return
    click.echo(f"pool {pool!r}: " + ("operation stopped" if r.get("stopped") else "nothing running"))


def _report_done(pool: str, r: dict[str, Any] | None, as_json: bool) -> None:
    """The result of a replace, move or resume: a line, or {"pool", **result} as JSON."""
    if r is None:
        return
    if as_json:
        echo_json({"pool": pool, **r})
    else:
        _echo_done(pool, r)


def _echo_done(pool: str, r: dict[str, Any]) -> None:
    kind = r.get("kind", "operation")
    secs = float(r.get("seconds", 0) or 0)
    nbytes = int(r.get("bytes", 0) or 0)
    rate = f", {format_size(int(nbytes / secs))}/s" if secs > 0 else ""
    if kind == "move":
        click.echo(f"member {r['member']} of pool {pool!r} moved to {r['uri']}: "
                   f"{format_size(nbytes)} in {secs:.1f} s{rate}, {len(r.get('rounds', []))} rounds, "
                   f"final pause {float(r.get('pause_seconds', 0)) * 1000:.0f} ms"
                   + (f" (resumed at region {r['resumed_at_region']})" if r.get("resumed_at_region") else ""))
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
@POOL
@click.argument("uri")
@click.option("--size", type=SIZE, default=None, help="Create a missing file:// spare of this size.")
@click.option("--force", is_flag=True, help="Use URI even if it belongs to another pool.")
@json_option
@click.pass_context
def spare_add(ctx: click.Context, pool: str, uri: str, size: int | None, force: bool, as_json: bool) -> None:
    """Add URI to POOL as a hot spare."""
    r = run_pool_command(ctx, pool, "spare_add", uri=uri, size=size, force=force)
    if as_json:
        echo_json({"pool": pool, "spares": r["spares"]})
        return
    click.echo(f"pool {pool!r} has {len(r['spares'])} spare(s): "
               + ", ".join(s["uri"] for s in r["spares"]))


@spare.command("remove")
@POOL
@click.argument("uri")
@json_option
@click.pass_context
def spare_remove(ctx: click.Context, pool: str, uri: str, as_json: bool) -> None:
    """Remove hot spare URI from POOL (its superblock is wiped)."""
    r = run_pool_command(ctx, pool, "spare_remove", uri=uri)
    if as_json:
        echo_json({"pool": pool, "spares": r["spares"]})
        return
    click.echo(f"removed spare {uri} from pool {pool!r}; {len(r['spares'])} left")


# --------------------------------------------------------------------------- scrub


@click.command()
@POOL
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
    try:
        r = run_pool_command(ctx, pool, "scrub", background=background, as_json=as_json, repair=repair,
                             restart=restart, speed=speed)
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
            "copy": "copy differs", "checksum": "block fails its checksum"}
    resumed = f", resumed at unit {r['resumed_at']}" if r.get("resumed_at") else ""
    click.echo(f"scrub of pool {pool!r} ({r.get('level')}): {format_size(int(r.get('scrubbed', 0)))} "
               f"in {r.get('units')} stripes{resumed}; {r.get('mismatches')} mismatch(es), "
               f"{r.get('repaired')} repaired")
    for f in r.get("found", []):
        who = f"member {f['culprit']} at fault" if f.get("culprit") is not None else "member at fault unknown"
        click.echo(f"  row {f['row']}: member {f['member']} offset {f['offset']} "
                   f"(data +{f['data_offset']}), {f['length']} bytes: {what.get(f['what'], f['what'])}; "
                   f"{who}" + (f"; P/Q {f['pq']}" if f.get("pq") else "")
                   + (f"; {f['note']}" if f.get("note") else "") + ("; repaired" if f.get("repaired") else ""))
    if r.get("truncated"):
        click.echo(f"  ... (only the first {len(r.get('found', []))} listed)")


COMMANDS = (replace, move, resume, stop, spare, scrub)
