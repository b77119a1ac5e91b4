"""`vstore path fail|reinstate POOL MEMBER PATH`: multipath drills."""

from __future__ import annotations

from typing import Any

import click

from vstore.cli.common import home_of, mount_socket, run_pool_command


@click.group()
def path() -> None:
    """Fail and reinstate paths of multipath members (drills; not kept across opens)."""


def _run(ctx: click.Context, pool: str, member: int, path_arg: str, *, fail: bool,
         force: bool = False) -> dict[str, Any]:
    index: int | str = int(path_arg) if path_arg.isdigit() else path_arg
    mounted = mount_socket(home_of(ctx), pool) is not None
    st = run_pool_command(ctx, pool, "path_fail" if fail else "path_reinstate", member=member,
                          path=index, force=force)
    if not mounted:
        click.echo(f"note: pool {pool!r} is not mounted: the path state lasts only for this command",
                   err=True)
    return st


def _describe(st: dict[str, Any], member: int, path_arg: str) -> str:
    paths = st["members"][member].get("paths", [])
    idx = int(path_arg) if path_arg.isdigit() else next(
        (i for i, p in enumerate(paths) if p["uri"] == path_arg), None)
    if idx is None or idx >= len(paths):
        return ""
    return f"{paths[idx]['uri']} is {paths[idx]['state']}"


@path.command("fail")
@click.argument("pool")
@click.argument("member", type=int)
@click.argument("path_arg", metavar="PATH")
@click.option("--force", is_flag=True, help="Fail it even if it is the member's last usable path.")
@click.pass_context
def path_fail(ctx: click.Context, pool: str, member: int, path_arg: str, force: bool) -> None:
    """Fail path PATH (index or URI) of member MEMBER of POOL; I/O moves to the other paths."""
    st = _run(ctx, pool, member, path_arg, fail=True, force=force)
    click.echo(f"member {member} of pool {pool!r}: path {path_arg} failed; "
               f"{_describe(st, member, path_arg)}")


@path.command("reinstate")
@click.argument("pool")
@click.argument("member", type=int)
@click.argument("path_arg", metavar="PATH")
@click.pass_context
def path_reinstate(ctx: click.Context, pool: str, member: int, path_arg: str) -> None:
    """Probe path PATH (index or URI) of member MEMBER of POOL and put it back into service."""
    st = _run(ctx, pool, member, path_arg, fail=False)
    click.echo(f"member {member} of pool {pool!r}: path {path_arg} reinstated; "
               f"{_describe(st, member, path_arg)}")
