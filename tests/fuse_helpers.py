"""Helpers for the FUSE tests: a tiny MountTarget, mount cleanup, and a mount script.

Run as a script (``python -m tests.fuse_helpers HOME MOUNTPOINT DIR [--background]``) it
mounts a target of two file-backed volumes in DIR, in the foreground unless told.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import trio

from vstore.errors import ExistsError, NotFoundError, VstoreError
from vstore.pool.commands import Registry
from vstore.stack.device import BlockDevice, FilterDevice


class FakeTarget:
    """A MountTarget over plain BlockDevices, counting flushes and recording its close."""

    def __init__(self, name: str, volumes: Mapping[str, BlockDevice], *,
                 closed_marker: Path | None = None) -> None:
        self.name = name
        self.volumes: dict[str, BlockDevice] = dict(volumes)
        self.flush_count = 0
        self.closed: bool | None = None  # None: open; True/False: closed clean / not clean
        self.closed_marker = closed_marker
        self.fail_io = False

    async def flush(self) -> None:
        """Flush every volume."""
        self.flush_count += 1
        for dev in list(self.volumes.values()):
            await dev.flush()

    def status(self) -> dict:
        """A status like `vstore status --json`."""
        return {"name": self.name, "state": "optimal",
                "volumes": [{"name": n, "size": d.size} for n, d in sorted(self.volumes.items())]}

    def io_stats(self) -> dict:
        """No layers below the volumes to account for."""
        return {}

    async def run_background(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """No background work."""
        task_status.started()

    async def aclose(self, clean: bool = True) -> None:
        """Flush, close the volumes, remember how."""
        if clean:
            await self.flush()
        for dev in self.volumes.values():
            await dev.aclose()
        self.closed = clean
        if self.closed_marker is not None:
            self.closed_marker.write_text(json.dumps({"clean": clean, "flushes": self.flush_count}))


# The control commands a FakeTarget answers (a pool's are vstore.pool.commands.POOL_COMMANDS).
FAKE_COMMANDS = Registry()


@FAKE_COMMANDS.command("status", writable=False, quick=True)
async def _status(target: FakeTarget) -> dict:
    return target.status()


@FAKE_COMMANDS.command("volume_create")
async def _volume_create(target: FakeTarget, *, name: str, size: int) -> dict:
    """A memory volume."""
    import numpy as np

    from backends.memory import MemoryDevice

    if name in target.volumes:
        raise ExistsError(f"volume {name!r} exists")
    target.volumes[name] = MemoryDevice(np.zeros(size, np.uint8))
    return {"name": name}


@FAKE_COMMANDS.command("volume_remove", guards_open_volume=True)
async def _volume_remove(target: FakeTarget, *, name: str, force: bool = False) -> dict:
    if target.volumes.pop(name, None) is None:
        raise NotFoundError(f"no volume {name!r}")
    return {}


@FAKE_COMMANDS.command("volume_resize")
async def _volume_resize(target: FakeTarget, *, name: str, size: int) -> dict:
    """A bigger device with the same bytes at the start."""
    import numpy as np

    from backends.memory import MemoryDevice

    old = target.volumes[name]
    store = np.zeros(size, np.uint8)
    n = min(old.size, len(store))
    store[:n] = await old.read(0, n)
    target.volumes[name] = MemoryDevice(store)
    return {"name": name, "size": len(store)}


@FAKE_COMMANDS.command("boom")
async def _boom(target: FakeTarget) -> dict:
    """A bug."""
    raise RuntimeError("a bug")


class FailingDevice(FilterDevice):
    """Wraps a device; raises a VstoreError on every I/O while .failing is set."""

    def __init__(self, dev: BlockDevice) -> None:
        super().__init__(dev)
        self.dev = dev
        self.failing = False

    def _check(self) -> None:
        if self.failing:
            from vstore.errors import DegradedError

            raise DegradedError("too many members failed")

    async def read(self, offset: int, length: int):
        self._check()
        return await self.dev.read(offset, length)

    async def write(self, offset: int, data) -> None:
        self._check()
        await self.dev.write(offset, data)

    async def readv_into(self, offset: int, views) -> None:
        self._check()
        await self.dev.readv_into(offset, views)

    async def writev(self, offset: int, views) -> None:
        self._check()
        await self.dev.writev(offset, views)

    async def flush(self) -> None:
        self._check()
        await self.dev.flush()


def force_unmount(mountpoint: str | Path) -> None:
    """Best-effort cleanup of a FUSE mount left behind by a failed test."""
    mp = os.fspath(mountpoint)
    for cmd in (["fusermount3", "-u", mp], ["fusermount3", "-u", "-z", mp], ["umount", "-l", mp]):
        if not is_mounted(mp):
            return
        subprocess.run(cmd, capture_output=True)


def is_mounted(mountpoint: str | Path) -> bool:
    """Whether something is mounted exactly on mountpoint."""
    from fuse_mount.daemon import mount_entry

    return mount_entry(mountpoint) is not None


def detach_loops(backing: str | Path) -> None:
    """losetup -d every loop device whose backing file is under backing."""
    res = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True)
    with contextlib.suppress(ValueError):
        for dev in json.loads(res.stdout or "{}").get("loopdevices", []):
            if str(dev.get("back-file", "")).startswith(os.fspath(backing)):
                subprocess.run(["losetup", "-d", dev["name"]], capture_output=True)


async def _open_file_target(directory: Path) -> FakeTarget:
    from backends.local import open_uri
    from vstore.uri import parse_uri

    vols = {}
    for name, size in (("vol0", 8 << 20), ("vol1", 4 << 20)):
        vols[name] = await open_uri(parse_uri(f"file://{directory}/{name}.img"), create_size=size)
    if os.environ.get("VSTORE_TEST_FAIL_OPEN"):
        raise NotFoundError("pool 'nosuch' not found")
    return FakeTarget("filepool", vols, closed_marker=directory / "closed.json")


def main(argv: list[str]) -> int:
    """Mount a file-backed FakeTarget (the subprocess side of the daemon tests)."""
    from fuse_mount.daemon import mount

    home, mountpoint, directory = Path(argv[0]), argv[1], Path(argv[2])
    background = "--background" in argv
    try:
        return mount(lambda: _open_file_target(directory), mountpoint, home=home,
                     foreground=not background, read_only=False, allow_other=False,
                     commands=FAKE_COMMANDS)
    except VstoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


_ = trio  # the module is imported by the test process, which runs trio
