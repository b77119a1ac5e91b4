"""Multipath against a real tgtd: one LUN over two paths, each through a TCP relay the test can cut.

The relays make path failure deterministic: ``cut()`` closes every relayed
connection and refuses new ones (as a dead link would), ``restore()`` lets
logins through again. tgtd also listens on 127.0.0.2 for the CLI test, which
gives the member as two plain portals of one LUN.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import trio

from tests.vectors import ViewSet
from vstore.errors import ConfigError, NoPathError, OutOfRangeError
from vstore.stack.multipath import MultipathDevice
from vstore.testing.iscsi_target import TgtServer, free_port
from vstore.uri import parse_uri

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("tgtd") is None and not os.path.exists("/usr/sbin/tgtd"),
                       reason="tgtd not installed"),
]

LUN_SIZE = 64 << 20
IQN = "iqn.2026-11.test:multipath"
SPLITS: dict[str, dict] = {}  # the load-balance splits, printed at the end of the module


@pytest.fixture(scope="module")
def tgt():
    """tgtd on 127.0.0.1:P and 127.0.0.2:P; target 1 with LUN 1 (64 MiB) and LUN 2 (other storage)."""
    port = free_port()
    srv = TgtServer(port=port, extra=f"portal=127.0.0.2:{port}")
    srv.start()
    try:
        srv.add_target(IQN, tid=1)
        srv.add_lun(1, 1, LUN_SIZE, scsi_id="vstore-mp-lun1", scsi_sn="MPSN0001")
        srv.add_lun(1, 2, 8 << 20, scsi_id="vstore-mp-lun2", scsi_sn="MPSN0002")
        yield srv
    finally:
        srv.stop()
        if SPLITS:
            print("\nload-balance splits (bytes per path):", json.dumps(SPLITS), file=sys.stderr)


class Relay:
    """A loopback TCP relay to one portal that the test can cut and restore."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.up = True
        self.scopes: set[trio.CancelScope] = set()
        self.accepted = 0
        self.cut_after: int | None = None  # cut() once this many more bytes went to the target

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        if not self.up:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self.scopes.add(scope)
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                async with client, upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope, True)
                    nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope, False)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self.scopes.discard(scope)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope,
                    to_target: bool) -> None:
        try:
            while data := await src.receive_some(1 << 20):
                await dst.send_all(data)
                if to_target and self.cut_after is not None:
                    self.cut_after -= len(data)
                    if self.cut_after <= 0:
                        self.cut_after = None
                        self.cut()  # mid-request: the rest never reaches the target
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()  # one direction ending ends the connection

    def cut(self) -> None:
        """Drop every relayed connection and refuse new ones."""
        self.up = False
        for scope in list(self.scopes):
            scope.cancel()

    def restore(self) -> None:
        """Let connections through again."""
        self.up = True

    def url(self, lun: int = 1) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{IQN}/{lun}"


async def start_relays(nursery: trio.Nursery, tgt: TgtServer, n: int = 2) -> list[Relay]:
    relays = [Relay(tgt.port) for _ in range(n)]
    for r in relays:
        await nursery.start(r.run)
    return relays


async def open_mp(urls: list[str], **options) -> MultipathDevice:
    return await MultipathDevice.open([parse_uri(u) for u in urls], **options)


def block(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


async def wait_for(cond, timeout: float = 15.0, what: str = "condition") -> None:
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------- tests


async def test_two_luns_as_paths_of_one_member_are_refused(tgt):
    with pytest.raises(ConfigError, match="reach different storage"):
        await open_mp([f"iscsi://127.0.0.1:{tgt.port}/{IQN}/1", f"iscsi://127.0.0.2:{tgt.port}/{IQN}/2"])


async def test_sustained_io_survives_a_cut_path_and_uses_it_again(tgt):
    """Reads and writes while path 0 is cut and restored: no error, nothing lost, traffic moves."""
    async with trio.open_nursery() as nursery:
        relays = await start_relays(nursery, tgt)
        mp = await open_mp([r.url() for r in relays], selector="round-robin", check_interval=0.2,
                           no_path_retry=20.0)
        await nursery.start(mp.run_background)
        workers, region, io = 6, 2 << 20, 64 << 10
        models = [np.zeros(region, dtype=np.uint8) for _ in range(workers)]
        stop = trio.Event()
        counts = {"writes": 0, "reads": 0}

        async def worker(w: int) -> None:
            rng = np.random.default_rng(w)
            base = w * region
            k = 0
            while not stop.is_set():
                off = int(rng.integers(0, region // io)) * io
                if rng.random() < 0.6:
                    data = block(w * 100000 + k, io)
                    await mp.write(base + off, data)
                    models[w][off:off + io] = data  # acknowledged: must never be lost
                    counts["writes"] += 1
                else:
                    got = await mp.read(base + off, io)
                    assert np.array_equal(got, models[w][off:off + io]), f"worker {w} read at {off}"
                    counts["reads"] += 1
                k += 1

        async with trio.open_nursery() as load:
            for w in range(workers):
                load.start_soon(worker, w)
            await trio.sleep(1.0)
            before = [p.ios for p in mp.paths]
            assert min(before) > 0, before
            relays[0].cut()
            await wait_for(lambda: mp.paths[0].state == "failed", what="path 0 to fail")
            await trio.sleep(0.2)  # replies already received before the cut may still complete
            cut_ios = [p.ios for p in mp.paths]
            await trio.sleep(1.5)
            during = [p.ios - c for p, c in zip(mp.paths, cut_ios, strict=True)]
            assert during[0] == 0 and during[1] > 20, during  # all traffic on the survivor
            relays[0].restore()
            await wait_for(lambda: mp.paths[0].state == "active", what="path 0 to return")
            back = [p.ios for p in mp.paths]
            await trio.sleep(1.0)
            after = [p.ios - b for p, b in zip(mp.paths, back, strict=True)]
            assert after[0] > 20 and after[1] > 20, after  # the returned path carries traffic again
            stop.set()
        await mp.flush()
        stats = mp.path_stats()
        assert stats[0]["errors"] >= 1 and stats[1]["errors"] == 0
        for w in range(workers):
            got = await mp.read(w * region, region)
            assert np.array_equal(got, models[w]), f"worker {w} lost an acknowledged write"
        await mp.aclose()
        nursery.cancel_scope.cancel()
    # And the LUN's backing file holds the same bytes (through no vstore code at all).
    with open(tgt.targets[1].luns[1].path, "rb") as f:
        for w in range(workers):
            f.seek(w * region)
            assert f.read(region) == models[w].tobytes()
    print(f"\nsustained I/O: {counts['writes']} writes, {counts['reads']} reads; "
          f"path stats {[(s['state'], s['ios'], s['errors']) for s in stats]}", file=sys.stderr)


async def test_path_cut_during_writev_completes_on_the_other(tgt):
    """A writev whose path is cut mid-transfer completes on the other path; vectored reads agree."""
    async with trio.open_nursery() as nursery:
        relays = await start_relays(nursery, tgt)
        mp = await open_mp([r.url() for r in relays], selector="round-robin", check_interval=0.2)
        await nursery.start(mp.run_background)
        burst = mp.paths[0].dev.session.params.max_burst
        sizes = [512 + 100, burst + 4096 - 100, 3 * burst, 24 * 1024, (2 << 20) - 8 * 512, 8 * 512]
        total = sum(sizes)
        assert total % 512 == 0 and max(sizes) > burst
        off = 40 << 20
        data = block(70, total)
        mp._rr = 1  # the next request goes to path 0
        relays[0].cut_after = total // 3  # cut once a third of the request went out on it
        await mp.writev(off, ViewSet(sizes, strided=(1, 4)).fill(data).views)
        stats = mp.path_stats()
        assert stats[0]["state"] == "failed" and stats[0]["errors"] == 1, stats
        assert stats[1]["ios"] == 1 and stats[1]["bytes"] == total, stats
        assert np.array_equal(await mp.read(off, total), data)
        dst = ViewSet(sizes, strided=(0, 3))
        await mp.readv_into(off, dst.views)
        assert np.array_equal(dst.joined(), data) and dst.outside_untouched()
        relays[0].restore()
        await wait_for(lambda: mp.paths[0].state == "active", what="path 0 to return")
        # Both paths again: vectored writes over the same range (the fence is lifted) and reads.
        new = block(71, total)
        for _ in range(2):
            await mp.writev(off, ViewSet(sizes).fill(new).views)
            dst.clear()
            await mp.readv_into(off, dst.views)
            assert np.array_equal(dst.joined(), new)
        assert all(p["ios"] > 1 for p in mp.path_stats())
        # Misaligned: the path refuses it as a request error (like write), and stays in service.
        for views in ([np.zeros(100, np.uint8)], [np.zeros(256, np.uint8), np.zeros(300, np.uint8)]):
            with pytest.raises(OutOfRangeError, match="512-byte blocks"):
                await mp.writev(off, views)
            with pytest.raises(OutOfRangeError, match="512-byte blocks"):
                await mp.readv_into(off, views)
        assert all(p["state"] == "active" for p in mp.path_stats())
        await mp.flush()
        await mp.aclose()
        nursery.cancel_scope.cancel()
    with open(tgt.targets[1].luns[1].path, "rb") as f:
        f.seek(off)
        assert f.read(total) == new.tobytes()


async def test_both_paths_cut_fails_after_no_path_retry(tgt):
    async with trio.open_nursery() as nursery:
        relays = await start_relays(nursery, tgt)
        mp = await open_mp([r.url() for r in relays], check_interval=0.2, no_path_retry=2.0)
        await nursery.start(mp.run_background)
        await mp.write(0, block(1, 4096))
        for r in relays:
            r.cut()
        t0 = trio.current_time()
        with pytest.raises(NoPathError, match="no usable path"):
            await mp.read(0, 4096)
        elapsed = trio.current_time() - t0
        assert 1.9 <= elapsed <= 6.0, elapsed
        t1 = trio.current_time()
        with pytest.raises(NoPathError):
            await mp.write(0, block(2, 4096))  # the grace is spent: at once
        assert trio.current_time() - t1 < 0.5
        relays[1].restore()
        await wait_for(lambda: mp.paths[1].state == "active", what="path 1 to return")
        assert np.array_equal(await mp.read(0, 4096), block(1, 4096))
        await mp.aclose()
        nursery.cancel_scope.cancel()


async def test_path_returning_within_no_path_retry_completes_io(tgt):
    async with trio.open_nursery() as nursery:
        relays = await start_relays(nursery, tgt)
        mp = await open_mp([r.url() for r in relays], check_interval=0.2, no_path_retry=15.0)
        await nursery.start(mp.run_background)
        for r in relays:
            r.cut()
        data = block(3, 1 << 20)
        done = trio.Event()

        async def writer() -> None:
            await mp.write(8 << 20, data)
            done.set()

        nursery.start_soon(writer)
        await trio.sleep(1.5)
        assert not done.is_set()
        relays[0].restore()
        with trio.fail_after(10):
            await done.wait()
        assert np.array_equal(await mp.read(8 << 20, 1 << 20), data)
        await mp.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("selector", ["round-robin", "queue-length", "service-time"])
async def test_load_balance_two_healthy_paths(tgt, selector):
    async with trio.open_nursery() as nursery:
        relays = await start_relays(nursery, tgt)
        mp = await open_mp([r.url() for r in relays], selector=selector)
        io, per_worker, workers = 256 << 10, 24, 8

        async def worker(w: int) -> None:
            for k in range(per_worker):
                off = ((w * per_worker + k) * io) % (LUN_SIZE - io)
                if k % 2:
                    await mp.write(off, block(k, io))
                else:
                    await mp.read(off, io)

        async with trio.open_nursery() as load:
            for w in range(workers):
                load.start_soon(worker, w)
        split = [p.bytes for p in mp.paths]
        total = sum(split)
        SPLITS[selector] = {"bytes": split, "share": [round(b / total, 3) for b in split]}
        print(f"\n{selector}: path bytes {split} shares {SPLITS[selector]['share']}", file=sys.stderr)
        assert total == workers * per_worker * io
        assert min(split) >= 0.3 * total, split  # a fair share each
        await mp.aclose()
        nursery.cancel_scope.cancel()


def test_cli_create_status_and_path_drills(tgt, tmp_path):
    env = {**os.environ, "VSTORE_HOME": str(tmp_path / "home")}
    vstore = [sys.executable, "-m", "vstore.cli.main"]

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([*vstore, *args], env=env, capture_output=True, text=True, timeout=120)
        if ok:
            assert r.returncode == 0, r.stderr
        return r

    member = f"iscsi://127.0.0.1:{tgt.port}/{IQN}/1,iscsi://127.0.0.2:{tgt.port}/{IQN}/1"
    run("create", "mp", "--level", "linear", "--selector", "queue-length", "--no-path-retry", "5",
        "--force", member)
    st = json.loads(run("status", "mp", "--json").stdout)
    paths = st["members"][0]["paths"]
    assert [p["uri"] for p in paths] == member.split(",")
    assert all(p["state"] == "active" and p["selector"] == "queue-length" for p in paths)
    text = run("status", "mp").stdout
    assert "paths" in text and "127.0.0.2" in text
    r = run("path", "fail", "mp", "0", "1")
    assert "path 1 failed" in r.stdout and "is failed" in r.stdout
    r = run("path", "reinstate", "mp", "0", member.split(",")[1])
    assert "is active" in r.stdout
    r = run("path", "fail", "mp", "0", "7", ok=False)
    assert r.returncode == 2 and "paths 0..1" in r.stderr
    bad = f"iscsi://127.0.0.1:{tgt.port}/{IQN}/1,iscsi://127.0.0.2:{tgt.port}/{IQN}/2"
    r = run("create", "mp2", "--level", "linear", "--force", bad, ok=False)
    assert r.returncode == 2 and "different storage" in r.stderr
