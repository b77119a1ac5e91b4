"""Mounting at boot: `mount -t vstore` through /sbin/mount.vstore, an fstab line, the systemd unit template."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fuse_mount.daemon import mount_entry
from tests.fuse_helpers import force_unmount
from vstore.cli.boot import vstore_args

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LINK = Path("/sbin/mount.vstore")  # mount(8) looks in /sbin, /sbin/fs.d and /sbin/fs only

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) and /sbin need root")
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                                reason="needs /dev/fuse and fusermount3")


def vstore(home: Path | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The installed `vstore` console script (the one install-helpers links beside)."""
    env = dict(os.environ)
    env.pop("VSTORE_HOME", None)
    if home is not None:
        env["VSTORE_HOME"] = str(home)
    res = subprocess.run([str(BIN / "vstore"), *args], capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert res.returncode == 0, f"vstore {' '.join(args)}: {res.stdout}{res.stderr}"
    return res


@pytest.fixture
def helper_installed(tmp_path: Path):
    """`vstore install-helpers` into /sbin (and a scratch systemd dir); the old /sbin link put back after."""
    old = os.readlink(LINK) if LINK.is_symlink() else None
    if LINK.exists() and old is None:
        pytest.skip(f"{LINK} exists and is not a link: not touching it")
    units = tmp_path / "systemd"
    try:
        res = vstore(None, "install-helpers", "--systemd-dir", str(units))
        assert os.path.realpath(LINK) == os.path.realpath(BIN / "mount.vstore")
        assert f"linked {LINK}" in res.stdout
        yield units
    finally:
        if LINK.is_symlink():
            LINK.unlink()
        if old is not None:
            LINK.symlink_to(old)


@pytest.fixture
def pool(tmp_path: Path):
    """A raid1 pool of two file members holding volume v (3 MB of random data, imported)."""
    home, mp = tmp_path / "home", tmp_path / "mnt"
    mp.mkdir()
    data = random.Random(4).randbytes(3_000_000)
    (tmp_path / "data").write_bytes(data)
    vstore(home, "create", "p", "--level", "raid1", "--size", "16M",
           *[f"file://{tmp_path}/m{i}.img" for i in range(2)])
    vstore(home, "import", "p", "v", str(tmp_path / "data"))
    try:
        yield home, mp, data
    finally:
        if mount_entry(mp) is not None:
            vstore(home, "umount", str(mp), check=False)
        force_unmount(mp)


def _mount(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("VSTORE_HOME", None)  # the pool's home comes from the home= option
    return subprocess.run(["mount", *args], capture_output=True, text=True, env=env, timeout=120)


def _closed_clean(home: Path) -> bool:
    st = json.loads(vstore(home, "status", "p", "--json").stdout)
    log = (home / "logs" / "mount-p.log").read_text()
    return st["owner"] is None and st["state"] == "clean" and "pool p closed (clean)" in log


@pytest.mark.integration
@needs_root
@needs_fuse
@pytest.mark.usefixtures("helper_installed")
def test_mount_t_vstore_read_only_then_umount(pool) -> None:
    """mount -t vstore POOL DIR -o allow_other,ro,home=H: the volume reads back; umount(8) closes the pool clean."""
    home, mp, data = pool
    res = _mount("-t", "vstore", "p", str(mp), "-o", f"allow_other,ro,home={home}")
    assert res.returncode == 0, res.stdout + res.stderr
    entry = mount_entry(mp)
    assert entry is not None
    line = next(s for s in Path("/proc/self/mountinfo").read_text().splitlines() if f" {mp} " in s)
    assert " ro," in line and "allow_other" in line and "fuse.vstore vstore:p" in line
    assert (mp / "v").read_bytes()[: len(data)] == data
    with pytest.raises(OSError) as refused:
        os.open(mp / "v", os.O_WRONLY)
    assert refused.value.errno == errno.EROFS
    res = subprocess.run(["umount", str(mp)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert mount_entry(mp) is None
    for _ in range(100):  # the mount process closes the pool once the kernel ended the session
        if not list((home / "mounts").glob("*.json")):
            break
        subprocess.run(["sleep", "0.1"])
    assert _closed_clean(home)


@pytest.mark.integration
@needs_root
@needs_fuse
@pytest.mark.usefixtures("helper_installed")
def test_an_fstab_line_mounts_writable(pool, tmp_path: Path) -> None:
    """`mount DIR` with an fstab line (the options systemd and mount -a pass along are ignored)."""
    home, mp, data = pool
    fstab = tmp_path / "fstab"
    fstab.write_text(f"p {mp} vstore defaults,_netdev,nofail,x-systemd.after=network-online.target,"
                     f"home={home} 0 0\n")
    res = _mount("-T", str(fstab), str(mp))
    assert res.returncode == 0, res.stdout + res.stderr
    res = _mount("-a", "-T", str(fstab))  # again, as `mount -a` does: mounted already is fine
    assert res.returncode == 0, res.stdout + res.stderr
    assert "already mounted" in res.stderr
    fd = os.open(mp / "v", os.O_RDWR)
    try:
        os.pwrite(fd, b"written through fstab", 1000)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert subprocess.run(["umount", str(mp)], timeout=60).returncode == 0
    for _ in range(100):
        if not list((home / "mounts").glob("*.json")):
            break
        subprocess.run(["sleep", "0.1"])
    out = tmp_path / "out"
    vstore(home, "export", "p", "v", str(out))
    expect = bytearray(data)
    expect[1000:1021] = b"written through fstab"
    assert out.read_bytes()[: len(data)] == bytes(expect)


@pytest.mark.integration
@needs_root
@needs_fuse
@pytest.mark.usefixtures("helper_installed")
def test_bad_option_is_one_line_and_mounts_nothing(pool) -> None:
    home, mp, _ = pool
    res = _mount("-t", "vstore", "p", str(mp), "-o", f"home={home},bogus")
    assert res.returncode != 0
    assert "mount.vstore: unknown option 'bogus'" in res.stderr and "Traceback" not in res.stderr
    assert mount_entry(mp) is None
    res = _mount("-f", "-t", "vstore", "p", str(mp), "-o", f"home={home}")  # fake: checks, mounts nothing
    assert res.returncode == 0 and mount_entry(mp) is None
    res = _mount("-t", "vstore", "p", str(mp), "-o", "home=" + str(home.parent / "nohome"))
    assert res.returncode == 32 and mount_entry(mp) is None  # mount(8)'s "mount failure"
    assert "vstore: error:" in res.stderr and "Traceback" not in res.stderr
    res = _mount("-s", "-t", "vstore", "p", str(mp), "-o", f"home={home},bogus")  # sloppy
    assert res.returncode == 0, res.stderr
    assert mount_entry(mp) is not None
    vstore(home, "umount", str(mp))


def test_option_mapping() -> None:
    assert vstore_args("ro,allow_other,home=/etc/vstore") == (["--home", "/etc/vstore"],
                                                                ["--allow-other", "--read-only"])
    assert vstore_args("defaults,rw,_netdev,nofail,noauto,x-systemd.automount,comment=x") == ([], [])
    assert vstore_args("bogus,ro", sloppy=True) == ([], ["--read-only"])
    from vstore.errors import ConfigError

    for bad in ("bogus", "home=", "uid=3"):
        with pytest.raises(ConfigError):
            vstore_args(bad)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@needs_root
def test_systemd_unit_template_verifies(helper_installed: Path) -> None:
    """The unit install-helpers writes names this vstore and passes `systemd-analyze verify`."""
    unit = helper_installed / "vstore-mount@.service"
    text = unit.read_text()
    assert f"ExecStart={BIN / 'vstore'} mount " in text and f"ExecStop={BIN / 'vstore'} umount " in text
    assert "After=network-online.target" in text and "Wants=network-online.target" in text
    res = subprocess.run(["systemd-analyze", "verify", str(helper_installed / "vstore-mount@tank.service")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    shipped = REPO / "contrib" / "systemd" / "vstore-mount@.service"
    assert shipped.read_text().replace("/usr/local/bin/vstore", str(BIN / "vstore")) == text

