"""`vstore grow`: add members to a pool, or give it the space its members grew by (vstore.ops.grow).

Like the lifecycle commands it goes through ``run_pool_command``: a mounted pool
grows in its mount process (a raid1 mirror is copied in the background, followed
here unless ``--background``); an unmounted one is opened and grown here.
"""

from __future__ import annotations

from typing import Any

import click

from vstore.cli.common import POOL, SIZE, echo_json, run_pool_command
from vstore.cli.lifecycle import _speed, json_option, speed_options
from vstore.errors import ConfigError
from vstore.sizes import format_size


@click.command()
@POOL
@click.argument("uris", nargs=-1, metavar="[URI]...")
@click.option("--add", "add", is_flag=True,
              help="Add the URIs as new members (linear: their space at once; raid1: new mirrors, "
                   "copied online).")
@click.option("--members-grew", is_flag=True,
              help="Take the space the members' devices grew by (as mdadm --grow --size=max).")
@click.option("--size", type=SIZE, default=None, help="Create missing file:// members of this size.")
@click.option("--force", is_flag=True, help="Use a URI even if it belongs to another pool.")
@click.option("--level", default=None, metavar="LEVEL",
              help="With --add: convert a two-member raid1 pool to raid5 (then reshaped onto the new members).")
@click.option("--background", is_flag=True, help="Return once started (the pool must be mounted).")
@json_option
@speed_options
@click.pass_context
def grow(ctx: click.Context, pool: str, uris: tuple[str, ...], add: bool, members_grew: bool,
         size: int | None, force: bool, level: str | None, background: bool, as_json: bool, speed_min: int | None,
         speed_max: int | None) -> None:
    """Grow POOL: `--add URI...` adds members, `--members-grew` takes the space its members grew by."""
    if add == members_grew:
        raise ConfigError("say what grows: --add URI... (new members) or --members-grew")
    if add and not uris:
        raise ConfigError("--add needs at least one URI")
    if members_grew and level is not None:
        raise ConfigError("--level goes with --add (a conversion adds a member)")
    if members_grew and uris:
        raise ConfigError("--members-grew takes no URI (it reads the members' sizes again)")
    if members_grew:
        r = run_pool_command(ctx, pool, "grow", as_json=as_json, members_grew=True)
    else:
        extra = {"level": level} if level is not None else {}
        r = run_pool_command(ctx, pool, "grow", background=background, as_json=as_json, add=list(uris),
                             size=size, force=force, speed=_speed(speed_min, speed_max), **extra)
    if r is None:
        return
    if as_json:
        echo_json({"pool": pool, **r})
        return
    _echo(pool, r)


def _echo(pool: str, r: dict[str, Any]) -> None:
    from vstore.ops.grow import describe_unusable

    for note in describe_unusable(r):
        click.echo(f"note: {note}", err=True)
    if "grown_members" in r:
        if not r["grown_members"]:
            click.echo(f"no member of pool {pool!r} grew: nothing to do")
        else:
            click.echo(f"pool {pool!r} grew by {format_size(int(r['added_bytes']))} to "
                       f"{format_size(int(r['size']))} (members {', '.join(map(str, r['grown_members']))} grew)")
        return
    members = ", ".join(map(str, r.get("added_members", [])))
    if r.get("kind") == "reshape":
        secs = float(r.get("seconds", 0) or 0)
        conv = f"converted from {r['converted_from']} to {r['level']} and " if r.get("converted_from") else ""
        click.echo(f"pool {pool!r} {conv}reshaped from {r['from']} onto {r['to']} members "
                   f"({format_size(int(r.get('bytes', 0)))} moved in {secs:.1f} s); now "
                   f"{format_size(int(r['size']))}; pool is {r.get('pool_state', 'clean')}")
        return
    if r.get("level") == "raid1":
        secs = float(r.get("seconds", 0) or 0)
        click.echo(f"pool {pool!r}: mirror(s) {members} added and copied ({format_size(int(r.get('bytes', 0)))} "
                   f"in {secs:.1f} s); pool is {r.get('pool_state', 'clean')}")
    else:
        click.echo(f"pool {pool!r} grew by {format_size(int(r['added_bytes']))} to "
                   f"{format_size(int(r['size']))} (members {members} added)")
