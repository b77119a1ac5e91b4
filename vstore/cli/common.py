"""What every command group of the CLI shares: sizes, running under trio, reaching a pool.

Every command opens what it needs inside one ``trio.run``; a pool that a
``vstore mount`` process holds is reached through that process's control socket
instead, so nothing opens a pool twice. ``run_pool_command`` carries out a
command of ``vstore.pool.commands`` either way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import click
import trio

from vstore.cli.progress import progress_bar
from vstore.errors import ConfigError, PoolBusyError, VstoreError
from vstore.io.aio import unwrap
from vstore.pool.commands import POOL_COMMANDS
from vstore.pool.home import Home
from vstore.sizes import parse_size

LEVELS = ["linear", "raid0", "raid1", "raid5", "raid6", "raid10"]

# Queries a live mount answers at once (the commands marked quick); a mount that does not
# answer them within this time is stopped or stuck, and saying so beats waiting. Commands
# that do work (a rebuild, a scrub, volume zeroing) keep the long timeout.
QUICK_TIMEOUT = 10.0
LONG_TIMEOUT = 600.0
FOLLOW_INTERVAL = 0.5  # how often a command following a mount's operation asks for its progress


class SizeType(click.ParamType):
    """A size such as 64K or 1G."""

    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
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


def complete_pool(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of a POOL argument: the pools of the config directory (--home / VSTORE_HOME)."""
    home = Home(ctx.find_root().params.get("home"))
    if not home.root.is_dir():  # completing must not create the config directory
        return []
    try:
        return [name for name in home.list_pools() if name.startswith(incomplete)]
    except (VstoreError, OSError):
        return []


POOL = click.argument("pool", shell_complete=complete_pool)
"""The POOL argument of a command, completed from the config directory's pools."""


def home_of(ctx: click.Context) -> Home:
    """The Home chosen by --home / VSTORE_HOME."""
    return ctx.obj["home"]


# ---------------------------------------------------------------------------- the mount


def mount_socket(home: Home, pool: str) -> Path | None:
    """The control socket of the mount process that owns pool, or None when it is not mounted."""
    try:
        from fuse_mount.daemon import mounted_pool_socket
    except ImportError:  # the FUSE front end is optional at import time
        return None
    return mounted_pool_socket(home.root, pool)


def _mount_pid(home: Home, pool: str) -> str:
    try:
        from fuse_mount.daemon import record_path

        return f"pid {json.loads(record_path(home.root, pool).read_text())['pid']}"
    except Exception:  # noqa: BLE001 - only for the message
        return "pid unknown"


def mounted_call(home: Home, pool: str, name: str, /, **args: Any) -> dict[str, Any] | None:
    """Carry out pool command name in the mount process that owns the pool; None when not mounted."""
    sock = mount_socket(home, pool)
    if sock is None:
        return None
    from vstore.pool.control import ControlSocketError, call_sync

    command = POOL_COMMANDS.lookup(name)
    try:
        return call_sync(sock, command.request(**args),
                         timeout=QUICK_TIMEOUT if command.quick else LONG_TIMEOUT)
    except ControlSocketError as e:
        if "no answer" not in str(e):
            raise
        raise ControlSocketError(f"the mount process of pool {pool!r} ({_mount_pid(home, pool)}) does not "
                                 f"answer: {e} (stopped or hung?)") from None


def refuse_if_mounted(home: Home, pool: str) -> None:
    """VstoreError when the pool is mounted (for commands that copy volume data)."""
    if mount_socket(home, pool) is not None:
        raise VstoreError(
            f"pool {pool!r} is mounted: copy to or from the volume file in its mount instead"
        )


def refuse_if_open(home: Home, pool: str, what: str) -> None:
    """PoolBusyError when the pool is mounted or open in another process."""
    from vstore.owner import PoolLock

    if mount_socket(home, pool) is not None:  # the mount process holds the lock too, but says more
        raise PoolBusyError(f"pool {pool!r} is mounted: unmount it before you {what} it")
    lock = PoolLock(home.lock_path(pool))
    lock.acquire(pool)  # raises PoolBusyError naming the process that has it open
    lock.release()


def refuse_pool_storage(home: Home, file: str) -> None:
    """ConfigError when FILE is the storage of a pool's member or spare (it would be read or destroyed)."""
    owner = home.pool_storage_of(file)
    if owner is not None:
        raise ConfigError(f"{file} is {owner}: refusing to use a pool's storage as a plain file")


# ---------------------------------------------------------------------------- pool commands


async def with_pool(home: Home, pool: str, fn: Callable[..., Awaitable[Any]], *,
                    read_only: bool = False) -> Any:
    """Open the pool, run fn(pool), close it (cleanly, also on error)."""
    from vstore.pool.pool import Pool

    p = await Pool.open(home, pool, read_only=read_only, takeover=takeover_requested())
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


def takeover_requested() -> bool:
    """Whether `vstore --takeover` asked to take over a pool owned through a lease."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and (ctx.find_root().obj or {}).get("takeover"))


def echo_json(doc: Any) -> None:
    """Write doc to stdout as the one JSON document of a --json command."""
    click.echo(json.dumps(doc, indent=2))


def run_pool_command(ctx: click.Context, pool: str, name: str, /, *, background: bool = False,
                     as_json: bool = False, **args: Any) -> dict[str, Any] | None:
    """Carry out pool command name (vstore.pool.commands): through the pool's mount, else here.

    A mount starts a long operation in the background: this follows its progress
    until it ends and returns its result, or with background returns None at once.
    Without a mount the command opens the pool and runs to completion here.
    With as_json, a started operation is announced as {"pool", "started"} JSON on stdout.
    """
    command = POOL_COMMANDS.lookup(name)
    home = home_of(ctx)
    reply = mounted_call(home, pool, name, **args)
    if reply is None:
        if background:
            click.echo(f"note: pool {pool!r} is not mounted: --background needs the mount process; "
                       "running to completion here", err=True)
        local = partial(command.call, args=args, progress=progress_bar)
        return run(partial(with_pool, home, pool, local, read_only=not command.writable))
    if not (command.background and "started" in reply):
        return reply
    if background:
        st = reply["started"]
        if as_json:
            echo_json({"pool": pool, "started": st})
            return None
        click.echo(f"{st['kind']} started in the mount process of pool {pool!r}; "
                   f"see `vstore status {pool}`")
        return None
    return follow(home, pool, command.label_for(command.arguments(args)))


def follow(home: Home, pool: str, label: str) -> dict[str, Any]:
    """Show the progress of the mount process's running operation until it ends; its result."""
    with progress_bar(label) as cb:
        while True:
            reply = mounted_call(home, pool, "operation")
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
