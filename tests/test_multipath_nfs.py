"""Multipath over NFS: two spellings of one file on a real NFS-Ganesha are one member; other files are not."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from tests.vectors import ViewSet
from vstore.errors import ConfigError
from vstore.stack.multipath import MultipathDevice
from vstore.testing.nfs_server import MOUNT_PORT, NFS_PORT, Ganesha, RpcRelay, ServerError
from vstore.uri import parse_uri

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


async def test_two_paths_to_one_nfs_file(ganesha):
    export = ganesha.export
    # The same file: explicit ports in the query, then the NFS port in the authority instead.
    urls = [f"nfs://127.0.0.1{export}/mp.img?nfsport={NFS_PORT}&mountport={MOUNT_PORT}",
            f"nfs://127.0.0.1:{NFS_PORT}{export}/mp.img?mountport={MOUNT_PORT}"]
    mp = await MultipathDevice.open([parse_uri(u) for u in urls], create_size=8 * MiB,
                                    selector="round-robin", io_timeout=10.0)
    try:
        assert mp.identity().startswith("nfs:")
        data = np.random.default_rng(1).integers(0, 256, 4 * MiB, dtype=np.uint8)
        for i in range(8):
            await mp.write(i * 512 * 1024, data[i * 512 * 1024:(i + 1) * 512 * 1024])
        await mp.flush()
        assert np.array_equal(await mp.read(0, 4 * MiB), data)
        assert all(p["ios"] > 0 for p in mp.path_stats())
        mp.fail_path(0)
        await mp.write(4 * MiB, data[:MiB])
        await mp.flush()
        await mp.reinstate_path(0)
        assert [p["state"] for p in mp.path_stats()] == ["active", "active"]
        assert np.array_equal(await mp.read(4 * MiB, MiB), data[:MiB])
    finally:
        await mp.aclose()
    with open(ganesha.path("mp.img"), "rb") as f:
        assert f.read(4 * MiB) == data.tobytes()


async def test_nfs_path_through_a_severed_relay_is_invisible(ganesha):
    async with trio.open_nursery() as nursery:
        relay = RpcRelay()
        port = await nursery.start(relay.serve)
        export = ganesha.export
        urls = [f"nfs://127.0.0.1{export}/relay.img?nfsport={port}&mountport={MOUNT_PORT}&timeout=2",
                f"nfs://127.0.0.1{export}/relay.img?nfsport={NFS_PORT}&mountport={MOUNT_PORT}"]
        mp = await MultipathDevice.open([parse_uri(u) for u in urls], create_size=4 * MiB,
                                        selector="round-robin")
        try:
            data = np.random.default_rng(2).integers(0, 256, MiB, dtype=np.uint8)
            for i in range(4):
                await mp.write(i * MiB, data)
                if i == 1:
                    relay.sever()
            await mp.flush()
            for i in range(4):
                assert np.array_equal(await mp.read(i * MiB, MiB), data)
            # The severed path either reconnected by itself or was failed over; no error either way.
            stats = mp.path_stats()
            assert relay.connections >= 2 or stats[0]["errors"] >= 1, (relay.connections, stats)
        finally:
            await mp.aclose()
            nursery.cancel_scope.cancel()


async def test_different_nfs_files_are_refused(ganesha):
    export = ganesha.export
    urls = [ganesha.url("a.img"), ganesha.url("b.img")]
    for u in urls:
        dev = await MultipathDevice.open([parse_uri(u), parse_uri(u.replace("?", "?path=2&"))],
                                         create_size=MiB)
        await dev.aclose()
    with pytest.raises(ConfigError, match="different storage"):
        await MultipathDevice.open([parse_uri(u) for u in urls])
    assert export.exists()


async def test_vectored_io_over_two_nfs_paths(ganesha):
    """writev / readv_into through both paths (round-robin), a failed path and a severed one."""
    async with trio.open_nursery() as nursery:
        relay = RpcRelay()
        port = await nursery.start(relay.serve)
        export = ganesha.export
        urls = [f"nfs://127.0.0.1{export}/vec.img?nfsport={port}&mountport={MOUNT_PORT}&timeout=2",
                f"nfs://127.0.0.1{export}/vec.img?nfsport={NFS_PORT}&mountport={MOUNT_PORT}"]
        mp = await MultipathDevice.open([parse_uri(u) for u in urls], create_size=8 * MiB,
                                        selector="round-robin")
        try:
            sizes = [700, MiB + 300_000, 12_345, 2 * MiB - 313_045]  # 3 MiB; one view over wsize
            total = sum(sizes)
            data = np.random.default_rng(3).integers(0, 256, 2 * total, dtype=np.uint8)
            for i in range(2):
                await mp.writev(i * total, ViewSet(sizes, strided=(1,)).fill(data[i * total:]).views)
            assert [p["ios"] for p in mp.path_stats()] == [1, 1]
            for i in range(2):
                dst = ViewSet(sizes, strided=(2,))
                await mp.readv_into(i * total, dst.views)
                assert np.array_equal(dst.joined(), data[i * total:(i + 1) * total])
                assert dst.outside_untouched()
            await mp.flush()
            mp.fail_path(1)
            relay.sever()  # path 0 reconnects by itself (or would fail over): no error either way
            await mp.writev(0, ViewSet(sizes).fill(data[total:]).views)
            await mp.flush()
            await mp.reinstate_path(1)
            for _ in range(2):
                dst = ViewSet(sizes)
                await mp.readv_into(0, dst.views)
                assert np.array_equal(dst.joined(), data[total:])
        finally:
            await mp.aclose()
            nursery.cancel_scope.cancel()
    expect = np.concatenate([data[total:], data[total:]])
    with open(ganesha.path("vec.img"), "rb") as f:
        assert f.read(2 * total) == expect.tobytes()


async def test_a_range_rewritten_through_the_other_path_never_reads_stale(ganesha):
    """Each NFS path keeps its own unstable writes; a newer write through another path wins (no flush between)."""
    export = ganesha.export
    url = f"nfs://127.0.0.1{export}/rr.img?nfsport={NFS_PORT}&mountport={MOUNT_PORT}"
    mp = await MultipathDevice.open([parse_uri(url), parse_uri(url + "&path=2")], create_size=4 * MiB,
                                    selector="round-robin")
    try:
        rng = np.random.default_rng(8)
        versions = [rng.integers(0, 256, MiB, dtype=np.uint8) for _ in range(4)]
        for data in versions:  # alternate paths, same range, nothing committed in between
            await mp.write(MiB, data)
            await mp.write(MiB + 4096, data[:8192])  # a partial overlap too
        want = versions[-1].copy()
        want[4096 : 4096 + 8192] = versions[-1][:8192]
        for _ in range(4):  # reads alternate over both paths
            assert np.array_equal(await mp.read(MiB, MiB), want)
        assert all(p["ios"] > 0 for p in mp.path_stats())
        await mp.flush()
    finally:
        await mp.aclose()
    with open(ganesha.path("rr.img"), "rb") as f:
        f.seek(MiB)
        assert f.read(MiB) == want.tobytes()


@pytest.mark.parametrize("restart", [False, True], ids=["same-server", "server-restarted"])
async def test_flush_through_the_survivor_commits_what_the_dead_path_wrote(ganesha, restart):
    """Writes acknowledged UNSTABLE through a path that then died are COMMITted (or resent after a
    server restart) by a flush through the surviving path, not left to the dead one."""
    async with trio.open_nursery() as nursery:
        relay = RpcRelay()
        port = await nursery.start(relay.serve)
        export = ganesha.export
        name = f"dead-{int(restart)}.img"
        urls = [f"nfs://127.0.0.1{export}/{name}?nfsport={port}&mountport={MOUNT_PORT}&timeout=2",
                f"nfs://127.0.0.1{export}/{name}?nfsport={NFS_PORT}&mountport={MOUNT_PORT}"]
        mp = await MultipathDevice.open([parse_uri(u) for u in urls], create_size=4 * MiB,
                                        policy="failover", no_path_retry=30.0)
        try:
            data = np.random.default_rng(7).integers(0, 256, 2 * MiB, dtype=np.uint8)
            await mp.write(0, data)  # through path 0 only (failover), UNSTABLE
            b = mp.paths[1].dev
            assert [p["ios"] for p in mp.path_stats()] == [1, 0] and b.stats["commits"] == 0
            relay.sever()
            mp.fail_path(0)
            if restart:
                ganesha.restart()  # a new write verifier: what path 0 wrote must be resent
            await mp.flush()
            assert b.stats["commits"] >= 1
            if restart:
                assert b.stats["resent_ranges"] >= 1
            assert np.array_equal(await mp.read(0, 2 * MiB), data)
        finally:
            await mp.aclose()
            nursery.cancel_scope.cancel()
    with open(ganesha.path(name), "rb") as f:
        assert f.read(2 * MiB) == data.tobytes()
