"""A description of the machine and the software a benchmark ran on, for comparing runs."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512bw", "gfni", "vpclmulqdq")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version_of(cmd: list[str], pattern: str = r"(\d+(?:\.\d+)+)") -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else None


def _module_version(name: str) -> str | None:
    try:
        mod = __import__(name)
    except Exception:
        return None
    return str(getattr(mod, "__version__", None) or getattr(mod, "version", None) or "?")


def _py_spy() -> str:
    """py-spy on PATH, else the one beside this Python (a venv's)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else "py-spy")


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe() -> dict:
    """CPU model, cores, memory, kernel, Python/numpy/numba/trio/pyfuse3 versions, fio and QEMU versions."""
    try:
        from vstore.raid import isal

        isal_ok: bool | None = isal.available()
    except Exception:
        isal_ok = None
    return {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "numpy": _module_version("numpy"),
        "numba": _module_version("numba"),
        "trio": _module_version("trio"),
        "pyfuse3": _module_version("pyfuse3"),
        "pyfuse3_nogil_patch": _pyfuse3_patched(),
        "isal": isal_ok,
        "fio": _version_of(["fio", "--version"]),
        "qemu_storage_daemon": _version_of(["qemu-storage-daemon", "--version"]),
        "py_spy": _version_of([_py_spy(), "--version"]),
        "load_average": _load(),
    }


def _os_release() -> str | None:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


if __name__ == "__main__":
    import json

    print(json.dumps(describe(), indent=2))


def _pyfuse3_patched() -> bool:
    """True when pyfuse3 carries scripts/pyfuse3-nogil.patch (its copies run without the GIL)."""
    try:
        import pyfuse3._pyfuse3 as p
    except ImportError:
        return False
    return getattr(p, "VSTORE_NOGIL_PATCH", 0) >= 1
