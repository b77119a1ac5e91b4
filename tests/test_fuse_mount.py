"""The FUSE front end through real mounts: volume files, semantics, the daemon, ext4 on a loop device."""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import trio

from backends.memory import MemoryDevice
from fuse_mount.daemon import (
    check_mountpoint,
    mount,
    mount_entry,
    mounted_pool_socket,
    serve_mount,
    unmount,
)
from tests.fuse_helpers import FAKE_COMMANDS, FailingDevice, FakeTarget, detach_loops, force_unmount
from vstore.errors import (
    ConfigError,
    ExistsError,
    NotFoundError,
    PoolBusyError,
    VstoreError,
)
from vstore.pool import control

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="needs /dev/fuse and fusermount3"),
]

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20

run = trio.to_thread.run_sync
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mount, losetup and tmpfs need root")


def memory_target(sizes: dict[str, int], name: str = "mempool") -> FakeTarget:
    """A FakeTarget of zero-filled memory volumes."""
    return FakeTarget(name, {n: MemoryDevice(np.zeros(s, np.uint8)) for n, s in sizes.items()})


@contextlib.asynccontextmanager
async def mounted(target: FakeTarget, tmp_path: Path, **kwargs):
    """Mount target in this process (served by this trio loop); always unmounted afterwards."""
    mp = tmp_path / "mnt"
    mp.mkdir(exist_ok=True)
    try:
        async with trio.open_nursery() as nursery:
            session = await nursery.start(partial(
                serve_mount, target, str(mp), home=tmp_path / "home", handle_signals=False,
                commands=FAKE_COMMANDS, **kwargs))
            try:
                yield session, mp
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(20):
                    await session.stop()
    finally:
        force_unmount(mp)


# ---------------------------------------------------------------------------- data path

def test_pyfuse3_copies_without_the_gil() -> None:
    """The set-up rebuilds pyfuse3 with scripts/pyfuse3-nogil.patch (else the I/O threads stall)."""
    import pyfuse3
    import pyfuse3._pyfuse3 as p

    patched = getattr(p, "VSTORE_NOGIL_PATCH", 0) >= 2  # 2: with the fallocate op (TRIM)
    if not patched and os.environ.get("CI", "").lower() != "true":
        pytest.skip("pyfuse3 without vstore's patch (run scripts/setup.sh)")
    assert patched, "scripts/setup.sh must rebuild pyfuse3 with scripts/pyfuse3-nogil.patch"
    assert "fallocate" in vars(pyfuse3.Operations)



async def test_random_io_matches_model(tmp_path: Path) -> None:
    sizes = {"big": 8 * MiB, "small": 64 * 1024 + 512}
    target = memory_target(sizes)
    models = {n: bytearray(s) for n, s in sizes.items()}
    rng = random.Random(1234)
    async with mounted(target, tmp_path) as (_, mp):
        def exercise() -> None:
            assert sorted(os.listdir(mp)) == [".vstore", "big", "small"]
            fds = {n: os.open(mp / n, os.O_RDWR) for n in sizes}
            try:
                for _ in range(300):
                    name = rng.choice(list(sizes))
                    size = sizes[name]
                    length = rng.choice([1, 511, 512, 4096, 4097, 65536, 200_000, MiB + 3])
                    length = min(length, size)
                    off = rng.randrange(0, size - length + 1)
                    if rng.random() < 0.5:
                        data = rng.randbytes(length)
                        assert os.pwrite(fds[name], data, off) == length
                        models[name][off : off + length] = data
                    else:
                        assert os.pread(fds[name], length, off) == models[name][off : off + length]
                # reads clipped at the end of the volume
                for name, size in sizes.items():
                    tail = os.pread(fds[name], 10_000, size - 100)
                    assert tail == models[name][size - 100 :]
                    assert os.pread(fds[name], 4096, size) == b""
                    assert os.fstat(fds[name]).st_size == size
            finally:
                for fd in fds.values():
                    os.close(fd)

        await run(exercise)
        # the bytes reached the volumes themselves (no cache in between)
        for name in sizes:
            assert bytes(target.volumes[name].store) == models[name]


async def test_direct_io_and_request_sizes(tmp_path: Path) -> None:
    target = memory_target({"vol": 16 * MiB})
    async with mounted(target, tmp_path) as (session, mp):
        def direct() -> None:
            buf = mmap.mmap(-1, MiB)
            buf.write(bytes(range(256)) * 4096)
            fd = os.open(mp / "vol", os.O_RDWR | os.O_DIRECT)
            try:
                for i in range(8):
                    assert os.pwritev(fd, [buf], i * MiB) == MiB
                out = mmap.mmap(-1, MiB)
                for i in range(8):
                    assert os.preadv(fd, [out], i * MiB) == MiB
                    assert out[:] == buf[:]
            finally:
                os.close(fd)
            with open(mp / "vol", "rb", buffering=0) as f:
                while f.read(MiB):
                    pass

        await run(direct)
        stats = session.fs.stats()
        # libfuse 3.14 and this kernel negotiate 1 MiB requests: direct I/O arrives whole
        assert stats["write"]["max_size"] == MiB
        assert stats["read"]["max_size"] == MiB
        text = await run(lambda: (mp / ".vstore" / "fuse-stats").read_text())
        assert json.loads(text)["write"]["count"] >= 8


async def test_write_past_end_and_truncate_refused(tmp_path: Path) -> None:
    size = 1 * MiB
    target = memory_target({"vol": size})
    store = target.volumes["vol"].store
    store[:] = 7
    async with mounted(target, tmp_path) as (_, mp):
        def check() -> None:
            fd = os.open(mp / "vol", os.O_RDWR)
            try:
                for off, length in [(size, 1), (size + 4096, 4096), (size, MiB)]:
                    with pytest.raises(OSError) as exc:
                        os.pwrite(fd, b"x" * length, off)
                    assert exc.value.errno in (errno.ENOSPC, errno.EFBIG)
                # A write crossing the end writes what fits (like a block device) and no more,
                # or fails whole; the next write at the end fails.
                try:
                    n = os.pwrite(fd, b"y" * 8192, size - 4096)
                    assert n <= 4096
                except OSError as e:
                    assert e.errno in (errno.ENOSPC, errno.EFBIG)
                # a request the kernel sends whole (direct I/O) is refused whole
                dfd = os.open(mp / "vol", os.O_RDWR | os.O_DIRECT)
                try:
                    buf = mmap.mmap(-1, 8192)
                    buf.write(b"z" * 8192)
                    with pytest.raises(OSError) as exc:
                        os.pwritev(dfd, [buf], size - 4096)
                    assert exc.value.errno in (errno.ENOSPC, errno.EFBIG)
                finally:
                    os.close(dfd)
                assert os.fstat(fd).st_size == size
                for bad in (0, size - 512, size + 512, 2 * size):
                    with pytest.raises(OSError) as exc:
                        os.ftruncate(fd, bad)
                    assert exc.value.errno in (errno.EPERM, errno.EINVAL)
                os.ftruncate(fd, size)  # the current size is accepted
                assert os.fstat(fd).st_size == size
                with pytest.raises(OSError):
                    os.chmod(mp / "vol", 0o644)
                with pytest.raises(OSError):
                    os.open(mp / "vol", os.O_WRONLY | os.O_TRUNC)
                with pytest.raises(OSError):
                    os.open(mp / "newfile", os.O_WRONLY | os.O_CREAT, 0o600)
                with pytest.raises(OSError):
                    os.unlink(mp / "vol")
            finally:
                os.close(fd)
            assert os.stat(mp / "vol").st_size == size

        await run(check)
    assert len(target.volumes["vol"].store) == size
    assert (store[: size - 4096] == 7).all()
    assert (store != ord("z")).all()


async def test_fsync_and_close_reach_flush(tmp_path: Path) -> None:
    target = memory_target({"vol": MiB})
    async with mounted(target, tmp_path) as (_, mp):
        fd = await run(os.open, mp / "vol", os.O_RDWR)
        try:
            await run(os.pwrite, fd, b"abc", 0)
            before = target.flush_count
            await run(os.fsync, fd)
            assert target.flush_count == before + 1
            await run(os.fdatasync, fd)
            assert target.flush_count == before + 2
            await run(os.pwrite, fd, b"def", 3)
        finally:
            await run(os.close, fd)  # close after a write flushes too
        assert target.flush_count == before + 3
        # closing a file that was only read does not flush
        await run(lambda: (mp / "vol").read_bytes()[:1])
        assert target.flush_count == before + 3
    assert target.closed is True


async def test_flush_waits_for_the_target(tmp_path: Path) -> None:
    """fsync returns only after target.flush() has returned."""
    target = memory_target({"vol": MiB})
    order: list[str] = []
    original = target.flush

    async def slow_flush() -> None:
        await trio.sleep(0.3)
        await original()
        order.append("flushed")

    target.flush = slow_flush  # type: ignore[method-assign]
    async with mounted(target, tmp_path) as (_, mp):
        def write_and_sync() -> None:
            fd = os.open(mp / "vol", os.O_RDWR)
            os.pwrite(fd, b"data", 0)
            os.fsync(fd)
            order.append("fsync returned")
            os.close(fd)

        await run(write_and_sync)
    assert order[:2] == ["flushed", "fsync returned"]


async def test_attributes_status_and_statfs(tmp_path: Path) -> None:
    target = memory_target({"a": 2 * MiB, "b": MiB})
    async with mounted(target, tmp_path, uid=1234, gid=4321) as (_, mp):
        def look() -> None:
            st = os.stat(mp / "a")
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            assert (st.st_uid, st.st_gid, st.st_size) == (1234, 4321, 2 * MiB)
            assert os.stat(mp / "a").st_ino == st.st_ino  # stable
            assert os.stat(mp / "b").st_ino != st.st_ino
            status = json.loads((mp / ".vstore" / "status").read_text())
            assert status == json.loads(json.dumps(target.status()))
            with pytest.raises(OSError):
                open(mp / ".vstore" / "status", "w")
            vfs = os.statvfs(mp)
            assert vfs.f_blocks * vfs.f_frsize == 3 * MiB
            entry = mount_entry(mp)
            assert entry is not None and entry["source"] == "vstore:mempool"
            assert entry["fstype"] == "fuse.vstore"

        await run(look)


async def test_read_only_mount(tmp_path: Path) -> None:
    target = memory_target({"vol": MiB})
    target.volumes["vol"].store[:4] = list(b"data")
    async with mounted(target, tmp_path, read_only=True) as (_, mp):
        def check() -> None:
            with pytest.raises(OSError) as exc:
                os.open(mp / "vol", os.O_RDWR)
            assert exc.value.errno == errno.EROFS
            assert (mp / "vol").read_bytes()[:4] == b"data"

        await run(check)


async def test_engine_errors_are_eio_and_the_mount_survives(tmp_path: Path, caplog) -> None:
    failing = FailingDevice(MemoryDevice(np.zeros(MiB, np.uint8)))
    target = FakeTarget("p", {"vol": failing})
    async with mounted(target, tmp_path) as (session, mp):
        fd = await run(os.open, mp / "vol", os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        try:
            failing.failing = True
            for _ in range(3):
                with pytest.raises(OSError) as exc:
                    await run(os.preadv, fd, [buf], 0)
                assert exc.value.errno == errno.EIO
                with pytest.raises(OSError) as exc:
                    await run(os.pwritev, fd, [buf], 0)
                assert exc.value.errno == errno.EIO
            failing.failing = False
            assert await run(os.preadv, fd, [buf], 0) == 4096
        finally:
            await run(os.close, fd)
        assert sum(session.fs.errors.counts.values()) == 6
    logged = [r for r in caplog.records if "DegradedError" in r.getMessage()]
    assert len(logged) == 2  # once per kind of request, not once per failure


async def test_control_socket_drives_live_volumes(tmp_path: Path) -> None:
    target = memory_target({"vol": MiB})
    async with mounted(target, tmp_path) as (_, mp):
        sock = mounted_pool_socket(tmp_path / "home", "mempool")
        assert sock is not None and stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert (await control.call(sock, {"cmd": "status"}))["name"] == "mempool"
        ino_vol = (await run(os.stat, mp / "vol")).st_ino
        await control.call(sock, {"cmd": "volume_create", "name": "extra", "size": 2 * MiB})
        assert (await run(os.stat, mp / "extra")).st_size == 2 * MiB
        with pytest.raises(ExistsError):
            await control.call(sock, {"cmd": "volume_create", "name": "extra", "size": MiB})
        await control.call(sock, {"cmd": "volume_remove", "name": "extra"})
        assert sorted(await run(os.listdir, mp)) == [".vstore", "vol"]
        assert not await run(os.path.exists, mp / "extra")
        assert (await run(os.stat, mp / "vol")).st_ino == ino_vol
        # resized while its attributes are cached: the new size shows at once
        await control.call(sock, {"cmd": "volume_resize", "name": "vol", "size": 3 * MiB})
        assert (await run(os.stat, mp / "vol")).st_size == 3 * MiB
        with pytest.raises(VstoreError, match="internal error"):
            await control.call(sock, {"cmd": "boom"})
        with pytest.raises(ConfigError):
            await control.call(sock, {"cmd": "nonsense"})
        info = await run(control.call_sync, sock, {"cmd": "mount-info"})
        assert info["mountpoint"] == str(mp)
    assert mounted_pool_socket(tmp_path / "home", "mempool") is None


async def test_control_socket_protocol(tmp_path: Path) -> None:
    async def handler(request: dict) -> dict:
        if request.get("cmd") == "missing":
            raise NotFoundError("no such pool")
        return {"echo": request, "n": np.int64(3)}

    # a long directory: the socket path exceeds sockaddr_un's 108 bytes
    path = tmp_path / ("d" * 90) / "pool.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve, path, handler)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert await control.call(path, {"cmd": "x"}) == {"echo": {"cmd": "x"}, "n": 3}
        with pytest.raises(NotFoundError, match="no such pool"):
            await control.call(path, {"cmd": "missing"})
        with pytest.raises(NotFoundError):
            await run(control.call_sync, path, {"cmd": "missing"})

        def garbage() -> bytes:
            import socket

            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path)) if len(str(path)) < 108 else s.connect(
                    f"/proc/self/fd/{os.open(path.parent, os.O_PATH)}/pool.sock")
                s.sendall(b"not json\n[1]\n")
                s.settimeout(10)
                got = b""
                while got.count(b"\n") < 2:  # the two replies may come in one recv or two
                    more = s.recv(4096)
                    if not more:
                        break
                    got += more
                return got

        replies = (await run(garbage)).splitlines()
        assert [json.loads(r)["type"] for r in replies] == ["ConfigError", "ConfigError"]
        nursery.cancel_scope.cancel()
    assert not path.exists()
    with pytest.raises(control.ControlSocketError):
        await control.call(path, {"cmd": "status"}, timeout=2)


@needs_root
def test_bad_mountpoints(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        check_mountpoint(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError):
        check_mountpoint(tmp_path / "file")
    busy = tmp_path / "busy"
    busy.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(busy)], check=True)
    try:
        with pytest.raises(PoolBusyError, match="busy"):
            check_mountpoint(busy)
    finally:
        subprocess.run(["umount", "-l", str(busy)])
    with pytest.raises(NotFoundError, match="not a vstore mount"):
        unmount(str(tmp_path), home=tmp_path / "home")


# ---------------------------------------------------------------------------- the mount process


def _spawn(tmp_path: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    home, mp, data = tmp_path / "home", tmp_path / "mnt", tmp_path / "data"
    mp.mkdir(exist_ok=True)
    data.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fuse_helpers", str(home), str(mp), str(data), *extra],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_mounted(tmp_path: Path, proc: subprocess.Popen | None = None, timeout: float = 20) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = mounted_pool_socket(tmp_path / "home", "filepool")
        if sock is not None:
            return sock
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"mount process exited: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("mount did not become ready")


@contextlib.contextmanager
def cleanup(tmp_path: Path, proc: subprocess.Popen | None = None):
    """Kill the mount process and remove the mount, whatever happened."""
    try:
        yield
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for rec_path in (tmp_path / "home" / "mounts").glob("*.json"):
            with contextlib.suppress(Exception):
                os.kill(json.loads(rec_path.read_text())["pid"], signal.SIGKILL)
        force_unmount(tmp_path / "mnt")


def test_foreground_mount_sigterm_closes_cleanly(tmp_path: Path) -> None:
    proc = _spawn(tmp_path)
    with cleanup(tmp_path, proc):
        _wait_mounted(tmp_path, proc)
        mp = tmp_path / "mnt"
        assert sorted(os.listdir(mp)) == [".vstore", "vol0", "vol1"]
        with open(mp / "vol1", "r+b") as f:
            f.seek(12345)
            f.write(b"hello through fuse")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert mount_entry(mp) is None
        closed = json.loads((tmp_path / "data" / "closed.json").read_text())
        assert closed["clean"] is True
        with open(tmp_path / "data" / "vol1.img", "rb") as f:
            f.seek(12345)
            assert f.read(18) == b"hello through fuse"
        assert mounted_pool_socket(tmp_path / "home", "filepool") is None
        assert "mounted on" in (tmp_path / "home" / "logs" / "mount-filepool.log").read_text()


def test_background_mount_busy_unmount_and_kill9(tmp_path: Path) -> None:
    proc = _spawn(tmp_path, "--background")
    with cleanup(tmp_path):
        out, err = proc.communicate(timeout=30)
        assert (proc.returncode, out, err) == (0, "", "")
        mp = tmp_path / "mnt"
        # ready means visible: no waiting needed
        assert sorted(os.listdir(mp)) == [".vstore", "vol0", "vol1"]
        home = tmp_path / "home"
        # a second mount on the same mountpoint is refused
        with pytest.raises(PoolBusyError):
            check_mountpoint(mp)
        fd = os.open(mp / "vol0", os.O_RDWR)
        try:
            os.pwrite(fd, b"durable", 4096)
            os.fsync(fd)
            with pytest.raises(PoolBusyError, match="busy"):
                unmount(str(mp), home=home, timeout=10)
        finally:
            os.close(fd)
        assert mounted_pool_socket(home, "filepool") is not None  # still mounted
        unmount(str(mp), home=home, timeout=30)
        assert mount_entry(mp) is None
        assert json.loads((tmp_path / "data" / "closed.json").read_text())["clean"] is True
        (tmp_path / "data" / "closed.json").unlink()

        # kill -9 after fsync: the data is on the member; umount clears the dead mount
        proc = _spawn(tmp_path, "--background")
        assert proc.wait(timeout=30) == 0
        sock = _wait_mounted(tmp_path)
        pid = control.call_sync(sock, {"cmd": "mount-info"})["pid"]
        fd = os.open(mp / "vol0", os.O_RDWR)
        os.pwrite(fd, b"after-kill", 8192)
        os.fsync(fd)
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):  # the flush on close finds the daemon gone
            os.close(fd)
        deadline = time.monotonic() + 10
        while mounted_pool_socket(home, "filepool") is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(PoolBusyError, match="dead FUSE mount|vstore umount"):
            check_mountpoint(mp)
        unmount(str(mp), home=home)
        assert mount_entry(mp) is None
        assert not (tmp_path / "data" / "closed.json").exists()
        # mount again: what was fsynced before the kill reads back through the new mount
        proc = _spawn(tmp_path, "--background")
        assert proc.wait(timeout=30) == 0
        with open(mp / "vol0", "rb") as f:
            data = f.read(8192 + 10)
        assert data[4096 : 4096 + 7] == b"durable" and data[8192:] == b"after-kill"
        unmount(str(mp), home=home)
        assert mount_entry(mp) is None


def test_background_mount_error_is_one_line(tmp_path: Path) -> None:
    proc = _spawn(tmp_path, "--background", env={"VSTORE_TEST_FAIL_OPEN": "1"})
    with cleanup(tmp_path, proc):
        out, err = proc.communicate(timeout=30)
        assert proc.returncode != 0
        assert err.strip() == "error: pool 'nosuch' not found"
        assert mount_entry(tmp_path / "mnt") is None
    with pytest.raises(NotFoundError):
        mount(lambda: None, str(tmp_path / "nowhere"), home=tmp_path / "home", foreground=False)  # type: ignore[arg-type, return-value]


# ---------------------------------------------------------------------------- ext4 on a loop device


@needs_root
@pytest.mark.skipif(shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None,
                    reason="needs e2fsprogs and losetup")
async def test_ext4_on_a_loop_device(tmp_path: Path) -> None:
    from backends.local import open_uri
    from vstore.uri import parse_uri

    member = tmp_path / "vol.img"
    dev = await open_uri(parse_uri(f"file://{member}"), create_size=64 * MiB)
    target = FakeTarget("extpool", {"vol": dev})
    fsdir = tmp_path / "ext4"
    fsdir.mkdir()
    files = {f"f{i}": random.Random(i).randbytes(random.Random(i).randrange(1, 3 * MiB))
             for i in range(6)}
    async with mounted(target, tmp_path) as (session, mp):
        volfile = mp / "vol"
        try:
            def build() -> None:
                subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(volfile)],
                               check=True, capture_output=True)
                subprocess.run(["mount", "-o", "loop", str(volfile), str(fsdir)], check=True,
                               capture_output=True)
                try:
                    for name, data in files.items():
                        (fsdir / name).write_bytes(data)
                    subprocess.run(["sync"], check=True)
                finally:
                    subprocess.run(["umount", str(fsdir)], check=True, capture_output=True)
                subprocess.run(["mount", "-o", "loop,ro", str(volfile), str(fsdir)], check=True,
                               capture_output=True)
                try:
                    for name, data in files.items():
                        assert (fsdir / name).read_bytes() == data
                finally:
                    subprocess.run(["umount", str(fsdir)], check=True, capture_output=True)

            await run(build)
        finally:
            await run(lambda: subprocess.run(["umount", "-l", str(fsdir)], capture_output=True))
            await run(detach_loops, mp)
        assert session.fs.stats()["flush"] > 0  # the loop device's flushes reached the target
    # the filesystem is consistent on the member itself, after a clean close
    res = subprocess.run(["e2fsck", "-fn", str(member)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------- through the CLI


def _vstore(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "vstore"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from vstore.cli.main import main; main()"]
    res = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "VSTORE_HOME": str(home)}, timeout=120)
    if check:
        assert res.returncode == 0, f"vstore {' '.join(args)}: {res.stdout}{res.stderr}"
    return res


@needs_root
@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
def test_cli_raid5_ext4_with_a_member_failed_while_mounted(tmp_path: Path) -> None:
    """vstore mount of a raid5 pool, ext4 on a loop device, a member failed through the mount."""
    home, mp, ext = tmp_path / "home", tmp_path / "mnt", tmp_path / "ext4"
    mp.mkdir()
    ext.mkdir()
    members = [f"file://{tmp_path}/m{i}.img" for i in range(3)]
    files = {f"f{i}": random.Random(100 + i).randbytes(random.Random(i).randrange(1, 2 * MiB))
             for i in range(5)}
    with cleanup(tmp_path):
        try:
            _vstore(home, "create", "p", "--level", "raid5", "--size", "48M", *members)
            _vstore(home, "volume", "create", "p", "v", "--size", "64M")
            res = _vstore(home, "mount", "p", str(mp))
            assert (res.stdout, res.stderr) == ("", "")
            assert os.stat(mp / "v").st_size == 64 * MiB
            bad = _vstore(home, "mount", "p", str(tmp_path), check=False)  # already mounted
            assert bad.returncode != 0 and "Traceback" not in bad.stderr
            assert len(bad.stderr.strip().splitlines()) == 1
            subprocess.run(["mkfs.ext4", "-q", "-F", str(mp / "v")], check=True, capture_output=True)
            subprocess.run(["mount", "-o", "loop", str(mp / "v"), str(ext)], check=True)
            for name, data in list(files.items())[:3]:
                (ext / name).write_bytes(data)
            subprocess.run(["sync"], check=True)
            # fail a member: carried out by the mount process, which owns the pool
            _vstore(home, "fail", "p", "1")
            status = json.loads((mp / ".vstore" / "status").read_text())
            assert status["state"] == "degraded"
            for name, data in list(files.items())[3:]:
                (ext / name).write_bytes(data)
            subprocess.run(["umount", str(ext)], check=True)
            # a new loop device reopens the volume file: its pages are read again (degraded)
            subprocess.run(["mount", "-o", "loop,ro", str(mp / "v"), str(ext)], check=True)
            for name, data in files.items():
                assert (ext / name).read_bytes() == data
            subprocess.run(["umount", str(ext)], check=True)
            _vstore(home, "umount", str(mp))
            assert mount_entry(mp) is None
            assert json.loads(_vstore(home, "status", "p", "--json").stdout)["state"] == "degraded"
            _vstore(home, "mount", "p", str(mp), "--read-only")
            res = subprocess.run(["e2fsck", "-fn", str(mp / "v")], capture_output=True, text=True)
            assert res.returncode == 0, res.stdout + res.stderr
            _vstore(home, "umount", str(mp))
        finally:
            subprocess.run(["umount", "-l", str(ext)], capture_output=True)
            detach_loops(mp)
            if mount_entry(mp) is not None:
                _vstore(home, "umount", str(mp), check=False)


@contextlib.contextmanager
def cli_mounted(tmp_path: Path, level: str, n: int, size: str, volumes: tuple[tuple[str, str], ...] = (),
                pool: str = "p"):
    """A pool of n file members created and mounted through the CLI; always unmounted afterwards."""
    home, mp = tmp_path / "home", tmp_path / "mnt"
    mp.mkdir(exist_ok=True)
    with cleanup(tmp_path):
        try:
            _vstore(home, "create", pool, "--level", level, "--size", size,
                    *[f"file://{tmp_path}/m{i}.img" for i in range(n)])
            for name, vsize in volumes:
                _vstore(home, "volume", "create", pool, name, "--size", vsize)
            _vstore(home, "mount", pool, str(mp))
            yield home, mp
            _vstore(home, "umount", str(mp))
        finally:
            if mount_entry(mp) is not None:
                _vstore(home, "umount", str(mp), check=False)


def test_fuse_stats_account_for_every_layer(tmp_path: Path) -> None:
    """.vstore/fuse-stats: the FUSE handlers' time, the layout's requests, waits and member runs, hand-offs."""
    with cli_mounted(tmp_path, "raid5", 5, "24M", (("v", "16M"),)) as (_, mp):
        buf = mmap.mmap(-1, MiB)
        buf.write(random.Random(5).randbytes(MiB))
        fd = os.open(mp / "v", os.O_RDWR | os.O_DIRECT)
        try:
            for i in range(4):
                assert os.pwritev(fd, [buf], i * MiB) == MiB
            out = mmap.mmap(-1, MiB)
            for i in range(4):
                assert os.preadv(fd, [out], i * MiB) == MiB and out[:] == buf[:]
        finally:
            os.close(fd)
        stats = json.loads((mp / ".vstore" / "fuse-stats").read_text())
        layers = stats["layers"]
        fuse, layout = layers["fuse_handler"], layers["layout"]
        assert fuse["write"]["count"] >= 4 and fuse["write"]["bytes"] >= 4 * MiB
        assert fuse["read"]["count"] >= 4 and fuse["read"]["bytes"] >= 4 * MiB
        assert layout["level"] == "raid5"
        # every byte the handlers passed down reached the layout
        assert layout["write"]["bytes"] >= fuse["write"]["bytes"]
        # a 1 MiB raid5 write is 4 full rows: data and parity on all 5 members, one run each
        assert layout["member_write"]["bytes"] >= 4 * MiB * 5 // 4
        assert layout["member_runs"] >= 4 * 5 + 4
        assert layout["stripe_locks"]["count"] >= 4
        assert layout["write"]["total_ms"] <= fuse["write"]["total_ms"] + 1  # inside the handler's time
        assert stats["handoffs"]["io_thread_wakeups"] >= 1 and stats["handoffs_per_request"] > 0
        status = json.loads((mp / ".vstore" / "status").read_text())  # and vstore status --json
        assert status["io"]["layout"]["write"]["count"] >= layout["write"]["count"]


def test_member_truncated_under_a_mounted_pool_is_failed_not_read_as_zeros(tmp_path: Path) -> None:
    """A member that returns fewer bytes than asked has failed that I/O (issue 15, item 2)."""
    data = random.Random(7).randbytes(8 * MiB)
    with cli_mounted(tmp_path, "raid5", 3, "16M", (("v", "8M"),)) as (_, mp):
        buf = mmap.mmap(-1, MiB)
        fd = os.open(mp / "v", os.O_RDWR | os.O_DIRECT)
        try:
            for i in range(8):
                buf[:] = data[i * MiB : (i + 1) * MiB]
                assert os.pwritev(fd, [buf], i * MiB) == MiB
            os.fsync(fd)
            # member 1 loses everything past the metadata area and the first MiB of data
            os.truncate(tmp_path / "m1.img", 3 * MiB)
            out = mmap.mmap(-1, MiB)
            got = bytearray()
            for i in range(8):
                assert os.preadv(fd, [out], i * MiB) == MiB
                got += out[:]
        finally:
            os.close(fd)
        assert bytes(got) == data  # served from redundancy, never zeros
        status = json.loads((mp / ".vstore" / "status").read_text())
        assert status["state"] == "degraded"
        assert status["members"][1]["state"] == "failed"
        assert "short read" in json.dumps(status["members"][1])


def test_force_never_overrides_a_live_owner(tmp_path: Path) -> None:
    """create/torture/import-pool --force on the members of a mounted pool: refused, nothing written (issue 15, item 3)."""
    members = [f"file://{tmp_path}/m{i}.img" for i in range(3)]
    files = [tmp_path / f"m{i}.img" for i in range(3)]
    other = tmp_path / "other"
    with cli_mounted(tmp_path, "raid5", 3, "16M", (("v", "4M"),), pool="live") as (home, mp):
        pid = json.loads((home / "mounts" / "live.json").read_text())["pid"]
        fd = os.open(mp / "v", os.O_WRONLY)
        try:
            os.pwrite(fd, b"precious" * 1000, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        attempts = [
            ("create", "clobber", "--level", "raid5", "--force", *members),
            ("torture", "--level", "raid5", "--force", "--time", "1s", *members),
            ("import-pool", "--name", "copy", *members),
        ]
        # The mount itself writes now and then (its write-intent bitmap is cleared lazily):
        # held still, every byte that changes on the members is the attempts' doing.
        os.kill(pid, signal.SIGSTOP)
        try:
            before = [f.read_bytes() for f in files]
            for args in attempts:
                res = _vstore(other, *args, check=False)
                assert res.returncode != 0, (args, res.stdout)
                lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
                assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
                assert "'live'" in lines[0] and f"pid {pid}" in lines[0] and "in use" in lines[0], lines[0]
            assert [f.read_bytes() for f in files] == before  # nothing was written
        finally:
            os.kill(pid, signal.SIGCONT)
        assert (mp / "v").read_bytes()[:8000] == b"precious" * 1000
    # once unmounted (no live owner), --force does overwrite, as it always did
    _vstore(other, "create", "clobber", "--level", "raid5", "--force", *members)


def test_status_of_a_stopped_mount_says_so_quickly(tmp_path: Path) -> None:
    """A mount process under SIGSTOP: status answers within seconds naming the process (issue 15, item 9)."""
    with cli_mounted(tmp_path, "raid1", 2, "8M") as (home, _):
        pid = json.loads((home / "mounts" / "p.json").read_text())["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            res = _vstore(home, "status", "p", check=False)
            took = time.monotonic() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert res.returncode != 0 and "Traceback" not in res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"pid {pid}" in lines[0] and "does not answer" in lines[0], res.stderr
        assert took < 60  # bounded (10 s), not the 600 s of a long command
        assert json.loads(_vstore(home, "status", "p", "--json").stdout)["state"] == "clean"  # alive again


def test_mount_logs_are_private_and_hold_no_secret(tmp_path: Path) -> None:
    """Logs are 0600; a failed replace with CHAP in its URI leaves no secret in them (issue 15, item 10)."""
    secret = "Pw-in-the-uri-9f3"
    with cli_mounted(tmp_path, "raid1", 2, "8M") as (home, _):
        res = _vstore(home, "replace", "p", "1", f"iscsi://bob%{secret}@127.0.0.1:1/iqn.2026-01.x:t/0",
                      check=False)
        assert res.returncode != 0 and secret not in res.stdout + res.stderr
    logs = list((tmp_path / "home" / "logs").iterdir())
    assert logs
    for f in logs:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert secret.encode() not in f.read_bytes(), f


def test_volume_remove_refused_while_its_file_is_open(tmp_path: Path) -> None:
    """volume remove of a volume held open through the mount: busy unless --force (issue 15, item 13)."""
    with cli_mounted(tmp_path, "raid1", 2, "16M", (("v", "4M"), ("w", "4M"))) as (home, mp):
        fd = os.open(mp / "v", os.O_RDWR)
        try:
            res = _vstore(home, "volume", "remove", "p", "v", check=False)
            assert res.returncode != 0 and "Traceback" not in res.stderr
            assert "open" in res.stderr and "--force" in res.stderr, res.stderr
            assert "v\t" in _vstore(home, "volume", "list", "p").stdout
            _vstore(home, "volume", "remove", "p", "w")  # a volume nobody holds goes at once
        finally:
            os.close(fd)
        # closed now: allowed (the kernel's RELEASE of the handle may trail close() a little)
        for _ in range(50):
            res = _vstore(home, "volume", "remove", "p", "v", check=False)
            if res.returncode == 0 or "open" not in res.stderr:
                break
            time.sleep(0.1)
        assert res.returncode == 0, res.stderr
        assert _vstore(home, "volume", "list", "p").stdout.strip() == ""


def test_old_copy_put_back_after_a_crashed_session_is_stale(tmp_path: Path) -> None:
    """A member copy one generation behind, the newer commit complete everywhere: stale (issue 15, item 1)."""
    import shutil

    home, mp = tmp_path / "home", tmp_path / "mnt"
    mp.mkdir()
    members = [f"file://{tmp_path}/m{i}.img" for i in range(3)]
    data = random.Random(11).randbytes(4 * MiB)
    with cleanup(tmp_path):
        _vstore(home, "create", "p", "--level", "raid5", "--size", "16M", *members)
        _vstore(home, "volume", "create", "p", "v", "--size", "4M")
        shutil.copyfile(tmp_path / "m1.img", tmp_path / "m1.old")  # kept while the pool is closed
        _vstore(home, "mount", "p", str(mp))  # one commit: the owner token
        fd = os.open(mp / "v", os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        pid = json.loads((home / "mounts" / "p.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)  # no clean close: the pool is one generation on
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.05)
        force_unmount(mp)
    shutil.copyfile(tmp_path / "m1.old", tmp_path / "m1.img")  # the old copy put back
    st = json.loads(_vstore(home, "status", "p", "--json").stdout)
    assert st["members"][1]["state"] == "stale", st["members"]
    out = tmp_path / "out.bin"
    _vstore(home, "export", "p", "v", str(out))
    assert out.read_bytes() == data  # recovered and served without the stale copy


def test_forget_destroy_and_rename_respect_the_mount(tmp_path: Path) -> None:
    """A mounted pool cannot be forgotten or destroyed; an open volume cannot be renamed."""
    with cli_mounted(tmp_path, "raid1", 2, "16M", (("v", "4M"),)) as (home, mp):
        for args in (("forget", "p"), ("destroy", "p", "--yes")):
            res = _vstore(home, *args, check=False)
            assert res.returncode != 0 and "mounted" in res.stderr and "Traceback" not in res.stderr
        fd = os.open(mp / "v", os.O_RDWR)
        try:
            res = _vstore(home, "volume", "rename", "p", "v", "w", check=False)
            assert res.returncode != 0 and "open" in res.stderr
        finally:
            os.close(fd)
        for _ in range(50):  # the kernel's RELEASE may trail close() a little
            res = _vstore(home, "volume", "rename", "p", "v", "w", check=False)
            if res.returncode == 0 or "open" not in res.stderr:
                break
            time.sleep(0.1)
        assert res.returncode == 0, res.stderr
        assert (mp / "w").exists() and not (mp / "v").exists()
    assert "p  " in _vstore(tmp_path / "home", "list").stdout  # still recorded


# ---------------------------------------------------------------------------- TRIM / discard

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); raises OSError."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _needs_fallocate_patch() -> None:
    import pyfuse3._pyfuse3 as p

    if getattr(p, "VSTORE_NOGIL_PATCH", 0) < 2 and os.environ.get("CI", "").lower() != "true":
        pytest.skip("pyfuse3 without vstore's fallocate patch (run scripts/setup.sh)")


def _allocated(paths: list[Path]) -> int:
    """Bytes the filesystem holds for these (sparse) files."""
    return sum(os.stat(p).st_blocks * 512 for p in paths)


@needs_root
def test_punch_hole_reads_zeros_even_where_the_layout_cannot_discard(tmp_path: Path) -> None:
    """raid5 ignores discards: a punched range still reads as zeros, then and after a remount (fallocate(2))."""
    _needs_fallocate_patch()
    data = bytearray(random.Random(11).randbytes(4 * MiB))
    punch = (MiB + 123, 2 * MiB + 1000)  # not block-aligned at either end
    zero = (3 * MiB + 7, 4096 * 3)
    with cli_mounted(tmp_path, "raid5", 3, "16M", (("v", "8M"),)) as (home, mp):
        fd = os.open(mp / "v", os.O_RDWR)
        try:
            os.pwrite(fd, bytes(data), 0)
            os.fsync(fd)
            _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, *punch)
            data[punch[0] : punch[0] + punch[1]] = bytes(punch[1])
            _fallocate(fd, FALLOC_FL_ZERO_RANGE, *zero)
            data[zero[0] : zero[0] + zero[1]] = bytes(zero[1])
            _fallocate(fd, 0, 0, 8 * MiB)  # plain allocation inside the volume: nothing to do
            with pytest.raises(OSError) as grow:
                _fallocate(fd, 0, 4 * MiB, 8 * MiB)  # would grow the file
            assert grow.value.errno == errno.ENOSPC
            _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 7 * MiB, 4 * MiB)  # past the end: clipped
            os.fsync(fd)
            assert os.pread(fd, 4 * MiB, 0) == bytes(data)
        finally:
            os.close(fd)
        stats = json.loads((mp / ".vstore" / "fuse-stats").read_text())
        assert stats["fallocate"]["count"] == 4 and stats["errors"] == 0
    out = tmp_path / "out.bin"
    _vstore(home, "export", "p", "v", str(out))
    got = out.read_bytes()
    assert got[: 4 * MiB] == bytes(data)
    assert got[7 * MiB :] == bytes(MiB)


@needs_root
@pytest.mark.skipif(any(shutil.which(t) is None for t in ("mkfs.ext4", "losetup", "fstrim", "e2fsck")),
                    reason="needs e2fsprogs, losetup and fstrim")
def test_fstrim_through_a_loop_device_frees_member_space(tmp_path: Path) -> None:
    """ext4 on a loop device on a volume file: fstrim punches holes in the sparse file members."""
    _needs_fallocate_patch()
    ext = tmp_path / "ext4"
    ext.mkdir()
    members = [tmp_path / f"m{i}.img" for i in range(2)]
    with cli_mounted(tmp_path, "raid0", 2, "48M", (("v", "64M"),)) as (_, mp):
        loop = ""
        try:
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(mp / "v")], check=True,
                           capture_output=True)
            loop = subprocess.run(["losetup", "--find", "--show", str(mp / "v")], check=True,
                                  capture_output=True, text=True).stdout.strip()
            granted = Path(f"/sys/block/{Path(loop).name}/queue/discard_max_bytes").read_text().strip()
            assert int(granted) > 0  # the loop driver passes discards on (FUSE answers fallocate)
            subprocess.run(["mount", loop, str(ext)], check=True)
            payload = random.Random(3).randbytes(24 * MiB)
            (ext / "big").write_bytes(payload)
            subprocess.run(["sync"], check=True)
            full = _allocated(members)
            (ext / "big").unlink()
            subprocess.run(["sync"], check=True)
            assert _allocated(members) >= full - MiB  # deleting frees nothing below by itself
            res = subprocess.run(["fstrim", "-v", str(ext)], capture_output=True, text=True)
            assert res.returncode == 0, res.stdout + res.stderr
            freed = full - _allocated(members)
            assert freed >= 20 * MiB, (full, freed)
            subprocess.run(["umount", str(ext)], check=True)
            subprocess.run(["losetup", "-d", loop], check=True)
            loop = ""
            res = subprocess.run(["e2fsck", "-fn", str(mp / "v")], capture_output=True, text=True)
            assert res.returncode == 0, res.stdout + res.stderr
        finally:
            subprocess.run(["umount", "-l", str(ext)], capture_output=True)
            if loop:
                subprocess.run(["losetup", "-d", loop], capture_output=True)
            detach_loops(mp)
