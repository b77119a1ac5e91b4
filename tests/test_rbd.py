"""rbd:// members against a real single-node Ceph cluster (ceph-mon + one memstore ceph-osd on
loopback, started once per session): the device interface, the CLI, and a raid6 pool mixing
file, NFS, iSCSI and RBD members. ``rbd export`` / ``rados`` are the independent oracles."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import trio

from tests.test_cli import assert_one_line_error, vstore
from vstore.errors import ConfigError, MemberIOError, NotFoundError, OutOfRangeError
from vstore.stack.device import BlockDevice
from vstore.testing.ceph_cluster import CephCluster, CephError, available
from vstore.testing.iscsi_target import TgtServer
from vstore.testing.nfs_server import Ganesha, ServerError
from vstore.uri import open_uri, parse_uri

POOL = "vs"
MiB = 1 << 20


@pytest.fixture(scope="session")
def ceph():
    """One cluster for the whole session (its start-up takes seconds), always stopped."""
    why = available()
    if why:
        pytest.skip(f"Ceph: {why}")
    t0 = time.monotonic()
    try:
        cluster = CephCluster().start()
    except CephError as e:
        pytest.skip(str(e))
    try:
        cluster.create_pool(POOL)
        cluster.ready_seconds = time.monotonic() - t0  # type: ignore[attr-defined]
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def rng():
    return np.random.default_rng(20)


def images(ceph: CephCluster) -> set[str]:
    """The pool's images per the rbd CLI."""
    return set(json.loads(ceph.rbd("ls", "--format", "json", POOL)))


def key_of(ceph: CephCluster) -> str:
    """client.admin's secret key (which must never reach any output)."""
    text = ceph.keyring.read_text()
    return text[text.index("[client.admin]"):].split("key = ", 1)[1].split()[0]


def test_cluster_starts_quickly(ceph):
    # The fixture's cost, measured: the session pays it once.
    assert ceph.startup_seconds < 60, ceph.startup_seconds
    assert json.loads(ceph.ceph("osd", "stat", "--format", "json"))["num_up_osds"] == 1


async def test_create_write_read_flush_reopen(ceph, rng):
    uri = ceph.rbd_uri(POOL, "dev0")
    dev = await open_uri(uri, create_size=8 * MiB)
    try:
        assert isinstance(dev, BlockDevice) and dev.created
        assert dev.size == 8 * MiB and dev.block_size == 512 and "dev0" in images(ceph)
        model = np.zeros(dev.size, np.uint8)
        # Many I/Os in flight at once, unaligned, from many tasks.
        writes = [(int(rng.integers(0, dev.size - 70000)), int(rng.integers(1, 70000))) for _ in range(64)]
        writes.sort()  # overlapping writes in flight at once have no order: keep them apart below
        spaced, end = [], 0
        for off, n in writes:
            if off >= end:
                spaced.append((off, n))
                end = off + n
        async with trio.open_nursery() as nursery:
            for off, n in spaced:
                data = rng.integers(0, 256, n, dtype=np.uint8)
                model[off : off + n] = data
                nursery.start_soon(dev.write, off, data)
        await dev.flush()
        got = await dev.read(0, dev.size)
        assert got.flags.writeable and np.array_equal(got, model)
    finally:
        await dev.aclose()
    assert ceph.export(POOL, "dev0") == model.tobytes()  # the oracle: rbd export
    again = await open_uri(ceph.rbd_uri(POOL, "dev0", keyring=False), create_size=8 * MiB)
    try:
        assert not again.created  # it exists: opened, not made anew
        assert np.array_equal(await again.read(12345, 100000), model[12345:112345])
    finally:
        await again.aclose()


async def test_vectored_io_and_rados_sees_the_objects(ceph, rng):
    dev = await open_uri(ceph.rbd_uri(POOL, "vec"), create_size=4 * MiB)
    try:
        parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in (1000, 3096, 1, 65535)]
        await dev.writev(4097, parts)
        outs = [np.zeros(len(p), np.uint8) for p in parts]
        await dev.readv_into(4097, outs)
        for a, b in zip(parts, outs, strict=True):
            assert np.array_equal(a, b)
        strided = np.zeros(2000, np.uint8)[::2]  # a non-contiguous destination
        await dev.readv_into(4097, [strided])
        assert np.array_equal(strided, parts[0])
        await dev.flush()
        image_id = json.loads(ceph.rbd("info", "--format", "json", f"{POOL}/vec"))["id"]
        assert dev.identity().endswith(f":{image_id}")
    finally:
        await dev.aclose()
    exported = np.frombuffer(ceph.export(POOL, "vec"), np.uint8)
    assert np.array_equal(exported[4097 : 4097 + sum(map(len, parts))], np.concatenate(parts))
    objects = ceph.rados("-p", POOL, "ls").split()
    assert any(o.startswith(f"rbd_data.{image_id}.") for o in objects)


async def test_discard_reads_back_zeros(ceph, rng):
    dev = await open_uri(ceph.rbd_uri(POOL, "disc"), create_size=12 * MiB)
    try:
        data = rng.integers(1, 256, dev.size, dtype=np.uint8)
        await dev.write(0, data)
        # Unaligned edges and a whole 4 MiB object in between.
        await dev.discard(1000, 9 * MiB)
        await dev.flush()
        got = await dev.read(0, dev.size)
        assert not got[1000 : 1000 + 9 * MiB].any()
        assert np.array_equal(got[:1000], data[:1000])
        assert np.array_equal(got[1000 + 9 * MiB :], data[1000 + 9 * MiB :])
    finally:
        await dev.aclose()
    exported = np.frombuffer(ceph.export(POOL, "disc"), np.uint8)
    assert not exported[1000 : 1000 + 9 * MiB].any() and exported[999] == data[999]
    usage = json.loads(ceph.rbd("du", "--format", "json", f"{POOL}/disc"))
    assert usage["images"][0]["used_size"] < 12 * MiB  # the whole object was deallocated


async def test_no_thread_per_io(ceph, rng):
    dev = await open_uri(ceph.rbd_uri(POOL, "thr"), create_size=4 * MiB)
    try:
        await dev.write(0, rng.integers(0, 256, dev.size, dtype=np.uint8))
        before = threading.active_count()
        async with trio.open_nursery() as nursery:
            for i in range(256):
                nursery.start_soon(dev.read, (i % 64) * 65536, 65536)
                nursery.start_soon(dev.write, (i % 64) * 65536 + 100, b"x" * 100)
            nursery.start_soon(dev.flush)
        assert threading.active_count() == before  # no Python (worker) threads: callbacks
    finally:
        await dev.aclose()


async def test_identity_probe_and_cancel(ceph):
    a = await open_uri(ceph.rbd_uri(POOL, "idA"), create_size=MiB)
    b = await open_uri(f"rbd://{POOL}/idA?conf={ceph.conf}", create_size=None)  # another spelling
    c = await open_uri(ceph.rbd_uri(POOL, "idB"), create_size=MiB)
    try:
        assert a.identity() == b.identity() != c.identity()
        fsid = ceph.fsid
        assert a.identity().startswith(f"rbd:{fsid}:")
        await a.probe(5)
        # A cancelled read neither lands later nor breaks the device.
        with trio.move_on_after(0):
            await a.read(0, MiB)
        await a.write(0, b"after")
        assert bytes(await b.read(0, 5)) == b"after"
    finally:
        for d in (a, b, c):
            await d.aclose()


async def test_errors_are_clear_and_secret_free(ceph):
    key = key_of(ceph)
    with pytest.raises(NotFoundError, match="no such image.*--size"):
        await open_uri(ceph.rbd_uri(POOL, "missing"))
    assert "missing" not in images(ceph)
    with pytest.raises(NotFoundError, match="no pool 'nopool'"):
        await open_uri(ceph.rbd_uri("nopool", "x"))
    with pytest.raises(ConfigError, match="keyring /nonexistent does not exist"):
        await open_uri(f"rbd://{POOL}/x?conf={ceph.conf}&keyring=/nonexistent")
    with pytest.raises(ConfigError, match="must not carry a key"):
        parse_uri(f"rbd://admin:{quote(key, safe='')}@{POOL}/x")
    slashed = "AQBvZ2Vz/dGhpcytrZXk+aXM/c2VjcmV0eA=="  # base64: a raw "/" makes the URI malformed
    for text in (f"rbd://admin:{slashed}@{POOL}/x", f"iscsi://u%{slashed}@127.0.0.1/iqn.x:t/0"):
        with pytest.raises(ConfigError) as bad:
            parse_uri(text)
        assert slashed not in str(bad.value) and "/c2VjcmV0eA" not in str(bad.value)
    with pytest.raises(ConfigError, match="one image name"):
        parse_uri(f"rbd://{POOL}/a/b")
    with pytest.raises(ConfigError, match="unknown parameter 'keyrig'"):
        parse_uri(f"rbd://{POOL}/a?keyrig=/x")
    with pytest.raises(MemberIOError, match="cannot connect.*client.nobody") as e:
        await open_uri(f"rbd://nobody@{POOL}/x?conf={ceph.conf}&timeout=5")
    assert key not in str(e.value) and "\n" not in str(e.value)
    dev = await open_uri(ceph.rbd_uri(POOL, "err"), create_size=MiB)
    try:
        with pytest.raises(OutOfRangeError):
            await dev.read(MiB - 10, 11)
        with pytest.raises(OutOfRangeError):
            await dev.write(MiB, b"x")
    finally:
        await dev.aclose()
    with pytest.raises(MemberIOError, match="closed"):
        await dev.read(0, 1)


def test_cli_pool_of_rbd_members_and_discover(ceph, tmp_path: Path):
    home = tmp_path / "home"
    key = key_of(ceph)
    members = [ceph.rbd_uri(POOL, f"cli{i}") for i in range(3)]
    r = vstore(home, "create", "rp", "--level", "raid5", "--size", str(16 * MiB), *members)
    assert {"cli0", "cli1", "cli2"} <= images(ceph)
    st = json.loads(vstore(home, "status", "rp", "--json").stdout)
    assert st["state"] == "clean" and all(m["uri"].startswith("rbd://") for m in st["members"])
    src = tmp_path / "src.bin"
    payload = np.random.default_rng(5).integers(0, 256, 5 * MiB, dtype=np.uint8)
    payload.tofile(src)
    vstore(home, "import", "rp", "data", str(src))
    out = tmp_path / "out.bin"
    vstore(home, "export", "rp", "data", str(out))
    assert out.read_bytes() == src.read_bytes()
    for i in range(3):  # the superblock is on each image, per rbd export
        assert ceph.export(POOL, f"cli{i}")[:8] == b"VSTORESB"
    # Lose one member: raid5 still returns every byte.
    vstore(home, "fail", "rp", "1")
    out.unlink()
    vstore(home, "export", "rp", "data", str(out))
    assert out.read_bytes() == src.read_bytes()

    d = vstore(home, "discover", f"rbd://admin@{POOL}?conf={ceph.conf}&keyring={ceph.keyring}")
    lines = [ln for ln in d.stdout.splitlines() if "/cli" in ln]
    assert len(lines) == 3 and all(ln.endswith("(16777216 bytes)") for ln in lines)
    listed = json.loads(vstore(home, "discover", "--json", f"rbd://{POOL}?conf={ceph.conf}").stdout)
    by_name = {im["image"]: im for im in listed}
    assert by_name["cli0"]["size"] >= 16 * MiB and by_name["cli0"]["uri"].startswith(f"rbd://{POOL}/cli0?")
    assert set(by_name) == images(ceph)
    for proc in (r, d):
        assert key not in proc.stdout + proc.stderr
    assert key not in json.dumps(st)
    assert not any(key in p.read_text(errors="replace") for p in home.rglob("*") if p.is_file())

    bad = vstore(home, "create", "rq", "--level", "raid1", f"rbd://{POOL}/nosuch?conf={ceph.conf}",
                 f"rbd://{POOL}/nosuch2?conf={ceph.conf}", check=False)
    assert_one_line_error(bad, "no such image")
    bad = vstore(home, "discover", f"rbd://{POOL}/img?conf={ceph.conf}", check=False)
    assert_one_line_error(bad, "takes a pool")
    bad = vstore(home, "discover", f"rbd://nopool?conf={ceph.conf}", check=False)
    assert_one_line_error(bad, "no pool")


def test_failed_create_removes_the_images_it_created(ceph, tmp_path: Path):
    home = tmp_path / "home"
    ceph.rbd("create", f"{POOL}/keep0", "--size", "16M")  # there before: never removed
    members = [ceph.rbd_uri(POOL, "fc0"), ceph.rbd_uri(POOL, "keep0"), ceph.rbd_uri(POOL, "fc1"),
               f"file://{tmp_path}/nodir/x.img"]
    bad = vstore(home, "create", "fc", "--level", "raid5", "--size", str(16 * MiB), *members, check=False)
    assert_one_line_error(bad, "does not exist")
    have = images(ceph)
    assert "keep0" in have and not {"fc0", "fc1"} & have
    # The same image under two spellings is one member, refused before anything is written.
    twice = vstore(home, "create", "tw", "--level", "raid1", ceph.rbd_uri(POOL, "keep0"),
                   f"rbd://{POOL}/keep0?conf={ceph.conf}", check=False)
    assert_one_line_error(twice, "same storage")
    assert not ceph.export(POOL, "keep0").strip(b"\0")


@pytest.fixture(scope="module")
def nas_and_san():
    try:
        nfs = Ganesha()
    except ServerError as e:
        pytest.skip(str(e))
    with nfs, TgtServer() as tgt:
        yield nfs, tgt


def test_raid6_over_file_nfs_iscsi_rbd(ceph, nas_and_san, tmp_path: Path):
    nfs, tgt = nas_and_san
    home = tmp_path / "home"
    size = 32 * MiB
    t1 = tgt.add_target("iqn.2026-12.test:rbdmix1")
    tgt.add_lun(t1.tid, 1, size, scsi_id="rbdmix1", scsi_sn="RBM1")
    members = [
        f"file://{tmp_path}/local0.img",
        nfs.url("rbdmix0.img"),
        tgt.url(t1.tid, 1),
        ceph.rbd_uri(POOL, "mix0"),
        f"file://{tmp_path}/local1.img",
        ceph.rbd_uri(POOL, "mix1"),
    ]
    vstore(home, "create", "mixed", "--level", "raid6", "--size", str(size), *members)
    st = json.loads(vstore(home, "status", "mixed", "--json").stdout)
    assert st["state"] == "clean" and [m["uri"].split(":")[0] for m in st["members"]] == [
        "file", "nfs", "iscsi", "rbd", "file", "rbd"]
    src = tmp_path / "src.bin"
    payload = np.random.default_rng(6).integers(0, 256, 12 * MiB, dtype=np.uint8)
    payload.tofile(src)
    vstore(home, "import", "mixed", "data", str(src))
    out = tmp_path / "out.bin"
    vstore(home, "export", "mixed", "data", str(out))
    assert out.read_bytes() == src.read_bytes()
    for name in ("mix0", "mix1"):
        assert ceph.export(POOL, name)[:8] == b"VSTORESB"
    vstore(home, "scrub", "mixed")  # parity and mirrors check out across all four kinds
    # Lose both RBD members: raid6 still returns every byte.
    vstore(home, "fail", "mixed", "3")
    vstore(home, "fail", "mixed", "5")
    assert json.loads(vstore(home, "status", "mixed", "--json").stdout)["state"] == "degraded"
    out.unlink()
    vstore(home, "export", "mixed", "data", str(out))
    assert out.read_bytes() == src.read_bytes()
    # Rebuild onto a new RBD image (created by --size), then scrub clean again.
    vstore(home, "replace", "mixed", "3", ceph.rbd_uri(POOL, "mix2"), "--size", str(size))
    vstore(home, "replace", "mixed", "5", f"file://{tmp_path}/local2.img", "--size", str(size))
    assert json.loads(vstore(home, "status", "mixed", "--json").stdout)["state"] == "clean"
    vstore(home, "scrub", "mixed")
    assert ceph.export(POOL, "mix2")[:8] == b"VSTORESB"


async def test_a_stalled_osd_fails_the_io_within_the_timeout(ceph):
    dev = await open_uri(ceph.rbd_uri(POOL, "stall") + "&timeout=3", create_size=MiB)
    osd = ceph.procs["osd.0"]
    try:
        assert dev.timeout == 3
        await dev.write(0, b"before")
        osd.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(MemberIOError, match="rbd://vs/stall: read at offset 4096: ") as e:
                await dev.read(4096, 512)
            assert time.monotonic() - t0 < 20 and "\n" not in str(e.value)
        finally:
            osd.send_signal(signal.SIGCONT)
    finally:
        await dev.aclose()
    again = await open_uri(ceph.rbd_uri(POOL, "stall"))  # the cluster serves again
    try:
        assert bytes(await again.read(0, 6)) == b"before"
    finally:
        await again.aclose()
