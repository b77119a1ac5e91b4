"""Host failover through an etcd lease (issue 20, part 2): a real etcd on loopback, two "hosts"
(two config directories), kill -9 and SIGSTOP of the owner's mount under fio, takeover."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vstore.testing.etcd_server import Etcd

REPO = Path(__file__).resolve().parents[1]
TTL = 3  # seconds: short, so a takeover waits little

needs_etcd = pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (apt-get install etcd-server)")
needs_fuse_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("fio") is None,
    reason="needs root, /dev/fuse and fio")


@pytest.fixture(scope="module")
def etcd():
    """A real etcd on free loopback ports, stopped (and its data removed) after the module."""
    with Etcd() as server:
        yield server


def vstore(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The CLI with a private config directory (one "host")."""
    env = {**os.environ, "VSTORE_HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("VSTORE_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", "vstore.cli.main", *args], capture_output=True,
                         text=True, cwd=REPO, timeout=180, env=env)
    if check:
        assert res.returncode == 0, f"vstore {' '.join(args)}: {res.stdout}{res.stderr}"
    return res


def one_line_error(res: subprocess.CompletedProcess, *words: str) -> str:
    """The one line of a clean CLI error (non-zero exit, no traceback) naming words."""
    assert res.returncode != 0, res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


def mount_pid(home: Path) -> int:
    """The pid of the mount process of pool p in this config directory."""
    from fuse_mount.daemon import mounted_pool_socket
    from vstore.pool import control

    return control.call_sync(mounted_pool_socket(home, "p"), {"cmd": "mount-info"})["pid"]


def status(mp: Path) -> dict:
    """The pool's status as its mount shows it."""
    return json.loads((mp / ".vstore" / "status").read_text())


def fio_args(filename: Path, *extra: str) -> list[str]:
    """A sequential 4K write pass with crc32c verify headers (acknowledged blocks are a prefix)."""
    return ["fio", "--name=lease", f"--filename={filename}", "--rw=write", "--bs=4k", "--size=12M",
            "--ioengine=psync", "--direct=1", "--verify=crc32c", *extra]


def member_digests(paths: list[Path]) -> list[str]:
    """SHA-256 of every member file."""
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@contextlib.contextmanager
def two_hosts(tmp_path: Path, etcd: Etcd, prefix: str):
    """A raid5 pool on 4 files owned through a lease, created on host A and imported on host B.

    Yields (home_a, home_b, mp_a, mp_b, member paths); every mount and process is gone afterwards.
    """
    from tests.fuse_helpers import force_unmount

    home_a, home_b = tmp_path / "host-a", tmp_path / "host-b"
    mp_a, mp_b = tmp_path / "mnt-a", tmp_path / "mnt-b"
    mp_a.mkdir()
    mp_b.mkdir()
    paths = [tmp_path / f"m{i}.img" for i in range(4)]
    uris = [f"file://{p}" for p in paths]
    try:
        vstore(home_a, "create", "p", "--level", "raid5", "--size", "12M", "--chunk", "16K",
               "--lease", f"{etcd.lease_uri(prefix)}?ttl={TTL}", *uris)
        vstore(home_a, "volume", "create", "p", "v", "--size", "16M")
        vstore(home_b, "import-pool", *uris)
        yield home_a, home_b, mp_a, mp_b, paths
    finally:
        for home in (home_a, home_b):
            for rec in (home / "mounts").glob("*.json") if (home / "mounts").is_dir() else []:
                with contextlib.suppress(Exception):
                    pid = json.loads(rec.read_text())["pid"]
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
        for mp in (mp_a, mp_b):
            force_unmount(mp)


def wait_gone(pid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), f"process {pid} is still there"


def wait_resynced(mp: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    st = status(mp)
    while (st["journal"].get("resync") or {}).get("state") not in (None, "done") \
            and time.monotonic() < deadline:
        time.sleep(0.1)
        st = status(mp)
    assert (st["journal"].get("resync") or {}).get("state") in (None, "done"), st["journal"]
    return st


@pytest.mark.integration
@needs_etcd
@needs_fuse_root
def test_kill9_owner_under_fio_then_takeover_keeps_every_acknowledged_write(tmp_path: Path, etcd) -> None:
    """kill -9 the owner's mount under fio; host B takes over, fio verifies every acknowledged block, scrub is clean."""
    with two_hosts(tmp_path, etcd, "kill9") as (home_a, home_b, mp_a, mp_b, _paths):
        vstore(home_a, "mount", "p", str(mp_a))
        epoch = status(mp_a)["lease"]["epoch"]  # every open of the pool took a new epoch
        assert epoch == status(mp_a)["owner"]["epoch"] >= 2
        # Host B may not open the pool while A's lease is alive: one clear line naming the owner.
        one_line_error(vstore(home_b, "scrub", "p", check=False), "lease", f"epoch {epoch}", "--takeover")
        fio = subprocess.Popen([*fio_args(mp_a / "v"), "--do_verify=0", "--verify_state_save=1",
                                "--rate_iops=400"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        try:
            time.sleep(2.0)
            assert fio.poll() is None, "fio stopped early"
            pid = mount_pid(home_a)
            os.kill(pid, signal.SIGKILL)
            assert fio.wait(60) != 0  # its writes fail once the mount is gone
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
        state = tmp_path / "local-lease-0-verify.state"
        assert state.exists(), "fio saved no record of its completed writes"
        wait_gone(pid)
        vstore(home_a, "umount", str(mp_a))  # clears the dead FUSE mount
        t0 = time.monotonic()
        vstore(home_b, "mount", "p", str(mp_b), "--takeover")
        took = time.monotonic() - t0
        st = status(mp_b)
        assert st["recovered"] is True
        assert st["lease"]["epoch"] == st["owner"]["epoch"] == epoch + 1 and not st["lease"]["fenced"]
        print(f"takeover took {took:.1f}s")
        # fio checks every block whose write it saw acknowledged before the kill.
        res = subprocess.run([*fio_args(mp_b / "v"), "--verify_only", "--verify_state_load=1",
                              "--output-format=json"], cwd=tmp_path, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr
        job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
        assert job["error"] == 0
        assert job["read"]["io_bytes"] >= 256 << 10, job["read"]  # it verified the acknowledged prefix
        wait_resynced(mp_b)
        vstore(home_b, "umount", str(mp_b))
        out = vstore(home_b, "scrub", "p").stdout
        assert "0 mismatch(es)" in out, out
        # B closed cleanly and gave the lease back: host A opens it again without waiting.
        st_a = json.loads(vstore(home_a, "status", "p", "--json").stdout)
        assert st_a["state"] == "clean" and st_a["owner"] is None


@pytest.mark.integration
@needs_etcd
@needs_fuse_root
def test_sigstopped_owner_that_wakes_after_takeover_writes_nothing(tmp_path: Path, etcd) -> None:
    """SIGSTOP the owner under fio; B takes over, writes and closes; A wakes up: not one member byte changes."""
    with two_hosts(tmp_path, etcd, "sigstop") as (home_a, home_b, mp_a, mp_b, paths):
        vstore(home_a, "mount", "p", str(mp_a))
        epoch = status(mp_a)["lease"]["epoch"]
        fio = subprocess.Popen([*fio_args(mp_a / "v"), "--do_verify=0", "--rate_iops=400",
                                "--time_based", "--runtime=120"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pid = mount_pid(home_a)
        try:
            time.sleep(1.5)
            assert fio.poll() is None, "fio stopped early"
            os.kill(pid, signal.SIGSTOP)  # mid-write: requests are in flight in the mount
            vstore(home_b, "mount", "p", str(mp_b), "--takeover")
            assert status(mp_b)["lease"]["epoch"] == epoch + 1
            with open(mp_b / "v", "r+b") as f:  # the new owner writes
                f.seek(8 << 20)
                f.write(b"B" * 65536)
                os.fsync(f.fileno())
            wait_resynced(mp_b)
            vstore(home_b, "umount", str(mp_b))
            before = member_digests(paths)
            os.kill(pid, signal.SIGCONT)  # the stale owner wakes up with fio's writes pending
            time.sleep(2 * TTL)  # it runs a while: renewals, background tasks, fio's writes
            st = status(mp_a)  # it still answers (reads), and says why it no longer writes
            assert st["lease"]["fenced"] is True, st["lease"]
            assert member_digests(paths) == before, "the stale owner wrote to a member"
            assert fio.wait(60) != 0  # fio's writes failed (EIO), none was acknowledged
            with pytest.raises(OSError) as err:  # a write now fails
                fd = os.open(mp_a / "v", os.O_WRONLY | os.O_DIRECT)
                try:
                    os.pwrite(fd, mmap.mmap(-1, 4096), 0)
                finally:
                    os.close(fd)
            assert err.value.errno == errno.EIO
            vstore(home_a, "umount", str(mp_a), check=False)  # its close may not write either
            wait_gone(pid)
            assert member_digests(paths) == before, "the stale owner wrote to a member while closing"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            if fio.poll() is None:
                fio.kill()
                fio.wait()
        out = vstore(home_b, "scrub", "p").stdout
        assert "0 mismatch(es)" in out, out
        vstore(home_b, "mount", "p", str(mp_b))
        try:
            with open(mp_b / "v", "rb") as f:
                f.seek(8 << 20)
                assert f.read(65536) == b"B" * 65536
        finally:
            vstore(home_b, "umount", str(mp_b))
