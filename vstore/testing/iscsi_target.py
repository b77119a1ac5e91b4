"""A real tgtd for tests and benchmarks: start it on a loopback portal, add file-backed LUNs, stop it.

Each instance gets a free TCP port and its own control port (``-C N``), so several
can run side by side. ``stop()`` always ends the daemon (``tgtadm --op delete
--mode system``, then SIGKILL) and never waits without a timeout.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

TGTD = "/usr/sbin/tgtd"
TGTADM = "/usr/sbin/tgtadm"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_used_controls: set[int] = set()


def _control_number() -> int:
    # tgtd's control socket is /var/run/tgtd/socket.N: pick an N no other instance
    # uses. Each process draws from its own stride so parallel test runs rarely meet;
    # start() retries with another number if tgtd still cannot bind.
    # tgtd accepts 0..32767.
    base = 1000 + (os.getpid() % 1800) * 16
    for n in [*range(base, base + 16), *random.sample(range(30000, 32768), 64)]:
        if n not in _used_controls and not os.path.exists(f"/var/run/tgtd/socket.{n}"):
            _used_controls.add(n)
            return n
    raise RuntimeError("no free tgtd control number")


@dataclass
class Lun:
    """A file-backed logical unit."""

    tid: int
    lun: int
    path: str
    size: int
    block_size: int


@dataclass
class Target:
    """One tgtd target."""

    tid: int
    iqn: str
    luns: dict[int, Lun] = field(default_factory=dict)


class _EarlyExit(Exception):
    """tgtd exited during start-up."""


class TgtServer:
    """A tgtd process in the foreground with a private control port."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, workdir: str | None = None,
                 extra: str = "") -> None:
        self.host = host
        self._fixed_port = port is not None
        self.port = port or free_port(host)
        self.control = _control_number()
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="vstore-tgt-")
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.targets: dict[int, Target] = {}
        self.log_path = os.path.join(self.workdir, "tgtd.log")
        self._log = None

    # ------------------------------------------------------------ process

    def start(self, timeout: float = 10.0) -> TgtServer:
        """Start tgtd and wait until its control socket answers (retrying on port clashes)."""
        for attempt in range(5):
            try:
                return self._start_once(timeout)
            except _EarlyExit:
                if attempt == 4:
                    message = f"tgtd would not start: {self.log()}"
                    self.stop()  # removes our work directory
                    raise RuntimeError(message) from None
                # Another process took our control number or port meanwhile: pick new ones.
                _used_controls.discard(self.control)
                self.control = _control_number()
                if not self._fixed_port:
                    self.port = free_port(self.host)
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> TgtServer:
        portal = f"portal={self.host}:{self.port}" + (f",{self.extra}" if self.extra else "")
        if getattr(self, "_log", None) is not None:
            self._log.close()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [TGTD, "-f", "-C", str(self.control), "--iscsi", portal],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                raise _EarlyExit()
            r = subprocess.run([TGTADM, "-C", str(self.control), "--op", "show", "--mode", "sys"],
                               capture_output=True, timeout=5)
            if r.returncode == 0 and self._listening():
                return self
            if time.monotonic() > deadline:
                message = f"tgtd did not become ready: {self.log()}"
                self.stop()
                raise RuntimeError(message)
            time.sleep(0.05)

    def _listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def log(self) -> str:
        """The daemon's output so far (for failure messages)."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-4000:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop tgtd: delete the system, then SIGKILL if it lingers."""
        p = self.proc
        try:
            if p is not None and p.poll() is None:
                try:
                    # tgtd refuses to delete the system while targets exist: force them out first.
                    out = self.adm("--op", "show", "--mode", "target", check=False)
                    for tid in re.findall(r"^Target (\d+):", out, re.M):
                        self.adm("--op", "delete", "--mode", "target", "--tid", tid, "--force", check=False)
                    subprocess.run([TGTADM, "-C", str(self.control), "--op", "delete", "--mode", "system"],
                                   capture_output=True, timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
                    p.wait(timeout=5)
        finally:
            if p is not None and p.poll() is not None:
                # tgtd leaves its control socket behind; it was ours, so tidy it.
                for suffix in ("", ".lock"):
                    try:
                        os.unlink(f"/var/run/tgtd/socket.{self.control}{suffix}")
                    except OSError:
                        pass
            self.proc = None
            if getattr(self, "_log", None) is not None:
                self._log.close()
                self._log = None
            _used_controls.discard(self.control)
            if self._own_dir and os.path.isdir(self.workdir):
                subprocess.run(["rm", "-rf", self.workdir], timeout=30)

    def kill(self) -> None:
        """SIGKILL tgtd at once (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)

    def __enter__(self) -> TgtServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ configuration

    def adm(self, *args: str, check: bool = True) -> str:
        """Run tgtadm against this instance; return its stdout."""
        cmd = [TGTADM, "-C", str(self.control), "--lld", "iscsi", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def add_target(self, iqn: str, *, tid: int | None = None, bind: bool = True, **params: str) -> Target:
        """Create a target (bound to all initiators) and set target parameters."""
        tid = tid or (max(self.targets, default=0) + 1)
        self.adm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
        t = self.targets[tid] = Target(tid, iqn)
        for key, value in params.items():
            self.set_param(tid, key, value)
        if bind:
            self.adm("--op", "bind", "--mode", "target", "--tid", str(tid), "-I", "ALL")
        return t

    def set_param(self, tid: int, key: str, value: str) -> None:
        """``--op update --mode target -n KEY -v VALUE`` (MaxRecvDataSegmentLength, HeaderDigest, ...)."""
        self.adm("--op", "update", "--mode", "target", "--tid", str(tid), "-n", key, "-v", str(value))

    def add_lun(self, tid: int, lun: int, size: int, *, block_size: int = 512, path: str | None = None,
                scsi_id: str | None = None, scsi_sn: str | None = None, thin: bool = False) -> Lun:
        """A LUN backed by a (sparse) file of size bytes; thin: UNMAP punches holes in it."""
        path = path or os.path.join(self.workdir, f"t{tid}-lun{lun}.img")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.truncate(size)
        args = ["--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(lun), "-b", path]
        if block_size != 512:
            args += ["--blocksize", str(block_size)]
        self.adm(*args)
        ids = []
        if scsi_id:
            ids.append(f"scsi_id={scsi_id}")
        if scsi_sn:
            ids.append(f"scsi_sn={scsi_sn}")
        if thin:
            ids.append("thin_provisioning=1")
        if ids:
            self.adm("--op", "update", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(lun),
                     "--params", ",".join(ids))
        lu = self.targets[tid].luns[lun] = Lun(tid, lun, path, size, block_size)
        return lu

    def add_account(self, tid: int, user: str, password: str) -> None:
        """Create a CHAP account and bind it to a target (logins then need CHAP)."""
        self.adm("--op", "new", "--mode", "account", "--user", user, "--password", password)
        self.adm("--op", "bind", "--mode", "account", "--tid", str(tid), "--user", user)

    def connections(self, tid: int) -> list[tuple[int, int]]:
        """(sid, cid) of every connection on a target, from ``--op show --mode target``."""
        out = self.adm("--op", "show", "--mode", "target")
        conns: list[tuple[int, int]] = []
        current = None
        sid = None
        for line in out.splitlines():
            m = re.match(r"Target (\d+):", line)
            if m:
                current = int(m.group(1))
                continue
            if current != tid:
                continue
            m = re.match(r"\s+I_T nexus: (\d+)", line)
            if m:
                sid = int(m.group(1))
                continue
            m = re.match(r"\s+Connection: (\d+)", line)
            if m and sid is not None:
                conns.append((sid, int(m.group(1))))
        return conns

    def drop_connections(self, tid: int) -> int:
        """Cut every connection of a target (as a network failure would); returns how many."""
        n = 0
        for sid, cid in self.connections(tid):
            self.adm("--op", "delete", "--mode", "conn", "--tid", str(tid), "--sid", str(sid),
                     "--cid", str(cid), check=False)
            n += 1
        return n

    def url(self, tid: int, lun: int, *, user: str | None = None, password: str | None = None) -> str:
        """iscsi:// URL of a LUN (works for vstore and libiscsi)."""
        cred = f"{user}%{password}@" if user else ""
        return f"iscsi://{cred}{self.host}:{self.port}/{self.targets[tid].iqn}/{lun}"
