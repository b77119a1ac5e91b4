"""`vstore torture` against a throwaway pool mixing a local file, an NFS file (Ganesha), an iSCSI
LUN (tgtd) and a two-path file member: a short campaign passes; with a layer that drops flushes
it fails with exit 1 and prints a rerun command that fails again; usage errors exit 2."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vstore.testing.iscsi_target import TgtServer
from vstore.testing.nfs_server import Ganesha, ServerError

REPO = Path(__file__).resolve().parent.parent


def torture(*args: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `vstore torture ...` as a user would."""
    env = dict(os.environ, VSTORE_HOME=str(home), PYTHONPATH=str(REPO))
    env.pop("VSTORE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "vstore.cli.main", "torture", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory):
    """Four members: file, NFS, iSCSI, and a file reached over two paths (multipath)."""
    tmp = tmp_path_factory.mktemp("torture")
    try:
        nfs = Ganesha()
    except ServerError as e:
        pytest.skip(str(e))
    tgt = None
    try:
        nfs.start()
        tgt = TgtServer().start()
        t = tgt.add_target("iqn.2026-11.test:torture")
        tgt.add_lun(t.tid, 1, 16 << 20, scsi_id="torture1", scsi_sn="TORT1")
        yield [f"file://{tmp}/d0.img", nfs.url("d1.img"), tgt.url(t.tid, 1),
               f"file://{tmp}/d3.img,file://localhost{tmp}/d3.img"], tmp
    finally:
        if tgt is not None:
            tgt.stop()
        nfs.close()


def test_short_campaign_on_file_nfs_iscsi_passes(members) -> None:
    uris, tmp = members
    res = torture("--level", "raid5", "--time", "10s", "--crashes", "--failures", "--checksums", "--seed", "1",
                  *uris, home=tmp / "home")
    print(res.stdout, res.stderr)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS:" in res.stdout and "(file, nfs, iscsi, file)" in res.stdout
    summary = res.stdout.strip().splitlines()[-1]
    assert "crashes" in summary and " 0 rounds" not in summary


def test_broken_layer_fails_and_its_rerun_fails_again(members) -> None:
    uris, tmp = members
    res = torture("--level", "raid5", "--time", "30s", "--crashes", "--seed", "3",
                  "--wrap", "vstore.testing.faults:DropFlushes", "--shrink-time", "5s",
                  *uris, home=tmp / "home")
    print(res.stdout, res.stderr)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL" in res.stdout and "minimal schedule" in res.stdout
    rerun = next(ln for ln in res.stdout.splitlines() if ln.startswith("rerun: "))
    argv = shlex.split(rerun[len("rerun: "):])
    assert argv[:2] == ["vstore", "torture"] and "--replay" in argv and "--seed" in argv
    again = torture(*argv[2:], home=tmp / "home")
    print(again.stdout, again.stderr)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "FAIL" in again.stdout


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cases = [
        ("file:///tmp/x.img",),  # member URIs without --level
        ("--level", "raid5", "--replay", "w:1", "file:///tmp/x.img"),  # a malformed schedule
        ("--level", "raid5", "--time", "soon", "file:///tmp/x.img"),
        ("nosuchpool", "--crashes"),  # crashes on an existing pool would harm it
        ("nosuchpool", "--checksums"),  # an existing pool has checksums or not
        ("nosuchpool", "--replay", "z:0:1"),  # nor flipped reads
        ("--level", "raid0", "--checksums", "--time", "1s", f"file://{tmp_path}/a.img",
         f"file://{tmp_path}/b.img"),  # no redundancy to heal from
    ]
    for args in cases:
        res = torture(*args, home=home)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr


def test_existing_pool_scratch_volume(tmp_path: Path) -> None:
    """Given a pool's name: workload and checks on a scratch volume, removed afterwards."""
    from tests.test_cli import vstore

    home = tmp_path / "home"
    vstore(home, "create", "tank", "--level", "raid6", "--size", "32M",
           *[f"file://{tmp_path}/p{i}.img" for i in range(4)])
    vstore(home, "volume", "create", "tank", "keep", "--size", "4M")
    res = torture("tank", "--time", "2s", "--seed", "9", home=home)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "scratch volume 'torture-scratch'" in res.stdout and "PASS:" in res.stdout
    listing = vstore(home, "volume", "list", "tank").stdout
    assert "keep" in listing and "torture-scratch" not in listing


def _file_members(tmp: Path, n: int) -> list[str]:
    return [f"file://{tmp}/z{i}.img" for i in range(n)]


def test_silent_corruption_repaired_with_checksums_and_a_finding_without(tmp_path: Path) -> None:
    """--failures flips the bits of member reads (z steps): with --checksums every such read is
    caught and healed (the campaign passes and counts them); the same seed without checksums
    fails, naming the silent corruption and the member, with a rerun line that has the z step."""
    import json

    uris = _file_members(tmp_path, 3)
    args = ("--level", "raid5", "--failures", "--seed", "1", "--rounds", "2", "--time", "60s")
    res = torture(*args, "--checksums", "--json", *uris, home=tmp_path / "home")
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert doc["ok"] and doc["rounds"] == 2 and doc["corruptions"] >= 1
    assert doc["corrupt_reads"] >= 1 and doc["checksum_mismatches"] >= 1 and doc["checksum_repairs"] >= 1
    assert "checksums; seed 1" in res.stderr

    res = torture(*args, "--shrink-time", "3s", *uris, home=tmp_path / "home")
    assert res.returncode == 1, res.stdout + res.stderr
    fail = next(ln for ln in res.stdout.splitlines() if ln.startswith("FAIL"))
    assert "silent corruption not caught: member" in fail and "no checksums" in fail, fail
    rerun = next(ln for ln in res.stdout.splitlines() if ln.startswith("rerun: "))
    assert "z:" in rerun and "--checksums" not in rerun


def test_corrupted_parity_read_in_a_read_modify_write(tmp_path: Path) -> None:
    """A flipped read of row 0's parity (member 3 of a 4-member raid5) while a small write updates
    it: caught by its checksum with --checksums; without, the parity is silently wrong (check c)."""
    uris = _file_members(tmp_path, 4)
    schedule = "w:0:65536:1,f,z:3:1,w:100:10:2,f"
    res = torture("--level", "raid5", "--checksums", "--replay", schedule, *uris, home=tmp_path / "home")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(1 reads flipped by silent corruption, 1 checksum errors" in res.stdout, res.stdout
    res = torture("--level", "raid5", "--replay", schedule, *uris, home=tmp_path / "home")
    assert res.returncode == 1, res.stdout + res.stderr
    assert ("FAIL at step 5: (c) silent corruption not caught: member 3 returned flipped bits on 1 "
            "read(s)") in res.stdout, res.stdout



@pytest.mark.parametrize(("level", "n", "schedule"), [
    # raid6, member 0's reads fail, member 3's return flipped bits: a small write's read-modify-
    # write heals member 3's block from the others, reads member 0 and marks it failed; that
    # MemberFailed escaped the write (now the write retries around member 0).
    ("raid6", 4, "x:0:short:0.521,z:3:3,w:147456:8380:47860"),
    # A three-way mirror, two copies flipped at once: the block was rebuilt from one other copy
    # only, which failed its checksum too (now the next copy is read).
    ("raid1", 3, "w:0:65536:1,f,z:0:2,z:1:2,r:0:65536"),
])
async def test_corruption_healed_where_torture_found_it_was_not(level: str, n: int, schedule: str) -> None:
    """Found by vstore torture --checksums; replayed on memory members (each healed and counted)."""
    from vstore.testing.faults import Rig
    from vstore.testing.torture import PoolTarget, Runner, parse_schedule, run_schedule

    rig = Rig()
    for i in range(n):
        rig.add_memory(f"m{i}", 8 << 20)
    await rig.start()
    runners: list[Runner] = []

    async def make() -> Runner:
        runners.append(Runner(PoolTarget(rig, level, checksums=True), window=256 << 10))
        return runners[-1]

    try:
        out = await run_schedule(make, parse_schedule(schedule))
        assert out.ok, out.message
        st = runners[-1].stats
        assert st.corrupt_reads >= 2 and st.checksum_mismatches >= 2 and st.checksum_repairs >= 1
    finally:
        await rig.aclose()
