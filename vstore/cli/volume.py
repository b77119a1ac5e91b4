"""`vstore volume create|list|remove|rename|resize`: the logical volumes of a pool."""

from __future__ import annotations

import json

import click

from vstore.cli.common import POOL, SIZE, echo_json, run_pool_command
from vstore.sizes import format_size


@click.group()
def volume() -> None:
    """Create, list, remove and resize logical volumes."""


@volume.command("create")
@POOL
@click.argument("name")
@click.option("--size", type=SIZE, required=True, help="Volume size (rounded up to 4K).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result (see README, Scripting).")
@click.pass_context
def volume_create(ctx: click.Context, pool: str, name: str, size: int, as_json: bool) -> None:
    """Create volume NAME in POOL (its bytes read as zeros)."""
    r = run_pool_command(ctx, pool, "volume_create", name=name, size=size)
    if as_json:
        echo_json({"pool": pool, "name": r["name"], "size": r["size"]})
        return
    click.echo(f"created volume {r['name']!r} of {format_size(r['size'])} in pool {pool!r}")


@volume.command("list")
@POOL
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def volume_list(ctx: click.Context, pool: str, as_json: bool) -> None:
    """List the volumes of POOL."""
    r = run_pool_command(ctx, pool, "volume_list")
    if as_json:
        click.echo(json.dumps(r["volumes"], indent=2))
    else:
        for v in r["volumes"]:
            note = "\tincomplete (an import did not finish; import it again)" if v.get("incomplete") else ""
            click.echo(f"{v['name']}\t{format_size(v['size'])}\t{v['size']}{note}")


@volume.command("remove")
@POOL
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove it even while it is open in the mount.")
@click.pass_context
def volume_remove(ctx: click.Context, pool: str, name: str, force: bool) -> None:
    """Remove volume NAME from POOL (refused while its file is open in the mount, unless --force)."""
    run_pool_command(ctx, pool, "volume_remove", name=name, force=force)
    click.echo(f"removed volume {name!r} from pool {pool!r}")


@volume.command("rename")
@POOL
@click.argument("name")
@click.argument("new")
@click.pass_context
def volume_rename(ctx: click.Context, pool: str, name: str, new: str) -> None:
    """Rename volume NAME of POOL to NEW (refused while its file is open in the mount)."""
    run_pool_command(ctx, pool, "volume_rename", name=name, new=new)
    click.echo(f"renamed volume {name!r} of pool {pool!r} to {new!r}")


@volume.command("resize")
@POOL
@click.argument("name")
@click.option("--size", type=SIZE, required=True, help="New size (grow only).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result (see README, Scripting).")
@click.pass_context
def volume_resize(ctx: click.Context, pool: str, name: str, size: int, as_json: bool) -> None:
    """Grow volume NAME of POOL to SIZE."""
    r = run_pool_command(ctx, pool, "volume_resize", name=name, size=size)
    if as_json:
        echo_json({"pool": pool, "name": r["name"], "size": r["size"]})
        return
    click.echo(f"volume {r['name']!r} is now {format_size(r['size'])}")
