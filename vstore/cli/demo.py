"""`make demo`: the main job end to end, each step a real `vstore` command.

Builds a raid5 pool from four sparse local files, imports a generated file into
a volume, fails a member, exports the volume and proves it byte-identical; then
mounts the pool through FUSE, puts ext4 on the volume file through a loop
device, copies files in, fails a second-level member drill, reads them back,
unmounts and runs e2fsck.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

WORK = Path(os.environ.get("VSTORE_DEMO_DIR", "demo-work")).absolute()


def sh(*args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    """Run a command, echoing it as a user would type it."""
    print(f"\n$ {shlex.join(args)}", flush=True)
    proc = subprocess.run(args, text=True, capture_output=True)
    if not quiet and proc.stdout:
        print(proc.stdout.rstrip())
    if proc.stderr.strip():
        print(proc.stderr.rstrip())
    if check and proc.returncode != 0:
        sys.exit(f"demo: step failed (exit {proc.returncode}): {shlex.join(args)}")
    return proc


def vstore(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the vstore CLI of this environment."""
    return sh(sys.executable, "-m", "vstore.cli.main", *args, check=check)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def part_one() -> None:
    """Pool, volume, import, failure, export, status."""
    disks = WORK / "disks"
    disks.mkdir(parents=True)
    members = [f"file://{disks}/disk{i}.img" for i in range(4)]
    vstore("create", "demo", "--level", "raid5", "--chunk", "64K", "--size", "256M", *members)
    src = WORK / "payload.bin"
    with open(src, "wb") as f:
        f.write(os.urandom(48 << 20))
    vstore("import", "demo", "data", str(src))
    vstore("volume", "list", "demo")
    vstore("fail", "demo", "2")
    out = WORK / "exported.bin"
    vstore("export", "demo", "data", str(out))
    a, b = sha256(src), sha256(out)
    print(f"\nsha256 imported {a}\nsha256 exported {b}")
    if a != b:
        sys.exit("demo: exported volume differs from the imported file")
    print("exported volume is byte-identical to the imported file, with member 2 failed")
    vstore("status", "demo")


def part_two() -> None:
    """FUSE mount, ext4 on a loop device, a member failure underneath, e2fsck."""
    disks = WORK / "disks6"
    disks.mkdir(parents=True)
    members = [f"file://{disks}/disk{i}.img" for i in range(5)]
    vstore("create", "fsdemo", "--level", "raid6", "--size", "128M", *members)
    vstore("volume", "create", "fsdemo", "fs", "--size", "192M")
    mnt = WORK / "mnt"
    ext = WORK / "ext4"
    mnt.mkdir()
    ext.mkdir()
    vstore("mount", "fsdemo", str(mnt))
    loop_mounted = False
    try:
        sh("ls", "-l", str(mnt))
        sh("mkfs.ext4", "-q", "-F", str(mnt / "fs"))
        sh("mount", "-o", "loop", str(mnt / "fs"), str(ext))
        loop_mounted = True
        files = {}
        for i in range(8):
            p = ext / f"file{i}.bin"
            p.write_bytes(os.urandom((1 + i) << 20))
            files[p.name] = sha256(p)
        shutil.copytree(Path(__file__).parent, ext / "vstore-source")
        sh("sync")
        vstore("fail", "fsdemo", "1")
        vstore("fail", "fsdemo", "3")
        sh("umount", str(ext))
        loop_mounted = False
        sh("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches", check=False)
        sh("mount", "-o", "loop,ro", str(mnt / "fs"), str(ext))
        loop_mounted = True
        for name, digest in files.items():
            if sha256(ext / name) != digest:
                sys.exit(f"demo: {name} differs after two members failed")
        print(f"all {len(files)} files read back intact with members 1 and 3 failed (raid6)")
        sh("df", "-h", str(ext))
        sh("umount", str(ext))
        loop_mounted = False
        sh("e2fsck", "-fn", str(mnt / "fs"))
        sh("cat", str(mnt / ".vstore" / "status"))
    finally:
        if loop_mounted:
            subprocess.run(["umount", "-l", str(ext)], check=False)
        vstore("umount", str(mnt), check=False)
    vstore("status", "fsdemo")


def main() -> None:
    """Run the demo in a fresh work directory."""
    if WORK.exists():
        subprocess.run(["umount", "-l", str(WORK / "ext4")], capture_output=True)
        subprocess.run(["fusermount3", "-u", "-z", str(WORK / "mnt")], capture_output=True)
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    os.environ["VSTORE_HOME"] = str(WORK / "home")
    print(f"vstore demo in {WORK} (VSTORE_HOME={WORK / 'home'})")
    part_one()
    if "--no-fuse" not in sys.argv:
        part_two()
    print("\ndemo finished: every check passed")


if __name__ == "__main__":
    main()
