"""FUSE throughput: the ceiling of an empty pyfuse3 filesystem vs a vstore mount of RAM volumes.

Run ``python -m bench.fuse_ceiling [--size 1G] [--runtime 5]`` as root. Each filesystem
is served by its own process (``--serve ceiling|vstore MOUNTPOINT``). The ceiling mounts
with vstore's FUSE settings, read at run time from ``fuse_mount.daemon.fuse_settings()``
(options, handler task counts, writeback cache, the BDI's read-ahead), or with the
settings given as JSON in ``--fuse-settings`` (``bench.stack`` also runs one with
pyfuse3's defaults, ``default_settings()``). ``fio`` runs
1 MiB sequential direct (libaio, queue depth 8) and buffered reads and writes, and
4 KiB random direct reads at queue depth 1 and 8, against one file on each. The
"ceiling" file answers reads with a preallocated zero buffer and drops writes, so
it measures pyfuse3 + the kernel alone; the ratio vstore/ceiling is the engine's
share. Request sizes seen by the vstore mount come from ``.vstore/fuse-stats``.
Writes ``bench/results/fuse.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "fuse.json"
MiB = 1 << 20

JOBS = {
    "seq read direct 1M qd8": ["--rw=read", "--bs=1M", "--direct=1", "--ioengine=libaio", "--iodepth=8"],
    "seq write direct 1M qd8": ["--rw=write", "--bs=1M", "--direct=1", "--ioengine=libaio", "--iodepth=8"],
    "seq read buffered 1M": ["--rw=read", "--bs=1M", "--direct=0", "--ioengine=psync", "--invalidate=1"],
    "seq write buffered 1M": ["--rw=write", "--bs=1M", "--direct=0", "--ioengine=psync", "--end_fsync=1"],
    "rand read direct 4K qd1": ["--rw=randread", "--bs=4k", "--direct=1", "--ioengine=libaio", "--iodepth=1"],
    "rand read direct 4K qd8": ["--rw=randread", "--bs=4k", "--direct=1", "--ioengine=libaio", "--iodepth=8"],
}


# ---------------------------------------------------------------------------- the two servers


def vstore_settings() -> dict[str, Any]:
    """The FUSE settings vstore mounts with, read from the engine at run time."""
    from fuse_mount.daemon import fuse_settings

    return dict(fuse_settings())


def default_settings() -> dict[str, Any]:
    """libfuse/pyfuse3 defaults: pyfuse3's default options and task counts, no read-ahead tuning."""
    import inspect

    import pyfuse3

    params = inspect.signature(pyfuse3.main).parameters
    return {
        "options": sorted(pyfuse3.default_options),
        "min_tasks": params["min_tasks"].default,
        "max_tasks": params["max_tasks"].default,
        "read_ahead_kb": None,
        "writeback_cache": pyfuse3.Operations.enable_writeback_cache,
    }


def bdi_read_ahead_path(mountpoint: str | Path) -> Path:
    """The read_ahead_kb file of the BDI behind a mount (FUSE mounts get one each)."""
    dev = os.stat(mountpoint).st_dev
    return Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")


def _set_read_ahead(mountpoint: str, kb: int) -> None:
    """What fuse_mount.daemon._tune_bdi does, with the value from the settings."""
    bdi_read_ahead_path(mountpoint).write_text(str(kb))


def _serve_ceiling(mountpoint: str, size: int, settings: dict[str, Any] | None = None) -> None:
    """An empty pyfuse3 filesystem mounted with the given FUSE settings: one file 'vol' of zeros; writes are dropped.

    ``settings`` has the keys of ``fuse_mount.daemon.fuse_settings()`` (vstore's, the
    default); ``read_ahead_kb`` None leaves the kernel's read-ahead alone.
    """
    import pyfuse3
    import trio

    settings = vstore_settings() if settings is None else settings
    zeros = memoryview(bytes(4 * MiB))
    ino_file = pyfuse3.ROOT_INODE + 1

    class Ceiling(pyfuse3.Operations):
        enable_writeback_cache = bool(settings["writeback_cache"])

        def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
            e = pyfuse3.EntryAttributes()
            e.st_ino = ino
            e.entry_timeout = e.attr_timeout = 300
            if ino == pyfuse3.ROOT_INODE:
                e.st_mode, e.st_size = stat.S_IFDIR | 0o755, 0
            else:
                e.st_mode, e.st_size = stat.S_IFREG | 0o600, size
            e.st_nlink, e.st_blksize = 1, 4096
            return e

        async def getattr(self, inode, ctx):
            return self._attr(inode)

        async def lookup(self, parent, name, ctx):
            if parent == pyfuse3.ROOT_INODE and name == b"vol":
                return self._attr(ino_file)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def setattr(self, inode, attr, fields, fh, ctx):
            return self._attr(inode)

        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode)  # direct_io and keep_cache off, as vstore's volumes

        async def read(self, fh, off, length):
            return zeros[: max(0, min(length, size - off))]

        async def write(self, fh, off, buf):
            return len(buf)

        async def fsync(self, fh, datasync):
            pass

        async def flush(self, fh):
            pass

    options = set(settings["options"]) | {"fsname=ceiling", "subtype=ceiling"}
    pyfuse3.init(Ceiling(), mountpoint, options)
    tasks = {k: int(settings[k]) for k in ("min_tasks", "max_tasks") if settings.get(k) is not None}

    async def main() -> None:
        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        async def tune() -> None:
            # As the vstore mount does: once the mount answers, set its BDI's read-ahead.
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(_set_read_ahead, mountpoint, int(settings["read_ahead_kb"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(on_signal)
            if settings.get("read_ahead_kb") is not None:
                nursery.start_soon(tune)
            await pyfuse3.main(**tasks)  # returns when unmounted or terminated
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)


def _serve_vstore(mountpoint: str, size: int) -> None:
    """The real vstore mount (fuse_mount.daemon) of one RAM volume."""
    import numpy as np
    import trio

    from backends.memory import MemoryDevice
    from fuse_mount.daemon import mount

    class RamTarget:
        name = "bench"

        def __init__(self) -> None:
            store = np.empty(size, np.uint8)
            store.fill(0)  # fault the pages in now, not during the first write job
            self.volumes = {"vol": MemoryDevice(store)}

        async def flush(self) -> None:
            pass

        def status(self) -> dict:
            return {"name": self.name, "volumes": [{"name": "vol", "size": size}]}

        def io_stats(self) -> dict:
            """No layers below the volumes to account for."""
            return {}

        async def run_background(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
            """No background work."""
            task_status.started()

        async def aclose(self, clean: bool = True) -> None:
            pass

    async def open_target() -> RamTarget:
        return RamTarget()

    home = Path(tempfile.mkdtemp(prefix="vstore-bench-home-"))
    try:
        mount(open_target, mountpoint, home=home, foreground=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------------------- the driver


def child_env() -> dict[str, str]:
    """The environment for child processes: this checkout's code first on their path."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    return env


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the {path.parent} mount did not come up")
        time.sleep(0.05)


def _fio(path: Path, name: str, args: list[str], size: int, runtime: float) -> dict:
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--size={size}", f"--runtime={runtime}",
           "--output-format=json", "--group_reporting", *args]
    if "rand" in name:
        cmd.append("--time_based")
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    job = json.loads(res.stdout)["jobs"][0]
    side = job["write"] if "write" in name else job["read"]
    return {"GB/s": side["bw_bytes"] / 1e9, "IOPS": side["iops"]}


def _stats(mountpoint: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((mountpoint / ".vstore" / "fuse-stats").read_text())
    return None


def _start(kind: str, size: int) -> tuple[subprocess.Popen, Path]:
    mp = Path(tempfile.mkdtemp(prefix=f"vstore-bench-{kind}-"))
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "bench.fuse_ceiling", "--serve", kind, str(mp),
                             "--size", str(size)], cwd=root, env=child_env())
    return proc, mp


def _stop(proc: subprocess.Popen, mp: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
    with contextlib.suppress(OSError):
        mp.rmdir()


def _run_all(size: int, runtime: float) -> dict:
    """Both filesystems mounted at once; each job runs on one, then the other."""
    servers = {kind: _start(kind, size) for kind in ("ceiling", "vstore")}
    out: dict = {kind: {} for kind in servers}
    try:
        for proc, mp in servers.values():
            _wait_for(mp / "vol", proc)
        time.sleep(0.3)  # let read-ahead tuning land
        for name, args in JOBS.items():
            for kind, (_, mp) in servers.items():
                before = _stats(mp)
                result = out[kind][name] = _fio(mp / "vol", name, args, size, runtime)
                after = _stats(mp)
                if before and after:
                    side = "write" if "write" in name else "read"
                    n = after[side]["count"] - before[side]["count"]
                    nbytes = after[side]["bytes"] - before[side]["bytes"]
                    result["avg request KiB"] = round(nbytes / max(n, 1) / 1024, 1)
                    result["max request KiB"] = after[side]["max_size"] // 1024
    finally:
        for proc, mp in servers.values():
            _stop(proc, mp)
    return out


def _parse_size(text: str) -> int:
    from vstore.sizes import parse_size

    return parse_size(text)


def main(argv: list[str] | None = None) -> None:
    """Measure both filesystems, print a table, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="file size (and sequential job size)")
    ap.add_argument("--runtime", type=float, default=5, help="seconds per job at most")
    ap.add_argument("--serve", nargs=2, metavar=("KIND", "MOUNTPOINT"), help=argparse.SUPPRESS)
    ap.add_argument("--fuse-settings", default=None, help=argparse.SUPPRESS)  # JSON, for --serve ceiling
    args = ap.parse_args(argv)
    size = _parse_size(args.size)
    if args.serve:
        kind, mountpoint = args.serve
        if kind == "ceiling":
            _serve_ceiling(mountpoint, size, json.loads(args.fuse_settings) if args.fuse_settings else None)
        else:
            _serve_vstore(mountpoint, size)
        return
    if shutil.which("fio") is None:
        raise SystemExit("fio is not installed")
    results = _run_all(size, args.runtime)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"FUSE throughput, {args.size} file ({platform.node()}, {os.cpu_count()} CPUs)")
    for col in ("job", "ceiling", "vstore", "vstore/ceiling", "vstore avg req KiB"):
        table.add_column(col, justify="right" if col != "job" else "left")
    for name in JOBS:
        c, v = results["ceiling"][name], results["vstore"][name]
        unit = "IOPS" if "4K" in name else "GB/s"
        fmt = (lambda x: f"{x:,.0f}") if unit == "IOPS" else (lambda x: f"{x:.2f} GB/s")
        ratio = v[unit] / c[unit] if c[unit] else float("nan")
        table.add_row(name, fmt(c[unit]), fmt(v[unit]), f"{ratio:.2f}",
                      str(v.get("avg request KiB", "")))
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
        "size": size, "runtime": args.runtime, "jobs": {n: JOBS[n] for n in JOBS},
        "results": results,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
