"""Copy files into and out of volumes (`vstore import` / `vstore export`), several I/Os in flight."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import trio

from vstore.cli.progress import progress_bar
from vstore.errors import MemberIOError, NotFoundError, VstoreError

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
