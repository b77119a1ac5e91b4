"""The `vstore` command line.

Every command opens what it needs inside one ``trio.run``; a pool that a
``vstore mount`` process holds is reached through that process's control socket
instead, so nothing opens a pool twice. Errors are one line on stderr and a
non-zero exit code; a traceback is shown only with VSTORE_DEBUG=1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import click
import trio

from vstore.cli.progress import progress_bar
from vstore.errors import ConfigError, NotFoundError, VstoreError
from vstore.io.aio import unwrap
from vstore.pool.home import Home
from vstore.sizes import format_size, parse_size
from vstore.uri import redact_text

LEVELS = ["linear", "raid0", "raid1", "raid5", "raid6", "raid10"]


class SizeType(click.ParamType):
    """A size such as 64K or 1G."""

    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            return parse_size(value)
        except ConfigError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


def run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run an async function under trio, turning exception groups into their leaf error."""
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as eg:
        raise unwrap(eg) from None


def home_of(ctx: click.Context) -> Home:
    """The Home chosen by --home / VSTORE_HOME."""
    return ctx.obj["home"]


# Queries a live mount answers at once; a mount that does not answer them within this
# time is stopped or stuck, and saying so beats waiting. Commands that do work (a
# rebuild, a scrub, volume zeroing) keep the long timeout.
QUICK_COMMANDS = frozenset({"status", "operation", "volume_list"})
QUICK_TIMEOUT = 10.0


def mounted_call(home: Home, pool: str, request: dict[str, Any]) -> dict[str, Any] | None:
    """Send a command to the mount process that owns the pool, or None when it is not mounted."""
    sock = _mount_socket(home, pool)
    if sock is None:
        return None
    from vstore.pool.control import ControlSocketError, call_sync

    quick = request.get("cmd") in QUICK_COMMANDS
    try:
        return call_sync(sock, request, timeout=QUICK_TIMEOUT if quick else 600)
    except ControlSocketError as e:
        if "no answer" not in str(e):
            raise
        raise ControlSocketError(f"the mount process of pool {pool!r} ({_mount_pid(home, pool)}) does not "
                                 f"answer: {e} (stopped or hung?)") from None


def _mount_pid(home: Home, pool: str) -> str:
    try:
        from fuse_mount.daemon import record_path

        return f"pid {json.loads(record_path(home.root, pool).read_text())['pid']}"
    except Exception:  # noqa: BLE001 - only for the message
        return "pid unknown"


def _mount_socket(home: Home, pool: str) -> Any:
    try:
        from fuse_mount.daemon import mounted_pool_socket
    except ImportError:  # the FUSE front end is optional at import time
        return None
    return mounted_pool_socket(home.root, pool)


async def with_pool(home: Home, pool: str, fn: Callable[..., Awaitable[Any]], *,
                    read_only: bool = False) -> Any:
    """Open the pool, run fn(pool), close it (cleanly, also on error)."""
    from vstore.pool.pool import Pool

    p = await Pool.open(home, pool, read_only=read_only)
    try:
        # The pool's background tasks (multipath path checkers) live as long as the command.
        async with trio.open_nursery() as nursery:
            await nursery.start(p.run_background)
            try:
                result = await fn(p)
                if not read_only:
                    # A member failed during the command: a hot spare takes its place now.
                    await p.lifecycle.settle(progress_bar)
                return result
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as eg:
        leaf = unwrap(eg)
        if isinstance(leaf, trio.Cancelled):
            raise
        raise leaf from None
    finally:
        with trio.CancelScope(shield=True):
            await p.aclose()


def pool_command(ctx: click.Context, pool: str, request: dict[str, Any],
                 local: Callable[[Any], Awaitable[Any]], *, read_only: bool = False) -> Any:
    """Carry out a command on a pool: through its mount if mounted, else by opening it."""
    home = home_of(ctx)
    reply = mounted_call(home, pool, request)
    if reply is not None:
        return reply
    return run(partial(with_pool, home, pool, local, read_only=read_only))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False), envvar="VSTORE_HOME",
              help="Config directory (default: $VSTORE_HOME or ~/.local/share/vstore).")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens to stderr.")
@click.version_option(package_name="vstore")
@click.pass_context
def cli(ctx: click.Context, home: str | None, verbose: bool) -> None:
    """vstore: pool local files, NFS files and iSCSI LUNs into RAID-protected volumes."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="vstore: %(levelname)s: %(message)s")
    ctx.obj = {"home": Home(home)}


# ---------------------------------------------------------------------------- pools
@cli.command()
@click.argument("pool")
@click.argument("members", nargs=-1, required=True, metavar="URI...")
@click.option("--level", type=click.Choice(LEVELS), required=True, help="RAID level.")
@click.option("--chunk", type=SIZE, default="64K", show_default=True, help="Chunk size.")
@click.option("--size", type=SIZE, default=None,
              help="Create missing file:// members with this size (sparse).")
@click.option("--force", is_flag=True, help="Overwrite members that belong to another pool.")
@click.option("--journal", "journal", default="none", show_default=True, metavar="URI",
              help="Write-ahead journal device (any member URI, not a member), or none: then "
                   "parity pools resync their dirty regions after a crash.")
@click.option("--journal-size", type=SIZE, default=None,
              help="Size of a journal file created by --journal (default 64M).")
@click.option("--selector", type=click.Choice(["round-robin", "queue-length", "service-time"]),
              default=None, help="Multipath path selector (default service-time).")
@click.option("--path-policy", type=click.Choice(["multibus", "failover"]), default=None,
              help="Multipath grouping: all paths active, or one priority group (default multibus).")
@click.option("--no-path-retry", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Queue I/O this long when every path is down, then fail (0: at once; default 30).")
@click.pass_context
def create(ctx: click.Context, pool: str, members: tuple[str, ...], level: str, chunk: int,
           size: int | None, force: bool, selector: str | None, path_policy: str | None,
           no_path_retry: float | None, journal: str, journal_size: int | None) -> None:
    """Create POOL from member URIs (comma-separate several paths to one member)."""
    from vstore.pool.pool import Pool

    mp = {"selector": selector, "policy": path_policy, "no_path_retry": no_path_retry}
    multipath = mp if any(v is not None for v in mp.values()) else None

    async def go() -> dict[str, Any]:
        p = await Pool.create(home_of(ctx), pool, level, list(members), chunk=chunk,
                              size=size, force=force, multipath=multipath, journal=journal,
                              journal_size=journal_size)
        try:
            return p.status()
        finally:
            await p.aclose()

    st = run(go)
    jr = st.get("journal") or {}
    how = f", journal {jr['uri']}" if jr.get("mode") == "journal" else ""
    click.echo(f"created {level} pool {pool!r}: {len(members)} members, "
               f"{format_size(st['size'])} usable, chunk {format_size(chunk)}{how}")


@cli.command()
@click.argument("pool")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, pool: str, as_json: bool) -> None:
    """Show a pool's level, size, state, members and volumes."""

    async def local(p: Any) -> dict[str, Any]:
        return p.status()

    st = pool_command(ctx, pool, {"cmd": "status"}, local, read_only=True)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    from vstore.cli.status_view import render_status

    render_status(st)
    for m in st["members"]:
        if m["state"] in ("bad", "stale"):
            click.echo(f"vstore: warning: member {m['index']} ({m['uri']}) is {m['state']}: {m.get('error')}; "
                       f"rebuild it with `vstore replace {pool} {m['index']} URI`", err=True)


def _refuse_if_open(home: Home, pool: str, what: str) -> None:
    """PoolBusyError when the pool is mounted or open in another process."""
    from vstore.errors import PoolBusyError
    from vstore.owner import PoolLock

    if _mount_socket(home, pool) is not None:  # the mount process holds the lock too, but says more
        raise PoolBusyError(f"pool {pool!r} is mounted: unmount it before you {what} it")
    lock = PoolLock(home.lock_path(pool))
    lock.acquire(pool)  # raises PoolBusyError naming the process that has it open
    lock.release()


@cli.command()
@click.argument("pool")
@click.pass_context
def forget(ctx: click.Context, pool: str) -> None:
    """Drop POOL from the config directory; its members are not touched (import-pool brings it back)."""
    home = home_of(ctx)
    home.read_pool(pool)  # NotFoundError for an unknown pool
    _refuse_if_open(home, pool, "forget")
    home.remove_pool(pool)
    home.lock_path(pool).unlink(missing_ok=True)
    click.echo(f"forgot pool {pool!r}; its members are untouched (vstore import-pool brings it back)")


@cli.command()
@click.argument("pool")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def destroy(ctx: click.Context, pool: str, yes: bool) -> None:
    """Wipe POOL's superblocks and metadata on every member, spare and journal, and forget it."""
    from vstore.pool.destroy import destroy_pool

    home = home_of(ctx)
    record = home.read_pool(pool)
    _refuse_if_open(home, pool, "destroy")
    n = len(record["members"]) + len(record.get("spares", [])) + (1 if record.get("journal") else 0)
    if not yes:
        click.confirm(f"destroy pool {pool!r}: wipe the vstore metadata of its {n} device(s)? Their data "
                      "becomes unreachable", abort=True)
    wiped = run(destroy_pool, home, pool)
    home.lock_path(pool).unlink(missing_ok=True)
    click.echo(f"destroyed pool {pool!r}: metadata wiped on {wiped} device(s)")


@cli.command("list")
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


@cli.command("import-pool")
@click.argument("members", nargs=-1, required=True, metavar="URI...")
@click.option("--name", default=None, help="Record the pool under this name.")
@click.pass_context
def import_pool_cmd(ctx: click.Context, members: tuple[str, ...], name: str | None) -> None:
    """Record a pool in the config directory from its members alone."""
    from vstore.pool.importer import import_pool

    result = run(import_pool, home_of(ctx), list(members), name)
    click.echo(f"imported pool {result['name']!r} ({result['level']}, "
               f"{result['found']}/{result['members']} members found)")


@cli.command()
@click.argument("pool")
@click.argument("index", type=int)
@click.option("--force", is_flag=True, help="Fail it even if that loses the pool's data.")
@click.pass_context
def fail(ctx: click.Context, pool: str, index: int, force: bool) -> None:
    """Mark member INDEX of POOL failed (for tests and drills)."""

    async def local(p: Any) -> dict[str, Any]:
        await p.fail_member(index, force=force)
        await p.lifecycle.settle(progress_bar)  # a hot spare takes its place (vstore.ops.rebuild)
        return p.status()

    st = pool_command(ctx, pool, {"cmd": "fail", "index": index, "force": force}, local)
    op = st.get("operation") or {}
    spare = ""
    if op.get("kind") == "rebuild" and op.get("how") == "spare" and op.get("member") == index:
        spare = (f"; spare {st['members'][index]['uri']} "
                 + ("rebuilt in its place" if op.get("state") == "done" else "is being rebuilt in its place"))
    click.echo(f"member {index} of pool {pool!r} marked failed{spare}; pool is {st['state']}")


# ---------------------------------------------------------------------------- volumes
@cli.group()
def volume() -> None:
    """Create, list, remove and resize logical volumes."""


@volume.command("create")
@click.argument("pool")
@click.argument("name")
@click.option("--size", type=SIZE, required=True, help="Volume size (rounded up to 4K).")
@click.pass_context
def volume_create(ctx: click.Context, pool: str, name: str, size: int) -> None:
    """Create volume NAME in POOL (its bytes read as zeros)."""

    async def local(p: Any) -> dict[str, Any]:
        with progress_bar(f"zeroing {name}") as cb:
            v = await p.create_volume(name, size, progress=cb)
        return {"name": v.name, "size": v.size}

    r = pool_command(ctx, pool, {"cmd": "volume_create", "name": name, "size": size}, local)
    click.echo(f"created volume {r['name']!r} of {format_size(r['size'])} in pool {pool!r}")


@volume.command("list")
@click.argument("pool")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def volume_list(ctx: click.Context, pool: str, as_json: bool) -> None:
    """List the volumes of POOL."""

    async def local(p: Any) -> dict[str, Any]:
        return {"volumes": p.status()["volumes"]}

    r = pool_command(ctx, pool, {"cmd": "volume_list"}, local, read_only=True)
    if as_json:
        click.echo(json.dumps(r["volumes"], indent=2))
    else:
        for v in r["volumes"]:
            note = "\tincomplete (an import did not finish; import it again)" if v.get("incomplete") else ""
            click.echo(f"{v['name']}\t{format_size(v['size'])}\t{v['size']}{note}")


@volume.command("remove")
@click.argument("pool")
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove it even while it is open in the mount.")
@click.pass_context
def volume_remove(ctx: click.Context, pool: str, name: str, force: bool) -> None:
    """Remove volume NAME from POOL (refused while its file is open in the mount, unless --force)."""

    async def local(p: Any) -> dict[str, Any]:
        await p.remove_volume(name)
        return {}

    pool_command(ctx, pool, {"cmd": "volume_remove", "name": name, "force": force}, local)
    click.echo(f"removed volume {name!r} from pool {pool!r}")


@volume.command("rename")
@click.argument("pool")
@click.argument("name")
@click.argument("new")
@click.pass_context
def volume_rename(ctx: click.Context, pool: str, name: str, new: str) -> None:
    """Rename volume NAME of POOL to NEW (refused while its file is open in the mount)."""

    async def local(p: Any) -> dict[str, Any]:
        await p.rename_volume(name, new)
        return {}

    pool_command(ctx, pool, {"cmd": "volume_rename", "name": name, "new": new}, local)
    click.echo(f"renamed volume {name!r} of pool {pool!r} to {new!r}")


@volume.command("resize")
@click.argument("pool")
@click.argument("name")
@click.option("--size", type=SIZE, required=True, help="New size (grow only).")
@click.pass_context
def volume_resize(ctx: click.Context, pool: str, name: str, size: int) -> None:
    """Grow volume NAME of POOL to SIZE."""

    async def local(p: Any) -> dict[str, Any]:
        with progress_bar(f"zeroing {name}") as cb:
            v = await p.resize_volume(name, size, progress=cb)
        return {"name": v.name, "size": v.size}

    r = pool_command(ctx, pool, {"cmd": "volume_resize", "name": name, "size": size}, local)
    click.echo(f"volume {r['name']!r} is now {format_size(r['size'])}")


# ---------------------------------------------------------------------------- discovery
@cli.command()
@click.argument("portal", metavar="iscsi://[USER%SECRET@]HOST[:PORT]")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def discover(portal: str, as_json: bool) -> None:
    """List the iSCSI targets behind a portal, with their LUNs and sizes."""
    from backends.iscsi import discover as iscsi_discover

    if not portal.lower().startswith("iscsi://"):
        raise ConfigError(f"discover takes an iscsi:// portal URI, not {redact_text(portal)!r}")
    targets = run(iscsi_discover, portal)
    failed = [t for t in targets if t.get("error")]
    if as_json:
        click.echo(json.dumps(targets, indent=2))
    else:
        if not targets:
            click.echo("no targets")
        for t in targets:
            click.echo(f"{t['target']}  ({t['portal']})" + (f"  error: {t['error']}" if t.get("error") else ""))
            for lun in t.get("luns", []):
                size = f"{format_size(lun['size'])} ({lun['size']} bytes, {lun.get('block_size')}-byte blocks)" if "size" in lun else lun.get("type", "")
                click.echo(f"  {lun['uri']}  {size}")
    if failed:  # a target we could not log in to (CHAP, ACL): say so in the exit code too
        click.echo(redact_text(f"vstore: error: could not log in to {len(failed)} of {len(targets)} target(s): "
                               f"{failed[0]['target']}: {failed[0]['error']}"), err=True)
        sys.exit(1)


# ---------------------------------------------------------------------------- mount
@cli.command()
@click.argument("pool")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (log to stderr).")
@click.option("--read-only", is_flag=True, help="Mount read-only.")
@click.option("--allow-other", is_flag=True, help="Let other users see the mount (default: owner only).")
@click.pass_context
def mount(ctx: click.Context, pool: str, mountpoint: str, foreground: bool, read_only: bool,
          allow_other: bool) -> None:
    """Mount POOL at MOUNTPOINT: one file per volume; returns once the files are visible."""
    from fuse_mount.daemon import mount as do_mount
    from vstore.pool.pool import Pool

    home = home_of(ctx)
    home.read_pool(pool)  # a clear error for an unknown pool before anything forks
    if _mount_socket(home, pool) is not None:
        raise VstoreError(f"pool {pool!r} is already mounted")

    async def open_target() -> Pool:
        p = await Pool.open(home, pool, read_only=read_only)
        p.lifecycle.resident = True  # rebuilds, spares and scrubs run in the mount process
        return p

    code = do_mount(open_target, mountpoint, home=home.root, foreground=foreground,
                    read_only=read_only, allow_other=allow_other)
    if code:
        sys.exit(code)


@cli.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.pass_context
def umount(ctx: click.Context, mountpoint: str) -> None:
    """Flush every volume, close the pool cleanly and unmount MOUNTPOINT."""
    from fuse_mount.daemon import unmount

    unmount(mountpoint, home=home_of(ctx).root)


# ---------------------------------------------------------------------------- data
def _refuse_if_mounted(home: Home, pool: str) -> None:
    if _mount_socket(home, pool) is not None:
        raise VstoreError(
            f"pool {pool!r} is mounted: copy to or from the volume file in its mount instead"
        )


@cli.command("import")
@click.argument("pool")
@click.argument("vol")
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_context
def import_cmd(ctx: click.Context, pool: str, vol: str, file: str) -> None:
    """Create volume VOL sized to FILE (rounded up) and copy FILE into it."""
    from vstore.cli.transfer import import_file

    home = home_of(ctx)
    _refuse_if_mounted(home, pool)
    if not os.path.exists(file):
        raise NotFoundError(f"{file}: no such file")
    if not os.path.isfile(file):
        import stat as stat_mod

        mode = os.stat(file).st_mode
        kind = ("a character device" if stat_mod.S_ISCHR(mode) else "a block device" if stat_mod.S_ISBLK(mode)
                else "a FIFO" if stat_mod.S_ISFIFO(mode) else "a directory" if stat_mod.S_ISDIR(mode)
                else "not a regular file")
        raise ConfigError(f"{file} is {kind}: import copies a regular file (its size sets the volume's)")
    _refuse_pool_storage(home, file)
    size = os.path.getsize(file)
    if size == 0:
        raise ConfigError(f"{file}: empty file, nothing to import")
    n = run(partial(with_pool, home, pool, partial(import_file, vol=vol, path=file)))
    click.echo(f"imported {format_size(n)} from {file} into volume {vol!r}")


def _refuse_pool_storage(home: Home, file: str) -> None:
    """ConfigError when FILE is the storage of a pool's member or spare (it would be read or destroyed)."""
    owner = home.pool_storage_of(file)
    if owner is not None:
        raise ConfigError(f"{file} is {owner}: refusing to use a pool's storage as a plain file")


@cli.command("export")
@click.argument("pool")
@click.argument("vol")
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_context
def export_cmd(ctx: click.Context, pool: str, vol: str, file: str) -> None:
    """Copy volume VOL of POOL out into FILE."""
    from vstore.cli.transfer import export_file

    home = home_of(ctx)
    _refuse_if_mounted(home, pool)
    _refuse_pool_storage(home, file)
    n = run(partial(with_pool, home, pool, partial(export_file, vol=vol, path=file),
                    read_only=True))
    click.echo(f"exported {format_size(n)} from volume {vol!r} to {file}")


from vstore.cli.path import path as _path_group  # noqa: E402 - needs pool_command above

cli.add_command(_path_group)

from vstore.cli.lifecycle import COMMANDS as _LIFECYCLE_COMMANDS  # noqa: E402

for _command in _LIFECYCLE_COMMANDS:
    cli.add_command(_command)

from vstore.cli.torture import torture as _torture  # noqa: E402

cli.add_command(_torture)


def main() -> None:
    """Entry point: run the CLI, turning every VstoreError into one line and an exit code."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("vstore: aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        where = f"vstore {e.ctx.command_path.split(' ', 1)[1]}" if e.ctx and " " in e.ctx.command_path else "vstore"
        click.echo(redact_text(f"vstore: error: {e.format_message()} (see '{where} --help')"), err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(redact_text(f"vstore: error: {e.format_message()}"), err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except BaseException as e:  # noqa: BLE001 - the one place errors become exit codes
        leaf = unwrap(e)
        if isinstance(leaf, SystemExit):
            raise
        if os.environ.get("VSTORE_DEBUG"):
            raise
        if isinstance(leaf, VstoreError):
            click.echo(redact_text(f"vstore: error: {leaf}"), err=True)
            sys.exit(leaf.exit_code)
        if isinstance(leaf, KeyboardInterrupt):
            click.echo("vstore: interrupted", err=True)
            sys.exit(130)
        if isinstance(leaf, OSError):
            click.echo(redact_text(f"vstore: error: {leaf}"), err=True)
            sys.exit(1)
        click.echo(redact_text(f"vstore: internal error: {type(leaf).__name__}: {leaf} ")
                   + "(set VSTORE_DEBUG=1 for a traceback)", err=True)
        sys.exit(70)


if __name__ == "__main__":
    main()

