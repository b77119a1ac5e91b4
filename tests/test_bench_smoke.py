"""Smoke test of ``python -m bench --quick``: it runs, the JSON has its schema, every figure is positive.

No speed is asserted: figures only have to be positive numbers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration]


def _needs_the_stack() -> None:
    if shutil.which("fio") is None:
        pytest.skip("needs fio")
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("needs /dev/fuse and fusermount3")
    if os.geteuid() != 0:
        pytest.skip("FUSE mounts of the stack benchmark need root")

MACHINE_KEYS = {"cpu", "cores", "memory_bytes", "kernel", "python", "numpy", "numba", "trio", "fio"}
LEVELS = {"linear", "raid0", "raid1", "raid5", "raid6", "raid10"}
# Every key that holds a measured figure, wherever it appears in the report.
FIGURE_KEYS = {"gbs", "iops", "single_gbs", "single_iops", "ratio", "value", "numerator_gbs",
               "denominator_gbs", "numba_gbs", "numpy_gbs", "memcpy_gbs", "isal_gbs", "numba_vs_isal",
               "all_cores_gbs", "fuse_avg_request_kib"}
# Stored as the engine wrote it (the mount's .vstore/fuse-stats): not the benchmark's figures.
NOT_FIGURES = {"fuse_stats"}


def _figures(node, path: str = ""):
    """Yield (path, value) of every figure key in the report, however deep."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in NOT_FIGURES:
                continue
            if k in FIGURE_KEYS:
                yield f"{path}.{k}", v
            else:
                yield from _figures(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _figures(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """`vstore bench --quick --json FILE --out DIR` (the CLI runs the program of `python -m bench`)."""
    _needs_the_stack()
    out = tmp_path_factory.mktemp("bench")
    json_path = out / "report.json"
    proc = subprocess.run([sys.executable, "-m", "vstore.cli.main", "bench", "--quick", "--out", str(out),
                           "--json", str(json_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "layouts.png").stat().st_size > 0
    assert f"wrote {json_path} and {out / 'layouts.png'}" in proc.stdout
    assert not (out / "bench.json").exists()  # --json FILE replaces OUT/bench.json
    return json.loads(json_path.read_text())


def test_top_level_schema(report: dict) -> None:
    assert report["quick"] is True
    assert report["command"].startswith("vstore bench --")
    assert report["layouts"]["chart"].endswith("layouts.png")
    assert report["sections"] == ["kernels", "layouts", "stack"]
    assert report["errors"] == {}
    assert MACHINE_KEYS <= set(report["machine"])
    assert report["machine"]["cores"] >= 1


def test_kernels_schema(report: dict) -> None:
    rows = report["kernels"]["rows"]
    assert {r["op"] for r in rows} >= {"xor_parity", "pq_syndrome", "recover_data2"}
    for r in rows:
        assert r["numba_gbs"] and r["numpy_gbs"] and r["memcpy_gbs"] and r["all_cores_gbs"]


def test_layouts_schema(report: dict) -> None:
    lay = report["layouts"]
    for kind in ("memory", "file"):
        rows = [r for r in lay["rows"] if r["kind"] == kind]
        assert {r["level"] for r in rows} == LEVELS
        workloads = {r["workload"] for r in rows}
        assert {"seq read 1M", "seq write 1M", "degraded read 1M", "rebuild 1 member"} <= workloads
        skipped = {(s["level"], s["workload"]) for s in lay["skipped"] if s["kind"] == kind}
        for level in ("raid1", "raid5", "raid6", "raid10"):
            has_api = any(r["level"] == level and r["workload"] == "rebuild via replace" for r in rows)
            assert has_api or (level, "rebuild via replace") in skipped
        for r in rows:
            assert set(r) >= {"level", "members", "workload", "gbs", "single_gbs", "ratio"}
    checks = {c["check"] for c in lay["checks"]}
    assert any("raid5 full-stripe" in c for c in checks)
    assert any("memory copy" in c for c in checks)
    # Block checksums next to the same layout without, both ways, on both kinds of members.
    assert sum("with block checksums / without" in c for c in checks) == 4  # raid1, raid5 x write, read


def test_stack_schema(report: dict) -> None:
    st = report["stack"]
    assert [g["key"] for g in st["groups"]] == ["tmpfs", "parity", "checksums", "disk"]
    measured = set(st["results"])
    assert {"raid5x5 disk", "raid0x4 disk", "plain disk", "ceiling", "ceiling dflt"} <= measured, st["missing"]
    if "raid0x4 tmpfs" not in st["missing"]:  # a machine without a tmpfs on /dev/shm reports it missing
        assert {"raid0x4 tmpfs", "plain tmpfs", "raid5x5 tmpfs", "raid0x5 tmpfs",
                "raid5x5 tmpfs cksum"} <= measured, st["missing"]
    if shutil.which("qemu-storage-daemon"):
        assert "qemu tmpfs" in measured or "raid0x4 tmpfs" in st["missing"], st["missing"]
    for g in st["groups"]:
        for target in g["targets"]:
            assert target in measured or target in st["missing"], target
            if target in measured:
                assert set(st["results"][target]) >= set(g["jobs"]), (g["key"], target)
        for job in g["jobs"]:
            for col in g["ratio_columns"]:
                have = {col["numerator"], col["denominator"]} <= measured
                assert g["ratios"][job][col["label"]] is not None or not have


def test_stack_ceiling_mounts_like_vstore(report: dict) -> None:
    from fuse_mount.daemon import fuse_settings

    targets = report["stack"]["targets"]
    assert targets["ceiling"]["fuse_settings"] == json.loads(json.dumps(fuse_settings()))
    assert targets["ceiling"]["bdi_read_ahead_kb"] == fuse_settings()["read_ahead_kb"]
    assert targets["ceiling dflt"]["fuse_settings"]["min_tasks"] == 1
    assert targets["ceiling dflt"]["fuse_settings"]["read_ahead_kb"] is None


def test_every_figure_is_a_positive_number(report: dict) -> None:
    figures = list(_figures(report))
    assert len(figures) > 100
    for where, value in figures:
        if where.endswith(("isal_gbs", "numba_vs_isal")) and value is None:
            continue  # ISA-L missing: the kernel table says so
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert math.isfinite(value) and value > 0, f"{where} = {value}"


def test_no_mount_left_behind(report: dict) -> None:
    mounts = Path("/proc/self/mountinfo").read_text()
    assert "vstore-bench-" not in mounts


def _vstore_bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vstore.cli.main", "bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_bench_reports_a_missing_fio_and_exits_0(tmp_path: Path) -> None:
    """No fio on PATH: the stack section says so, nothing fails, and only the JSON is claimed written."""
    bin_dir = tmp_path / "bin"  # an empty PATH: no fio, no qemu-storage-daemon
    bin_dir.mkdir()
    out, json_path = tmp_path / "out", tmp_path / "r.json"
    proc = _vstore_bench("--quick", "--only", "stack", "--out", str(out), "--json", str(json_path),
                         env=dict(os.environ, PATH=str(bin_dir)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rep = json.loads(json_path.read_text())
    assert rep["errors"] == {}
    assert "fio" in rep["stack"]["missing"]
    assert rep["stack"]["results"] == {}
    assert "missing: fio" in proc.stdout
    assert f"wrote {json_path} in" in proc.stdout
    assert "layouts.png" not in proc.stdout and not (out / "layouts.png").exists()


def test_cli_bench_unknown_section_is_one_line(tmp_path: Path) -> None:
    proc = _vstore_bench("--quick", "--only", "kernels,warp", "--out", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown section(s) warp" in lines[0] and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing written


def test_chart_without_matplotlib_is_skipped_with_a_note(tmp_path: Path, monkeypatch) -> None:
    """matplotlib missing (a plain `pip install .` before it was a dependency): a note, not a failure."""
    import importlib

    bench_main = importlib.import_module("bench.__main__")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    note = bench_main.chart({"rows": []}, tmp_path / "layouts.png")
    assert note is not None and "matplotlib is not installed" in note
    assert not (tmp_path / "layouts.png").exists()
