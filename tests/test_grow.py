"""Pools that grow (issue 19): `vstore grow --add` (linear, raid1) and `--members-grew`, through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import trio

from tests.fuse_helpers import force_unmount
from tests.test_lifecycle_cli import _kill_mount, _wait, needs_fuse, status, vstore, vstore_process
from vstore.consistency.metadata import DATA_OFFSET
from vstore.errors import ConfigError

MiB = 1 << 20


def _data(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _wait_pool(home: Path, pool: str, pred, timeout: float = 60) -> dict:
    """The pool's status once pred holds for it."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(home, pool)
        if pred(st):
            return st
        assert time.monotonic() < deadline, f"timed out; last status {st}"
        time.sleep(0.2)


def _data_areas(files: list[Path]) -> list[bytes]:
    """Each member's data area and size."""
    return [f.read_bytes()[DATA_OFFSET:] for f in files]


def _roundtrip(home: Path, d: Path, data: bytes, name: str = "v") -> None:
    """The volume's first bytes are data (exported through a file)."""
    out = d / f"out-{name}.raw"
    out.unlink(missing_ok=True)
    vstore(home, "export", "p", name, str(out))
    assert out.read_bytes()[: len(data)] == data


def test_grow_linear_add_then_resize_into_the_new_space(tmp_path: Path) -> None:
    home, d = tmp_path / "home", tmp_path
    vstore(home, "create", "p", "--level", "linear", "--size", "10M", f"file://{d}/a.img", f"file://{d}/b.img")
    size0 = status(home)["size"]
    data = _data(12 * MiB, 1)
    (d / "in.raw").write_bytes(data)
    vstore(home, "import", "p", "v", str(d / "in.raw"))

    res = vstore(home, "grow", "p", "--add", f"file://{d}/c.img", f"file://{d}/e.img", "--size", "10M")
    assert "members 2, 3 added" in res.stdout
    st = status(home)
    assert st["size"] == size0 + 2 * 8 * MiB and st["state"] == "clean"
    assert [m["uri"] for m in st["members"]] == [f"file://{d}/{x}.img" for x in "abce"]
    assert all(m["state"] == "active" for m in st["members"])

    # The new space takes a volume's growth and a new volume; old bytes stay where they were.
    vstore(home, "volume", "resize", "p", "v", "--size", "16M")
    more = _data(10 * MiB, 2)
    (d / "in2.raw").write_bytes(more)
    vstore(home, "import", "p", "w", str(d / "in2.raw"))
    _roundtrip(home, d, data)
    _roundtrip(home, d, more, "w")
    # The pool reopens from its members alone (record and metadata agree on four members).
    vstore(home, "forget", "p")
    vstore(home, "import-pool", f"file://{d}/a.img")
    st = status(home)
    assert len(st["members"]) == 4 and st["size"] == size0 + 16 * MiB
    _roundtrip(home, d, data)


def test_grow_refusals_are_one_line_and_change_nothing(tmp_path: Path) -> None:
    home, d = tmp_path / "home", tmp_path
    vstore(home, "create", "p", "--level", "linear", "--size", "8M", f"file://{d}/a.img")
    vstore(home, "create", "q", "--level", "raid10", "--size", "8M",
           *[f"file://{d}/q{i}.img" for i in range(2)])
    files = sorted(d.glob("*.img"))
    before = _data_areas(files)
    cases = [
        (["grow", "p", "--add", f"file://{d}/a.img"], "already a member"),
        (["grow", "p", "--add", f"file://{d}/n.img", f"file://{d}/n.img", "--size", "8M"], "given twice"),
        (["grow", "p", "--add", f"file://{d}/t.img", "--size", "1M"], "too small"),
        (["grow", "p", "--add", f"file://{d}/nosuch.img"], "no such file"),
        (["grow", "p"], "--members-grew"),
        (["grow", "p", "--add"], "at least one uri"),
        (["grow", "q", "--add", f"file://{d}/q3.img", "--size", "8M", "--level", "raid5"], "converts a raid1"),
        (["grow", "q", "--members-grew", f"file://{d}/x.img"], "takes no uri"),
    ]
    for args, words in cases:
        res = vstore(home, *args, check=False)
        assert res.returncode != 0, args
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and words.lower() in lines[0].lower(), (args, res.stderr)
    assert sorted(d.glob("*.img")) == files  # no file left behind
    assert _data_areas(files) == before  # (opening a pool commits its owner token: metadata moves)
    assert len(status(home)["members"]) == 1 and len(status(home, "q")["members"]) == 2


def test_grow_raid1_adds_a_mirror_rebuilt_from_the_others(tmp_path: Path) -> None:
    home, d = tmp_path / "home", tmp_path
    vstore(home, "create", "p", "--level", "raid1", "--size", "16M", "--chunk", "16K",
           f"file://{d}/a.img", f"file://{d}/b.img")
    data = _data(9 * MiB, 3)
    (d / "in.raw").write_bytes(data)
    vstore(home, "import", "p", "v", str(d / "in.raw"))
    size0 = status(home)["size"]
    res = vstore(home, "grow", "p", "--add", f"file://{d}/c.img", f"file://{d}/e.img", "--size", "16M")
    assert "mirror(s) 2, 3 added and copied" in res.stdout and "pool is clean" in res.stdout
    assert "grow" in res.stderr and "100.0%" in res.stderr  # progress
    st = status(home)
    assert st["size"] == size0 and [m["state"] for m in st["members"]] == ["active"] * 4
    assert vstore(home, "scrub", "p").returncode == 0
    # The last new mirror alone holds the data: the three others failed.
    for i in range(3):
        vstore(home, "fail", "p", str(i))
    _roundtrip(home, d, data)


def test_members_grew_raid5_zeroes_the_new_rows_and_resizes(tmp_path: Path) -> None:
    home, d = tmp_path / "home", tmp_path
    files = [d / f"m{i}.img" for i in range(4)]
    vstore(home, "create", "p", "--level", "raid5", "--size", "10M", "--chunk", "16K",
           *[f"file://{f}" for f in files])
    data = _data(20 * MiB, 4)
    (d / "in.raw").write_bytes(data)
    vstore(home, "import", "p", "v", str(d / "in.raw"))
    size0 = status(home)["size"]
    res = vstore(home, "grow", "p", "--members-grew")
    assert "nothing to do" in res.stdout
    # The devices grow; one had garbage where its new rows are (a reused LUN): zeroed.
    for f in files:
        os.truncate(f, 18 * MiB)
    with open(files[2], "r+b") as fh:
        fh.seek(14 * MiB)
        fh.write(_data(MiB, 5))
    res = vstore(home, "grow", "p", "--members-grew", "--json")
    js = json.loads(res.stdout)
    assert js["grown_members"] == [0, 1, 2, 3] and js["added_bytes"] > 0
    st = status(home)
    assert st["size"] == size0 + js["added_bytes"] and st["size"] >= size0 + 3 * 8 * MiB - 3 * 4 * MiB
    assert all(m["data_size"] == 16 * MiB for m in st["members"])
    vstore(home, "volume", "resize", "p", "v", "--size", f"{st['size'] // MiB - 1}M")
    assert vstore(home, "scrub", "p").returncode == 0
    _roundtrip(home, d, data)


def test_members_grew_linear_takes_the_last_member_only(tmp_path: Path) -> None:
    home, d = tmp_path / "home", tmp_path
    vstore(home, "create", "p", "--level", "linear", "--size", "8M", f"file://{d}/a.img", f"file://{d}/b.img")
    data = _data(10 * MiB, 6)
    (d / "in.raw").write_bytes(data)
    vstore(home, "import", "p", "v", str(d / "in.raw"))
    size0 = status(home)["size"]
    os.truncate(d / "a.img", 12 * MiB)
    res = vstore(home, "grow", "p", "--members-grew")
    assert "nothing to do" in res.stdout and "only grow its last member" in res.stderr
    os.truncate(d / "b.img", 16 * MiB)
    res = vstore(home, "grow", "p", "--members-grew")
    assert "members 1 grew" in res.stdout
    st = status(home)
    assert st["size"] == size0 + 8 * MiB
    assert [m["data_size"] for m in st["members"]] == [6 * MiB, 14 * MiB]
    _roundtrip(home, d, data)


def test_members_grew_refuses_a_pool_with_block_checksums(tmp_path: Path) -> None:
    """Their area sits at the tail of each member's data window: growing in place would leave it inside."""
    from vstore.ops.grow import add, members_grew
    from vstore.pool.home import Home
    from vstore.pool.pool import Pool

    home, d = tmp_path / "home", tmp_path
    vstore(home, "create", "p", "--level", "raid1", "--size", "8M", f"file://{d}/a.img", f"file://{d}/b.img")
    for f in ("a", "b"):
        os.truncate(d / f"{f}.img", 12 * MiB)

    async def main() -> None:
        pool = await Pool.open(Home(home), "p")
        try:
            pool.meta["checksums"] = {"block": 4096}
            with pytest.raises(ConfigError, match="checksums"):
                await members_grew(pool)
            with pytest.raises(ConfigError, match="checksums"):  # nor a new mirror (its window's tail)
                await add(pool, [f"file://{d}/c.img"], size=12 * MiB)
            assert not (d / "c.img").exists()
            assert pool.members[0].data_size == 6 * MiB
        finally:
            pool.meta.pop("checksums")
            await pool.aclose()

    trio.run(main)
    assert status(home)["members"][0]["data_size"] == 6 * MiB


# --------------------------------------------------------------------------- mounted


needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")


def _fio(path: Path, size_mib: int, seed: int, *, verify_only: bool = False) -> subprocess.Popen:
    """fio writing a verify pattern over the file and checking it back (crc32c), a few passes."""
    return subprocess.Popen(
        ["fio", "--name=grow", f"--filename={path}", f"--size={size_mib}M", "--rw=randwrite", "--bs=16k",
         "--ioengine=psync", "--iodepth=1", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
         f"--randseed={seed}", "--output-format=terse",
         "--verify_state_save=0", *(["--verify_only"] if verify_only else ["--loops=4"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=path.parent.parent)


def _fio_ok(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out, err)
    assert "verify" not in err.lower(), err


@needs_fuse
@needs_fio
def test_grow_mounted_pools_while_fio_verifies(tmp_path: Path) -> None:
    """Each level grown by one member in its mount while fio --verify runs; then members-grew."""
    home, d = tmp_path / "home", tmp_path
    for level in ("linear", "raid1", "raid0", "raid5", "raid6", "raid10", "raid1-to-raid5"):
        mp = d / f"mnt-{level}"
        mp.mkdir()
        pool = f"p{level}"
        n = {"raid5": 3, "raid6": 4}.get(level, 2)
        convert = ["--level", "raid5"] if level == "raid1-to-raid5" else []
        vstore(home, "create", pool, "--level", level.split("-")[0], "--size", "16M", "--chunk", "16K",
               *[f"file://{d}/{level}{i}.img" for i in range(n)])
        vstore(home, "volume", "create", pool, "v", "--size", "12M")
        try:
            assert vstore_process(home, "mount", pool, str(mp)).returncode == 0
            fio = _fio(mp / "v", 12, 11)
            try:
                res = vstore(home, "grow", pool, "--add", f"file://{d}/{level}-new.img", "--size", "16M",
                             "--speed-max", "8M", "--background", *convert)
                assert fio.poll() is None, "fio ended before the grow: nothing ran alongside"
                if level != "linear":  # the copy (raid0: the reshape) runs in the mount, fio still writing
                    assert "started in the mount process" in res.stdout
                    st = _wait_pool(home, pool, lambda s: (s["operation"] or {}).get("state") == "done")
                    assert st["operation"]["kind"] == ("grow" if level == "raid1" else "reshape")
                    assert st["operation"]["added_members"] == [n]
                else:
                    assert "members 2 added" in res.stdout
                st = json.loads(vstore(home, "status", pool, "--json").stdout)
                assert len(st["members"]) == n + 1 and st["state"] == "clean"
                assert st["level"] == ("raid5" if convert else level)
                if level == "linear":  # the new space is there at once, while mounted
                    vstore(home, "volume", "resize", pool, "v", "--size", "40M")
                    assert os.path.getsize(mp / "v") == 40 * MiB
                    os.truncate(d / f"{level}-new.img", 32 * MiB)
                    res = vstore(home, "grow", pool, "--members-grew")
                    assert "members 2 grew" in res.stdout
                else:
                    for i in range(n + 1):
                        os.truncate(d / (f"{level}{i}.img" if i < n else f"{level}-new.img"), 32 * MiB)
                    res = vstore(home, "grow", pool, "--members-grew")
                    assert f"members {', '.join(map(str, range(n + 1)))} grew" in res.stdout
                    # Into the space the members grew by (raid0: past what the reshape gave).
                    grown = json.loads(vstore(home, "status", pool, "--json").stdout)["size"]
                    vstore(home, "volume", "resize", pool, "v", "--size", f"{grown // MiB}M")
                    assert os.path.getsize(mp / "v") == grown
            finally:
                _fio_ok(fio)
            _fio_ok(_fio(mp / "v", 12, 11, verify_only=True))  # what the last pass wrote is all there
            vstore(home, "umount", str(mp))
        finally:
            if (mp / ".vstore").exists():
                vstore(home, "umount", str(mp), check=False)
            force_unmount(mp)
        st = status(home, pool)
        assert st["state"] == "clean" and st["size"] >= 28 * MiB  # 12M at create (raid0 24M)
        if level not in ("linear", "raid0"):  # parity and copies agree everywhere, new rows too
            assert vstore(home, "scrub", pool).returncode == 0


@needs_fuse
def test_kill9_mount_while_a_new_mirror_is_copied_then_resume(tmp_path: Path) -> None:
    """kill -9 the mount during the copy of a mirror added by grow; the remount resumes and finishes it."""
    home, d, mp = tmp_path / "home", tmp_path, tmp_path / "mnt"
    mp.mkdir()
    vstore(home, "create", "p", "--level", "raid1", "--size", "24M", "--chunk", "16K",
           f"file://{d}/a.img", f"file://{d}/b.img")
    vstore(home, "volume", "create", "p", "v", "--size", "20M")
    rng = np.random.default_rng(9)
    model = bytearray(rng.integers(0, 256, 20 * MiB, dtype=np.uint8).tobytes())
    try:
        assert vstore_process(home, "mount", "p", str(mp)).returncode == 0
        fd = os.open(mp / "v", os.O_RDWR)
        try:
            os.pwrite(fd, bytes(model), 0)
            os.fsync(fd)
            vstore(home, "grow", "p", "--add", f"file://{d}/c.img", "--size", "24M", "--background",
                   "--speed-max", "1M")
            for _ in range(30):  # acknowledged while the copy runs
                n = int(rng.integers(1, 64 * 1024))
                off = int(rng.integers(0, len(model) - n))
                buf = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                os.pwrite(fd, buf, off)
                model[off : off + n] = buf
            os.fsync(fd)
        finally:
            os.close(fd)
        st = _wait(home, lambda s: (s["operation"] or {}).get("percent", 0) >= 20)
        assert st["operation"]["kind"] == "grow" and st["operation"]["state"] == "running"
        _kill_mount(home, mp)

        st = status(home)  # on record: the new member, being rebuilt from its checkpoint
        assert st["operation"]["state"] == "interrupted" and st["operation"]["cursor"] > 0
        assert st["operation"]["how"] == "grow" and st["members"][2]["state"] == "rebuilding"

        assert vstore_process(home, "mount", "p", str(mp)).returncode == 0  # recovers, then resumes
        st = _wait(home, lambda s: (s["operation"] or {}).get("state") == "done")
        assert st["operation"]["resumed_at_row"] > 0, st["operation"]
        assert st["state"] == "clean" and st["members"][2]["state"] == "active"
        assert (mp / "v").read_bytes() == bytes(model)
        vstore(home, "umount", str(mp))
    finally:
        if (mp / ".vstore").exists():
            vstore(home, "umount", str(mp), check=False)
        force_unmount(mp)
    assert vstore(home, "scrub", "p").returncode == 0
    vstore(home, "fail", "p", "0")
    vstore(home, "fail", "p", "1")
    out = d / "out.raw"
    vstore(home, "export", "p", "v", str(out))
    assert out.read_bytes() == bytes(model)  # the new mirror alone holds every acknowledged write


def test_grow_raid0_reshapes_onto_the_new_member(tmp_path: Path) -> None:
    home, d = tmp_path / "home", tmp_path
    vstore(home, "create", "p", "--level", "raid0", "--size", "10M", "--chunk", "16K",
           f"file://{d}/a.img", f"file://{d}/b.img")
    data = _data(14 * MiB, 7)
    (d / "in.raw").write_bytes(data)
    vstore(home, "import", "p", "v", str(d / "in.raw"))
    size0 = status(home)["size"]
    res = vstore(home, "grow", "p", "--add", f"file://{d}/c.img", "--size", "10M", "--json")
    js = json.loads(res.stdout)
    assert js["kind"] == "reshape" and (js["from"], js["to"]) == (2, 3) and js["bytes"] == 2 * 8 * MiB
    st = status(home)
    assert st["size"] == js["size"] > size0 and len(st["members"]) == 3 and st["operation"] is None
    _roundtrip(home, d, data)
    # Row 0 is the new geometry: chunk 2 (bytes 32K..48K of the volume's first extent) on the new member.
    assert (d / "c.img").read_bytes()[DATA_OFFSET : DATA_OFFSET + 16384] == data[32768:49152]
    vstore(home, "volume", "resize", "p", "v", "--size", f"{st['size'] // MiB}M")
    res = vstore(home, "grow", "p", "--add", f"file://{d}/e.img", "--size", "10M")
    assert "reshaped from 3 onto 4 members" in res.stdout
    _roundtrip(home, d, data)


def test_grow_raid1_converts_to_raid5_by_adding_a_member(tmp_path: Path) -> None:
    """md's raid1 -> raid5: the level changes (a 2-member raid5 is the mirror's bytes), then a 2 -> 3 reshape."""
    home, d = tmp_path / "home", tmp_path
    vstore(home, "create", "p", "--level", "raid1", "--size", "12M", "--chunk", "16K",
           f"file://{d}/a.img", f"file://{d}/b.img")
    data = _data(7 * MiB, 12)
    (d / "in.raw").write_bytes(data)
    vstore(home, "import", "p", "v", str(d / "in.raw"))
    size0 = status(home)["size"]
    files = sorted(d.glob("*.img"))
    before = _data_areas(files)
    for args, words in [
        (["--add", f"file://{d}/n.img", "--size", "12M", "--level", "raid6"], "raid1 pool of two members to raid5"),
        (["--members-grew", "--level", "raid5"], "--level goes with --add"),
    ]:
        res = vstore(home, "grow", "p", *args, check=False)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode != 0 and len(lines) == 1 and words.lower() in lines[0].lower(), res.stderr
    assert sorted(d.glob("*.img")) == files and _data_areas(files) == before

    res = vstore(home, "grow", "p", "--add", f"file://{d}/c.img", "--size", "12M", "--level", "raid5", "--json")
    js = json.loads(res.stdout)
    assert (js["kind"], js["level"], js["converted_from"], js["from"], js["to"]) == ("reshape", "raid5", "raid1", 2, 3)
    st = status(home)
    assert st["level"] == "raid5" and len(st["members"]) == 3 and st["size"] >= 2 * size0
    assert st["state"] == "clean" and st["operation"] is None
    _roundtrip(home, d, data)
    assert "0 mismatch" in vstore(home, "scrub", "p").stdout
    # Row 0 is raid5 over three members: chunks 0 and 1 on members 0 and 1, P = their XOR on the new one.
    C = 16384
    p = np.frombuffer(data[:C], np.uint8) ^ np.frombuffer(data[C : 2 * C], np.uint8)
    assert (d / "c.img").read_bytes()[DATA_OFFSET : DATA_OFFSET + C] == p.tobytes()
    vstore(home, "fail", "p", "0")  # degraded raid5: the rest rebuilt from parity
    _roundtrip(home, d, data)
    # Two members of a raid1 are needed: a three-way mirror is refused in one line.
    vstore(home, "create", "q", "--level", "raid1", "--size", "12M", *[f"file://{d}/q{i}.img" for i in range(3)])
    res = vstore(home, "grow", "q", "--add", f"file://{d}/q3.img", "--size", "12M", "--level", "raid5", check=False)
    assert res.returncode != 0 and "with two members" in res.stderr and not (d / "q3.img").exists()
    assert status(home, "q")["level"] == "raid1"


@needs_fuse
@pytest.mark.parametrize("level", ["raid0", "raid5", "raid10", "raid1-to-raid5"])
def test_kill9_mount_during_a_reshape_then_resume(tmp_path: Path, level: str) -> None:
    """kill -9 the mount while a pool is reshaped under writes; the remount resumes and finishes it."""
    home, d, mp = tmp_path / "home", tmp_path, tmp_path / "mnt"
    mp.mkdir()
    count = 3 if level == "raid5" else 2
    size = "24M" if level in ("raid1-to-raid5", "raid10") else "14M"  # a mirror holds one member's worth
    vstore(home, "create", "p", "--level", level.split("-")[0], "--size", size, "--chunk", "16K",
           *[f"file://{d}/m{i}.img" for i in range(count)])
    vstore(home, "volume", "create", "p", "v", "--size", "20M")
    rng = np.random.default_rng(10)
    model = bytearray(rng.integers(0, 256, 20 * MiB, dtype=np.uint8).tobytes())
    try:
        assert vstore_process(home, "mount", "p", str(mp)).returncode == 0
        fd = os.open(mp / "v", os.O_RDWR)
        try:
            os.pwrite(fd, bytes(model), 0)
            os.fsync(fd)
            convert = ["--level", "raid5"] if level == "raid1-to-raid5" else []
            vstore(home, "grow", "p", "--add", f"file://{d}/c.img", "--size", size, "--background",
                   "--speed-max", "2M", *convert)
            for _ in range(30):  # acknowledged while the data moves
                n = int(rng.integers(1, 64 * 1024))
                off = int(rng.integers(0, len(model) - n))
                buf = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                os.pwrite(fd, buf, off)
                model[off : off + n] = buf
            os.fsync(fd)
        finally:
            os.close(fd)
        st = _wait(home, lambda s: (s["operation"] or {}).get("percent", 0) >= 30)
        assert st["operation"]["kind"] == "reshape" and st["operation"]["state"] == "running"
        _kill_mount(home, mp)

        st = status(home)  # on record: the reshape at its last checkpoint
        assert st["operation"]["kind"] == "reshape" and st["operation"]["state"] == "interrupted"
        assert st["operation"]["cursor"] > 0 and len(st["members"]) == count + 1
        assert st["level"] == ("raid5" if level == "raid1-to-raid5" else level)  # converted in the reshape's commit

        assert vstore_process(home, "mount", "p", str(mp)).returncode == 0  # resumes by itself
        st = _wait(home, lambda s: (s["operation"] or {}).get("state") == "done")
        assert st["operation"]["resumed_at_chunk"] > 0, st["operation"]
        assert st["state"] == "clean" and st["size"] >= 32 * MiB
        assert (mp / "v").read_bytes() == bytes(model)
        vstore(home, "umount", str(mp))
    finally:
        if (mp / ".vstore").exists():
            vstore(home, "umount", str(mp), check=False)
        force_unmount(mp)
    out = d / "out.raw"
    vstore(home, "export", "p", "v", str(out))
    assert out.read_bytes() == bytes(model)
    if level != "raid0":
        assert "0 mismatch" in vstore(home, "scrub", "p").stdout
