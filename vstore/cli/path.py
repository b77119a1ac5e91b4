"""`vstore path fail|reinstate POOL MEMBER PATH`: multipath drills."""

from __future__ import annotations

from typing import Any

import click

from vstore.cli.common import POOL, echo_json, home_of, mount_socket, run_pool_command

JSON_OPTION = click.option("--json", "as_json", is_flag=True,
                           help="Machine-readable result (see README, Scripting).")


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


def _path_index(st: dict[str, Any], member: int, path_arg: str) -> int | None:
    """The index of PATH (an index or a URI) among the member's paths, None when not there."""
    paths = st["members"][member].get("paths", [])
    idx = int(path_arg) if path_arg.isdigit() else next(
        (i for i, p in enumerate(paths) if p["uri"] == path_arg), None)
    return None if idx is None or idx >= len(paths) else idx


def _describe(st: dict[str, Any], member: int, path_arg: str) -> str:
    idx = _path_index(st, member, path_arg)
    if idx is None:
        return ""
    p = st["members"][member]["paths"][idx]
    return f"{p['uri']} is {p['state']}"


def _report(ctx: click.Context, st: dict[str, Any], pool: str, member: int, path_arg: str,
            action: str, as_json: bool) -> None:
    """The drill's outcome: a line, or {"pool", "member", "action", "path", "mounted", "paths"} as JSON."""
    if not as_json:
        click.echo(f"member {member} of pool {pool!r}: path {path_arg} {action}; "
                   f"{_describe(st, member, path_arg)}")
        return
    paths = st["members"][member].get("paths", [])
    echo_json({"pool": pool, "member": member, "action": action,
               "path": _path_index(st, member, path_arg),
               "mounted": mount_socket(home_of(ctx), pool) is not None, "paths": paths})


@path.command("fail")
@POOL
@click.argument("member", type=int)
@click.argument("path_arg", metavar="PATH")
@click.option("--force", is_flag=True, help="Fail it even if it is the member's last usable path.")
@JSON_OPTION
@click.pass_context
def path_fail(ctx: click.Context, pool: str, member: int, path_arg: str, force: bool,
              as_json: bool) -> None:
    """Fail path PATH (index or URI) of member MEMBER of POOL; I/O moves to the other paths."""
    st = _run(ctx, pool, member, path_arg, fail=True, force=force)
    _report(ctx, st, pool, member, path_arg, "failed", as_json)


@path.command("reinstate")
@POOL
@click.argument("member", type=int)
@click.argument("path_arg", metavar="PATH")
@JSON_OPTION
@click.pass_context
def path_reinstate(ctx: click.Context, pool: str, member: int, path_arg: str, as_json: bool) -> None:
    """Probe path PATH (index or URI) of member MEMBER of POOL and put it back into service."""
    st = _run(ctx, pool, member, path_arg, fail=False)
    _report(ctx, st, pool, member, path_arg, "reinstated", as_json)
