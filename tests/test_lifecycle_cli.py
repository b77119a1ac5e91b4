"""Member lifecycle through the CLI: file members, and a mounted pool in use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.fuse_helpers import force_unmount
from vstore.cli.main import cli
from vstore.consistency.metadata import DATA_OFFSET
from vstore.errors import VstoreError
from vstore.io.aio import unwrap

MiB = 1 << 20


def vstore(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the CLI in this process (click's runner; a subprocess per command costs seconds).

    As ``vstore`` (vstore.cli.main.main) does, a VstoreError becomes one line on stderr and its
    exit code; output is not a terminal, so progress comes as plain lines on stderr.
    """
    res = CliRunner().invoke(cli, ["--home", str(home), *args])
    code, err = res.exit_code, res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        leaf = unwrap(res.exception)
        if not isinstance(leaf, VstoreError):
            raise res.exception
        code, err = leaf.exit_code, err + f"vstore: error: {leaf}\n"
    proc = subprocess.CompletedProcess(["vstore", *args], code, res.stdout, err)
    if check and code != 0:
        raise AssertionError(f"vstore {' '.join(args)} failed ({code}): {err}")
    return proc


def vstore_process(home: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the real `vstore` program (a subprocess)."""
    env = dict(os.environ, VSTORE_HOME=str(home))
    env.pop("VSTORE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "vstore.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def status(home: Path, pool: str = "p") -> dict:
    return json.loads(vstore(home, "status", pool, "--json").stdout)


def corrupt(path: Path, offset: int, length: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in old))


def test_cli_replace_spare_scrub(tmp_path: Path) -> None:
    home, d = tmp_path / "home", tmp_path
    uris = [f"file://{d}/d{i}.img" for i in range(5)]
    data = np.random.default_rng(1).integers(0, 256, 9 * MiB, dtype=np.uint8).tobytes()
    (d / "in.raw").write_bytes(data)
    vstore(home, "create", "p", "--level", "raid6", "--size", "24M", "--chunk", "16K", *uris)
    vstore(home, "import", "p", "img", str(d / "in.raw"))

    # A failed member replaced by a new file: waits for the rebuild, with progress on stderr.
    vstore(home, "fail", "p", "2")
    res = vstore(home, "replace", "p", "2", f"file://{d}/n2.img", "--size", "24M")
    assert "rebuilt onto" in res.stdout and "pool is clean" in res.stdout
    assert "rebuild member 2" in res.stderr and "100.0%" in res.stderr

    # A hot spare is taken by the command that failed the member.
    res = vstore(home, "spare", "add", "p", f"file://{d}/s0.img", "--size", "24M")
    assert f"1 spare(s): file://{d}/s0.img" in res.stdout
    res = vstore(home, "fail", "p", "3")
    assert "rebuild member 3 onto a spare" in res.stderr
    st = status(home)
    assert st["state"] == "clean" and st["members"][3]["uri"] == f"file://{d}/s0.img"
    assert st["members"][2]["uri"] == f"file://{d}/n2.img" and st["spares"] == []

    # Scrub: a corruption found and named (1), repaired (0), clean again (0).
    corrupt(d / "d1.img", DATA_OFFSET + 16384 * 3 + 5000, 300)
    res = vstore(home, "scrub", "p", check=False)
    assert res.returncode == 1, res.stderr
    assert "1 mismatch(es)" in res.stdout and "member 1 at fault" in res.stdout
    res = vstore(home, "scrub", "p", "--repair", "--json", check=False)
    js = json.loads(res.stdout)
    assert res.returncode == 0 and js["mismatches"] == js["repaired"] == 1
    assert js["found"][0]["culprit"] == 1 and js["found"][0]["offset"] == DATA_OFFSET + 16384 * 3 + 4096

    # Replace of a healthy member is an online move (like pvmove); --background needs a mount.
    res = vstore(home, "replace", "p", "4", f"file://{d}/m4.img", "--size", "24M", "--background")
    assert "not mounted" in res.stderr and "moved to" in res.stdout
    vstore(home, "export", "p", "img", str(d / "out.raw"))
    assert (d / "out.raw").read_bytes()[: len(data)] == data
    st = status(home)
    assert [m["uri"] for m in st["members"]] == [f"file://{d}/{x}.img" for x in
                                                   ("d0", "d1", "n2", "s0", "m4")]

    # Errors: one line, exit 2 or more (a scrub's 1 means mismatches).
    res = vstore(home, "replace", "p", "9", f"file://{d}/z.img", check=False)
    assert res.returncode == 2 and "members 0..4, not 9" in res.stderr
    res = vstore_process(home, "scrub", "nosuch")  # the real program: one line, exit 2
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr


needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                                reason="needs /dev/fuse and fusermount3")


def _wait(home: Path, pred, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = status(home)
        if pred(st):
            return st
        assert time.monotonic() < deadline, f"timed out; last status {st}"
        time.sleep(0.2)


@needs_fuse
def test_cli_lifecycle_on_a_mounted_pool_in_use(tmp_path: Path) -> None:
    """Through the mount process: background replace while writing, spare takeover, scrub, move."""
    home, d, mp = tmp_path / "home", tmp_path, tmp_path / "mnt"
    mp.mkdir()
    uris = [f"file://{d}/d{i}.img" for i in range(4)]
    rng = np.random.default_rng(3)
    vstore(home, "create", "p", "--level", "raid5", "--size", "32M", "--chunk", "16K", *uris)
    vstore(home, "volume", "create", "p", "v", "--size", "16M")
    model = bytearray(16 * MiB)
    try:
        res = vstore_process(home, "mount", "p", str(mp))  # forks the mount process
        assert res.returncode == 0, res.stderr
        fd = os.open(mp / "v", os.O_RDWR)
        try:
            def write_some(count: int) -> None:
                for _ in range(count):
                    n = int(rng.integers(1, 256 * 1024))
                    off = int(rng.integers(0, len(model) - n))
                    buf = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                    os.pwrite(fd, buf, off)
                    model[off : off + n] = buf
                os.fsync(fd)

            write_some(40)
            vstore(home, "fail", "p", "1")
            res = vstore(home, "replace", "p", "1", f"file://{d}/n1.img", "--size", "32M",
                         "--background", "--speed-max", "8M")
            assert "started in the mount process" in res.stdout
            st = status(home)
            assert st["operation"]["kind"] == "rebuild" and st["members"][1]["state"] == "rebuilding"
            write_some(40)  # the pool is in use while it rebuilds
            mounted = json.loads((mp / ".vstore" / "status").read_text())
            assert mounted["operation"]["kind"] == "rebuild"
            st = _wait(home, lambda s: s["members"][1]["state"] == "active")
            assert st["state"] == "clean" and st["operation"]["state"] == "done"

            # A hot spare, taken by the mount process when a member fails.
            vstore(home, "spare", "add", "p", f"file://{d}/s0.img", "--size", "32M")
            vstore(home, "fail", "p", "2")
            write_some(20)
            # Clean once the member is active; the takeover operation ends a moment later.
            st = _wait(home, lambda s: s["state"] == "clean"
                       and (s.get("operation") or {}).get("state") != "running")
            assert st["members"][2]["uri"] == f"file://{d}/s0.img" and st["spares"] == []

            # A background scrub stopped half way resumes from its checkpoint; then a move,
            # following progress through the mount until done.
            vstore(home, "scrub", "p", "--background", "--speed-max", "16M")
            time.sleep(1.0)
            assert "operation stopped" in vstore(home, "stop", "p").stdout
            assert status(home)["operation"]["state"] == "interrupted"
            res = vstore(home, "scrub", "p")
            assert "0 mismatch(es)" in res.stdout and "resumed at unit" in res.stdout
            res = vstore(home, "move", "p", "0", f"file://{d}/m0.img", "--size", "32M")
            assert "moved to" in res.stdout
            write_some(20)
            assert os.pread(fd, len(model), 0) == bytes(model)
        finally:
            os.close(fd)
        vstore(home, "umount", str(mp))
    finally:
        if (mp / ".vstore").exists():
            vstore(home, "umount", str(mp), check=False)
        force_unmount(mp)
    st = status(home)
    assert st["state"] == "clean"
    assert [m["uri"] for m in st["members"]] == [f"file://{d}/{x}.img" for x in ("m0", "n1", "s0", "d3")]
    assert vstore(home, "scrub", "p").returncode == 0


def _kill_mount(home: Path, mp: Path) -> None:
    """kill -9 the mount process of pool p, then clear its dead FUSE mount."""
    import signal

    from fuse_mount.daemon import mounted_pool_socket
    from vstore.pool import control

    pid = control.call_sync(mounted_pool_socket(home, "p"), {"cmd": "mount-info"})["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (mounted_pool_socket(home, "p") is not None
                                           or os.path.exists(f"/proc/{pid}")):
        time.sleep(0.05)
    vstore(home, "umount", str(mp))


@needs_fuse
@pytest.mark.parametrize("operation", ["rebuild", "move"])
def test_kill9_mount_during_an_operation_then_remount(tmp_path: Path, operation: str) -> None:
    """kill -9 the mount while it rebuilds (journal) or moves (bitmap) a member; the remount resumes it."""
    home, d, mp = tmp_path / "home", tmp_path, tmp_path / "mnt"
    mp.mkdir()
    uris = [f"file://{d}/d{i}.img" for i in range(4)]
    jr = ["--journal", f"file://{d}/j.img", "--journal-size", "8M"] if operation == "rebuild" else []
    vstore(home, "create", "p", "--level", "raid5", "--size", "16M", "--chunk", "16K", *jr, *uris)
    vstore(home, "volume", "create", "p", "v", "--size", "32M")
    rng = np.random.default_rng(7)
    model = bytearray(rng.integers(0, 256, 32 * MiB, dtype=np.uint8).tobytes())
    target = d / "n1.img"
    try:
        assert vstore_process(home, "mount", "p", str(mp)).returncode == 0
        fd = os.open(mp / "v", os.O_RDWR)
        try:
            os.pwrite(fd, bytes(model), 0)
            os.fsync(fd)
            if operation == "rebuild":
                vstore(home, "fail", "p", "1")
            vstore(home, operation if operation == "move" else "replace", "p", "1", f"file://{target}",
                   "--size", "16M", "--background", "--speed-max", "1M")
            for _ in range(30):  # acknowledged while the operation runs
                n = int(rng.integers(1, 64 * 1024))
                off = int(rng.integers(0, len(model) - n))
                buf = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                os.pwrite(fd, buf, off)
                model[off : off + n] = buf
            os.fsync(fd)
        finally:
            os.close(fd)
        st = _wait(home, lambda s: (s["operation"] or {}).get("percent", 0) >= 25)
        assert st["operation"]["kind"] == operation and st["operation"]["state"] == "running"
        _kill_mount(home, mp)

        st = status(home)  # read-only: the operation is on record, past its first checkpoint
        assert st["operation"]["kind"] == operation and st["operation"]["state"] == "interrupted"
        assert st["operation"]["cursor"] > 0
        if operation == "move":  # the pending target is marked: not taken for another pool
            res = vstore(home, "create", "q", "--level", "raid0", f"file://{target}", check=False)
            assert res.returncode != 0 and "already belongs to vstore pool" in res.stderr
            assert st["members"][1]["uri"] == uris[1]

        assert vstore_process(home, "mount", "p", str(mp)).returncode == 0  # recovers, then resumes
        st = _wait(home, lambda s: (s["operation"] or {}).get("state") == "done")
        key = "resumed_at_row" if operation == "rebuild" else "resumed_at_region"
        assert st["operation"][key] > 0, st["operation"]
        assert st["recovered"] is True and st["state"] == "clean"
        assert st["members"][1]["uri"] == f"file://{target}" and st["members"][1]["state"] == "active"
        assert (mp / "v").read_bytes() == bytes(model)  # every acknowledged write
        vstore(home, "umount", str(mp))
    finally:
        if (mp / ".vstore").exists():
            vstore(home, "umount", str(mp), check=False)
        force_unmount(mp)
    res = vstore(home, "scrub", "p")
    assert "0 mismatch(es)" in res.stdout
    st = status(home)
    assert st["state"] == "clean" and st["members"][1]["uri"] == f"file://{target}"
