"""A real single-node Ceph cluster on loopback for tests and benchmarks: start it, stop it.

Set up the way Ceph's own ``vstart.sh`` does, all inside a temporary directory: a
keyring with ``mon.`` and ``client.admin`` (``ceph-authtool``), a monmap
(``monmaptool``), one ``ceph-mon --mkfs``, then ``ceph osd new`` and
``ceph-osd --mkfs`` for each OSD, on memstore (RAM, bounded by ``memstore device
bytes``). No ceph-mgr: RBD I/O, pool and image commands need only the monitor and
the OSDs (what ceph-mgr serves, such as ``ceph osd df`` or ``rbd perf``, does not
answer here). Pools get size 1. The daemons run in the foreground as our children;
``stop()`` always ends them (SIGTERM, then SIGKILL) and removes the directory.

    with CephCluster() as ceph:
        ceph.create_pool("vs")
        uri = ceph.rbd_uri("vs", "img0")  # rbd://admin@vs/img0?conf=...
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from vstore.testing.iscsi_target import free_port

CEPH_MON = "/usr/bin/ceph-mon"
CEPH_OSD = "/usr/bin/ceph-osd"

CONFIG = """\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{port}
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = {dir}/keyring
run dir = {dir}/run
admin socket = {dir}/run/$name.asok
pid file = {dir}/run/$name.pid
log file = {dir}/log/$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
ms async op threads = 2
rbd cache = false

[mon]
mon data = {dir}/mon.$id
mon cluster log file = {dir}/log/cluster.log

[osd]
osd data = {dir}/osd.$id
keyring = {dir}/osd.$id/keyring
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd memory target = 268435456
osd op num shards = 1
osd op num threads per shard = 2
"""


class CephError(RuntimeError):
    """The test cluster could not be started, or a command failed."""


def available() -> str | None:
    """None when the Ceph daemons are installed, else what is missing."""
    missing = [p for p in (CEPH_MON, CEPH_OSD) if not os.access(p, os.X_OK)]
    missing += [t for t in ("ceph", "ceph-authtool", "monmaptool", "rbd") if shutil.which(t) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


class CephCluster:
    """ceph-mon and ``osds`` ceph-osd (memstore) on 127.0.0.1, in a private directory."""

    def __init__(self, *, osds: int = 1, memstore_bytes: int = 1 << 30, workdir: str | None = None) -> None:
        self.osds = osds
        self.memstore_bytes = memstore_bytes
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="vstore-ceph-"))
        self.port = free_port()
        self.fsid = str(uuid.uuid4())
        self.conf = self.dir / "ceph.conf"
        self.keyring = self.dir / "keyring"
        self.procs: dict[str, subprocess.Popen] = {}
        self.startup_seconds = 0.0

    # ------------------------------------------------------------------ commands

    def ceph(self, *args: str, timeout: float = 60) -> str:
        """Run the ``ceph`` CLI against this cluster; its stdout (CephError on failure)."""
        return self._run("ceph", "--connect-timeout", "15", *args, timeout=timeout)

    def rbd(self, *args: str, timeout: float = 120) -> str:
        """Run the ``rbd`` CLI against this cluster; its stdout."""
        return self._run("rbd", *args, timeout=timeout)

    def rados(self, *args: str, timeout: float = 60) -> str:
        """Run the ``rados`` CLI against this cluster; its stdout."""
        return self._run("rados", *args, timeout=timeout)

    def run_bytes(self, tool: str, *args: str, timeout: float = 120) -> bytes:
        """Run a Ceph CLI tool against this cluster; its stdout as bytes."""
        r = subprocess.run([tool, "-c", str(self.conf), *args], capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if r.returncode:
            raise CephError(f"{tool} {' '.join(args)}: {r.stderr.decode(errors='replace').strip()}")
        return r.stdout

    def _run(self, tool: str, *args: str, timeout: float = 60) -> str:
        return self.run_bytes(tool, *args, timeout=timeout).decode()

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = 120.0) -> CephCluster:
        """Create and start the monitor and the OSDs; return once every OSD is up."""
        why = available()
        if why:
            raise CephError(f"Ceph: {why} (scripts/setup.sh installs it)")
        t0 = time.monotonic()
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _start(self, timeout: float) -> None:
        d = self.dir
        (d / "run").mkdir(parents=True, exist_ok=True)
        (d / "log").mkdir(exist_ok=True)
        self.conf.write_text(CONFIG.format(fsid=self.fsid, port=self.port, dir=d,
                                           memstore_bytes=self.memstore_bytes))
        tool = ["-c", str(self.conf)]
        self._check(["ceph-authtool", "--create-keyring", str(self.keyring), "--gen-key", "-n", "mon.",
                     "--cap", "mon", "allow *"])
        self._check(["ceph-authtool", str(self.keyring), "--gen-key", "-n", "client.admin",
                     "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *"])
        monmap = d / "monmap"
        self._check(["monmaptool", "--create", "--clobber", "--fsid", self.fsid,
                     "--addv", "a", f"[v2:127.0.0.1:{self.port}]", str(monmap)])
        self._check([CEPH_MON, *tool, "--mkfs", "-i", "a", "--monmap", str(monmap),
                     "--keyring", str(self.keyring)])
        self._spawn("mon.a", [CEPH_MON, *tool, "-f", "-i", "a"])
        deadline = time.monotonic() + timeout
        self._wait(lambda: self._quiet("ceph", "--connect-timeout", "2", "mon", "stat"), deadline, "mon.a")
        for _ in range(self.osds):
            osd_uuid = str(uuid.uuid4())
            secret = self._check(["ceph-authtool", "--gen-print-key"]).strip()
            spec = d / "osd-new.json"
            spec.write_text(json.dumps({"cephx_secret": secret}))
            osd_id = self.ceph("osd", "new", osd_uuid, "-i", str(spec)).strip()
            spec.unlink()
            (d / f"osd.{osd_id}").mkdir()
            self._check([CEPH_OSD, *tool, "-i", osd_id, "--mkfs", "--key", secret, "--osd-uuid", osd_uuid])
            self._check(["ceph-authtool", "--create-keyring", str(d / f"osd.{osd_id}" / "keyring"),
                         "--name", f"osd.{osd_id}", "--add-key", secret])
            self._spawn(f"osd.{osd_id}", [CEPH_OSD, *tool, "-f", "-i", osd_id])
        self._wait(self._osds_up, deadline, "the OSDs")

    def _osds_up(self) -> bool:
        try:
            stat = json.loads(self.ceph("osd", "stat", "--format", "json", timeout=20))
        except (CephError, subprocess.TimeoutExpired, ValueError):
            return False
        return stat.get("num_up_osds") == self.osds

    def _quiet(self, tool: str, *args: str) -> bool:
        try:
            self._run(tool, *args, timeout=20)
            return True
        except (CephError, subprocess.TimeoutExpired):
            return False

    def _wait(self, ready, deadline: float, what: str) -> None:
        while not ready():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise CephError(f"{name} exited with status {p.returncode}: {self.log(name)}")
            if time.monotonic() > deadline:
                raise CephError(f"{what} did not come up: {self.log(what.split()[-1])}")
            time.sleep(0.2)

    def _check(self, argv: list[str]) -> str:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if r.returncode:
            raise CephError(f"{' '.join(argv[:3])}: {(r.stderr or r.stdout).strip()[-2000:]}")
        return r.stdout

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.dir / "log" / f"{name}.out", "ab") as out:
            self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self, name: str) -> str:
        """The tail of a daemon's output and log file (for failure messages)."""
        text = ""
        for path in (self.dir / "log" / f"{name}.out", self.dir / "log" / f"{name}.log"):
            try:
                text += path.read_bytes()[-2000:].decode(errors="replace")
            except OSError:
                pass
        return text

    def stop(self) -> None:
        """Stop every daemon (SIGTERM, SIGKILL after 3 s: memstore keeps nothing) and remove the directory."""
        for name in sorted(self.procs, reverse=True):  # the OSDs before the monitor
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.procs.clear()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> CephCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ pools and images

    def create_pool(self, pool: str, pg_num: int = 8) -> None:
        """Create a replicated pool of size 1 and initialise it for RBD."""
        self.ceph("osd", "pool", "create", pool, str(pg_num), str(pg_num))
        self.rbd("pool", "init", pool)

    def rbd_uri(self, pool: str, image: str, *, keyring: bool = True) -> str:
        """The rbd:// member URI of an image of this cluster (as client.admin)."""
        query = f"conf={self.conf}" + (f"&keyring={self.keyring}" if keyring else "")
        return f"rbd://admin@{pool}/{image}?{query}"

    def export(self, pool: str, image: str) -> bytes:
        """The image's bytes, read by ``rbd export`` (an oracle independent of vstore)."""
        return self.run_bytes("rbd", "export", "--no-progress", f"{pool}/{image}", "-")
