"""vstore's iSCSI initiator against a real tgtd, cross-checked with libiscsi and QEMU tools."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import trio

import backends.iscsi as iscsi
from backends.iscsi import pdu as P
from tests.vectors import ViewSet
from vstore.errors import (
    AuthError,
    ConfigError,
    MemberIOError,
    NotFoundError,
    OutOfRangeError,
    ProtocolError,
)
from vstore.testing.iscsi_target import TgtServer
from vstore.uri import parse_uri

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("tgtd") is None and not os.path.exists("/usr/sbin/tgtd"),
                       reason="tgtd not installed"),
]

LUN_SIZE = 16 << 20
CHAP_USER, CHAP_SECRET = "vstoreuser", "Sup3rSecretChap!"

# name -> target parameters (each a different transfer path through tgtd)
TARGETS = {
    "default": {},
    "mrdsl512": {"MaxRecvDataSegmentLength": "512"},
    "mrdsl8192": {"MaxRecvDataSegmentLength": "8192"},
    "mrdsl262144": {"MaxRecvDataSegmentLength": "262144"},
    "r2t_no": {"InitialR2T": "No"},
    "r2t_no_big": {"InitialR2T": "No", "MaxRecvDataSegmentLength": "262144", "FirstBurstLength": "262144"},
    "digests": {"HeaderDigest": "CRC32C", "DataDigest": "CRC32C"},
    "chap": {},
}


@pytest.fixture(scope="module")
def tgt():
    """One tgtd with a target per transfer path, each with a 16 MiB LUN 1 (tid order as TARGETS)."""
    srv = TgtServer()
    srv.start()
    try:
        srv.tids = {}
        for i, (name, params) in enumerate(TARGETS.items(), 1):
            srv.add_target(iqn_of(name), tid=i, **params)
            srv.add_lun(i, 1, LUN_SIZE, scsi_id=f"vstore-{name}", scsi_sn=f"SN{i:04d}")
            srv.tids[name] = i
        srv.add_lun(1, 2, 1 << 20, scsi_id="vstore-small", scsi_sn="SNSMALL")
        srv.add_account(srv.tids["chap"], CHAP_USER, CHAP_SECRET)
        yield srv
    finally:
        srv.stop()


def iqn_of(name: str) -> str:
    return f"iqn.2026-11.test:{name.replace('_', '-')}"


def url(srv: TgtServer, name: str, lun: int = 1, **q: str) -> str:
    u = srv.url(srv.tids[name], lun)
    if name == "chap":
        u = u.replace("iscsi://", f"iscsi://{CHAP_USER}%{CHAP_SECRET}@")
    if q:
        u += "?" + "&".join(f"{k}={v}" for k, v in q.items())
    return u


def backing(srv: TgtServer, name: str, lun: int = 1) -> str:
    return srv.targets[srv.tids[name]].luns[lun].path


def read_file(path: str, offset: int, length: int) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(offset)
        return np.frombuffer(f.read(length), dtype=np.uint8)


def pattern(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


async def run_tool(*cmd: str) -> subprocess.CompletedProcess:
    return await trio.run_process(list(cmd), capture_stdout=True, capture_stderr=True, check=False)


# ---------------------------------------------------------------- transfer paths


@pytest.mark.parametrize("name", [n for n in TARGETS if n != "chap"])
async def test_every_transfer_path(tgt, name):
    """Writes of many shapes land in the backing file and read back, on each tgtd configuration."""
    dev = await iscsi.open_uri(parse_uri(url(tgt, name)))
    try:
        assert (dev.size, dev.block_size) == (LUN_SIZE, 512)
        p = dev.session.params
        params = TARGETS[name]
        if "MaxRecvDataSegmentLength" in params:
            assert p.target_max_recv == int(params["MaxRecvDataSegmentLength"])
        assert p.initial_r2t == (params.get("InitialR2T", "Yes") == "Yes")
        assert p.header_digest == p.data_digest == (name == "digests")
        shapes = [(0, 512), (512, 4096), (8192, 65536), (1 << 20, 300 * 1024), (3 << 20, (1 << 20) + 7 * 512),
                  (LUN_SIZE - 2048, 2048), (5 << 20, 2 << 20)]
        for i, (off, n) in enumerate(shapes):
            data = pattern(n, i)
            await dev.write(off, data)
            back = await dev.read(off, n)
            assert np.array_equal(back, data), (off, n)
        await dev.flush()
        for i, (off, n) in enumerate(shapes):
            assert np.array_equal(read_file(backing(tgt, name), off, n), pattern(n, i)), (off, n)
    finally:
        await dev.aclose()


@pytest.mark.parametrize("max_recv", [512, 8192])
async def test_small_data_in_segments(tgt, max_recv):
    """Our own small MaxRecvDataSegmentLength: Data-In arrives in many pieces placed by offset."""
    data = pattern(200 * 1024, 99)
    with open(backing(tgt, "default"), "r+b") as f:
        f.seek(7 << 20)
        f.write(data.tobytes())
    dev = await iscsi.open_uri(url(tgt, "default"), max_recv=max_recv)
    try:
        assert dev.session.params.our_max_recv == max_recv
        assert np.array_equal(await dev.read(7 << 20, len(data)), data)
    finally:
        await dev.aclose()


async def test_many_commands_in_flight(tgt):
    dev = await iscsi.open_uri(url(tgt, "mrdsl262144"), queue_depth=32)
    peak = 0
    try:
        blocks = [pattern(64 * 1024, 1000 + i) for i in range(96)]

        async def writer(i: int) -> None:
            await dev.write(i * 65536, blocks[i])

        async def watch(cancel: trio.CancelScope) -> None:
            nonlocal peak
            with cancel:
                while True:
                    peak = max(peak, dev.session.in_flight)
                    await trio.sleep(0)

        cs = trio.CancelScope()
        async with trio.open_nursery() as n:
            n.start_soon(watch, cs)
            async with trio.open_nursery() as w:
                for i in range(len(blocks)):
                    w.start_soon(writer, i)
            cs.cancel()
        assert peak > 4, peak
        await dev.flush()
        results = [None] * len(blocks)

        async def reader(i: int) -> None:
            results[i] = await dev.read(i * 65536, 65536)

        async with trio.open_nursery() as r:
            for i in range(len(blocks)):
                r.start_soon(reader, i)
        for i, b in enumerate(blocks):
            assert np.array_equal(results[i], b)
        # One big request splits into many commands in flight too.
        big = pattern(8 << 20, 5)
        await dev.write(0, big)
        assert np.array_equal(await dev.read(0, len(big)), big)
    finally:
        await dev.aclose()


async def test_overlapping_writes_are_serialized(tgt):
    """Concurrent writes to one range: the device never has both in flight (tgt reorders)."""
    dev = await iscsi.open_uri(url(tgt, "default"))
    try:
        a, b = pattern(1 << 20, 1), pattern(1 << 20, 2)
        async with trio.open_nursery() as n:
            n.start_soon(dev.write, 0, a)
            await trio.sleep(0)
            n.start_soon(dev.write, 0, b)
        got = await dev.read(0, 1 << 20)
        assert np.array_equal(got, a) or np.array_equal(got, b)
    finally:
        await dev.aclose()


async def test_bad_requests_and_luns(tgt):
    dev = await iscsi.open_uri(url(tgt, "default"))
    try:
        for off, n in ((1, 512), (0, 100), (LUN_SIZE, 512), (LUN_SIZE - 512, 1024), (-512, 512)):
            with pytest.raises(OutOfRangeError):
                await dev.read(off, n)
            with pytest.raises(OutOfRangeError):
                await dev.write(off, np.zeros(max(n, 0), np.uint8))
        await dev.discard(0, 4096)  # advisory no-op
        await dev.discard(1, 100)  # any in-range byte range is fine
        assert len(await dev.read(0, 0)) == 0
    finally:
        await dev.aclose()
    with pytest.raises(ConfigError, match="cannot be created"):
        await iscsi.open_uri(url(tgt, "default"), create_size=LUN_SIZE * 2)
    dev = await iscsi.open_uri(url(tgt, "default"), create_size=LUN_SIZE)
    await dev.aclose()
    with pytest.raises(ConfigError, match="controller"):
        await iscsi.open_uri(url(tgt, "default", lun=0))
    with pytest.raises(NotFoundError):
        await iscsi.open_uri(url(tgt, "default", lun=9))
    with pytest.raises(NotFoundError, match="no such target"):
        await iscsi.open_uri(f"iscsi://127.0.0.1:{tgt.port}/iqn.2026-11.test:nothere/1")


async def test_identity_and_probe(tgt):
    a = await iscsi.open_uri(url(tgt, "default"))
    b = await iscsi.open_uri(url(tgt, "default"))
    c = await iscsi.open_uri(url(tgt, "default", lun=2))
    d = await iscsi.open_uri(url(tgt, "r2t_no"))
    try:
        assert a.identity() == b.identity()
        assert len({a.identity(), c.identity(), d.identity()}) == 3
        assert "SN0001" in a.identity()
        assert a.session.isid != b.session.isid  # two sessions side by side, no reinstatement
        await a.probe()
        await a.ping()
        await b.probe()
        # Both paths stay usable.
        await a.write(0, pattern(4096, 3))
        assert np.array_equal(await b.read(0, 4096), pattern(4096, 3))
    finally:
        for dev in (a, b, c, d):
            await dev.aclose()


# ---------------------------------------------------------------- discovery, CHAP


async def test_discover_matches_iscsi_ls(tgt):
    found = await iscsi.discover(f"iscsi://127.0.0.1:{tgt.port}")
    by_name = {t["target"]: t for t in found}
    for name in TARGETS:
        iqn = iqn_of(name)
        assert iqn in by_name
        if name == "chap":
            # Discovery without credentials still lists it, but cannot look inside.
            assert "error" in by_name[iqn]
            continue
        luns = {lun["lun"]: lun for lun in by_name[iqn]["luns"]}
        assert luns[0]["type"] == "controller"
        assert (luns[1]["type"], luns[1]["size"], luns[1]["block_size"]) == ("disk", LUN_SIZE, 512)
    assert {lun["lun"]: lun.get("size") for lun in by_name["iqn.2026-11.test:default"]["luns"]}[2] == 1 << 20
    # With the CHAP user, iscsi-ls can log in to every target (the others accept AuthMethod=None).
    r = await run_tool("iscsi-ls", "-s", f"iscsi://{CHAP_USER}%{CHAP_SECRET}@127.0.0.1:{tgt.port}")
    assert r.returncode == 0, r.stdout + r.stderr
    listed = set(re.findall(rb"Target:(\S+)", r.stdout))
    assert {t.encode() for t in by_name} == listed
    # With credentials the CHAP target's LUNs are visible too.
    found = await iscsi.discover(f"iscsi://{CHAP_USER}%{CHAP_SECRET}@127.0.0.1:{tgt.port}")
    chap = next(t for t in found if t["target"].endswith(":chap"))
    assert "error" not in chap and any(lun.get("size") == LUN_SIZE for lun in chap["luns"])


async def test_cli_discover_exits_non_zero_when_a_login_fails(tgt):
    """vstore discover: a target it cannot log in to (CHAP) makes the exit code 1 (issue 15, item 14)."""
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vstore.cli.main", *args], capture_output=True, text=True,
                              timeout=120)

    r = await trio.to_thread.run_sync(cli, "discover", f"iscsi://127.0.0.1:{tgt.port}")
    assert r.returncode == 1, r.stderr
    assert iqn_of("chap") in r.stdout and iqn_of("default") in r.stdout  # the listing is still there
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "could not log in" in lines[0] and "Traceback" not in r.stderr
    r = await trio.to_thread.run_sync(cli, "discover", f"iscsi://{CHAP_USER}%{CHAP_SECRET}@127.0.0.1:{tgt.port}")
    assert r.returncode == 0, r.stderr
    assert CHAP_SECRET not in r.stdout + r.stderr


async def test_chap_login_and_failures(tgt):
    dev = await iscsi.open_uri(url(tgt, "chap"))
    try:
        await dev.write(0, pattern(8192, 4))
        assert np.array_equal(await dev.read(0, 8192), pattern(8192, 4))
    finally:
        await dev.aclose()
    plain = tgt.url(tgt.tids["chap"], 1)
    wrong = plain.replace("iscsi://", f"iscsi://{CHAP_USER}%NotTheSecret@")
    with pytest.raises(AuthError) as e:
        await iscsi.open_uri(wrong)
    assert "NotTheSecret" not in str(e.value) and CHAP_USER in str(e.value)
    with pytest.raises(AuthError, match="authentication required"):
        await iscsi.open_uri(plain)


async def test_chap_credentials_file(tgt, monkeypatch):
    plain = tgt.url(tgt.tids["chap"], 1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "creds")
        with open(path, "w") as f:
            f.write(f"# target user secret\niqn.2026-11.test:other nobody x\n"
                    f"iqn.2026-11.test:chap {CHAP_USER} {CHAP_SECRET}\n")
        os.chmod(path, 0o600)
        dev = await iscsi.open_uri(plain, credentials_file=path)
        await dev.aclose()
        monkeypatch.setenv("VSTORE_ISCSI_CREDENTIALS", path)
        dev = await iscsi.open_uri(plain)
        assert CHAP_SECRET not in repr(dev) and CHAP_SECRET not in repr(dev.session)
        await dev.aclose()
        os.chmod(path, 0o644)
        with pytest.raises(ConfigError, match="readable only by you") as e:
            await iscsi.open_uri(plain)
        assert CHAP_SECRET not in str(e.value)
        os.chmod(path, 0o600)
        with open(path, "w") as f:
            f.write(f"{CHAP_USER} wrong-{CHAP_SECRET}\n")
        with pytest.raises(AuthError) as e:
            await iscsi.open_uri(plain)
        assert CHAP_SECRET not in str(e.value)


# ---------------------------------------------------------------- interop


async def test_interop_with_libiscsi_and_qemu(tgt):
    u = tgt.url(tgt.tids["mrdsl262144"], 1)
    dev = await iscsi.open_uri(u)
    try:
        data = pattern(LUN_SIZE, 42)
        await dev.write(0, data)
        await dev.flush()
        # The backing file and QEMU's libiscsi driver both see what vstore wrote.
        assert np.array_equal(read_file(backing(tgt, "mrdsl262144"), 0, LUN_SIZE), data)
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "copy.raw")
            r = await run_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", u, out)
            assert r.returncode == 0, r.stderr
            assert np.array_equal(read_file(out, 0, LUN_SIZE), data)
        r = await run_tool("iscsi-readcapacity16", "-s", u)
        assert r.returncode == 0 and int(r.stdout) == dev.size
        r = await run_tool("iscsi-inq", "-e", "1", "-c", "128", u)
        serial = re.search(rb"Unit Serial Number:\[\s*(\S+)\]", r.stdout).group(1).decode()
        assert serial == dev.serial and f"serial:{serial}" in dev.identity()
        r = await run_tool("iscsi-inq", "-e", "1", "-c", "131", u)
        assert r.returncode == 0 and b"NAA" in r.stdout
        assert dev.identity().startswith("iscsi:naa:")
        # Data written behind vstore's back (to the backing file) is read correctly.
        other = pattern(1 << 20, 43)
        with open(backing(tgt, "mrdsl262144"), "r+b") as f:
            f.seek(4 << 20)
            f.write(other.tobytes())
        assert np.array_equal(await dev.read(4 << 20, 1 << 20), other)
    finally:
        await dev.aclose()


# ---------------------------------------------------------------- failures


async def test_dropped_connections_mid_workload(tgt):
    """tgtadm cuts the connection repeatedly under load: commands are reissued, nothing is lost."""
    name = "mrdsl8192"
    dev = await iscsi.open_uri(url(tgt, name), recovery_timeout=20)
    chunk = 1 << 20  # four WRITE commands per request (MaxBurstLength 256 KiB): the batched path
    nchunks = LUN_SIZE // chunk
    done_writing = trio.Event()
    written: dict[int, int] = {}
    try:

        cuts_done = trio.Event()

        async def writer(k: int) -> None:
            # Rounds until every cut has happened, then one more.
            rnd = 0
            while True:
                last = cuts_done.is_set()
                for i in range(k, nchunks, 4):
                    await dev.write(i * chunk, pattern(chunk, rnd * 1000 + i))
                    written[i] = rnd
                rnd += 1
                if last:
                    return

        async def reader() -> None:
            while not done_writing.is_set():
                await dev.read(0, 1 << 20)

        async def cutter() -> None:
            for _ in range(3):
                await trio.sleep(0.1)
                with trio.fail_after(10):  # a reconnect may be under way: wait for the connection
                    while not await trio.to_thread.run_sync(tgt.drop_connections, tgt.tids[name]):
                        await trio.sleep(0.02)
            cuts_done.set()

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            n.start_soon(cutter)
            async with trio.open_nursery() as w:
                for k in range(4):
                    w.start_soon(writer, k)
            done_writing.set()
        await dev.flush()
        print(dev.stats)
        assert dev.stats["reconnects"] >= 3
        for i, rnd in written.items():
            assert np.array_equal(await dev.read(i * chunk, chunk), pattern(chunk, rnd * 1000 + i)), i
            assert np.array_equal(read_file(backing(tgt, name), i * chunk, chunk), pattern(chunk, rnd * 1000 + i))
    finally:
        await dev.aclose()


async def test_target_restart_and_outage():
    """tgtd killed mid-I/O: I/O resumes after a restart on the same port; with no target, it fails in bounded time."""
    with tempfile.TemporaryDirectory() as d:
        srv = TgtServer(workdir=d)
        srv.start()
        try:
            srv.add_target("iqn.2026-11.test:restart")
            srv.add_lun(1, 1, 4 << 20, scsi_id="restart", scsi_sn="RESTART1")
            dev = await iscsi.open_uri(srv.url(1, 1), recovery_timeout=15, timeout=5)
            acked: dict[int, int] = {}
            restarted = trio.Event()
            try:

                async def writer() -> None:
                    # Keep writing through the crash and restart, then one more full round.
                    rnd = 0
                    while True:
                        last = restarted.is_set()
                        for i in range(64):
                            await dev.write(i * 65536, pattern(65536, rnd * 64 + i))
                            acked[i] = rnd
                        rnd += 1
                        if last:
                            return

                async def restart() -> None:
                    await trio.sleep(0.05)
                    await trio.to_thread.run_sync(srv.kill)
                    await trio.sleep(0.5)
                    await trio.to_thread.run_sync(srv.start)
                    def configure() -> None:
                        srv.add_target("iqn.2026-11.test:restart", tid=1)
                        srv.add_lun(1, 1, 4 << 20, scsi_id="restart", scsi_sn="RESTART1")

                    await trio.to_thread.run_sync(configure)
                    restarted.set()

                async with trio.open_nursery() as n:
                    n.start_soon(writer)
                    n.start_soon(restart)
                await dev.flush()
                assert dev.stats["reconnects"] >= 1
                for i, rnd in acked.items():
                    want = pattern(65536, rnd * 64 + i)
                    assert np.array_equal(await dev.read(i * 65536, 65536), want)
                    assert np.array_equal(read_file(srv.targets[1].luns[1].path, i * 65536, 65536), want)
                # Now the target goes away for good: I/O fails cleanly within the bound.
                await trio.to_thread.run_sync(srv.kill)
                dev.recovery_timeout = 1.0
                t0 = trio.current_time()
                with pytest.raises(MemberIOError):
                    await dev.read(0, 4096)
                assert trio.current_time() - t0 < 10
                with pytest.raises(MemberIOError):
                    await dev.probe(timeout=2)
            finally:
                await dev.aclose()
        finally:
            srv.stop()


async def _garbage_server(nursery: trio.Nursery, reply: bytes, *, close: bool = False) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            if not close:
                await stream.send_all(reply)
                await trio.sleep(30)

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return port


@pytest.mark.parametrize(
    "reply,close,error",
    [
        (os.urandom(4096), False, ProtocolError),
        (bytes([0x23]) + bytes(4) + b"\xff\xff\xff" + bytes(40), False, ProtocolError),  # huge segment
        (P.encode_target_pdu(P.Opcode.NOP_IN, data_length=0), False, ProtocolError),  # not a login response
        (b"", True, MemberIOError),  # closes at once
    ],
)
async def test_garbage_speaking_server(reply, close, error):
    """A peer that is not an iSCSI target: a clear error, quickly, never a hang."""
    async with trio.open_nursery() as n:
        port = await _garbage_server(n, reply, close=close)
        with trio.fail_after(5):
            with pytest.raises(error):
                await iscsi.open_uri(f"iscsi://127.0.0.1:{port}/iqn.2026-11.test:x/1", timeout=3)
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- digests under corruption


async def _corrupting_relay(
    nursery: trio.Nursery, port: int, flips: list[int], *, cut_first_after: int | None = None
) -> int:
    """A TCP relay to tgtd that flips one bit of the target->initiator stream at given byte offsets
    (and, if asked, cuts its first connection after that many bytes towards the initiator)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    my_port = listeners[0].socket.getsockname()[1]
    connections = 0

    async def handle(client: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        limit = cut_first_after if connections == 1 else None
        server = await trio.open_tcp_stream("127.0.0.1", port)
        pos = 0

        async def up() -> None:
            while data := await client.receive_some(1 << 20):
                await server.send_all(data)

        async def down() -> None:
            nonlocal pos
            while data := await server.receive_some(1 << 20):
                buf = bytearray(data)
                for f in flips:
                    if pos <= f < pos + len(buf):
                        buf[f - pos] ^= 0x10
                if limit is not None and pos + len(buf) >= limit:
                    await client.send_all(buf[: max(0, limit - pos)])
                    return  # the cut
                pos += len(buf)
                await client.send_all(buf)

        async def pump(direction, cancel: trio.CancelScope) -> None:
            # Either direction ending (EOF, error, cut) ends the whole relayed connection.
            try:
                await direction()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                cancel.cancel()

        try:
            async with trio.open_nursery() as n:
                n.start_soon(pump, up, n.cancel_scope)
                n.start_soon(pump, down, n.cancel_scope)
        finally:
            await client.aclose()
            await server.aclose()

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return my_port


async def test_corrupted_data_is_never_returned_with_digests(tgt):
    """Bits flipped on the wire: digests catch them, the command is retried, the data is right."""
    name = "digests"
    data = pattern(4 << 20, 77)
    with open(backing(tgt, name), "r+b") as f:
        f.write(data.tobytes())
    async with trio.open_nursery() as n:
        # Flip bits well inside the read traffic (after login and the open's small commands).
        port = await _corrupting_relay(n, tgt.port, [300_000, 1_500_000, 2_900_000])
        u = f"iscsi://127.0.0.1:{port}/{iqn_of(name)}/1"
        dev = await iscsi.open_uri(u, recovery_timeout=10)
        try:
            assert dev.session.params.data_digest
            got = await dev.read(0, len(data))
            assert np.array_equal(got, data)
            print(dev.stats)
            assert dev.stats["digest_errors"] + dev.stats["reissued"] >= 1
        finally:
            await dev.aclose()
        n.cancel_scope.cancel()


async def test_unresponsive_target_times_out_then_recovers():
    """SIGSTOP tgtd: commands fail within timeout + recovery bound; after SIGCONT the device works again."""
    import signal

    srv = TgtServer()
    srv.start()
    try:
        srv.add_target("iqn.2026-11.test:stall")
        srv.add_lun(1, 1, 1 << 20, scsi_id="stall", scsi_sn="STALL1")
        dev = await iscsi.open_uri(srv.url(1, 1), timeout=1, recovery_timeout=1.5)
        try:
            await dev.write(0, pattern(4096, 1))
            srv.proc.send_signal(signal.SIGSTOP)
            try:
                t0 = trio.current_time()
                with trio.fail_after(15):
                    with pytest.raises(MemberIOError):
                        await dev.read(0, 4096)
                assert trio.current_time() - t0 < 8
                with pytest.raises(MemberIOError):
                    await dev.probe(timeout=2)
            finally:
                srv.proc.send_signal(signal.SIGCONT)
            await dev.probe(timeout=10)  # reconnects
            assert np.array_equal(await dev.read(0, 4096), pattern(4096, 1))
        finally:
            await dev.aclose()
    finally:
        srv.stop()


async def test_target_nop_pings_are_answered():
    """tgtd pings idle initiators (nop_interval) and drops those that do not answer: we answer."""
    srv = TgtServer(extra="nop_interval=1,nop_count=2")
    srv.start()
    try:
        srv.add_target("iqn.2026-11.test:nop")
        srv.add_lun(1, 1, 1 << 20)
        async with trio.open_nursery() as n:
            # The device's background reader (it answers an idle connection's pings) lives in n.
            dev = await iscsi.open_uri(srv.url(1, 1), nursery=n)
            try:
                await trio.sleep(4)  # idle: several NOP-Ins arrive and must be answered
                await dev.write(0, pattern(4096, 9))
                assert np.array_equal(await dev.read(0, 4096), pattern(4096, 9))
                assert dev.stats["reconnects"] == 0 and dev.stats["reissued"] == 0
                assert len(srv.connections(1)) == 1
            finally:
                await dev.aclose()
    finally:
        srv.stop()


async def test_idle_connection_without_a_background_reader():
    """No background reader: tgtd's pings go unanswered while idle and it drops the connection;
    the next I/O notices before sending and reconnects, even with recovery_timeout=0."""
    srv = TgtServer(extra="nop_interval=1,nop_count=2")
    srv.start()
    try:
        srv.add_target("iqn.2026-11.test:idle")
        srv.add_lun(1, 1, 1 << 20)
        dev = await iscsi.open_uri(srv.url(1, 1), recovery_timeout=0)
        try:
            await trio.sleep(5)
            await dev.write(0, pattern(4096, 9))
            assert np.array_equal(await dev.read(0, 4096), pattern(4096, 9))
            assert dev.stats["reissued"] == 0 and dev.stats["reconnects"] <= 1
        finally:
            await dev.aclose()
    finally:
        srv.stop()


async def test_check_condition_names_sense(tgt):
    """A command the target refuses becomes a ScsiError with sense key and ASC/ASCQ."""
    dev = await iscsi.open_uri(url(tgt, "default"))
    try:
        buf = bytearray(512)
        blocks = dev.size // dev.block_size
        with pytest.raises(iscsi.ScsiError) as e:
            await dev._execute(iscsi.scsi.read_16(blocks + 10, 1), read_buf=memoryview(buf), what="READ(16)")
        err = e.value
        assert isinstance(err, MemberIOError)
        assert (err.sense_key, err.asc, err.ascq) == (5, 0x21, 0x00)
        assert "ILLEGAL REQUEST" in str(err) and "0x21/0x00" in str(err) and "CHECK CONDITION" in str(err)
        await dev.read(0, 512)  # the session is fine afterwards
    finally:
        await dev.aclose()


async def test_queue_deeper_than_the_cmdsn_window(tgt):
    """More commands than tgt's CmdSN window (128): senders wait for MaxCmdSN to move, none is lost."""
    dev = await iscsi.open_uri(url(tgt, "default"), queue_depth=400)
    try:
        windows = set()
        results: dict[int, np.ndarray] = {}

        async def one(i: int) -> None:
            s = dev.session
            # Commands the target accepts now (0 when MaxCmdSN = ExpCmdSN - 1: closed).
            windows.add((s.max_cmd_sn - s.exp_cmd_sn + 1) & 0xFFFFFFFF)
            results[i] = await dev.read(i * 512, 512)

        async with trio.open_nursery() as n:
            for i in range(600):
                n.start_soon(one, i)
        assert len(results) == 600
        assert max(windows) < 400  # the target's window, not our queue depth, was the limit
        assert dev.session.window_waits > 0
        whole = await dev.read(0, 600 * 512)
        for i in range(600):
            assert np.array_equal(results[i], whole[i * 512 : (i + 1) * 512])
    finally:
        await dev.aclose()


async def test_no_recovery_fails_fast_and_probe_reconnects(tgt):
    """recovery_timeout=0 (what multipath wants): a cut fails in-flight I/O at once; probe() brings it back."""
    name = "mrdsl262144"
    async with trio.open_nursery() as n:
        # The relay cuts the first connection after 2 MB towards us: inside the 4 MiB read.
        port = await _corrupting_relay(n, tgt.port, [], cut_first_after=2_000_000)
        dev = await iscsi.open_uri(f"iscsi://127.0.0.1:{port}/{iqn_of(name)}/1", recovery_timeout=0)
        try:
            t0 = trio.current_time()
            with pytest.raises(MemberIOError, match="READ"):
                await dev.read(0, 4 << 20)
            assert trio.current_time() - t0 < 5
            assert dev.stats["reissued"] == 0 and dev.stats["reconnects"] == 0
            await dev.probe()
            assert dev.stats["reconnects"] == 1
            await dev.read(0, 4 << 20)
        finally:
            await dev.aclose()
        n.cancel_scope.cancel()


async def test_two_portals_one_lun(tgt):
    """Two paths (portals) to one LUN: same identity, independent sessions (different ISIDs)."""
    from vstore.testing.iscsi_target import free_port

    port2 = free_port()
    tgt.adm("--op", "new", "--mode", "portal", "--param", f"portal=127.0.0.1:{port2}")
    try:
        u1 = url(tgt, "default")
        u2 = u1.replace(f":{tgt.port}/", f":{port2}/")
        a = await iscsi.open_uri(u1)
        b = await iscsi.open_uri(u2)
        try:
            assert a.identity() == b.identity()
            assert a.session.isid != b.session.isid
            await a.write(8192, pattern(8192, 11))
            assert np.array_equal(await b.read(8192, 8192), pattern(8192, 11))
            await a.probe()
            await b.probe()
            assert a.stats["reconnects"] == b.stats["reconnects"] == 0
        finally:
            await a.aclose()
            await b.aclose()
    finally:
        tgt.adm("--op", "delete", "--mode", "portal", "--param", f"portal=127.0.0.1:{port2}", check=False)


def test_random_concurrent_io_matches_a_model(tgt):
    """Hypothesis: batches of concurrent reads/writes/flushes (any block-aligned shape) agree with a bytearray."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    name = "mrdsl512"  # tiny PDUs: the most pieces per request
    size = 4 << 20
    blocks = size // 512
    extent = st.tuples(st.integers(0, blocks - 1), st.integers(1, 1100)).map(
        lambda t: (t[0] * 512, min(t[1], blocks - t[0]) * 512)
    )
    op = st.one_of(
        st.tuples(st.just("w"), extent, st.integers(0, 2**31)),
        st.tuples(st.just("r"), extent, st.just(0)),
        st.tuples(st.just("f"), st.just((0, 0)), st.just(0)),
    )
    model = bytearray(read_file(backing(tgt, name), 0, size).tobytes())

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.lists(op, min_size=1, max_size=6), min_size=1, max_size=4))
    def run(batches) -> None:
        async def main() -> None:
            dev = await iscsi.open_uri(url(tgt, name), queue_depth=8)
            try:
                for batch in batches:
                    # Within a batch, writes never overlap each other or a read (the
                    # outcome would be a race); drop the ones that would.
                    taken: list[tuple[int, int]] = []
                    chosen = []
                    for kind, (off, n), seed in batch:
                        if kind != "f" and any(a < off + n and off < b for a, b in taken):
                            continue
                        if kind != "f":
                            taken.append((off, off + n))
                        chosen.append((kind, off, n, seed))
                    reads: dict[int, np.ndarray] = {}

                    async def do(reads: dict, i: int, kind: str, off: int, n: int, seed: int) -> None:
                        if kind == "w":
                            await dev.write(off, pattern(n, seed))
                        elif kind == "r":
                            reads[i] = await dev.read(off, n)
                        else:
                            await dev.flush()

                    async with trio.open_nursery() as nursery:
                        for i, args in enumerate(chosen):
                            nursery.start_soon(do, reads, i, *args)
                    for i, (kind, off, n, _seed) in enumerate(chosen):
                        if kind == "r":
                            assert reads[i].tobytes() == bytes(model[off : off + n])
                    for kind, off, n, seed in chosen:
                        if kind == "w":
                            model[off : off + n] = pattern(n, seed).tobytes()
                await dev.flush()
                assert read_file(backing(tgt, name), 0, size).tobytes() == bytes(model)
            finally:
                await dev.aclose()

        trio.run(main)

    run()


async def test_cancelled_io_and_close(tgt):
    """Cancelling reads and writes mid-flight leaves the device usable; aclose works even when cancelled."""
    dev = await iscsi.open_uri(url(tgt, "mrdsl8192"))
    try:
        for delay in (0, 0.0005, 0.002):
            with trio.move_on_after(delay):
                async with trio.open_nursery() as n:
                    n.start_soon(dev.write, 0, pattern(2 << 20, 1))
                    n.start_soon(dev.read, 4 << 20, 2 << 20)
        await dev.write(0, pattern(1 << 20, 2))
        assert np.array_equal(await dev.read(0, 1 << 20), pattern(1 << 20, 2))
    finally:
        with trio.CancelScope() as cs:
            cs.cancel()
            await dev.aclose()  # cancelled caller: still logs out / stops the reader
    assert dev.session is not None and not dev.session.alive
    with pytest.raises(MemberIOError, match="closed"):
        await dev.read(0, 512)


# ---------------------------------------------------------------- vectored I/O


def vector_sizes(burst: int) -> list[int]:
    """Uneven view sizes for a request: sub-block pieces, a view bigger than MaxBurstLength, a tail."""
    return [512 + 100, 1536 - 100, 8192, burst + 3 * 512 + 200, 64 * 1024 - 200, 1000, 24]


@pytest.mark.parametrize("name", [n for n in TARGETS if n != "chap"])
async def test_vectored_io_every_transfer_path(tgt, name):
    """writev / readv_into with uneven, gapped and strided views agree with write / read and the backing file."""
    dev = await iscsi.open_uri(parse_uri(url(tgt, name)))
    try:
        burst = dev.session.params.max_burst
        sizes = vector_sizes(burst)
        total = sum(sizes)
        assert total % 512 == 0 and max(sizes) > burst
        off = (9 << 20) + 3 * 512  # block-aligned, not burst-aligned: commands straddle views
        data = pattern(total, 77)
        src = ViewSet(sizes, strided=(1, 4)).fill(data)
        await dev.writev(off, src.views)
        assert np.array_equal(await dev.read(off, total), data)  # plain read of the same range
        dst = ViewSet(sizes, strided=(0, 3))
        await dev.readv_into(off, dst.views)
        assert np.array_equal(dst.joined(), data) and dst.outside_untouched()
        # The other direction: a plain write read back through views, and a single view.
        other = pattern(total, 78)
        await dev.write(off, other)
        dst.clear()
        await dev.readv_into(off, dst.views)
        assert np.array_equal(dst.joined(), other) and dst.outside_untouched()
        one = np.empty(burst + 512, np.uint8)
        await dev.readv_into(off, [one])
        assert np.array_equal(one, other[: len(one)])
        await dev.writev(off, [])
        await dev.readv_into(off, [])
        await dev.writev(off, src.views)
        await dev.flush()
        assert np.array_equal(read_file(backing(tgt, name), off, total), data)
    finally:
        await dev.aclose()


async def test_vectored_io_against_libiscsi(tgt):
    """What writev puts on the LUN, QEMU's libiscsi driver reads; what it writes, readv_into reads."""
    u = tgt.url(tgt.tids["default"], 1)
    dev = await iscsi.open_uri(u)
    try:
        sizes = vector_sizes(dev.session.params.max_burst) * 3
        total = sum(sizes)
        data = pattern(total, 90)
        off = 2 << 20
        await dev.writev(off, ViewSet(sizes, strided=(2, 9)).fill(data).views)
        await dev.flush()
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "copy.raw")
            r = await run_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", u, out)
            assert r.returncode == 0, r.stderr
            assert np.array_equal(read_file(out, off, total), data)
            # libiscsi writes a new image onto the LUN; vstore reads it back through views.
            image = pattern(LUN_SIZE, 91)
            with open(out, "wb") as f:
                f.write(image.tobytes())
            r = await run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", out, u)
            assert r.returncode == 0, r.stderr
        dst = ViewSet(sizes, strided=(0, 5))
        await dev.readv_into(off, dst.views)
        assert np.array_equal(dst.joined(), image[off : off + total]) and dst.outside_untouched()
    finally:
        await dev.aclose()


async def test_vectored_bad_requests_fail_like_write(tgt):
    """Out-of-range and misaligned vectored requests raise what write raises, and send nothing."""
    dev = await iscsi.open_uri(url(tgt, "default"))
    try:
        cases = [(1, [512]), (0, [100]), (0, [256, 200]), (512, [300, 300]), (LUN_SIZE, [512]),
                 (LUN_SIZE - 512, [512, 512]), (-512, [512])]
        for off, sizes in cases:
            views = [np.zeros(n, np.uint8) for n in sizes]
            with pytest.raises(OutOfRangeError) as plain:
                await dev.write(off, np.zeros(sum(sizes), np.uint8))
            with pytest.raises(OutOfRangeError) as vec:
                await dev.writev(off, views)
            assert str(vec.value) == str(plain.value)
            with pytest.raises(OutOfRangeError) as vec:
                await dev.readv_into(off, views)
            assert str(vec.value) == str(plain.value)
        # Views need not be whole blocks; only the request must be.
        data = pattern(1024, 5)
        await dev.writev(0, [data[:100], data[100:612], data[612:]])
        assert np.array_equal(await dev.read(0, 1024), data)
    finally:
        await dev.aclose()


async def test_vectored_io_honours_4k_blocks(tgt):
    """A 4096-byte-block LUN: views of any size, but the request in whole blocks."""
    tid = tgt.tids["r2t_no"]
    tgt.add_lun(tid, 5, 4 << 20, block_size=4096, scsi_id="vstore-4k", scsi_sn="SN4K")
    try:
        dev = await iscsi.open_uri(url(tgt, "r2t_no", lun=5))
        try:
            assert dev.block_size == 4096
            for off, sizes in ((0, [512] * 3), (512, [4096]), (4096, [2048, 1024])):
                with pytest.raises(OutOfRangeError, match="4096-byte blocks"):
                    await dev.writev(off, [np.zeros(n, np.uint8) for n in sizes])
                with pytest.raises(OutOfRangeError, match="4096-byte blocks"):
                    await dev.readv_into(off, [np.zeros(n, np.uint8) for n in sizes])
            sizes = [512, 3584, 300 * 1024, 7 * 512, 512 + 200 * 1024 - 7 * 512 - 512]
            total = sum(sizes)
            assert total % 4096 == 0
            data = pattern(total, 6)
            await dev.writev(8192, ViewSet(sizes, strided=(1,)).fill(data).views)
            dst = ViewSet(sizes, strided=(2,))
            await dev.readv_into(8192, dst.views)
            assert np.array_equal(dst.joined(), data) and np.array_equal(await dev.read(8192, total), data)
            await dev.flush()
            path = tgt.targets[tid].luns[5].path
            assert np.array_equal(read_file(path, 8192, total), data)
        finally:
            await dev.aclose()
    finally:
        tgt.adm("--op", "delete", "--mode", "logicalunit", "--tid", str(tid), "--lun", "5", check=False)


async def test_cancelled_vectored_read_never_lands_later(tgt):
    """Data-In of an abandoned readv_into is dropped: the caller's views stay as they were."""
    dev = await iscsi.open_uri(url(tgt, "mrdsl262144"))
    try:
        data = pattern(4 << 20, 12)
        await dev.write(4 << 20, data)
        dst = ViewSet([1 << 20] * 4, strided=(2,))
        for _ in range(3):
            with trio.CancelScope() as cs:
                cs.cancel()  # the commands are sent, then the wait for them is cancelled
                await dev.readv_into(4 << 20, dst.views)
            dst.clear()
            await trio.sleep(0.2)  # the target's answers arrive meanwhile
            assert (dst.joined() == 0x5A).all() and dst.outside_untouched()
        await dev.readv_into(4 << 20, dst.views)  # the session is still fine
        assert np.array_equal(dst.joined(), data)
    finally:
        await dev.aclose()


async def test_an_idle_pool_answers_the_targets_pings(tmp_path):
    """A pool's background work runs its members' (a plain LUN, a two-path one): pings answered."""
    from vstore.pool.home import Home
    from vstore.pool.pool import Pool

    srv = TgtServer(extra="nop_interval=1,nop_count=2")
    srv.start()
    try:
        srv.add_target("iqn.2026-11.test:pingpool")
        srv.add_lun(1, 1, 8 << 20)
        srv.add_lun(1, 2, 8 << 20)
        one, two = srv.url(1, 1), srv.url(1, 2)
        pool = await Pool.create(Home(tmp_path / "home"), "pp", "raid1",
                                 [one, f"{two}?path=a,{two}?path=b"])
        try:
            async with trio.open_nursery() as n:
                await n.start(pool.run_background)
                vol = await pool.create_volume("v", 1 << 20)
                await trio.sleep(4)  # idle: several NOP-Ins per connection, all to be answered
                await vol.write(0, pattern(4096, 5))
                assert np.array_equal(await vol.read(0, 4096), pattern(4096, 5))
                devs = [pool.members[0].dev, *(p.dev for p in pool.members[1].dev.paths)]
                assert [d.stats["reconnects"] for d in devs] == [0, 0, 0]
                assert len(srv.connections(1)) == 3
                n.cancel_scope.cancel()
        finally:
            await pool.aclose()
    finally:
        srv.stop()


# ---------------------------------------------------------------- discard (UNMAP)


def test_unmap_codec():
    params = iscsi.scsi.unmap_parameters([(8, 16), (1 << 33, 1)])
    assert len(params) == 8 + 2 * 16
    assert params[:4] == bytes([0, 6 + 32, 0, 32])
    assert params[8:24] == (8).to_bytes(8, "big") + (16).to_bytes(4, "big") + bytes(4)
    assert params[24:32] == (1 << 33).to_bytes(8, "big")
    assert iscsi.scsi.unmap(len(params)) == bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 40, 0])
    cap = bytearray(32)
    cap[0:12] = (99).to_bytes(8, "big") + (512).to_bytes(4, "big")
    assert not iscsi.scsi.parse_read_capacity_16(cap).lbpme
    cap[14] = 0xC0
    c = iscsi.scsi.parse_read_capacity_16(cap)
    assert (c.blocks, c.lbpme, c.lbprz) == (100, True, True)
    page = bytearray(64)
    page[1], page[3] = 0xB0, 60
    page[20:28] = (4096).to_bytes(4, "big") + (1).to_bytes(4, "big")
    assert iscsi.scsi.parse_vpd_block_limits(page) == iscsi.scsi.BlockLimits(4096, 1)
    assert iscsi.scsi.parse_vpd_block_limits(bytes([0, 0xB0, 0, 8]) + bytes(8)).max_unmap_blocks == 0


async def test_discard_unmaps_a_thin_lun_and_leaves_a_thick_one_alone():
    """A thin LU (LBPME, LBPRZ) gets UNMAP: holes in tgt's backing file, zeros read back; a thick one keeps its bytes."""
    with TgtServer() as srv:
        t = srv.add_target("iqn.2026-12.test:unmap")
        thin = srv.add_lun(t.tid, 1, LUN_SIZE, thin=True)
        thick = srv.add_lun(t.tid, 2, LUN_SIZE)
        data = pattern(8 << 20, 21)
        for lu, is_thin in ((thin, True), (thick, False)):
            dev = await iscsi.open_uri(parse_uri(srv.url(t.tid, lu.lun)))
            try:
                await dev.write(0, data)
                await dev.flush()
                full = os.stat(lu.path).st_blocks * 512
                assert full >= 8 << 20
                await dev.discard((1 << 20) + 100, 5 << 20)  # whole blocks only: [1 MiB + 512, 6 MiB + 100)
                await dev.flush()
                back = await dev.read(0, 8 << 20)
                expect = data.copy()
                if is_thin:
                    expect[(1 << 20) + 512 : 6 << 20] = 0
                    assert os.stat(lu.path).st_blocks * 512 <= full - (4 << 20)
                else:
                    assert os.stat(lu.path).st_blocks * 512 == full
                assert np.array_equal(back, expect)
                assert np.array_equal(read_file(lu.path, 0, 8 << 20), expect)
            finally:
                await dev.aclose()
