"""The whole stack: fio through a FUSE mount of a vstore pool, next to its three baselines.

Run ``python -m bench.stack [--quick]`` as root. One file of the same size on each of:

- ``vstore``: a volume of a raid5 pool of five file members (chunk 64 KiB, so a
  1 MiB request is four full stripes), mounted with ``vstore mount --foreground``;
- ``plain file``: a file on the same disk, no FUSE (the disk and page cache);
- ``FUSE ceiling``: the empty pyfuse3 filesystem of ``bench.fuse_ceiling`` (reads
  return a zero buffer, writes are dropped): pyfuse3 and the kernel alone;
- ``qemu FUSE``: qemu-storage-daemon's FUSE export of a plain file on the same
  disk (``driver=file`` + ``raw``), the closest existing peer.

Jobs: 1 MiB sequential write and read and 4 KiB random read at queue depth 8
(libaio), once with ``--direct=1`` and once buffered (psync, so depth 1; the
buffered write ends with an fsync, the buffered read drops the file's cache
first). Each job is time based and runs on every target in turn before the next
job, so a noisy neighbour slows them alike. Every mount is unmounted and every
process stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.layouts import scratch_dir

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20

_DIRECT = ["--direct=1", "--ioengine=libaio", "--iodepth=8"]
_BUFFERED = ["--direct=0", "--ioengine=psync"]
JOBS: dict[str, list[str]] = {
    "direct seq write 1M qd8": ["--rw=write", "--bs=1M", *_DIRECT],
    "direct seq read 1M qd8": ["--rw=read", "--bs=1M", *_DIRECT],
    "direct rand read 4K qd8": ["--rw=randread", "--bs=4k", *_DIRECT],
    "buffered seq write 1M": ["--rw=write", "--bs=1M", *_BUFFERED, "--end_fsync=1"],
    "buffered seq read 1M": ["--rw=read", "--bs=1M", *_BUFFERED, "--invalidate=1"],
    "buffered rand read 4K": ["--rw=randread", "--bs=4k", *_BUFFERED, "--invalidate=1"],
}
QUICK_JOBS = ("direct seq write 1M qd8", "direct seq read 1M qd8", "direct rand read 4K qd8",
              "buffered seq read 1M")
POOL_LEVEL, POOL_MEMBERS, POOL_CHUNK = "raid5", 5, 64 * 1024


def fio(path: Path, job: str, size: int, runtime: float) -> dict:
    """Run one fio job on a file; GB/s, IOPS and mean completion latency of its read or write side."""
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--size={size}", f"--runtime={max(1, int(runtime * 1000))}ms",
           "--time_based", "--output-format=json", "--group_reporting", *JOBS[job]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 4 + 120)
    if res.returncode:
        raise RuntimeError(f"fio failed on {path} ({job}): {res.stderr.strip()[-500:]}")
    side = json.loads(res.stdout)["jobs"][0]["write" if "write" in job else "read"]
    return {"gbs": side["bw_bytes"] / 1e9, "iops": side["iops"],
            "lat_us": side.get("clat_ns", {}).get("mean", 0) / 1000}


def _fuse_stats(volume: Path) -> dict | None:
    """The vstore mount's request counters (``.vstore/fuse-stats`` beside the volume file)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((volume.parent / ".vstore" / "fuse-stats").read_text())
    return None


def _wait_for(path: Path, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if path.exists() and (path.stat().st_size > 0):
                return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: {path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)


def _is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == target:
                return True
    return False


def _stop(proc: subprocess.Popen | None, mountpoint: Path | None) -> None:
    """SIGTERM our own process (then SIGKILL), then lazily unmount what may be left."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if mountpoint is not None and _is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


class Stack:
    """Sets up the four targets in a scratch directory and tears every one down."""

    def __init__(self, size: int, log) -> None:
        self.size = size
        self.log = log
        self.dir = scratch_dir()
        self.home = self.dir / "home"
        self.procs: list[tuple[subprocess.Popen, Path | None]] = []
        self.targets: dict[str, Path] = {}
        self.missing: dict[str, str] = {}
        self.vstore_mp: Path | None = None
        self.vstore_proc: subprocess.Popen | None = None

    def _vstore(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        exe = Path(sys.executable).with_name("vstore")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from vstore.cli import main; main()"]
        res = subprocess.run([*cmd, "--home", str(self.home), *args], capture_output=True, text=True,
                             timeout=300, cwd=ROOT)
        if check and res.returncode:
            raise RuntimeError(f"vstore {' '.join(args[:2])} failed: {res.stderr.strip()}")
        return res

    def start(self) -> None:
        """Create the plain files and the pool, start the three FUSE servers."""
        plain = self.dir / "plain.img"
        with open(plain, "wb") as f:
            f.truncate(self.size)
        self.targets["plain file"] = plain
        self._start_vstore()
        self._start_ceiling()
        self._start_qemu()

    def _start_vstore(self) -> None:
        member = self.size // (POOL_MEMBERS - 1) + 64 * MiB  # room for metadata and extent rounding
        uris = [f"file://{self.dir}/d{i}.img" for i in range(POOL_MEMBERS)]
        self.log(f"stack: creating a {POOL_LEVEL} pool of {POOL_MEMBERS} file members")
        self._vstore("create", "bench", "--level", POOL_LEVEL, "--chunk", str(POOL_CHUNK),
                     "--size", str(member), *uris)
        self._vstore("volume", "create", "bench", "vol", "--size", str(self.size))
        mp = self.dir / "vstore-mnt"
        mp.mkdir()
        exe = Path(sys.executable).with_name("vstore")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from vstore.cli import main; main()"]
        logf = open(self.dir / "vstore-mount.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([*cmd, "--home", str(self.home), "mount", "--foreground", "bench", str(mp)],
                                stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
        logf.close()
        self.vstore_proc, self.vstore_mp = proc, mp
        self.procs.append((proc, mp))
        _wait_for(mp / "vol", proc, "vstore mount")
        self.targets["vstore"] = mp / "vol"

    def _start_ceiling(self) -> None:
        mp = self.dir / "ceiling-mnt"
        mp.mkdir()
        proc = subprocess.Popen([sys.executable, "-m", "bench.fuse_ceiling", "--serve", "ceiling", str(mp),
                                 "--size", str(self.size)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append((proc, mp))
        _wait_for(mp / "vol", proc, "FUSE ceiling")
        self.targets["FUSE ceiling"] = mp / "vol"

    def _start_qemu(self) -> None:
        qsd = shutil.which("qemu-storage-daemon")
        if qsd is None:
            self.missing["qemu FUSE"] = "qemu-storage-daemon not installed (Debian qemu-system-common)"
            return
        image = self.dir / "qemu.img"
        with open(image, "wb") as f:
            f.truncate(self.size)
        mp = self.dir / "qemu-export"  # the export's mountpoint is a regular file
        mp.touch()
        logf = open(self.dir / "qemu.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([
            qsd,
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=raw,node-name=raw0,file=file0",
            "--export", f"type=fuse,id=exp0,node-name=raw0,mountpoint={mp},writable=on",
        ], stdout=logf, stderr=subprocess.STDOUT)  # fmt: skip
        logf.close()
        self.procs.append((proc, mp))
        try:
            _wait_for(mp, proc, "qemu-storage-daemon")
        except RuntimeError as e:
            log = (self.dir / "qemu.log").read_text(errors="replace").strip()
            self.missing["qemu FUSE"] = f"{e}: {log[-300:]}"
            return
        self.targets["qemu FUSE"] = mp

    def stop(self) -> None:
        """Unmount vstore cleanly (flush, close), stop every server, remove the scratch directory."""
        if self.vstore_mp is not None and self.vstore_proc is not None and self.vstore_proc.poll() is None:
            with contextlib.suppress(Exception):
                self._vstore("umount", str(self.vstore_mp), check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.vstore_proc.wait(timeout=30)
        for proc, mp in reversed(self.procs):
            with contextlib.suppress(Exception):
                _stop(proc, mp)
        shutil.rmtree(self.dir, ignore_errors=True)


def run(quick: bool, log=print) -> dict:
    """Run every fio job on every target, interleaved; results, ratios and target checks."""
    if shutil.which("fio") is None:
        raise RuntimeError("fio is not installed")
    size = (64 if quick else 1024) * MiB
    runtime = 0.5 if quick else 4.0
    jobs = list(QUICK_JOBS) if quick else list(JOBS)
    stack = Stack(size, log)
    results: dict[str, dict[str, dict]] = {}
    try:
        stack.start()
        results = {name: {} for name in stack.targets}
        # Untimed warm-up: fills every file once and lets the vstore mount compile its
        # kernels (numba, on first use) before anything is measured.
        log("stack: warm-up (untimed)")
        for path in stack.targets.values():
            fio(path, "direct seq write 1M qd8", size, 0.3 if quick else 1.5)
        for job in jobs:
            log(f"stack: {job}")
            for name, path in stack.targets.items():
                before = _fuse_stats(path) if name == "vstore" else None
                results[name][job] = res = fio(path, job, size, runtime)
                after = _fuse_stats(path) if before else None
                if before and after:
                    # What the vstore mount received: the request size after the kernel's FUSE layer.
                    side = "write" if "write" in job else "read"
                    count = after[side]["count"] - before[side]["count"]
                    nbytes = after[side]["bytes"] - before[side]["bytes"]
                    if count > 0:
                        res["fuse_requests"] = count
                        res["fuse_avg_request_kib"] = nbytes / count / 1024
    finally:
        stack.stop()
    ratios: dict[str, dict[str, float | None]] = {}
    for job in jobs:
        v = results.get("vstore", {}).get(job)
        key = "iops" if "4K" in job else "gbs"
        ratios[job] = {}
        for short, name in (("plain", "plain file"), ("ceiling", "FUSE ceiling"), ("qemu", "qemu FUSE")):
            b = results.get(name, {}).get(job)
            ratios[job][short] = v[key] / b[key] if v and b and b[key] else None
    checks = []
    rd = "direct seq read 1M qd8"
    if ratios.get(rd, {}).get("ceiling"):
        checks.append({"check": "vstore FUSE direct 1M seq read / empty pyfuse3 ceiling", "kind": "file",
                       "value": ratios[rd]["ceiling"], "target": 0.7,
                       "numerator_gbs": results["vstore"][rd]["gbs"],
                       "denominator_gbs": results["FUSE ceiling"][rd]["gbs"]})
    if ratios.get(rd, {}).get("qemu"):
        checks.append({"check": "vstore FUSE direct 1M seq read / qemu-storage-daemon FUSE", "kind": "file",
                       "value": ratios[rd]["qemu"], "target": 1.0,
                       "numerator_gbs": results["vstore"][rd]["gbs"],
                       "denominator_gbs": results["qemu FUSE"][rd]["gbs"]})
    return {
        "size": size,
        "runtime": runtime,
        "pool": {"level": POOL_LEVEL, "members": POOL_MEMBERS, "chunk": POOL_CHUNK, "kind": "file"},
        "jobs": {job: JOBS[job] for job in jobs},
        "targets": list(results),
        "results": results,
        "ratios": ratios,
        "checks": checks,
        "missing": stack.missing,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the whole-stack benchmark alone and print its table."""
    from bench import report

    ap = argparse.ArgumentParser(prog="python -m bench.stack", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    report.show_stack(run(args.quick))


if __name__ == "__main__":
    main()
