"""The whole stack: fio through FUSE mounts of vstore pools, next to baselines measured in the same run.

Run ``python -m bench.stack [--quick] [--profile] [--out DIR]`` as root. Three comparisons,
each a table of figures with ratio columns (reported, never asserted):

- ``tmpfs``: a volume of a raid0 pool of 4 file members on tmpfs (``/dev/shm``), next to
  (a) ``ceiling``: the empty pyfuse3 filesystem of ``bench.fuse_ceiling`` (reads return a
  zero buffer, writes are dropped) mounted with vstore's own FUSE settings, read at run
  time from ``fuse_mount.daemon.fuse_settings()`` (options, handler task counts,
  writeback cache, the BDI's read-ahead); (b) ``ceiling dflt``: the same filesystem with
  pyfuse3's defaults (min_tasks=1, no read-ahead tuning); (c) qemu-storage-daemon's FUSE
  export of a plain file on the same tmpfs (``driver=file`` + ``raw``); (d) a plain tmpfs
  file, no FUSE. Direct 1 MiB sequential read and write and 4 KiB random read, libaio, qd 8.
- ``parity``: raid5 over 5 tmpfs file members vs raid0 over 5 (two pools, member files in
  one tmpfs directory, chunk 64 KiB): direct 1 MiB sequential write (and read, full run).
- ``disk``: raid5 over 5 and raid0 over 4 file members on the repository's disk vs a plain
  file on that disk (a full run adds qemu's export of a plain file there and the ceiling,
  and buffered jobs: psync, the write ends with an fsync, reads drop the file's cache).

Every file is written once in full before anything is measured (and the vstore mounts
compile their kernels then). Each job is time based and runs on every target in turn
before the next job, so a noisy neighbour slows them alike. ``--profile`` runs py-spy on
the mount process during each vstore job (raw profiles and summaries in
``OUT/stack-profiles/``); the figures of a profiled run are slowed by the sampling. The
mount's ``.vstore/fuse-stats`` is kept after every vstore job. Every mount is unmounted
and every process stopped in ``finally``, on errors and Ctrl-C too; a missing baseline
(qemu-storage-daemon, tmpfs, py-spy, fio) is reported as missing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import fuse_ceiling
from bench.layouts import scratch_dir

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results"
MiB = 1 << 20
CHUNK = 64 * 1024
TMPFS = Path("/dev/shm")
PROFILE_RATE = 200  # py-spy samples per second
TOP_FRAMES = 12

_DIRECT = ["--direct=1", "--ioengine=libaio", "--iodepth=8"]
_BUFFERED = ["--direct=0", "--ioengine=psync"]
JOBS: dict[str, list[str]] = {
    "direct seq write 1M qd8": ["--rw=write", "--bs=1M", *_DIRECT],
    "direct seq read 1M qd8": ["--rw=read", "--bs=1M", *_DIRECT],
    "direct rand read 4K qd8": ["--rw=randread", "--bs=4k", *_DIRECT],
    "buffered seq write 1M": ["--rw=write", "--bs=1M", *_BUFFERED, "--end_fsync=1"],
    "buffered seq read 1M": ["--rw=read", "--bs=1M", *_BUFFERED, "--invalidate=1"],
    "buffered rand read 4K": ["--rw=randread", "--bs=4k", *_BUFFERED, "--invalidate=1"],
}
DIRECT_JOBS = ("direct seq write 1M qd8", "direct seq read 1M qd8", "direct rand read 4K qd8")
SEQ_WRITE, SEQ_READ = "direct seq write 1M qd8", "direct seq read 1M qd8"


# ---------------------------------------------------------------------------- what is measured


@dataclass
class Target:
    """One file fio runs on, and what serves it."""

    name: str
    kind: str  # vstore, ceiling, qemu or plain
    storage: str  # tmpfs, disk, or none (the ceiling stores nothing)
    note: str
    level: str | None = None  # vstore: the pool's RAID level and member count
    members: int = 0
    checksums: bool = False  # vstore: the pool keeps block checksums (create --checksums)
    fuse: dict[str, Any] | None = None  # ceiling: the FUSE settings it mounts with
    path: Path | None = None  # the file fio opens, once started
    pid: int | None = None  # the process serving the FUSE mount
    read_ahead_kb: int | None = None  # of the mount's BDI, read once it is up
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The target as stored in the JSON report."""
        d: dict[str, Any] = {"kind": self.kind, "storage": self.storage, "note": self.note}
        if self.level:
            d.update(level=self.level, members=self.members, chunk=CHUNK, checksums=self.checksums)
        if self.fuse is not None:
            d["fuse_settings"] = self.fuse
        if self.read_ahead_kb is not None:
            d["bdi_read_ahead_kb"] = self.read_ahead_kb
        return d | self.extra


@dataclass(frozen=True)
class Group:
    """One comparison: a table of jobs on targets, and ratio columns (label, numerator, denominator)."""

    key: str
    title: str
    targets: tuple[str, ...]
    jobs: tuple[str, ...]
    ratios: tuple[tuple[str, str, str], ...]
    # (job, ratio label) -> target the issue sets (None: reported without one)
    targets_of_issue: tuple[tuple[str, str, float | None], ...] = ()


def make_targets() -> dict[str, Target]:
    """Every target the comparisons may use, by name."""
    vstore_fuse, default_fuse = fuse_ceiling.vstore_settings(), fuse_ceiling.default_settings()
    ts = [
        Target("raid0x4 tmpfs", "vstore", "tmpfs", "vstore raid0 pool of 4 file members on tmpfs", "raid0", 4),
        Target("ceiling", "ceiling", "none", "empty pyfuse3 filesystem, vstore's FUSE settings", fuse=vstore_fuse),
        Target("ceiling dflt", "ceiling", "none", "empty pyfuse3 filesystem, pyfuse3 defaults", fuse=default_fuse),
        Target("qemu tmpfs", "qemu", "tmpfs", "qemu-storage-daemon FUSE export of a plain tmpfs file"),
        Target("plain tmpfs", "plain", "tmpfs", "plain file on tmpfs, no FUSE"),
        Target("raid5x5 tmpfs", "vstore", "tmpfs", "vstore raid5 pool of 5 file members on tmpfs", "raid5", 5),
        Target("raid0x5 tmpfs", "vstore", "tmpfs", "vstore raid0 pool of 5 file members on tmpfs", "raid0", 5),
        Target("raid5x5 tmpfs cksum", "vstore", "tmpfs",
               "vstore raid5 pool of 5 file members on tmpfs, block checksums", "raid5", 5, checksums=True),
        Target("raid5x5 disk", "vstore", "disk", "vstore raid5 pool of 5 file members on the disk", "raid5", 5),
        Target("raid0x4 disk", "vstore", "disk", "vstore raid0 pool of 4 file members on the disk", "raid0", 4),
        Target("plain disk", "plain", "disk", "plain file on the disk, no FUSE"),
        Target("qemu disk", "qemu", "disk", "qemu-storage-daemon FUSE export of a plain file on the disk"),
    ]  # fmt: skip
    return {t.name: t for t in ts}


def make_groups(quick: bool) -> list[Group]:
    """The comparisons of one run (fewer jobs and targets with ``quick``)."""
    disk_targets = ("raid5x5 disk", "raid0x4 disk", "plain disk") + (() if quick else ("qemu disk", "ceiling"))
    disk_ratios = (("raid5/plain", "raid5x5 disk", "plain disk"), ("raid0/plain", "raid0x4 disk", "plain disk"),
                   ("raid5/qemu", "raid5x5 disk", "qemu disk"), ("raid5/ceiling", "raid5x5 disk", "ceiling"))
    return [
        Group("tmpfs", "raid0 over 4 file members on tmpfs vs the FUSE ceiling, qemu and a plain tmpfs file",
              ("raid0x4 tmpfs", "ceiling", "ceiling dflt", "qemu tmpfs", "plain tmpfs"), DIRECT_JOBS,
              (("vs ceiling", "raid0x4 tmpfs", "ceiling"), ("vs ceiling dflt", "raid0x4 tmpfs", "ceiling dflt"),
               ("vs qemu", "raid0x4 tmpfs", "qemu tmpfs"), ("vs plain", "raid0x4 tmpfs", "plain tmpfs"),
               ("ceiling/dflt", "ceiling", "ceiling dflt")),
              tuple((job, label, target) for job in DIRECT_JOBS
                    for label, target in (("vs ceiling", 0.7 if job == SEQ_READ else None),
                                          ("vs qemu", 1.0 if job == SEQ_READ else None)))),
        Group("parity", "raid5 vs raid0 over 5 file members on tmpfs, chunk 64 KiB",
              ("raid5x5 tmpfs", "raid0x5 tmpfs"), (SEQ_WRITE,) if quick else (SEQ_WRITE, SEQ_READ),
              (("raid5/raid0", "raid5x5 tmpfs", "raid0x5 tmpfs"),),
              ((SEQ_WRITE, "raid5/raid0", None),)),
        Group("checksums", "raid5 over 5 file members on tmpfs with block checksums vs without",
              ("raid5x5 tmpfs cksum", "raid5x5 tmpfs"), (SEQ_WRITE, SEQ_READ),
              (("cksum/plain", "raid5x5 tmpfs cksum", "raid5x5 tmpfs"),),
              ((SEQ_WRITE, "cksum/plain", 0.85), (SEQ_READ, "cksum/plain", 0.85))),
        Group("disk", "file members on the disk vs a plain file of that disk",
              disk_targets, (SEQ_WRITE, SEQ_READ) if quick else tuple(JOBS),
              tuple(r for r in disk_ratios if r[1] in disk_targets and r[2] in disk_targets),
              tuple((job, label, 0.7) for job in (SEQ_READ, SEQ_WRITE) for label in ("raid5/plain", "raid0/plain"))),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- processes


def child_env() -> dict[str, str]:
    """The environment of every child: this checkout's code first on the Python path."""
    return fuse_ceiling.child_env()


def _vstore_cmd() -> list[str]:
    # Never the venv's console script: that imports whichever checkout was installed.
    return [sys.executable, "-c", "from vstore.cli.main import main; main()"]


def fio(path: Path, job: str, size: int, runtime: float | None) -> dict:
    """Run one fio job on a file (time based, or once over the file when runtime is None); GB/s, IOPS, mean latency."""
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--size={size}", "--output-format=json",
           "--group_reporting", *JOBS[job]]
    if runtime is not None:
        cmd += [f"--runtime={max(1, int(runtime * 1000))}ms", "--time_based"]
    timeout = (runtime or 0) * 4 + 600
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"fio failed on {path} ({job}): {res.stderr.strip()[-500:]}")
    side = json.loads(res.stdout)["jobs"][0]["write" if "write" in job else "read"]
    return {"gbs": side["bw_bytes"] / 1e9, "iops": side["iops"],
            "lat_us": side.get("clat_ns", {}).get("mean", 0) / 1000}


def _fuse_stats(volume: Path) -> dict | None:
    """The vstore mount's counters (``.vstore/fuse-stats`` beside the volume file)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((volume.parent / ".vstore" / "fuse-stats").read_text())
    return None


def _mount_table() -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount of this process' namespace."""
    out = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            sep = fields.index("-")
            out.append((fields[4].encode().decode("unicode_escape"), fields[sep + 1]))
    return out


def _is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    return any(mp == target for mp, _ in _mount_table())


def _fs_type(path: Path) -> str | None:
    """The file system type of the mount that holds path."""
    real = os.path.realpath(path)
    best = ("", None)
    for mp, fstype in _mount_table():
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best[0]):
            best = (mp, fstype)
    return best[1]


def _read_ahead_kb(mountpoint: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(fuse_ceiling.bdi_read_ahead_path(mountpoint).read_text())
    return None


def _tail(path: Path, n: int = 400) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace").strip()[-n:]
    return ""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while the stack runs, so ``finally`` still cleans up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while tearing down (a second Ctrl-C must not leave mounts behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@dataclass
class _Server:
    name: str
    proc: subprocess.Popen
    mountpoint: Path
    log: Path


class Stack:
    """Sets up the targets (files, pools, FUSE servers) in scratch directories and tears every one down."""

    def __init__(self, size: int, log: Callable[[str], None]) -> None:
        self.size = size
        self.log = log
        self.dir = scratch_dir()  # on the repository's disk: disk targets, mountpoints, HOME
        self.home = self.dir / "home"
        self.shm: Path | None = None  # tmpfs members and files
        self.tmpfs_missing: str | None = None
        self.servers: list[_Server] = []
        self.targets: dict[str, Target] = {}  # the ones that are up
        self.missing: dict[str, str] = {}

    def _vstore(self, *args: str) -> None:
        res = subprocess.run([*_vstore_cmd(), "--home", str(self.home), *args], capture_output=True,
                             text=True, timeout=300, cwd=ROOT, env=child_env())
        if res.returncode:
            raise RuntimeError(f"vstore {' '.join(args[:2])} failed: {res.stderr.strip()}")

    def _data_dir(self, storage: str) -> Path | None:
        if storage != "tmpfs":
            return self.dir
        if self.shm is None and self.tmpfs_missing is None:
            if _fs_type(TMPFS) != "tmpfs":
                self.tmpfs_missing = f"{TMPFS} is not a tmpfs mount"
            else:
                self.shm = Path(tempfile.mkdtemp(prefix="vstore-bench-", dir=TMPFS))
        return self.shm

    def start(self, wanted: list[Target]) -> None:
        """Create the files and pools of the wanted targets, start their FUSE servers, wait until all are up."""
        pending: list[tuple[Target, _Server]] = []
        for t in wanted:
            where = self._data_dir(t.storage)
            if where is None:
                self.missing[t.name] = self.tmpfs_missing or "no tmpfs"
                continue
            if t.kind == "plain":
                t.path = where / f"{_slug(t.name)}.img"
                with open(t.path, "wb") as f:
                    f.truncate(self.size)
                self.targets[t.name] = t
            elif t.kind == "vstore":
                pending.append((t, self._spawn_vstore(t, where)))
            elif t.kind == "ceiling":
                pending.append((t, self._spawn_ceiling(t)))
            elif t.kind == "qemu":
                server = self._spawn_qemu(t, where)
                if server is not None:
                    pending.append((t, server))
        for t, server in pending:
            self._wait_up(t, server)

    def _spawn(self, name: str, cmd: list[str], mountpoint: Path) -> _Server:
        logpath = self.dir / f"{_slug(name)}.log"
        with open(logpath, "wb") as logf:
            # A session of its own: Ctrl-C reaches only us, and we stop the servers in order.
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(),
                                    start_new_session=True)
        server = _Server(name, proc, mountpoint, logpath)
        self.servers.append(server)
        return server

    def _spawn_vstore(self, t: Target, where: Path) -> _Server:
        pool = _slug(t.name)
        data = t.members - (1 if t.level == "raid5" else 0)
        member = (-(-self.size // data // MiB) + 64) * MiB  # whole MiB, with room for metadata and extent rounding
        uris = [f"file://{where}/{pool}-d{i}.img" for i in range(t.members)]
        self.log(f"stack: creating {t.name}: {t.level} pool of {t.members} file members in {where}")
        self._vstore("create", pool, "--level", t.level or "", "--chunk", str(CHUNK), "--size", str(member),
                     *(["--checksums"] if t.checksums else []), *uris)
        self._vstore("volume", "create", pool, "vol", "--size", str(self.size))
        mp = self.dir / f"{pool}-mnt"
        mp.mkdir()
        t.extra["member_dir"] = str(where)
        cmd = [*_vstore_cmd(), "--home", str(self.home), "mount", "--foreground", pool, str(mp)]
        return self._spawn(t.name, cmd, mp)

    def _spawn_ceiling(self, t: Target) -> _Server:
        mp = self.dir / f"{_slug(t.name)}-mnt"
        mp.mkdir()
        cmd = [sys.executable, "-m", "bench.fuse_ceiling", "--serve", "ceiling", str(mp), "--size", str(self.size),
               "--fuse-settings", json.dumps(t.fuse)]
        return self._spawn(t.name, cmd, mp)

    def _spawn_qemu(self, t: Target, where: Path) -> _Server | None:
        qsd = shutil.which("qemu-storage-daemon")
        if qsd is None:
            self.missing[t.name] = "qemu-storage-daemon not installed (Debian qemu-system-common)"
            return None
        image = where / f"{_slug(t.name)}.img"
        with open(image, "wb") as f:
            f.truncate(self.size)
        mp = self.dir / f"{_slug(t.name)}-export"  # the export's mountpoint is a regular file
        mp.touch()
        return self._spawn(t.name, [
            qsd,
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=raw,node-name=raw0,file=file0",
            "--export", f"type=fuse,id=exp0,node-name=raw0,mountpoint={mp},writable=on",
        ], mp)  # fmt: skip

    def _wait_up(self, t: Target, server: _Server, timeout: float = 90) -> None:
        """Wait until the server's file is there (vstore: its mount record too); qemu failing is a missing baseline."""
        path = server.mountpoint if t.kind == "qemu" else server.mountpoint / "vol"
        record = self.home / "mounts" / f"{_slug(t.name)}.json" if t.kind == "vstore" else None
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                if path.stat().st_size > 0 and _is_mounted(server.mountpoint) and (record is None or record.exists()):
                    break
            if server.proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with {server.proc.returncode}" if server.proc.poll() is not None
                       else f"not up within {timeout:.0f} s")
                msg = f"{t.name}: {why}: {_tail(server.log)}"
                if t.kind == "qemu":
                    self.missing[t.name] = msg
                    return
                raise RuntimeError(msg)
            time.sleep(0.05)
        t.path, t.pid = path, server.proc.pid
        if record is not None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                t.pid = int(json.loads(record.read_text())["pid"])
        want = (t.fuse or {}).get("read_ahead_kb") if t.kind == "ceiling" else None
        t.read_ahead_kb = _read_ahead_kb(server.mountpoint)
        until = time.monotonic() + 5
        while want is not None and t.read_ahead_kb != want and time.monotonic() < until:
            time.sleep(0.05)  # the ceiling sets it once its mount answers
            t.read_ahead_kb = _read_ahead_kb(server.mountpoint)
        self.targets[t.name] = t

    def stop(self) -> None:
        """Stop every server (vstore unmounts cleanly on SIGTERM), unmount leftovers, remove the scratch directories."""
        with _no_interrupts():
            for s in self.servers:
                if s.proc.poll() is None:
                    with contextlib.suppress(OSError):
                        s.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 60
            for s in self.servers:
                try:
                    s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.log(f"stack: {s.name} did not stop on SIGTERM; killing it")
                    s.proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        s.proc.wait(timeout=10)
            for s in self.servers:
                if _is_mounted(s.mountpoint):
                    subprocess.run(["fusermount3", "-u", "-z", str(s.mountpoint)], capture_output=True)
            for d in (self.dir, self.shm):
                if d is not None:
                    shutil.rmtree(d, ignore_errors=True)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


# ---------------------------------------------------------------------------- profiles


def py_spy() -> str | None:
    """The py-spy executable: on PATH or beside this Python."""
    exe = shutil.which("py-spy")
    if exe:
        return exe
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else None


class Profile:
    """py-spy recording one process while a job runs; ``summary()`` once stopped."""

    def __init__(self, exe: str, pid: int, runtime: float, raw: Path) -> None:
        self.raw = raw
        self.err = raw.with_suffix(".log")
        with open(self.err, "wb") as errf:
            self.proc = subprocess.Popen(
                [exe, "record", "--threads", "-f", "raw", "-r", str(PROFILE_RATE),
                 "-d", str(max(1, math.ceil(runtime))), "-p", str(pid), "-o", str(raw)],
                stdout=errf, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        time.sleep(0.3)  # let it attach before the job starts

    def stop(self) -> None:
        """Wait for the recording to end (SIGINT makes py-spy write what it has)."""
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def summary(self) -> dict[str, Any]:
        """Thread shares and the main thread's top own-time frames (see ``summarize``)."""
        if not self.raw.exists() or self.raw.stat().st_size == 0:
            return {"error": f"py-spy wrote no profile: {_tail(self.err, 300)}"}
        return summarize(self.raw)


# Leaf frames of threads that wait for work: a trio worker thread parked in its thread
# cache (lock.acquire). py-spy's idle test misses some of these samples on a busy machine.
IDLE_LEAVES = ("WorkerThread._work (_thread_cache.py)",)
EPOLL_LEAF = "EpollIOManager.get_events (_io_epoll.py)"


def _frame_function(frame: str) -> str:
    """'func (path/file.py:123)' -> 'func (file.py)': own time is summed per function."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({Path(m.group(2)).name})"


def summarize(raw: Path, top: int = TOP_FRAMES) -> dict[str, Any]:
    """Share of samples in the trio main thread vs the other threads, and the main thread's top own-time frames.

    From a ``py-spy record --threads -f raw`` profile (samples of running threads only);
    samples of worker threads parked in trio's thread cache are counted apart as idle.
    """
    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        name = frames[0].split(": ", 1)[1] if ": " in frames[0] else frames[0]  # "thread (TID): NAME"
        leaf = _frame_function(frames[-1]) if len(frames) > 1 else ""
        if name == "MainThread":
            threads["MainThread"] += n
            own[leaf] += n
        elif leaf in IDLE_LEAVES:
            idle += n
        else:
            threads[re.sub(r"\d+", "N", name)] += n
    total = sum(threads.values())
    main = threads.get("MainThread", 0)
    return {
        "raw": str(raw),
        "rate": PROFILE_RATE,
        "samples": total,
        "main_samples": main,
        "main_share": main / total if total else None,
        "worker_share": (total - main) / total if total else None,
        "main_epoll_share": own.get(EPOLL_LEAF, 0) / main if main else None,
        "idle_worker_samples": idle,
        "threads": dict(threads.most_common()),
        "main_top_own": [{"frame": f, "samples": n, "share": n / main} for f, n in own.most_common(top)],
    }


def profile_text(target: str, job: str, s: dict[str, Any]) -> str:
    """A short plain-text summary of one profile."""
    if "error" in s:
        return f"{target} / {job}: {s['error']}"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    lines = [f"{target} / {job}: {s['samples']} samples of running threads at {s['rate']} Hz: trio main thread "
             f"{pct(s['main_share'])} ({pct(s['main_epoll_share'])} of them in epoll), other threads "
             f"{pct(s['worker_share'])} ({s['idle_worker_samples']} more samples of idle trio workers left out)",
             "  threads: " + ", ".join(f"{k} {v}" for k, v in s["threads"].items()),
             "  main thread, own time:"]
    lines += [f"    {pct(f['share']):>4}  {f['frame']}" for f in s["main_top_own"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the run


def _job_order(groups: list[Group]) -> list[str]:
    return [job for job in JOBS if any(job in g.jobs for g in groups)]


def _targets_of(job: str, groups: list[Group]) -> list[str]:
    return list(dict.fromkeys(t for g in groups if job in g.jobs for t in g.targets))


def _numeric(d: dict | None) -> dict[str, float]:
    return {k: v for k, v in (d or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}


def run(quick: bool, log: Callable[[str], None] = print, *, profile: bool = False, out: Path | None = None,
        only: list[str] | None = None) -> dict:
    """Set up every target, run every job on its targets (interleaved), tear down; results, ratios, checks.

    ``only``: the keys of the comparisons to run (default: all).
    """
    size = (64 if quick else 1024) * MiB
    runtime = 0.5 if quick else 4.0
    groups = [g for g in make_groups(quick) if not only or g.key in only]
    out = DEFAULT_OUT if out is None else out
    prof_dir = out / "stack-profiles"
    report: dict[str, Any] = {
        "size": size, "runtime": runtime, "chunk": CHUNK, "profile": profile,
        "fuse_settings": {"vstore": fuse_ceiling.vstore_settings(), "pyfuse3 defaults": fuse_ceiling.default_settings()},
        "jobs": {job: JOBS[job] for job in _job_order(groups)},
        "targets": {}, "groups": [], "results": {}, "checks": [], "missing": {},
    }  # fmt: skip
    if shutil.which("fio") is None:
        report["missing"]["fio"] = "fio is not installed: nothing was measured"
        _finish(report, groups)
        return report
    if not os.access("/dev/fuse", os.R_OK | os.W_OK) or shutil.which("fusermount3") is None:
        report["missing"]["fuse"] = "no usable /dev/fuse or fusermount3 (FUSE 3): nothing was measured"
        _finish(report, groups)
        return report
    spy = py_spy() if profile else None
    if profile and spy is None:
        report["missing"]["py-spy"] = "py-spy not found: no profiles"
    if spy:
        prof_dir.mkdir(parents=True, exist_ok=True)
        report["profiles"] = {}
    all_targets = make_targets()
    wanted = [all_targets[n] for n in dict.fromkeys(t for g in groups for t in g.targets)]
    stack = Stack(size, log)
    results: dict[str, dict[str, dict]] = report["results"]
    try:
        with _sigterm_as_interrupt():
            stack.start(wanted)
            # Untimed: every file written once in full (reads then read data, not holes), and the
            # vstore mounts compile their kernels (numba, on first use) before anything is measured.
            log("stack: writing every file once (untimed)")
            for t in stack.targets.values():
                fio(t.path, SEQ_WRITE, size, None)
            for job in _job_order(groups):
                log(f"stack: {job}")
                for name in _targets_of(job, groups):
                    t = stack.targets.get(name)
                    if t is not None:
                        results.setdefault(name, {})[job] = _measure(t, job, size, runtime, spy, prof_dir, report, log)
    finally:
        stack.stop()
        report["missing"].update(stack.missing)
        report["targets"] = {t.name: t.describe() for t in wanted}
    _finish(report, groups)
    return report


def _measure(t: Target, job: str, size: int, runtime: float, spy: str | None, prof_dir: Path,
             report: dict, log: Callable[[str], None]) -> dict:
    """One fio job on one target; for vstore also its fuse-stats and, when profiling, a py-spy profile."""
    assert t.path is not None
    if t.kind != "vstore":
        return fio(t.path, job, size, runtime)
    before = _fuse_stats(t.path)
    prof = Profile(spy, t.pid, runtime, prof_dir / f"{_slug(t.name)}__{_slug(job)}.raw") if spy and t.pid else None
    try:
        res = fio(t.path, job, size, runtime)
    finally:
        if prof is not None:
            prof.stop()
    after = _fuse_stats(t.path)
    if before and after:
        # What the mount received: the request size after the kernel's FUSE layer.
        side = "write" if "write" in job else "read"
        with contextlib.suppress(KeyError, TypeError):
            count = after[side]["count"] - before[side]["count"]
            nbytes = after[side]["bytes"] - before[side]["bytes"]
            if count > 0:
                res["fuse_requests"] = count
                res["fuse_avg_request_kib"] = nbytes / count / 1024
    if after is not None:
        res["fuse_stats"] = after
    if prof is not None:
        summary = prof.summary()
        report["profiles"].setdefault(t.name, {})[job] = summary
        stem = prof.raw.with_suffix("")
        Path(f"{stem}.txt").write_text(profile_text(t.name, job, summary) + "\n")
        if after is not None:
            Path(f"{stem}.fuse-stats.json").write_text(json.dumps(after, indent=2) + "\n")
        log(profile_text(t.name, job, summary))
        nums, old = _numeric(after), _numeric(before)
        if nums:
            log("  fuse-stats: " + ", ".join(f"{k}={v:g} (+{v - old.get(k, 0):g})" for k, v in nums.items()))
    return res


def _finish(report: dict, groups: list[Group]) -> None:
    """Ratios of every group and the checks, from the results."""
    results = report["results"]

    def figure(name: str, job: str) -> float | None:
        r = results.get(name, {}).get(job)
        return None if r is None else r["iops" if "4K" in job else "gbs"]

    for g in groups:
        ratios: dict[str, dict[str, float | None]] = {}
        for job in g.jobs:
            ratios[job] = {}
            for label, num, den in g.ratios:
                a, b = figure(num, job), figure(den, job)
                ratios[job][label] = a / b if a and b else None
        report["groups"].append({
            "key": g.key, "title": g.title, "targets": list(g.targets), "jobs": list(g.jobs),
            "ratio_columns": [{"label": lab, "numerator": n, "denominator": d} for lab, n, d in g.ratios],
            "ratios": ratios,
        })  # fmt: skip
        defs = {lab: (n, d) for lab, n, d in g.ratios}
        for job, label, target in g.targets_of_issue:
            value = ratios.get(job, {}).get(label)
            if value is None or label not in defs:
                continue
            num, den = defs[label]
            unit = "iops" if "4K" in job else "gbs"
            report["checks"].append({
                "check": f"{num} / {den}: {job}", "kind": g.key, "value": value, "target": target,
                "unit": unit, "numerator": figure(num, job), "denominator": figure(den, job),
                "numerator_gbs": results[num][job]["gbs"], "denominator_gbs": results[den][job]["gbs"],
            })  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run the whole-stack benchmark alone, print its tables, write OUT/stack.json."""
    from bench import report

    ap = argparse.ArgumentParser(prog="python -m bench.stack", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small files, short jobs, fewer jobs (about a minute)")
    ap.add_argument("--group", action="append", default=None, metavar="KEY",
                    help="run only this comparison (tmpfs, parity, checksums, disk); repeatable")
    ap.add_argument("--profile", action="store_true", help="py-spy on the mount process during each vstore job")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args.quick, profile=args.profile, out=args.out, only=args.group)
    report.show_stack(res)
    report.write_json(args.out / "stack.json", res)
    report.console().print(f"wrote {args.out / 'stack.json'}")


if __name__ == "__main__":
    main()
