"""file:// members: sparse creation, block-device-like I/O, the plug that batches member I/Os."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import trio

from backends.local import LocalDevice
from vstore.errors import MemberIOError, NotFoundError, OutOfRangeError
from vstore.uri import open_uri


async def test_create_sparse_and_reopen(tmp_path: Path):
    path = tmp_path / "d.img"
    dev = await open_uri(f"file://{path}", create_size=8 << 20)
    assert isinstance(dev, LocalDevice) and dev.size == 8 << 20
    assert os.stat(path).st_blocks == 0  # sparse
    assert os.stat(path).st_mode & 0o777 == 0o600
    await dev.write(4096, b"abc")
    await dev.flush()
    await dev.aclose()
    dev = await open_uri(f"file://{path}")
    assert bytes(await dev.read(4096, 3)) == b"abc"
    with pytest.raises(OutOfRangeError):
        await dev.read((8 << 20) - 10, 11)
    await dev.aclose()
    with pytest.raises(NotFoundError):
        await open_uri(f"file://{tmp_path}/missing.img")


async def test_concurrent_adjacent_io_is_batched_and_correct(tmp_path: Path):
    dev = await open_uri(f"file://{tmp_path}/d.img", create_size=4 << 20)
    model = np.zeros(4 << 20, dtype=np.uint8)
    rng = np.random.default_rng(5)
    # 64 adjacent 16 KiB writes in one tick: the plug merges them into few syscalls.
    data = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    async with trio.open_nursery() as nursery:
        for i in range(64):
            nursery.start_soon(dev.write, 65536 + i * 16384, data[i * 16384 : (i + 1) * 16384])
    model[65536 : 65536 + (1 << 20)] = data
    # Random overlapping-free mix of reads and writes, checked against the model.
    for _ in range(20):
        offs = sorted(rng.choice(256, size=8, replace=False) * 16384)
        payloads = [rng.integers(0, 256, 8192, dtype=np.uint8) for _ in offs]
        reads: dict[int, np.ndarray] = {}

        async def rd(o: int, reads=reads) -> None:
            reads[o] = await dev.read(o + 8192, 8192)

        async with trio.open_nursery() as nursery:
            for o, p in zip(offs, payloads, strict=True):
                nursery.start_soon(dev.write, int(o), p)
                nursery.start_soon(rd, int(o))
        for o, p in zip(offs, payloads, strict=True):
            assert (reads[o] == model[o + 8192 : o + 16384]).all()
            model[o : o + 8192] = p
    got = await dev.read(0, 4 << 20)
    assert (got == model).all()
    with open(tmp_path / "d.img", "rb") as f:
        assert f.read() == model.tobytes()
    await dev.aclose()


async def test_io_error_becomes_member_io_error(tmp_path: Path):
    dev = await open_uri(f"file://{tmp_path}/d.img", create_size=1 << 20)
    os.close(dev.fd)
    dev.fd = os.open("/dev/null", os.O_RDONLY)  # writes to a read-only fd fail with EBADF
    with pytest.raises(MemberIOError, match="write at 0"):
        await dev.write(0, b"x" * 512)
    await dev.aclose()


async def test_existing_file_is_opened_as_is(tmp_path: Path):
    from backends.local import _open_sync

    (tmp_path / "e.img").write_bytes(b"\0" * 4096)
    # An existing file is opened as is (create_size only applies to missing files).
    dev = _open_sync(str(tmp_path / "e.img"), 1 << 20, 512)
    assert dev.size == 4096
    await dev.aclose()


async def test_direct_members_bypass_the_cache_and_take_any_buffer(tmp_path: Path):
    """?direct=1: O_DIRECT for aligned ranges (bounce buffers for unaligned memory), buffered otherwise."""
    import fcntl

    path = tmp_path / "d.img"
    dev = await open_uri(f"file://{path}?direct=1", create_size=4 << 20)
    assert isinstance(dev, LocalDevice) and dev.direct_fd >= 0
    assert fcntl.fcntl(dev.direct_fd, fcntl.F_GETFL) & os.O_DIRECT
    rng = np.random.default_rng(9)
    model = np.zeros(4 << 20, np.uint8)
    raw = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
    cases = [
        (0, [raw[:65536]]),  # maybe aligned memory
        (65536, [raw[1 : 1 + 8192], raw[100 : 100 + 4096]]),  # unaligned memory: bounce
        (1 << 20, [raw[5 : 5 + (1 << 20)]]),
        (12345, [raw[7:1000]]),  # unaligned range: through the page cache
        (3 << 20, [raw[::2][:8192]]),  # strided view
    ]
    for off, views in cases:
        await dev.writev(off, views)
        data = np.concatenate(views)
        model[off : off + len(data)] = data
    for off, views in cases:
        n = sum(len(v) for v in views)
        outs = [np.empty(len(v), np.uint8) for v in views]
        await dev.readv_into(off, [o[:] for o in outs])
        assert np.array_equal(np.concatenate(outs), model[off : off + n])
        # an unaligned destination of an aligned range is filled through the bounce buffer
        big = np.empty(n + 1, np.uint8)
        await dev.readv_into(off, [big[1:]])
        assert np.array_equal(big[1:], model[off : off + n])
    await dev.flush()
    await dev.aclose()
    assert path.read_bytes() == model.tobytes()  # an independent reader sees every write


async def test_short_read_is_an_error_not_zeros(tmp_path: Path):
    """A member file that shrank under us: the read fails (the layout serves it from redundancy)."""
    path = tmp_path / "d.img"
    dev = await open_uri(f"file://{path}", create_size=1 << 20)
    await dev.write(0, np.ones(1 << 20, np.uint8))
    os.truncate(path, 512 * 1024)
    with pytest.raises(MemberIOError, match="short read"):
        await dev.read(768 * 1024, 128 * 1024)
    await dev.aclose()


async def test_raid5_over_direct_members_matches_a_model(tmp_path: Path):
    from vstore.raid import make_layout

    members = [await open_uri(f"file://{tmp_path}/m{i}.img?direct=1", create_size=2 << 20) for i in range(4)]
    lay = make_layout("raid5", members, chunk=65536)
    rng = np.random.default_rng(3)
    model = np.zeros(lay.size, np.uint8)
    for _ in range(30):
        off = int(rng.integers(0, lay.size - 1))
        n = int(min(rng.integers(1, 700_000), lay.size - off))
        data = rng.integers(0, 256, n, dtype=np.uint8)
        await lay.write(off, data)
        model[off : off + n] = data
    assert np.array_equal(await lay.read(0, lay.size), model)
    await lay.flush()
    await lay.aclose()


async def test_io_uring_engine_moves_the_same_bytes(tmp_path: Path, monkeypatch):
    """VSTORE_IO_ENGINE=io_uring: a raid5 of file members matches a model; errors and short reads stay errors."""
    from vstore.io import threads as io_threads
    from vstore.io import uring
    from vstore.raid import make_layout

    monkeypatch.setattr(io_threads, "ENGINE", "io_uring")
    fault = uring.binding_fault()
    if fault:
        # The binding cannot run on this CPU (the PyPI wheel may need features it lacks): what
        # can be checked here is that the opt-in engine refuses with the reason, not crash.
        print(f"io_uring engine not available here: {fault}")
        with pytest.raises(RuntimeError, match=re.escape(fault)):
            io_threads.engine()
        return
    assert io_threads.engine() == "io_uring"  # liburing is a test extra; the kernel must allow it
    members = [await open_uri(f"file://{tmp_path}/m{i}.img", create_size=2 << 20) for i in range(4)]
    lay = make_layout("raid5", members, chunk=65536)
    rng = np.random.default_rng(4)
    model = np.zeros(lay.size, np.uint8)
    for _ in range(30):
        off = int(rng.integers(0, lay.size - 1))
        n = int(min(rng.integers(1, 900_000), lay.size - off))
        data = rng.integers(0, 256, n, dtype=np.uint8)
        await lay.write(off, data)
        model[off : off + n] = data
    assert np.array_equal(await lay.read(0, lay.size), model)
    await lay.aclose()

    dev = await open_uri(f"file://{tmp_path}/e.img", create_size=1 << 20)
    await dev.write(0, np.ones(1 << 20, np.uint8))
    os.truncate(tmp_path / "e.img", 512 * 1024)
    with pytest.raises(MemberIOError, match="short read"):
        await dev.read(768 * 1024, 128 * 1024)
    os.close(dev.fd)
    dev.fd = os.open("/dev/null", os.O_RDONLY)
    with pytest.raises(MemberIOError, match="write at 0"):
        await dev.write(0, np.ones(256 * 1024, np.uint8))
    await dev.aclose()


@pytest.mark.parametrize("where", ["/tmp", "/dev/shm"])
async def test_write_into_a_truncated_member_fails_instead_of_leaving_holes(tmp_path: Path, where: str):
    """A member file truncated under us: a write fails (it would regrow the file with zero holes)."""
    import tempfile

    from vstore.raid import make_layout

    with tempfile.TemporaryDirectory(dir=where) as d:
        members = [await open_uri(f"file://{d}/m{i}.img", create_size=4 << 20) for i in range(3)]
        lay = make_layout("raid5", members, chunk=65536)
        data = np.random.default_rng(2).integers(0, 256, lay.size, dtype=np.uint8)
        await lay.write(0, data)
        os.truncate(f"{d}/m1.img", 1 << 20)
        with pytest.raises(MemberIOError, match="shrank"):
            await members[1].write(3 << 20, np.ones(4096, np.uint8))
        assert os.path.getsize(f"{d}/m1.img") == 1 << 20  # not regrown
        new = np.random.default_rng(3).integers(0, 256, lay.size, dtype=np.uint8)
        await lay.write(0, new)  # member 1 fails on the way; the others carry the data
        assert 1 in lay.failed
        assert np.array_equal(await lay.read(0, lay.size), new)
        await lay.aclose()


@pytest.mark.parametrize("where", ["/tmp", "/dev/shm"])
async def test_strided_views_are_read_and_written_through(tmp_path: Path, where: str):
    """readv_into / writev with strided numpy views (every other byte): the bytes reach the views."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=where) as d:
        dev = await open_uri(f"file://{d}/s.img", create_size=1 << 20)
        rng = np.random.default_rng(6)
        for n in (1000, 100_000):  # inline (small) and through the threads
            src = rng.integers(0, 256, 2 * n, dtype=np.uint8)
            await dev.writev(4096, [src[::2]])
            dst = np.zeros(2 * n, np.uint8)
            await dev.readv_into(4096, [dst[::2]])
            assert np.array_equal(dst[::2], src[::2]) and not dst[1::2].any()
        await dev.aclose()


async def test_a_liburing_binding_that_crashes_is_not_used(monkeypatch, caplog):
    """A binding that dies (SIGILL on a CPU without the features its wheel was built for) is tried
    in a child process: this process goes on with threads, and the opt-in engine says why."""
    from vstore.io import threads as io_threads
    from vstore.io import uring

    monkeypatch.setattr(uring, "PROBE", "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    monkeypatch.setattr(uring, "_fault", None)
    assert uring.binding_fault() == "the liburing binding dies with SIGILL on this machine"
    pytest.importorskip("liburing")  # (without the package open_ring returns None before the probe)
    assert uring.open_ring() is None
    assert "dies with SIGILL" in caplog.text
    monkeypatch.setattr(io_threads, "ENGINE", "io_uring")
    with pytest.raises(RuntimeError, match="dies with SIGILL"):
        io_threads.engine()


async def test_a_created_file_appears_with_its_size(tmp_path: Path, monkeypatch):
    """A create is sized before the file appears under its name (a kill -9 mid-way leaves no
    empty file to refuse the next try); no helper file is left beside it."""
    import backends.local as local

    seen: list[int] = []
    real_link = os.link

    def link(src, dst):
        seen.append(os.stat(src).st_size)
        return real_link(src, dst)

    monkeypatch.setattr(local.os, "link", link)
    dev = await open_uri(f"file://{tmp_path}/j.img", create_size=1 << 20)
    await dev.aclose()
    assert seen == [1 << 20] and os.path.getsize(tmp_path / "j.img") == 1 << 20
    assert os.listdir(tmp_path) == ["j.img"]
