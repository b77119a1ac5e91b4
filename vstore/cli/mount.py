"""`vstore mount|umount`: a pool as one file per volume, served by a mount process that owns it."""

from __future__ import annotations

import sys

import click

from vstore.cli.common import POOL, home_of, mount_socket, takeover_requested
from vstore.errors import VstoreError


@click.command()
@POOL
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (log to stderr).")
@click.option("--read-only", is_flag=True, help="Mount read-only.")
@click.option("--allow-other", is_flag=True, help="Let other users see the mount (default: owner only).")
@click.option("--takeover", is_flag=True,
              help="The pool is owned through an etcd lease held by another host: wait for that "
                   "lease to expire, take the pool over (a newer owner epoch), recover it and serve.")
@click.pass_context
def mount(ctx: click.Context, pool: str, mountpoint: str, foreground: bool, read_only: bool,
          allow_other: bool, takeover: bool) -> None:
    """Mount POOL at MOUNTPOINT: one file per volume; returns once the files are visible."""
    from fuse_mount.daemon import mount as do_mount
    from vstore.pool.commands import POOL_COMMANDS
    from vstore.pool.pool import Pool

    home = home_of(ctx)
    takeover = takeover or takeover_requested()
    home.read_pool(pool)  # a clear error for an unknown pool before anything forks
    if mount_socket(home, pool) is not None:
        raise VstoreError(f"pool {pool!r} is already mounted")

    async def open_target() -> Pool:
        p = await Pool.open(home, pool, read_only=read_only, takeover=takeover)
        p.lifecycle.resident = True  # rebuilds, spares and scrubs run in the mount process
        return p

    code = do_mount(open_target, mountpoint, home=home.root, foreground=foreground,
                    read_only=read_only, allow_other=allow_other, commands=POOL_COMMANDS)
    if code:
        sys.exit(code)


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.pass_context
def umount(ctx: click.Context, mountpoint: str) -> None:
    """Flush every volume, close the pool cleanly and unmount MOUNTPOINT."""
    from fuse_mount.daemon import unmount

    unmount(mountpoint, home=home_of(ctx).root)
