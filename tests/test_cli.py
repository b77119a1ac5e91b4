"""The vstore CLI through a subprocess: every command, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vstore.consistency.metadata import DATA_OFFSET


def vstore(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the CLI with a private config directory."""
    env = dict(os.environ, VSTORE_HOME=str(home))
    env.pop("VSTORE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "vstore.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"vstore {' '.join(args)} failed: {proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """A user error: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def digest_files(paths: list[Path]) -> list[str]:
    """SHA-256 of each file (to prove nothing changed on disk)."""
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.fixture
def env(tmp_path: Path):
    home = tmp_path / "home"
    disks = tmp_path / "disks"
    disks.mkdir()
    return home, disks


def members(disks: Path, n: int) -> list[str]:
    return [f"file://{disks}/d{i}.img" for i in range(n)]


def test_full_cli_tour(env, tmp_path: Path):
    home, disks = env
    r = vstore(home, "create", "tank", "--level", "raid6", "--size", "24M", *members(disks, 5))
    assert "raid6" in r.stdout
    st = json.loads(vstore(home, "status", "tank", "--json").stdout)
    assert st["level"] == "raid6" and st["state"] == "clean" and len(st["members"]) == 5
    assert all(m["data_offset"] == DATA_OFFSET and m["state"] == "active" for m in st["members"])
    assert "tank" in vstore(home, "list").stdout

    src = tmp_path / "src.bin"
    src.write_bytes(np.random.default_rng(1).integers(0, 256, 5 << 20, dtype=np.uint8).tobytes())
    vstore(home, "import", "tank", "data", str(src))
    vols = json.loads(vstore(home, "volume", "list", "tank", "--json").stdout)
    assert vols == [{"name": "data", "size": 5 << 20}]

    vstore(home, "fail", "tank", "1")
    vstore(home, "fail", "tank", "3")
    st = json.loads(vstore(home, "status", "tank", "--json").stdout)
    assert st["state"] == "degraded"
    assert [m["state"] for m in st["members"]] == ["active", "failed", "active", "failed", "active"]
    out = tmp_path / "out.bin"
    vstore(home, "export", "tank", "data", str(out))
    assert out.read_bytes() == src.read_bytes()
    # A third failure would lose data: refused without --force.
    assert_one_line_error(vstore(home, "fail", "tank", "0", check=False), "without its data")

    vstore(home, "volume", "create", "tank", "scratch", "--size", "3M")
    vstore(home, "volume", "resize", "tank", "scratch", "--size", "9M")
    vols = {v["name"]: v["size"] for v in json.loads(vstore(home, "volume", "list", "tank", "--json").stdout)}
    assert vols == {"data": 5 << 20, "scratch": 9 << 20}
    assert_one_line_error(vstore(home, "volume", "resize", "tank", "scratch", "--size", "1M",
                                 check=False), "shrink")
    vstore(home, "volume", "remove", "tank", "scratch")
    vols = json.loads(vstore(home, "volume", "list", "tank", "--json").stdout)
    assert [v["name"] for v in vols] == ["data"]

    # The pool can be recorded again from its members alone.
    (home / "pools" / "tank.json").unlink()
    assert_one_line_error(vstore(home, "status", "tank", check=False), "not found")
    vstore(home, "import-pool", *members(disks, 5))
    st = json.loads(vstore(home, "status", "tank", "--json").stdout)
    assert st["state"] == "degraded" and [v["name"] for v in st["volumes"]] == ["data"]
    vstore(home, "export", "tank", "data", str(out))
    assert out.read_bytes() == src.read_bytes()


def test_help_for_every_command(env):
    home, _ = env
    for cmd in (["create"], ["status"], ["list"], ["import-pool"], ["fail"], ["import"],
                ["export"], ["volume", "create"], ["volume", "list"], ["volume", "remove"],
                ["volume", "resize"]):
        r = vstore(home, *cmd, "--help")
        assert "Usage:" in r.stdout


def test_bad_create_input(env):
    home, disks = env
    assert_one_line_error(
        vstore(home, "create", "p", "--level", "raid7", *members(disks, 3), check=False), "raid7")
    assert_one_line_error(
        vstore(home, "create", "p", "--level", "raid5", "--size", "16M", *members(disks, 2),
               check=False), "at least 3")
    assert_one_line_error(
        vstore(home, "create", "p", "--level", "raid6", "--size", "16M", *members(disks, 3),
               check=False), "at least 4")
    # Members that do not exist, without --size: nothing is created.
    assert_one_line_error(
        vstore(home, "create", "p", "--level", "raid1", *members(disks, 2), check=False),
        "no such file")
    assert list(disks.iterdir()) == []
    assert_one_line_error(
        vstore(home, "create", "p", "--level", "raid1", "--size", "16M",
               "file:///nonexistent-dir/x.img", f"file://{disks}/a.img", check=False),
        "does not exist")
    assert_one_line_error(
        vstore(home, "create", "p", "--level", "raid1", "--size", "lots", *members(disks, 2),
               check=False), "not a size")
    assert_one_line_error(
        vstore(home, "create", "p", "--level", "raid1", "--size", "16M", "ftp://x/y",
               f"file://{disks}/a.img", check=False), "scheme")
    assert_one_line_error(vstore(home, "create", "bad/name", "--level", "raid1", "--size", "16M",
                                 *members(disks, 2), check=False), "invalid pool name")
    vstore(home, "create", "p", "--level", "raid1", "--size", "16M", *members(disks, 2))
    assert_one_line_error(
        vstore(home, "create", "p", "--level", "raid1", "--size", "16M", *members(disks, 2),
               check=False), "already exists")
    # Members of another pool are not silently overwritten.
    assert_one_line_error(
        vstore(home, "create", "q", "--level", "raid1", "--size", "16M", *members(disks, 2),
               check=False), "already belongs")


def test_bad_volume_input(env, tmp_path: Path):
    home, disks = env
    vstore(home, "create", "p", "--level", "raid5", "--size", "16M", *members(disks, 3))
    assert_one_line_error(vstore(home, "volume", "create", "p", "v", "--size", "1G", check=False),
                          "free")
    vstore(home, "volume", "create", "p", "v", "--size", "4M")
    assert_one_line_error(vstore(home, "volume", "create", "p", "v", "--size", "4M", check=False),
                          "already exists")
    assert_one_line_error(vstore(home, "volume", "remove", "p", "nope", check=False), "not found")
    assert_one_line_error(vstore(home, "status", "nopool", check=False), "not found")
    assert_one_line_error(vstore(home, "fail", "p", "7", check=False), "members 0..2")
    assert_one_line_error(vstore(home, "import", "p", "w", str(tmp_path / "missing"), check=False),
                          "no such file")


def test_corrupt_superblock_is_reported_and_nothing_changes(env):
    home, disks = env
    uris = members(disks, 4)
    vstore(home, "create", "p", "--level", "raid5", "--size", "16M", *uris)
    vstore(home, "volume", "create", "p", "v", "--size", "4M")
    files = sorted(disks.iterdir())
    with open(files[2], "r+b") as f:
        f.seek(40)
        f.write(b"\xde\xad\xbe\xef")
    before = digest_files(files)
    r = vstore(home, "status", "p", "--json", check=False)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    bad = st["members"][2]
    assert bad["state"] == "bad" and "CRC" in bad["error"]
    assert st["state"] == "degraded"
    r = vstore(home, "status", "p", check=False)
    warn = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(warn) == 1 and "member 2" in warn[0] and "CRC" in warn[0]
    assert digest_files(files) == before
    # With two bad members a raid5 pool cannot be opened for writing: clear error, no change.
    with open(files[0], "r+b") as f:
        f.write(b"garbage!")
    before = digest_files(files)
    assert_one_line_error(vstore(home, "volume", "create", "p", "w", "--size", "4M", check=False),
                          "failed members")
    assert digest_files(files) == before


def test_raid6_member_limit_refused_before_any_member_is_touched(env, tmp_path: Path):
    """raid6 of 258 members: two data chunks would share a Q coefficient (issue 15, item 4)."""
    home, disks = env
    r = vstore(home, "create", "wide", "--level", "raid6", "--size", "4M", *members(disks, 258), check=False)
    assert_one_line_error(r, "raid6", "at most 257")
    assert r.returncode == 2
    assert list(disks.iterdir()) == []  # no member file was created
    # 257 is the largest raid6 that every double failure can be recovered from
    from vstore.raid import geometry

    geometry.check_member_count("raid6", 257)


@pytest.mark.parametrize(("uri", "words"), [
    ("iscsi://[::1/iqn.2026-01.x:t/0", ("malformed",)),
    ("file:///tmp/a%00b.img", ("nul",)),
    ("file:///tmp/a.img?bogus=1", ("unknown parameter", "bogus")),
    ("memory://m?size=8M&sise=9M", ("unknown parameter", "sise")),
    ("iscsi://127.0.0.1:0/iqn.2026-01.x:t/0", ("port",)),
    ("nfs://127.0.0.1:0/export/a.img", ("port",)),
    ("file:///tmp/a.img?direct=maybe", ("direct",)),
])
def test_bad_member_uris_are_clean_errors(env, uri: str, words: tuple[str, ...]):
    """Malformed URIs: one line, exit 2, no member file left behind (issue 15, items 12 and 14)."""
    home, disks = env
    r = vstore(home, "create", "p", "--level", "raid1", "--size", "8M", f"file://{disks}/first.img", uri,
               check=False)
    assert_one_line_error(r, *words)
    assert r.returncode == 2
    assert list(disks.iterdir()) == []  # the first member's file, created here, was removed


def test_absurd_size_is_a_clean_error(env):
    home, disks = env
    r = vstore(home, "create", "p", "--level", "raid1", "--size", "99999999P", *members(disks, 2), check=False)
    assert_one_line_error(r, "larger than")
    assert r.returncode == 2 and list(disks.iterdir()) == []


def test_failed_create_removes_the_files_it_created(env):
    """A member that cannot be opened after others were created: those files go again (issue 15, item 14)."""
    home, disks = env
    (disks / "existing.img").write_bytes(b"\0" * (8 << 20))
    r = vstore(home, "create", "p", "--level", "raid5", "--size", "8M", f"file://{disks}/new0.img",
               f"file://{disks}/existing.img", f"file://{disks}/missing-dir/x.img", check=False)
    assert r.returncode != 0
    assert sorted(p.name for p in disks.iterdir()) == ["existing.img"]  # never removes what it did not make


def test_stale_member_copy_is_never_read_and_is_rebuilt(env, tmp_path: Path):
    """An old copy of a member put back: shown stale, never read, rebuilt in place (issue 15, item 1)."""
    import shutil

    home, disks = env
    uris = members(disks, 3)
    vstore(home, "create", "p", "--level", "raid5", "--size", "24M", *uris)
    rng = np.random.default_rng(21)
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    second.write_bytes(rng.integers(0, 256, 5 << 20, dtype=np.uint8).tobytes())
    vstore(home, "import", "p", "one", str(first))
    shutil.copyfile(disks / "d1.img", tmp_path / "d1.old")  # a copy of member 1, kept
    vstore(home, "import", "p", "two", str(second))  # more writes the copy misses
    shutil.copyfile(tmp_path / "d1.old", disks / "d1.img")  # the old copy put back

    st = json.loads(vstore(home, "status", "p", "--json").stdout)
    assert st["state"] == "degraded"
    m1 = st["members"][1]
    assert m1["state"] == "stale" and "generation" in m1["error"] and "pool at" in m1["error"], m1
    text = vstore(home, "status", "p")
    assert "stale" in text.stdout and "vstore replace p 1" in text.stderr
    for vol, src in (("one", first), ("two", second)):
        out = tmp_path / f"{vol}.out"
        vstore(home, "export", "p", vol, str(out))
        assert out.read_bytes() == src.read_bytes()  # served from the others, never the stale copy
    # it stays failed once recorded, also after another open
    assert json.loads(vstore(home, "status", "p", "--json").stdout)["members"][1]["state"] != "active"
    # rebuilt in place: the same file as its own replacement
    vstore(home, "replace", "p", "1", uris[1])
    st = json.loads(vstore(home, "status", "p", "--json").stdout)
    assert st["state"] == "clean"
    assert vstore(home, "scrub", "p").returncode == 0
    for vol, src in (("one", first), ("two", second)):
        out = tmp_path / f"{vol}.again"
        vstore(home, "export", "p", vol, str(out))
        assert out.read_bytes() == src.read_bytes()


def test_same_storage_under_another_spelling_is_refused(env, tmp_path: Path):
    """//, ./ and symlinks name one file: refused as a second member or a second spare (issue 15, item 7)."""
    home, disks = env
    (disks / "sub").mkdir()
    r = vstore(home, "create", "p", "--level", "raid1", "--size", "8M", f"file://{disks}/d0.img",
               f"file://{disks}//sub/../d0.img", check=False)
    assert_one_line_error(r, "same storage")
    assert not (disks / "d0.img").exists()  # the file this create made is gone again
    vstore(home, "create", "p", "--level", "raid1", "--size", "8M", *members(disks, 2))
    os.symlink(disks / "d1.img", disks / "d1-alias.img")
    r = vstore(home, "spare", "add", "p", f"file://{disks}/s.img", "--size", "8M")
    r = vstore(home, "spare", "add", "p", f"file://{disks}/./s.img", check=False)
    assert_one_line_error(r, "already a spare")
    st = json.loads(vstore(home, "status", "p", "--json").stdout)
    assert len(st["spares"]) == 1
    r = vstore(home, "spare", "add", "p", f"file://{disks}/d1-alias.img", check=False)
    assert_one_line_error(r, "same storage")


def test_export_onto_and_import_from_a_member_are_refused(env, tmp_path: Path):
    """The output or input of export/import is a member of a known pool: refused, nothing touched (issue 15, item 5)."""
    home, disks = env
    vstore(home, "create", "p", "--level", "raid5", "--size", "16M", *members(disks, 3))
    vstore(home, "create", "q", "--level", "raid1", "--size", "8M", f"file://{disks}/q0.img",
           f"file://{disks}/q1.img")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1 << 20))
    vstore(home, "import", "p", "v", str(src))
    os.symlink(disks / "d1.img", tmp_path / "alias.img")
    files = sorted(disks.iterdir())
    before = digest_files(files)
    for target in (disks / "d1.img", tmp_path / "alias.img", disks / "q0.img"):
        r = vstore(home, "export", "p", "v", str(target), check=False)
        assert_one_line_error(r, "member", "refusing")
        assert r.returncode == 2
        r = vstore(home, "import", "p", "w", str(target), check=False)
        assert_one_line_error(r, "member", "refusing")
    assert digest_files(files) == before
    out = tmp_path / "out.bin"
    vstore(home, "export", "p", "v", str(out))
    assert out.read_bytes()[: 1 << 20] == src.read_bytes()


def test_member_shorter_than_the_data_area_is_failed_and_replaceable(env, tmp_path: Path):
    """A member truncated while the pool was closed: named, the pool opens degraded, replace works (item 6)."""
    home, disks = env
    vstore(home, "create", "p", "--level", "raid5", "--size", "24M", *members(disks, 3))
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(6 << 20))
    vstore(home, "import", "p", "v", str(src))
    os.truncate(disks / "d2.img", 10 << 20)
    st = json.loads(vstore(home, "status", "p", "--json").stdout)
    assert st["state"] == "degraded"
    assert st["members"][2]["state"] == "bad" and "shorter" in st["members"][2]["error"]
    out = tmp_path / "out.bin"
    vstore(home, "export", "p", "v", str(out))
    assert out.read_bytes()[: 6 << 20] == src.read_bytes()
    vstore(home, "replace", "p", "2", f"file://{disks}/n2.img", "--size", "24M")
    assert json.loads(vstore(home, "status", "p", "--json").stdout)["state"] == "clean"
    assert vstore(home, "scrub", "p").returncode == 0


SECRET = "Zq8-very-secret-7Xw"


@pytest.mark.parametrize("args", [
    ("create", "p", "--level", "raid1", "--size", "8M", f"iscsi://alice%{SECRET}@127.0.0.1:99999/iqn.2026-01.x:t/0"),
    ("create", "p", "--level", "raid1", "--size", "8M", f"iscsi://alice%{SECRET}@127.0.0.1:1/iqn.2026-01.x:t/0"),
    ("create", "p", "--level", "raid1", "--size", "8M", f"iscsi://alice%{SECRET}@127.0.0.1/iqn.2026-01.x:t"),
    ("create", "p", "--level", "raid1", "--size", "8M", f"iscsi://alice:{SECRET}@[::1/iqn.2026-01.x:t/0"),
    ("create", "p", "--level", "raid1", "--size", "8M", f"iscsi://alice%{SECRET}@127.0.0.1:1/iqn.x:t/0?bogus=1"),
    ("discover", f"iscsi://alice%{SECRET}@127.0.0.1:1"),
    ("discover", f"nfs://alice:{SECRET}@127.0.0.1/x"),
])
def test_secrets_never_reach_errors(env, args):
    """Every failing path with a secret in the URI: the secret is in no output and no file (issue 15, item 10)."""
    home, disks = env
    full = [*args, f"file://{disks}/d0.img"] if args[0] == "create" else list(args)
    r = vstore(home, *full, check=False)
    assert r.returncode != 0
    assert SECRET not in r.stdout + r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    for f in [*home.rglob("*"), *disks.rglob("*")] if home.exists() else disks.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_config_directory_of_another_user_or_open_to_others_is_refused(tmp_path: Path):
    """--home owned by someone else, writable by others, or a lock file swapped for a symlink (issue 15, item 11)."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 12345, 12345)
    r = vstore(theirs, "list", check=False)
    assert_one_line_error(r, "belongs to uid 12345")
    assert r.returncode == 2 and list(theirs.iterdir()) == []
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    r = vstore(open_dir, "list", check=False)
    assert_one_line_error(r, "writable by others")
    assert list(open_dir.iterdir()) == []
    r = vstore(tmp_path / "no" / "such" / "home", "list", check=False)
    assert_one_line_error(r, "parent does not exist")
    # a lock file replaced by a symlink to a file of root's is not followed
    home = tmp_path / "home"
    disks = tmp_path / "disks"
    disks.mkdir()
    vstore(home, "create", "p", "--level", "raid1", "--size", "8M", *members(disks, 2))
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    lock = home / "locks" / "p.lock"
    lock.parent.mkdir(mode=0o700, exist_ok=True)
    lock.unlink(missing_ok=True)
    os.symlink(victim, lock)
    r = vstore(home, "status", "p", check=False)
    assert_one_line_error(r, "symlink")
    assert victim.read_text() == "keep me"


def test_messages_say_what_is_wrong(env, tmp_path: Path):
    """Export from a failed pool, a device as import source, a small journal, member notes (issue 15, item 12)."""
    home, disks = env
    vstore(home, "create", "p", "--level", "raid0", "--size", "16M", *members(disks, 2))
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1 << 20))
    vstore(home, "import", "p", "v", str(src))
    vstore(home, "fail", "p", "1", "--force")
    r = vstore(home, "export", "p", "v", str(tmp_path / "out.bin"), check=False)
    assert_one_line_error(r, "failed")
    assert "not found" not in r.stderr
    r = vstore(home, "import", "p", "w", "/dev/zero", check=False)
    assert_one_line_error(r, "character device")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = vstore(home, "import", "p", "w", str(fifo), check=False)
    assert_one_line_error(r, "fifo")
    # member notes do not grow "failed: failed: ..." at every open
    notes = {json.loads(vstore(home, "status", "p", "--json").stdout)["members"][1]["error"] for _ in range(3)}
    assert len(notes) == 1 and not next(iter(notes)).startswith("failed: failed")
    r = vstore(home, "create", "q", "--level", "raid5", "--size", "16M", *[f"file://{disks}/q{i}.img" for i in range(3)],
               "--journal", f"file://{disks}/j.img", "--journal-size", "4K", check=False)
    assert_one_line_error(r, "journal", "at least", "--journal-size")
    assert r.returncode == 2
    assert not any(p.name.startswith(("q", "j")) for p in disks.iterdir())  # nothing left behind


def test_import_killed_halfway_leaves_a_volume_marked_incomplete(env, tmp_path: Path):
    """kill -9 during import: the volume says incomplete, and importing again replaces it (issue 15, item 8)."""
    import signal
    import time

    home, disks = env
    vstore(home, "create", "p", "--level", "raid5", "--size", "200M", *members(disks, 3))
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(32):
            f.write(os.urandom(8 << 20))
    env_vars = dict(os.environ, VSTORE_HOME=str(home))
    base = (disks / "d0.img").stat().st_blocks
    proc = subprocess.Popen([sys.executable, "-m", "vstore.cli.main", "import", "p", "img", str(src)], env=env_vars,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill it once data lands on the members (the volume was recorded before the copy began).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if (disks / "d0.img").stat().st_blocks - base > (16 << 20) // 512:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the import finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    st = json.loads(vstore(home, "status", "p", "--json").stdout)
    assert st["volumes"] == [{"name": "img", "size": st["volumes"][0]["size"], "incomplete": True}]
    assert "incomplete" in vstore(home, "volume", "list", "p").stdout
    vstore(home, "import", "p", "img", str(src))  # again: replaces the incomplete one
    st = json.loads(vstore(home, "status", "p", "--json").stdout)
    assert [v.get("incomplete") for v in st["volumes"]] == [None]
    out = tmp_path / "out.bin"
    vstore(home, "export", "p", "img", str(out))
    assert out.read_bytes()[: src.stat().st_size] == src.read_bytes()


def test_forget_destroy_and_volume_rename(env, tmp_path: Path):
    """Housekeeping: forget keeps the members, rename keeps the data, destroy wipes the metadata."""
    home, disks = env
    uris = members(disks, 3)
    vstore(home, "create", "p", "--level", "raid5", "--size", "16M", *uris)
    vstore(home, "spare", "add", "p", f"file://{disks}/spare.img", "--size", "16M")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1 << 20))
    vstore(home, "import", "p", "old", str(src))
    r = vstore(home, "volume", "rename", "p", "old", "new")
    assert "renamed" in r.stdout
    assert vstore(home, "volume", "list", "p").stdout.split("\t")[0] == "new"
    assert_one_line_error(vstore(home, "volume", "rename", "p", "gone", "x", check=False), "not found")
    assert_one_line_error(vstore(home, "volume", "rename", "p", "new", "bad/name", check=False), "name")
    out = tmp_path / "out.bin"
    vstore(home, "export", "p", "new", str(out))
    assert out.read_bytes()[: 1 << 20] == src.read_bytes()

    before = digest_files(sorted(disks.iterdir()))
    vstore(home, "forget", "p")
    assert "no pools" in vstore(home, "list").stdout
    assert digest_files(sorted(disks.iterdir())) == before  # members untouched
    assert_one_line_error(vstore(home, "forget", "p", check=False), "not found")
    vstore(home, "import-pool", *uris)
    assert json.loads(vstore(home, "status", "p", "--json").stdout)["volumes"][0]["name"] == "new"

    r = subprocess.run([sys.executable, "-m", "vstore.cli.main", "destroy", "p"], env=dict(os.environ, VSTORE_HOME=str(home)),
                       capture_output=True, text=True, input="n\n", timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr  # answered no: nothing happens
    assert json.loads(vstore(home, "status", "p", "--json").stdout)["state"] == "clean"
    r = vstore(home, "destroy", "p", "--yes")
    assert "destroyed" in r.stdout
    assert "no pools" in vstore(home, "list").stdout
    for f in [disks / f"d{i}.img" for i in range(3)]:
        assert not any(f.read_bytes()[: 2 << 20])  # superblock and metadata slots are gone
    assert_one_line_error(vstore(home, "import-pool", *uris, check=False), "no vstore member")
