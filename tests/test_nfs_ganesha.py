"""The NFS backend against a real NFS-Ganesha on loopback (no mocks).

One Ganesha serves the whole module (its ports are fixed); tests that restart,
pause or reconfigure it leave it running as they found it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.nfs import NfsDevice
from tests.vectors import ViewSet
from vstore.errors import (
    ConfigError,
    DeviceTimeoutError,
    MemberIOError,
    NotFoundError,
    OutOfRangeError,
    VstoreError,
)
from vstore.testing.nfs_server import Ganesha, RpcRelay, ServerError
from vstore.uri import open_uri

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture(scope="module")
def ganesha():
    """A running Ganesha exporting a fresh temporary directory."""
    try:
        server = Ganesha()
    except ServerError as e:
        pytest.skip(str(e))
    with server:
        yield server


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


async def open_dev(url: str, **kw) -> NfsDevice:
    dev = await open_uri(url, **kw)
    assert isinstance(dev, NfsDevice)
    return dev


async def test_create_write_read_flush_reopen(ganesha, rng):
    size = 8 * MiB
    dev = await open_dev(ganesha.url("disk1.img"), create_size=size)
    try:
        assert (dev.size, dev.block_size) == (size, 512)
        st = os.stat(ganesha.path("disk1.img"))
        assert st.st_size == size and st.st_blocks * 512 < MiB  # created sparse
        model = np.zeros(size, dtype=np.uint8)
        for offset, length in [(0, 4096), (12345, 777), (MiB - 100, 3 * MiB + 200), (size - 512, 512)]:
            data = rng.integers(0, 256, length, dtype=np.uint8)
            await dev.write(offset, data)
            model[offset : offset + length] = data
        assert np.array_equal(await dev.read(0, size), model)  # big read: 8 concurrent READs
        assert np.array_equal(await dev.read(12000, 5000), model[12000:17000])
        await dev.flush()
        assert dev.stats["commits"] >= 1
        assert ganesha.path("disk1.img").read_bytes() == model.tobytes()
        with pytest.raises(OutOfRangeError):
            await dev.read(size - 10, 20)
        with pytest.raises(OutOfRangeError):
            await dev.write(size, b"x")
    finally:
        await dev.aclose()
    # Reopen, this time through rpcbind (no explicit ports), and through an existing file.
    dev = await open_dev(ganesha.url("disk1.img", ports=False), create_size=size)
    try:
        assert dev.size == size
        assert np.array_equal(await dev.read(0, size), model)
    finally:
        await dev.aclose()


async def test_concurrent_mixed_io_matches_model(ganesha, rng):
    size = 16 * MiB
    dev = await open_dev(ganesha.url("mixed.img", depth=8), create_size=size)
    model = np.zeros(size, dtype=np.uint8)
    try:
        # Disjoint regions per task, so concurrent requests never overlap.
        async def worker(k: int) -> None:
            r = np.random.default_rng(k)
            base = k * 2 * MiB
            for _ in range(20):
                off = base + int(r.integers(0, 2 * MiB - 300_000))
                n = int(r.integers(1, 300_000))
                if r.random() < 0.6:
                    data = r.integers(0, 256, n, dtype=np.uint8)
                    await dev.write(off, data)
                    model[off : off + n] = data
                else:
                    assert np.array_equal(await dev.read(off, n), model[off : off + n])

        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(worker, k)
        await dev.flush()
        assert ganesha.path("mixed.img").read_bytes() == model.tobytes()
    finally:
        await dev.aclose()


async def test_cache_bound_commits_early(ganesha, rng):
    dev = await open_dev(ganesha.url("bound.img", cache_bytes=4 * MiB), create_size=16 * MiB)
    try:
        data = rng.integers(0, 256, 16 * MiB, dtype=np.uint8)
        for pos in range(0, 16 * MiB, MiB):
            await dev.write(pos, data[pos : pos + MiB])
            assert dev._cache.nbytes <= 4 * MiB
        assert dev.stats["commits"] >= 4
        await dev.write(0, data[: 3 * MiB])  # bigger than half the bound: FILE_SYNC, not cached
        await dev.flush()
        assert ganesha.path("bound.img").read_bytes() == data.tobytes()
    finally:
        await dev.aclose()


@pytest.mark.skipif(shutil.which("nfs-cat") is None, reason="libnfs-utils not installed")
async def test_interop_nfs_cat_reads_what_vstore_wrote(ganesha, rng):
    size = 3 * MiB + 4096
    data = rng.integers(0, 256, size, dtype=np.uint8)
    dev = await open_dev(ganesha.url("interop1.img"), create_size=size)
    try:
        await dev.write(0, data)
        await dev.flush()
    finally:
        await dev.aclose()
    out = await trio.run_process(["nfs-cat", ganesha.url("interop1.img")], capture_stdout=True)
    assert out.stdout == data.tobytes()
    assert ganesha.path("interop1.img").read_bytes() == data.tobytes()


@pytest.mark.skipif(shutil.which("nfs-cp") is None, reason="libnfs-utils not installed")
async def test_interop_vstore_reads_what_nfs_cp_placed(ganesha, rng, tmp_path):
    size = 2 * MiB + 1536
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    src = tmp_path / "src.img"
    src.write_bytes(data)
    await trio.run_process(["nfs-cp", str(src), ganesha.url("interop2.img")])
    dev = await open_dev(ganesha.url("interop2.img"))
    try:
        assert dev.size == size
        assert (await dev.read(0, size)).tobytes() == data
    finally:
        await dev.aclose()


async def test_restart_before_flush_resends_uncommitted_writes(ganesha, rng):
    size = 8 * MiB
    data = rng.integers(0, 256, size, dtype=np.uint8)
    dev = await open_dev(ganesha.url("durable.img", timeout=5), create_size=size)
    try:
        for pos in range(0, size, MiB):
            await dev.write(pos, data[pos : pos + MiB])
        assert dev.stats["commits"] == 0 and dev._cache.nbytes == size
        ganesha.restart()  # a new epoch: a new write verifier
        # What a real server loses with its cache: the data of the uncommitted writes.
        with open(ganesha.path("durable.img"), "r+b") as f:
            f.write(bytes(size))
        await dev.flush()
        assert dev.stats["verifier_changes"] >= 1
        assert dev.stats["resent_ranges"] >= 8
        assert dev._nfs.reconnects >= 1
        assert ganesha.path("durable.img").read_bytes() == data.tobytes()
        # Once committed under the new verifier, nothing is left to resend.
        assert dev._cache.nbytes == 0
        await dev.flush()
        assert dev.stats["verifier_changes"] == 1
    finally:
        await dev.aclose()


async def test_reads_survive_a_server_restart(ganesha, rng):
    dev = await open_dev(ganesha.url("restart.img"), create_size=MiB)
    try:
        data = rng.integers(0, 256, MiB, dtype=np.uint8)
        await dev.write(0, data)
        await dev.flush()
        ganesha.restart()
        assert np.array_equal(await dev.read(0, MiB), data)
        assert dev._nfs.reconnects >= 1
    finally:
        await dev.aclose()


async def test_paused_server_retransmits_after_sigcont(ganesha, rng):
    dev = await open_dev(ganesha.url("pause.img", timeout=0.5, retrans=20), create_size=2 * MiB)
    try:
        data = rng.integers(0, 256, 2 * MiB, dtype=np.uint8)
        await dev.write(0, data)
        ganesha.pause()
        try:
            async with trio.open_nursery() as nursery:
                async def resume_later() -> None:
                    await trio.sleep(1.6)
                    ganesha.resume()

                nursery.start_soon(resume_later)
                with trio.fail_after(15):
                    got = await dev.read(0, 2 * MiB)
                    await dev.write(MiB, data[:4096])
                    await dev.flush()
        finally:
            ganesha.resume()
        assert np.array_equal(got, data)
        assert dev._nfs.retransmits >= 1 and dev._nfs.reconnects >= 1
        expect = data.copy()
        expect[MiB : MiB + 4096] = data[:4096]
        assert ganesha.path("pause.img").read_bytes() == expect.tobytes()
    finally:
        await dev.aclose()


async def test_paused_server_times_out_cleanly_then_recovers(ganesha):
    dev = await open_dev(ganesha.url("timeout.img", timeout=0.4, retrans=1), create_size=MiB)
    try:
        ganesha.pause()
        try:
            with trio.fail_after(10):
                with pytest.raises(DeviceTimeoutError, match="no reply"):
                    await dev.read(0, 4096)
                with pytest.raises(DeviceTimeoutError):
                    await dev.probe(timeout=0.3)
        finally:
            ganesha.resume()
        await dev.probe()
        assert (await dev.read(0, 4096)).tobytes() == bytes(4096)
    finally:
        await dev.aclose()


async def test_identity_and_probe(ganesha):
    a = await open_dev(ganesha.url("id1.img"), create_size=MiB)
    b = await open_dev(ganesha.url("id1.img", ports=False))
    c = await open_dev(ganesha.url("id2.img"), create_size=MiB)
    try:
        assert a.identity() == b.identity() != c.identity()
        st = os.stat(ganesha.path("id1.img"))
        assert f":{st.st_ino:x}:" in a.identity()  # fileid is the inode number
        await a.probe()
        await c.probe(timeout=2)
    finally:
        for d in (a, b, c):
            await d.aclose()


async def test_errors_are_clear(ganesha):
    with pytest.raises(NotFoundError, match="NFS3ERR_NOENT.*give a size"):
        await open_uri(ganesha.url("missing.img"))
    with pytest.raises(NotFoundError, match="no export of 127.0.0.1 contains"):
        await open_uri("nfs://127.0.0.1/no/such/export/f.img?nfsport=2049&mountport=20048")
    with pytest.raises(NotFoundError, match="LOOKUP .*nodir: NFS3ERR_NOENT"):
        await open_uri(ganesha.url("nodir/f.img"), create_size=MiB)
    with pytest.raises(ConfigError, match="multiple of 512"):
        await open_uri(ganesha.url("bad.img"), create_size=1000)
    with pytest.raises(ConfigError, match="not an integer"):
        await open_uri(ganesha.url("bad.img", depth="lots"))
    os.mkdir(ganesha.path("adir"))
    with pytest.raises(ConfigError, match="not a regular file"):
        await open_uri(ganesha.url("adir"))
    with pytest.raises(MemberIOError, match="cannot connect"):
        await open_uri("nfs://127.0.0.1/x/f.img?nfsport=2049&mountport=1")
    for exc in (NotFoundError, ConfigError, MemberIOError):
        assert issubclass(exc, VstoreError)


async def test_short_writes_are_completed(ganesha, rng):
    ganesha.restart(max_write=65536)
    try:
        # wsize above the server's MaxWrite: Ganesha writes only part of each WRITE.
        dev = await open_dev(ganesha.url("short.img", wsize=MiB), create_size=4 * MiB)
        try:
            data = rng.integers(0, 256, 3 * MiB, dtype=np.uint8)
            await dev.write(512, data)
            await dev.flush()
            assert np.array_equal(await dev.read(512, 3 * MiB), data)
        finally:
            await dev.aclose()
        got = ganesha.path("short.img").read_bytes()
        assert got[512 : 512 + 3 * MiB] == data.tobytes()
        assert dev.stats["short_writes"] >= 1
        # The same through writev: remembered (UNSTABLE) and, over a small bound, FILE_SYNC
        # straight from the views; each short WRITE resumes inside the right view.
        for cache in (None, 2 * MiB):
            extra = {"cache_bytes": cache} if cache else {}
            dev = await open_dev(ganesha.url("short.img", wsize=MiB, **extra))
            try:
                data = rng.integers(0, 256, 3 * MiB, dtype=np.uint8)
                views = ViewSet([70000, MiB + 1, 5, 3 * MiB - MiB - 70006], strided=(1,))
                await dev.writev(1024, views.fill(data).views)
                await dev.flush()
                assert dev.stats["short_writes"] >= 1
            finally:
                await dev.aclose()
            assert ganesha.path("short.img").read_bytes()[1024 : 1024 + 3 * MiB] == data.tobytes()
    finally:
        ganesha.restart(max_write=MiB)


def test_ganesha_log_has_no_errors_from_our_requests(ganesha):
    text = ganesha.log.read_text(errors="replace") if ganesha.log.exists() else ""
    bad = [ln for ln in text.splitlines() if "XDR" in ln and ("fail" in ln or "error" in ln.lower())]
    assert not bad, bad[:5]


def test_nfs_ls_sees_the_export(ganesha):
    if shutil.which("nfs-ls") is None:
        pytest.skip("libnfs-utils not installed")
    url = f"nfs://127.0.0.1{ganesha.export}?nfsport=2049&mountport=20048"
    out = subprocess.run(["nfs-ls", url], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


async def test_rpc_and_nfs_refusals_name_their_status(ganesha):
    from backends.nfs import nfs3
    from backends.nfs.client import RpcClient
    from backends.nfs.rpc import RpcError, auth_sys

    for vers, proc, match in [(7, 0, "PROG_MISMATCH .*3-4"), (3, 99, "PROC_UNAVAIL")]:
        client = RpcClient("127.0.0.1", 2049, 100003, vers, cred=auth_sys(0, 0), timeout=5)
        try:
            await client.connect()
            with pytest.raises(RpcError, match=match):
                await client.call(proc)
        finally:
            await client.aclose()
    client = RpcClient("127.0.0.1", 2049, 100003, 3, cred=auth_sys(0, 0), timeout=5)
    try:
        await client.connect()
        u, _ = await client.call(nfs3.GETATTR, nfs3.fh_args(b"not a handle"))
        with pytest.raises(nfs3.NfsError, match="GETATTR: NFS3ERR_(BADHANDLE|STALE)"):
            nfs3.decode_getattr(u)
        # The connection is still good after refusals.
        u, _ = await client.call(nfs3.NULL)
        assert u.remaining == 0
    finally:
        await client.aclose()


async def test_dropped_connection_retransmits_the_same_xid(ganesha, rng):
    """A relay forwards one WRITE, swallows its reply and cuts the connection."""
    relay = RpcRelay()
    cut = []
    relay.cut_after = lambda xid, proc: proc == 7 and not cut and not cut.append(xid)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(relay.serve)
        dev = await open_dev(ganesha.url("relay.img", nfsport=port), create_size=MiB)
        try:
            data = rng.integers(0, 256, 64 * 1024, dtype=np.uint8)
            with trio.fail_after(20):
                await dev.write(4096, data)
                await dev.flush()
            assert np.array_equal(await dev.read(4096, len(data)), data)
            assert dev._nfs.reconnects == 1 and relay.connections == 2
        finally:
            await dev.aclose()
        nursery.cancel_scope.cancel()
    writes = [(xid, call) for xid, proc, call in relay.calls if proc == 7]
    assert len(writes) == 2 and writes[0] == writes[1]  # same XID, same bytes
    assert len({xid for xid, _, _ in relay.calls}) == len(relay.calls) - 1  # no other reuse


async def test_jukebox_replies_are_retried_later(ganesha, rng):
    """A relay turns the first SETATTR and the first two WRITE replies into NFS3ERR_JUKEBOX."""
    relay = RpcRelay()
    procs: dict[int, int] = {}
    left = {2: 1, 7: 2}  # procedure -> JUKEBOX replies still to inject

    def jukebox(xid: int, msg: bytes) -> bytes:
        proc = next((p for x, p, _ in reversed(relay.calls) if x == xid), None)
        if proc in left and left[proc] and msg[24:28] == bytes(4):
            left[proc] -= 1
            procs[xid] = proc
            return msg[:24] + (10008).to_bytes(4, "big") + msg[28:]
        return msg

    relay.reply_filter = jukebox
    async with trio.open_nursery() as nursery:
        port = await nursery.start(relay.serve)
        dev = await open_dev(ganesha.url("jukebox.img", nfsport=port), create_size=2 * MiB)
        try:
            assert dev.size == 2 * MiB  # SETATTR (size) went through on a retry
            data = rng.integers(0, 256, MiB, dtype=np.uint8)
            await dev.write(0, data)
            await dev.flush()
            assert ganesha.path("jukebox.img").read_bytes()[:MiB] == data.tobytes()
        finally:
            await dev.aclose()
        nursery.cancel_scope.cancel()
    assert sorted(procs.values()) == [2, 7, 7] and left == {2: 0, 7: 0}
    # Each retry is a new request: a new XID, never the one that got JUKEBOX.
    writes = [xid for xid, proc, _ in relay.calls if proc == 7]
    assert len(writes) == len(set(writes)) == 3


_EXAMPLE = itertools.count()
OPS = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 4 * MiB - 1), st.integers(1, 3 * MiB // 2),
              st.integers(0, 255)),
    st.tuples(st.just("read"), st.integers(0, 4 * MiB - 1), st.integers(1, 3 * MiB // 2)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("restart")),
    st.tuples(st.just("lose")),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, min_size=1, max_size=25))
@pytest.mark.parametrize("small_cache", [False, True])
def test_random_io_against_a_model_with_restarts(ganesha, small_cache, ops):
    """Random writes (overlapping), reads, flushes and server restarts agree with a byte model.

    "lose" stands for a server that lost its unstable data: it rewrites the file on
    the export with the last flushed image, then restarts (a new verifier); the
    next flush must bring back every write acknowledged since. With a small bound
    on uncommitted data (early COMMITs, trimmed and resent ranges, pooled
    buffers) the test cannot tell what was committed early, so "lose" only restarts.
    """
    size = 4 * MiB
    name = f"model-{next(_EXAMPLE)}.img"  # a fresh file per example, replays included

    async def run() -> None:
        model = np.zeros(size, dtype=np.uint8)
        flushed = model.copy()
        # The default bound (64 MiB) is above the file's size: no early COMMIT, so the last
        # flush() is the last COMMIT and "lose" knows what the server may lose.
        params = {"cache_bytes": 2 * MiB} if small_cache else {}
        dev = await open_dev(ganesha.url(name, **params), create_size=size)
        try:
            for op in ops:
                if op[0] == "write":
                    _, off, n, fill = op
                    n = min(n, size - off)
                    data = np.full(n, fill, dtype=np.uint8)
                    data[::97] = np.arange(len(data[::97])) % 256  # not one flat value
                    await dev.write(off, data)
                    model[off : off + n] = data
                elif op[0] == "read":
                    _, off, n = op
                    n = min(n, size - off)
                    assert np.array_equal(await dev.read(off, n), model[off : off + n])
                elif op[0] == "flush":
                    await dev.flush()
                    flushed = model.copy()
                    assert ganesha.path(name).read_bytes() == model.tobytes()
                else:
                    if op[0] == "lose" and not small_cache:
                        ganesha.path(name).write_bytes(flushed.tobytes())
                    ganesha.restart()
            await dev.flush()
            assert ganesha.path(name).read_bytes() == model.tobytes()
        finally:
            await dev.aclose()

    trio.run(run)


def test_cli_raid6_pool_mixing_local_and_nfs_members(ganesha, tmp_path):
    """The heterogeneous pool through the CLI: build, import, degrade, export, rebuild onto NFS."""
    vstore = [sys.executable, "-m", "vstore.cli.main"] if shutil.which("vstore") is None else ["vstore"]
    home = tmp_path / "home"

    def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([*vstore, "--home", str(home), *args], capture_output=True,
                             text=True, timeout=300)
        if ok:
            assert res.returncode == 0, res.stdout + res.stderr
        return res

    members = [f"file://{tmp_path}/m0.img", f"file://{tmp_path}/m1.img",
               ganesha.url("cli-m2.img"), ganesha.url("cli-m3.img")]
    cli("create", "p", "--level", "raid6", "--size", "32M", *members)
    assert ganesha.path("cli-m2.img").stat().st_size == 32 * MiB  # created through NFS
    payload = os.urandom(3 * MiB + 12345)
    (tmp_path / "in.bin").write_bytes(payload)
    cli("import", "p", "v1", str(tmp_path / "in.bin"))
    assert "nfs://127.0.0.1" in cli("status", "p").stdout
    cli("fail", "p", "3")
    cli("fail", "p", "0")  # raid6 survives two failed members, one of them on NFS
    cli("export", "p", "v1", str(tmp_path / "out.bin"))
    assert (tmp_path / "out.bin").read_bytes()[: len(payload)] == payload
    cli("replace", "p", "3", ganesha.url("cli-m4.img"), "--size", "32M")
    cli("replace", "p", "0", f"file://{tmp_path}/m5.img", "--size", "32M")
    cli("scrub", "p")  # parity and data agree again, the rebuilt NFS member included


# ---- vectored I/O ------------------------------------------------------------------------


VEC_SIZES = [1000, 3 * MiB // 2 + 7, 4096, 70000, 13, 500_000]  # one view bigger than wsize (1 MiB)


def _write_calls(relay: RpcRelay, since: int) -> list[bytes]:
    """The WRITE calls the relay saw since call number `since`, without their XIDs."""
    return sorted(call[4:] for _xid, proc, call in relay.calls[since:] if proc == 7)


@pytest.mark.parametrize("cache_bytes", [None, 2 * MiB])  # UNSTABLE + remembered / FILE_SYNC from the views
async def test_vectored_io_matches_plain_io_and_nfs_cat(ganesha, rng, cache_bytes):
    """writev sends the very WRITE calls write sends; readv_into reads what read reads; nfs-cat agrees."""
    name = f"vec{cache_bytes or 0}.img"
    size = 8 * MiB
    total = sum(VEC_SIZES)
    off = 12345
    data = rng.integers(0, 256, total, dtype=np.uint8)
    relay = RpcRelay()
    extra = {"cache_bytes": cache_bytes} if cache_bytes else {}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(relay.serve)
        dev = await open_dev(ganesha.url(name, nfsport=port, **extra), create_size=size)
        try:
            n0 = len(relay.calls)
            await dev.write(off, data)
            plain = _write_calls(relay, n0)
            n1 = len(relay.calls)
            await dev.writev(off, ViewSet(VEC_SIZES, strided=(2, 4)).fill(data).views)
            vec = _write_calls(relay, n1)
            assert len(vec) == -(-total // dev.wsize) and vec == plain
            assert np.array_equal(await dev.read(off, total), data)
            dst = ViewSet(VEC_SIZES, strided=(0, 3))
            await dev.readv_into(off, dst.views)
            assert np.array_equal(dst.joined(), data) and dst.outside_untouched()
            await dev.flush()
            assert dev._cache.nbytes == 0
            # A second range, written plainly, read back through views straddling it.
            other = rng.integers(0, 256, 3 * MiB, dtype=np.uint8)
            await dev.write(4 * MiB, other)
            dst = ViewSet([MiB + 1, 2 * MiB - 2, 1], strided=(1,))
            await dev.readv_into(4 * MiB, dst.views)
            assert np.array_equal(dst.joined(), other) and dst.outside_untouched()
            await dev.flush()
        finally:
            await dev.aclose()
        nursery.cancel_scope.cancel()
    expect = np.zeros(size, np.uint8)
    expect[off : off + total] = data
    expect[4 * MiB : 7 * MiB] = other
    out = await trio.run_process(["nfs-cat", ganesha.url(name)], capture_stdout=True)
    assert out.stdout == expect.tobytes()
    assert ganesha.path(name).read_bytes() == expect.tobytes()


async def test_vectored_read_of_what_nfs_cp_placed(ganesha, rng, tmp_path):
    """libnfs writes the file; readv_into reads it into gapped and strided views."""
    size = 3 * MiB + 1536
    data = rng.integers(0, 256, size, dtype=np.uint8)
    src = tmp_path / "src.img"
    src.write_bytes(data.tobytes())
    await trio.run_process(["nfs-cp", str(src), ganesha.url("veccp.img")])
    dev = await open_dev(ganesha.url("veccp.img", rsize=65536))
    try:
        sizes = [100, 200_000, MiB + 3, size - MiB - 200_103]
        dst = ViewSet(sizes, strided=(1,))
        await dev.readv_into(0, dst.views)
        assert np.array_equal(dst.joined(), data) and dst.outside_untouched()
    finally:
        await dev.aclose()


async def test_vectored_writes_are_resent_after_a_restart(ganesha, rng):
    """Uncommitted writev data is remembered like write's: a new verifier at COMMIT resends it."""
    size = 4 * MiB
    dev = await open_dev(ganesha.url("vecdurable.img", timeout=5), create_size=size)
    try:
        data = rng.integers(0, 256, size, dtype=np.uint8)
        sizes = [MiB - 5, 5, 2 * MiB + 4096, MiB - 4096]
        views = ViewSet(sizes, strided=(2,)).fill(data)
        await dev.writev(0, views.views)
        views.clear()  # the caller reuses its buffers at once
        assert dev.stats["commits"] == 0 and dev._cache.nbytes == size
        ganesha.restart()
        with open(ganesha.path("vecdurable.img"), "r+b") as f:
            f.write(bytes(size))  # what the server lost with its cache
        await dev.flush()
        assert dev.stats["verifier_changes"] >= 1 and dev.stats["resent_ranges"] >= 1
        assert ganesha.path("vecdurable.img").read_bytes() == data.tobytes()
    finally:
        await dev.aclose()


async def test_vectored_bad_requests_fail_like_write(ganesha):
    dev = await open_dev(ganesha.url("vecbad.img"), create_size=MiB)
    try:
        for off, sizes in ((MiB - 10, [10, 10]), (MiB, [1]), (-1, [1]), (MiB - 512, [256, 257])):
            with pytest.raises(OutOfRangeError) as plain:
                await dev.write(off, np.zeros(sum(sizes), np.uint8))
            with pytest.raises(OutOfRangeError) as vec:
                await dev.writev(off, [np.zeros(n, np.uint8) for n in sizes])
            assert str(vec.value) == str(plain.value)
            with pytest.raises(OutOfRangeError) as vec:
                await dev.readv_into(off, [np.zeros(n, np.uint8) for n in sizes])
            assert str(vec.value) == str(plain.value)
        await dev.writev(5, [])
        await dev.readv_into(5, [])
        assert dev._cache.nbytes == 0
    finally:
        await dev.aclose()


async def test_cancelled_vectored_read_never_lands_later(ganesha, rng):
    """A readv_into given up while the server is stalled: its late reply never reaches the views."""
    dev = await open_dev(ganesha.url("veccancel.img", timeout=5), create_size=2 * MiB)
    try:
        data = rng.integers(0, 256, 2 * MiB, dtype=np.uint8)
        await dev.write(0, data)
        await dev.flush()
        dst = ViewSet([MiB - 1, MiB + 1], strided=(1,))
        ganesha.pause()
        try:
            with trio.move_on_after(0.3):
                await dev.readv_into(0, dst.views)
            assert (dst.joined() == 0x5A).all()
        finally:
            ganesha.resume()
        await trio.sleep(0.5)  # the replies arrive now
        await dev.probe()
        assert (dst.joined() == 0x5A).all() and dst.outside_untouched()
        await dev.readv_into(0, dst.views)
        assert np.array_equal(dst.joined(), data)
    finally:
        await dev.aclose()


async def test_read_past_a_truncated_end_is_an_error_not_zeros(ganesha, rng):
    """The file shrank on the server: a READ that meets EOF inside the device fails (issue 15, item 2)."""
    from vstore.errors import MemberIOError

    size = 4 * MiB
    dev = await open_dev(ganesha.url("shrunk.img"), create_size=size)
    try:
        data = rng.integers(0, 256, size, dtype=np.uint8)
        await dev.write(0, data)
        await dev.flush()
        os.truncate(ganesha.path("shrunk.img"), MiB + 100)
        assert np.array_equal(await dev.read(0, MiB), data[:MiB])  # what is still there reads fine
        with pytest.raises(MemberIOError, match="short read"):
            await dev.read(MiB, 64 * 1024)
        with pytest.raises(MemberIOError, match="short read"):
            await dev.readv_into(2 * MiB, [np.empty(4096, np.uint8), np.empty(4096, np.uint8)])
    finally:
        await dev.aclose()
