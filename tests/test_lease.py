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
    """A raid5 pool on 4 files owned through a lease, created on host A, mounted there, imported on host B.

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
        vstore(home_a, "mount", "p", str(mp_a))
        vstore(home_b, "import-pool", *uris)  # a standby host may import a pool another host owns
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
            time.sleep(TTL)  # it runs a while: renewal attempts, background tasks, fio's writes
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


# ---------------------------------------------------------------------------- the lease state machine
# A fake etcd on trio's MockClock (autojump): the timing rules checked exactly and fast. The
# real etcd is the tests above and below; this one only adds what real time cannot show cheaply.


class FakeEtcd:
    """The few etcd calls the lease makes, on a fake clock; leases expire at grant/renew + TTL."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.kv: dict[str, tuple[bytes, int, int, int]] = {}  # key -> value, create, mod, lease
        self.leases: dict[int, float] = {}  # id -> expiry
        self.rev = 1
        self.next_id = 100
        self.down = False

    def _expire(self) -> None:
        now = self.clock()
        for lid in [lid for lid, t in self.leases.items() if t <= now]:
            del self.leases[lid]
            self.kv = {k: v for k, v in self.kv.items() if v[3] != lid}

    def _up(self) -> None:
        from vstore.cluster.etcd import EtcdError

        if self.down:
            raise EtcdError("etcd at fake: connection refused")
        self._expire()

    async def get(self, key: str):
        from vstore.cluster.etcd import KeyValue

        self._up()
        v = self.kv.get(key)
        return KeyValue(*v) if v else None

    async def grant(self, ttl: int) -> tuple[int, int]:
        self._up()
        self.next_id += 1
        self.leases[self.next_id] = self.clock() + ttl
        self.ttl = ttl
        return self.next_id, ttl

    async def keepalive(self, lease: int) -> int:
        self._up()
        if lease not in self.leases:
            return 0
        self.leases[lease] = self.clock() + self.ttl
        return self.ttl

    async def revoke(self, lease: int) -> None:
        self._up()
        self.leases[lease] = self.clock()
        self._expire()

    async def txn(self, compare, success, failure=None) -> bool:
        from vstore.cluster.etcd import unb64

        self._up()
        for c in compare:
            v = self.kv.get(unb64(c["key"]).decode())
            have = (v[1] if c["target"] == "CREATE" else v[2]) if v else 0
            want = int(c["create_revision"] if c["target"] == "CREATE" else c["mod_revision"])
            if have != want:
                return False
        self.rev += 1
        for op in success:
            p = op["request_put"]
            key = unb64(p["key"]).decode()
            old = self.kv.get(key)
            self.kv[key] = (unb64(p["value"]), old[1] if old else self.rev, self.rev, int(p.get("lease", 0)))
        return True

    def lease_alive(self, lease: int) -> bool:
        self._expire()
        return lease in self.leases


def _lease(fake: FakeEtcd, ttl: int = 8):
    import trio

    from vstore.cluster.etcd import LeaseURI
    from vstore.cluster.lease import OwnershipLease

    return OwnershipLease(LeaseURI("fake", 1, "pre", ttl), "p", "uuid-1", client=fake, clock=trio.current_time)


async def test_epochs_busy_owner_and_takeover_after_expiry(autojump_clock) -> None:
    import trio

    from vstore.cluster import fence
    from vstore.errors import PoolBusyError

    fake = FakeEtcd(trio.current_time)
    a, b = _lease(fake), _lease(fake)
    try:
        assert await a.acquire({"host": "a", "pid": 1}) == 1
        t = trio.current_time()
        assert a.fence.deadline == pytest.approx(t + 8 - 2)  # sent + TTL - TTL/4
        with pytest.raises(PoolBusyError, match="pid 1 on host a.*epoch 1.*--takeover"):
            await b.acquire({"host": "b", "pid": 2})
        # While A renews, B's takeover gives up after its wait limit, naming a live owner.
        async with trio.open_nursery() as n:
            n.start_soon(a.renew_forever)
            with pytest.raises(PoolBusyError, match="still being renewed"):
                await b.acquire({"host": "b", "pid": 2}, takeover=True, wait_limit=30)
            assert not a.fence.expired()
            n.cancel_scope.cancel()
        # A stops renewing (killed, stopped): B waits for the lease to expire, then epoch 2.
        assert await b.acquire({"host": "b", "pid": 2}, takeover=True, min_epoch=0) == 2
        assert not fake.lease_alive(a.lease_id)  # only once A's lease expired
        assert a.fence.deadline <= trio.current_time() - 2  # A's fence had shut a margin before
        assert not await a.renew_once()  # A wakes: its lease is gone, for good
        assert a.fence.lost is not None and a.fence.expired()
        assert not b.fence.expired()
        # The epoch never goes back, even below the pool metadata's.
        await b.release()
        assert await a.acquire({"host": "a", "pid": 1}, min_epoch=7) == 8
    finally:
        for x in (a, b):
            fence.disarm(x.fence)


async def test_fence_shuts_before_the_lease_can_expire_when_etcd_is_unreachable(autojump_clock) -> None:
    import trio

    from vstore.cluster import fence

    fake = FakeEtcd(trio.current_time)
    a = _lease(fake, ttl=4)
    await a.acquire({"host": "a", "pid": 1})
    try:
        async with trio.open_nursery() as n:
            n.start_soon(a.renew_forever)
            await trio.sleep(10)  # renewals keep it open
            assert not a.fence.expired() and fake.lease_alive(a.lease_id)
            fake.down = True
            shut_at = None
            while fake.lease_alive(a.lease_id):  # at every instant: fence shut before etcd lets go
                if a.fence.expired() and shut_at is None:
                    shut_at = trio.current_time()
                await trio.sleep(0.05)
            assert shut_at is not None and trio.current_time() - shut_at >= 4 / 4 - 0.1
            fake.down = False  # etcd is back, but this owner stays fenced
            await trio.sleep(5)
            assert a.fence.expired() and a.fence.lost
            with pytest.raises(fence.FencedError, match="is fenced"):
                fence.check_writes()
            n.cancel_scope.cancel()
    finally:
        fence.disarm(a.fence)
    fence.check_writes()  # disarmed: nothing refused


async def test_renewal_notices_a_foreign_epoch(autojump_clock) -> None:
    import trio

    from vstore.cluster import fence
    from vstore.cluster.etcd import b64

    fake = FakeEtcd(trio.current_time)
    a = _lease(fake)
    await a.acquire({"host": "a", "pid": 1})
    try:
        assert await a.renew_once()
        # Someone rewrote the owner key (an operator's etcdctl put, a buggy peer): not ours any more.
        await fake.txn([], [{"request_put": {"key": b64(a.owner_key), "value": b64('{"epoch": 9}'),
                                             "lease": str(a.lease_id)}}])
        assert not await a.renew_once()
        assert "no longer current" in a.fence.lost and a.fence.expired()
    finally:
        fence.disarm(a.fence)


async def test_fenced_writes_fail_in_the_layout_and_io_threads_without_failing_members(tmp_path: Path) -> None:
    import numpy as np

    from backends.local import open_uri
    from vstore.cluster import fence
    from vstore.io import threads as io_threads
    from vstore.raid import make_layout
    from vstore.uri import parse_uri

    devs = [await open_uri(parse_uri(f"file://{tmp_path}/d{i}.img"), create_size=1 << 20)
            for i in range(2)]
    layout = make_layout("raid1", devs, 65536)
    f = fence.Fence("p")
    f.open_until(float("inf"))
    fence.arm(f)
    try:
        await layout.write(0, np.full(8192, 7, np.uint8))
        await layout.flush()
        # A write op already handed to the I/O threads when the fence shuts is refused there.
        op = devs[0].prepare_io(True, 65536, [np.full(4096, 9, np.uint8)])
        f.lose("test")
        io_threads.submit([op])
        await io_threads.wait([op])
        assert "is fenced" in (op.failure() or "")
        with pytest.raises(fence.FencedError):
            await layout.write(0, np.full(8192, 8, np.uint8))
        with pytest.raises(fence.FencedError):
            await layout.flush()
        assert not layout.failed  # no member blamed for the fence
        assert (await layout.read(0, 8192) == 7).all()  # reads still work; nothing was written
    finally:
        fence.disarm(f)
        for d in devs:
            await d.aclose()
    for i in range(2):
        raw = (tmp_path / f"d{i}.img").read_bytes()
        assert raw[65536:65536 + 4096] == bytes(4096) and raw[:8192] == b"\7" * 8192


def test_lease_uri_parsing() -> None:
    from vstore.cluster.etcd import LeaseURI
    from vstore.errors import ConfigError

    u = LeaseURI.parse("etcd://10.0.0.1/vstore/prod?ttl=5")
    assert (u.host, u.port, u.prefix, u.ttl) == ("10.0.0.1", 2379, "vstore/prod", 5)
    assert str(LeaseURI.parse("etcd://h:1234/p")) == "etcd://h:1234/p"
    for bad in ("http://h/p", "etcd://h", "etcd://h/", "etcd://h/p?ttl=1", "etcd://h/p?ttl=x",
                "etcd://h/p?foo=1", "etcd://u:pw@h/p", "etcd://h:99999/p"):
        with pytest.raises(ConfigError):
            LeaseURI.parse(bad)


def test_http_reply_parsing() -> None:
    from vstore.cluster.etcd import EtcdError, parse_response

    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n3\r\n 1}\r\n0\r\n\r\n"
    assert parse_response(raw, "x") == (200, {"transfer-encoding": "chunked"}, b'{"a": 1}')
    raw = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}junk"
    assert parse_response(raw, "x")[::2] == (404, b"{}")
    for bad in (b"", b"garbage\r\n\r\n", b"HTTP/1.1 x\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"):
        with pytest.raises(EtcdError):
            parse_response(bad, "x")


@needs_etcd
async def test_owner_fences_itself_when_etcd_stops_answering(tmp_path: Path) -> None:
    """A paused etcd: the owner's writes fail (nothing reaches a member) before its lease can expire."""
    import numpy as np
    import trio

    from vstore.cluster.fence import FencedError
    from vstore.pool.home import Home
    from vstore.pool.pool import Pool

    paths = [tmp_path / f"m{i}.img" for i in range(3)]
    with Etcd() as server:
        home = Home(str(tmp_path / "home"))
        pool = await Pool.create(home, "p", "raid5", [f"file://{p}" for p in paths], size=8 << 20,
                                 chunk=16384, lease=server.lease_uri("outage") + "?ttl=2")
        try:
            vol = await pool.create_volume("v", 1 << 20)
            await vol.write(0, np.full(65536, 1, np.uint8))
            await pool.flush()
            assert pool.status()["lease"]["epoch"] == 1
            before = member_digests(paths)
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                await trio.sleep(2.2)  # renewals time out; the fence shuts before the 2 s lease can lapse
                with pytest.raises(FencedError, match="is fenced"):
                    await vol.write(0, np.full(65536, 2, np.uint8))
                with pytest.raises(FencedError):
                    await pool.flush()
                assert (await vol.read(0, 65536) == 1).all()
                assert pool.status()["lease"]["fenced"] is True
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            await trio.sleep(1)  # etcd answers again: the fence stays shut
            with pytest.raises(FencedError):
                await vol.write(0, np.full(65536, 3, np.uint8))
            assert member_digests(paths) == before
            with pytest.raises(FencedError):
                await pool.aclose()  # a fenced pool cannot even mark itself clean
            assert member_digests(paths) == before
        finally:
            pool.abandon()
        # Its lease was given back on close: the next owner needs no wait, recovers, epoch 2.
        again = await Pool.open(home, "p")
        try:
            st = again.status()
            assert st["recovered"] is True and st["lease"]["epoch"] == 2 and st["owner"]["epoch"] == 2
            assert (await again.volumes["v"].read(0, 65536) == 1).all()
        finally:
            await again.aclose()


@needs_etcd
def test_cli_takeover_of_a_dead_owners_lease_and_clean_errors(tmp_path: Path, etcd) -> None:
    """`vstore --takeover CMD` waits out a dead owner's lease; bad or unreachable lease URIs are one clean line."""
    import trio

    from vstore.cluster.etcd import LeaseURI
    from vstore.cluster.lease import OwnershipLease
    from vstore.pool.home import Home
    from vstore.testing.etcd_server import free_port

    home = tmp_path / "home"
    paths = [tmp_path / f"m{i}.img" for i in range(3)]
    uris = [f"file://{p}" for p in paths]
    # Nothing is left behind by a create that cannot reach etcd or names a bad lease.
    for lease, words in ((f"etcd://127.0.0.1:{free_port()}/x", ("etcd at 127.0.0.1",)),
                         ("etcd://h/p?ttl=0", ("ttl",))):
        one_line_error(vstore(home, "create", "p", "--level", "raid5", "--size", "8M", "--lease", lease,
                              *uris, check=False), *words)
        assert not any(p.exists() for p in paths)
        assert not Home(str(home)).pool_record_path("p").exists()
    uri = etcd.lease_uri("cli") + "?ttl=2"
    vstore(home, "create", "p", "--level", "raid5", "--size", "8M", *uris, "--lease", uri)
    st = json.loads(vstore(home, "status", "p", "--json").stdout)
    assert st["lease"]["uri"] == uri and st["lease"]["epoch"] == 1

    async def dead_owner() -> int:  # takes the lease as a host that then dies (never renews)
        # Its own lease lives 8 s (not 2): long enough to be live, even on a loaded machine,
        # when the next command (a new process) tries the pool without --takeover.
        lease = OwnershipLease(LeaseURI.parse(etcd.lease_uri("cli") + "?ttl=8"), "p", st["uuid"])
        try:
            return await lease.acquire({"host": "elsewhere", "pid": 4242}, min_epoch=1)
        finally:
            lease.abandon()

    dead_epoch = trio.run(dead_owner)
    assert dead_epoch == 2
    one_line_error(vstore(home, "scrub", "p", check=False), "pid 4242 on host elsewhere", "--takeover")
    t0 = time.monotonic()
    out = vstore(home, "--takeover", "scrub", "p").stdout
    assert "0 mismatch(es)" in out
    assert time.monotonic() - t0 >= 1.0  # it waited for the dead owner's lease
    st = json.loads(vstore(home, "status", "p", "--json").stdout)
    assert st["lease"]["epoch"] == 3 and st["owner"] is None and st["state"] == "clean"


needs_tgtd = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tgtd") is None, reason="needs root and tgtd")


@pytest.mark.integration
@needs_etcd
@needs_tgtd
async def test_iscsi_members_are_fenced_by_persistent_reservations(tmp_path: Path, etcd) -> None:
    """An old owner whose client-side fence is gone still cannot write: tgtd answers RESERVATION CONFLICT."""
    import numpy as np
    import trio

    from vstore.pool.home import Home
    from vstore.pool.importer import import_pool
    from vstore.pool.pool import Pool
    from vstore.testing.iscsi_target import TgtServer

    with TgtServer(workdir=str(tmp_path)) as srv:
        srv.add_target("iqn.2026-12.test:lease", tid=1)
        luns = [srv.add_lun(1, i, 8 << 20, scsi_id=f"lease-{i}", scsi_sn=f"LEASE{i}") for i in (1, 2, 3)]
        uris = [srv.url(1, i) for i in (1, 2, 3)]
        backing = [Path(lu.path) for lu in luns]
        home_a, home_b = Home(str(tmp_path / "a")), Home(str(tmp_path / "b"))
        created = await Pool.create(home_a, "p", "raid5", uris, chunk=16384,
                                    lease=etcd.lease_uri("pr") + "?ttl=2")
        assert created.status()["lease"]["reserved"] == [0, 1, 2]
        await created.aclose()
        await import_pool(home_b, uris)  # host B knows the pool
        a = await Pool.open(home_a, "p")
        b = None
        try:
            assert a.status()["lease"]["reserved"] == [0, 1, 2]
            vol = await a.create_volume("v", 1 << 20)
            await vol.write(0, np.full(65536, 1, np.uint8))
            await a.flush()
            # A stalls for good: no renewals, and (to test the target alone) no client-side fence.
            a.lease.abandon()
            b = await Pool.open(home_b, "p", takeover=True)  # waits out A's lease, preempts A's key
            assert b.status()["lease"]["reserved"] == [0, 1, 2]
            assert b.lease.epoch == a.lease.epoch + 1
            await trio.sleep(0)
            before = member_digests(backing)
            with pytest.raises(Exception, match="RESERVATION CONFLICT|failed members"):
                await vol.write(0, np.full(65536, 2, np.uint8))
            assert member_digests(backing) == before  # the target refused every byte
            assert (await b.volumes["v"].read(0, 65536) == 1).all()
            await b.volumes["v"].write(65536, np.full(4096, 3, np.uint8))
            await b.aclose()  # clean: the reservation is cleared again
            b = None
            again = await Pool.open(home_b, "p")
            try:
                assert (await again.volumes["v"].read(65536, 4096) == 3).all()
            finally:
                await again.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await a._close_devices()
                if b is not None:
                    await b.aclose()


def test_persistent_reservation_codec() -> None:
    import struct

    from backends.iscsi import scsi
    from vstore.cluster.reservations import reservation_key

    cdb = scsi.persistent_reserve_out(scsi.PR_PREEMPT, scsi.PR_WRITE_EXCLUSIVE_REGISTRANTS_ONLY, 24)
    assert cdb == bytes([0x5F, 0x04, 0x05, 0, 0, 0, 0, 0, 24, 0])
    assert scsi.persistent_reserve_in(scsi.PR_READ_KEYS, 1024) == bytes([0x5E, 0, 0, 0, 0, 0, 0, 4, 0, 0])
    assert scsi.pr_out_parameters(0x1122, 0x3344) == struct.pack(">QQ8x", 0x1122, 0x3344)
    keys = struct.pack(">II", 7, 16) + struct.pack(">QQ", 0xAB, 0xCD)
    assert scsi.parse_pr_keys(keys) == [0xAB, 0xCD]
    assert scsi.parse_pr_reservation(struct.pack(">II", 7, 0)) is None
    held = struct.pack(">IIQ4xBBH", 7, 16, 0xAB, 0, 0x05, 0)
    assert scsi.parse_pr_reservation(held) == (0xAB, 5)
    with pytest.raises(ValueError):
        scsi.parse_pr_keys(b"\0" * 4)
    k1, k2 = reservation_key("uuid", 1), reservation_key("uuid", 2)
    assert k1 != k2 and k1 >> 32 == k2 >> 32 and k1 & 0xFFFFFFFF == 1


@needs_etcd
async def test_etcd_client_against_a_real_etcd(etcd) -> None:
    """The JSON-gateway calls the lease relies on, as a real etcd answers them."""
    from vstore.cluster.etcd import EtcdClient, EtcdError, compare_revision, put_op

    c = EtcdClient("127.0.0.1", etcd.port)
    assert await c.get("client/absent") is None
    lid, ttl = await c.grant(5)
    assert lid > 0 and ttl == 5
    put = [put_op("client/owner", "me", lid), put_op("client/epoch", "1")]
    assert await c.txn([compare_revision("client/owner", "CREATE", 0)], put)
    assert not await c.txn([compare_revision("client/owner", "CREATE", 0)], put)  # taken
    kv = await c.get("client/owner")
    assert kv.value == b"me" and kv.lease == lid and kv.create_revision > 0
    epoch = await c.get("client/epoch")
    assert not await c.txn([compare_revision("client/epoch", "MOD", epoch.mod_revision - 1)], [])
    assert await c.keepalive(lid) == 5
    await c.revoke(lid)
    assert await c.get("client/owner") is None and (await c.get("client/epoch")).value == b"1"
    assert await c.keepalive(lid) == 0  # gone
    await c.revoke(lid)  # revoking twice is fine
    with pytest.raises(EtcdError, match="etcd at 127.0.0.1"):
        await EtcdClient("127.0.0.1", 1, timeout=1).get("x")
