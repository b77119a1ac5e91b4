"""`vstore import|export`: copy files into and out of volumes, several I/Os in flight.

The pool must not be mounted (its mount holds it; copy to or from the volume's
file there instead): these commands open the pool themselves.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import click
import numpy as np
import trio

from vstore.cli.common import (
    POOL,
    echo_json,
    home_of,
    refuse_if_mounted,
    refuse_pool_storage,
    run,
    with_pool,
)
from vstore.cli.progress import progress_bar
from vstore.errors import ConfigError, MemberIOError, NotFoundError, VstoreError
from vstore.sizes import format_size

BLOCK = 8 << 20
IN_FLIGHT = 4


async def import_file(pool: Any, *, vol: str, path: str) -> int:
    """Create volume vol sized to the file (rounded up) and copy the file in."""
    size = os.path.getsize(path)
    if vol in pool.volumes and pool.volume_incomplete(vol):
        # An earlier import of it was cut short (kill -9): start it again from scratch.
        await pool.remove_volume(vol)
    volume = await pool.create_volume(vol, size, incomplete=True)
    try:
        await _copy(path, size, volume, to_volume=True, label=f"import {vol}")
        await pool.flush()
        await pool.mark_complete(vol)
    except BaseException:
        # Leave nothing half-imported behind.
        with trio.CancelScope(shield=True):
            try:
                await pool.remove_volume(vol)
            except VstoreError:
                pass
        raise
    return size


async def export_file(pool: Any, *, vol: str, path: str) -> int:
    """Copy a whole volume into a file."""
    volume = pool.get_volume(vol)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except FileNotFoundError as e:
        raise NotFoundError(f"{path}: directory does not exist") from e
    except OSError as e:
        raise VstoreError(f"{path}: {e.strerror}") from e
    os.close(fd)
    await _copy(path, volume.size, volume, to_volume=False, label=f"export {vol}")
    return volume.size


async def _copy(path: str, size: int, volume: Any, *, to_volume: bool, label: str) -> None:
    fd = os.open(path, os.O_RDONLY if to_volume else os.O_WRONLY)
    limiter = trio.Semaphore(IN_FLIGHT)
    done = 0
    try:
        with progress_bar(label) as progress:

            async def one(off: int, n: int) -> None:
                nonlocal done
                try:
                    if to_volume:
                        buf = np.empty(n, dtype=np.uint8)
                        got = await trio.to_thread.run_sync(os.preadv, fd, [buf], off)
                        if got < n:
                            buf[got:] = 0
                        await volume.write(off, buf)
                    else:
                        buf = await volume.read(off, n)
                        await trio.to_thread.run_sync(os.pwrite, fd, memoryview(buf), off)
                except OSError as e:
                    raise MemberIOError(f"{path}: {e.strerror}") from e
                finally:
                    limiter.release()
                done += n
                progress(done, size)

            async with trio.open_nursery() as nursery:
                for off in range(0, size, BLOCK):
                    await limiter.acquire()
                    nursery.start_soon(one, off, min(BLOCK, size - off))
        if not to_volume:
            os.fsync(fd)
    finally:
        os.close(fd)


@click.command("import")
@POOL
@click.argument("vol")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result (see README, Scripting).")
@click.pass_context
def import_cmd(ctx: click.Context, pool: str, vol: str, file: str, as_json: bool) -> None:
    """Create volume VOL sized to FILE (rounded up) and copy FILE into it."""
    home = home_of(ctx)
    refuse_if_mounted(home, pool)
    if not os.path.exists(file):
        raise NotFoundError(f"{file}: no such file")
    if not os.path.isfile(file):
        import stat as stat_mod

        mode = os.stat(file).st_mode
        kind = ("a character device" if stat_mod.S_ISCHR(mode) else "a block device" if stat_mod.S_ISBLK(mode)
                else "a FIFO" if stat_mod.S_ISFIFO(mode) else "a directory" if stat_mod.S_ISDIR(mode)
                else "not a regular file")
        raise ConfigError(f"{file} is {kind}: import copies a regular file (its size sets the volume's)")
    refuse_pool_storage(home, file)
    size = os.path.getsize(file)
    if size == 0:
        raise ConfigError(f"{file}: empty file, nothing to import")
    n = run(partial(with_pool, home, pool, partial(import_file, vol=vol, path=file)))
    if as_json:
        echo_json({"pool": pool, "volume": vol, "file": file, "bytes": n})
    else:
        click.echo(f"imported {format_size(n)} from {file} into volume {vol!r}")


@click.command("export")
@POOL
@click.argument("vol")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result (see README, Scripting).")
@click.pass_context
def export_cmd(ctx: click.Context, pool: str, vol: str, file: str, as_json: bool) -> None:
    """Copy volume VOL of POOL out into FILE."""
    home = home_of(ctx)
    refuse_if_mounted(home, pool)
    refuse_pool_storage(home, file)
    n = run(partial(with_pool, home, pool, partial(export_file, vol=vol, path=file),
                    read_only=True))
    if as_json:
        echo_json({"pool": pool, "volume": vol, "file": file, "bytes": n})
    else:
        click.echo(f"exported {format_size(n)} from volume {vol!r} to {file}")
