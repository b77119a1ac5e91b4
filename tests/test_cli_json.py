"""Scripting the CLI: --json results, `status --watch` and shell completion (issue 13, item 3)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fuse_helpers import force_unmount
from tests.test_cli import assert_one_line_error, members, vstore


def _json(proc: subprocess.CompletedProcess) -> dict:
    """The one JSON document on stdout of a --json command."""
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_import_export_json(tmp_path: Path) -> None:
    home, disks = tmp_path / "home", tmp_path
    vstore(home, "create", "tank", "--level", "raid5", "--size", "16M", *members(disks, 3))
    src = tmp_path / "src.bin"
    src.write_bytes(np.random.default_rng(2).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    doc = _json(vstore(home, "import", "tank", "data", str(src), "--json"))
    assert doc == {"pool": "tank", "volume": "data", "file": str(src), "bytes": 3 << 20}
    out = tmp_path / "out.bin"
    doc = _json(vstore(home, "export", "tank", "data", str(out), "--json"))
    assert doc == {"pool": "tank", "volume": "data", "file": str(out), "bytes": out.stat().st_size}
    assert out.read_bytes()[: 3 << 20] == src.read_bytes()
    # An error stays one line on stderr, with nothing on stdout.
    bad = vstore(home, "export", "tank", "nosuch", str(out), "--json", check=False)
    assert_one_line_error(bad, "nosuch")
    assert bad.stdout == ""


def test_replace_move_resume_json(tmp_path: Path) -> None:
    home, disks = tmp_path / "home", tmp_path
    vstore(home, "create", "tank", "--level", "raid1", "--size", "8M", *members(disks, 2))
    vstore(home, "fail", "tank", "1")
    new = f"file://{disks}/new.img"
    doc = _json(vstore(home, "replace", "tank", "1", new, "--size", "8M", "--json"))
    assert doc["pool"] == "tank" and doc["kind"] == "rebuild" and doc["member"] == 1
    assert doc["uri"] == new and doc["bytes"] > 0 and doc["pool_state"] == "clean"
    assert isinstance(doc["seconds"], float)
    moved = f"file://{disks}/moved.img"
    doc = _json(vstore(home, "move", "tank", "0", moved, "--size", "8M", "--json"))
    assert doc["kind"] == "move" and doc["member"] == 0 and doc["uri"] == moved
    assert doc["bytes"] == doc["copied"] > 0 and isinstance(doc["rounds"], list)
    st = _json(vstore(home, "status", "tank", "--json"))
    assert [m["uri"] for m in st["members"]] == [moved, new]
    bad = vstore(home, "resume", "tank", "--json", check=False)
    assert_one_line_error(bad, "no interrupted")
    assert bad.stdout == ""


def test_path_drill_json(tmp_path: Path) -> None:
    home = tmp_path / "home"
    img = tmp_path / "m.img"
    uris = [f"file://{img}", f"file://localhost{img}"]
    vstore(home, "create", "mp", "--level", "linear", "--size", "8M", ",".join(uris))
    doc = _json(vstore(home, "path", "fail", "mp", "0", "1", "--json"))
    assert doc["pool"] == "mp" and doc["member"] == 0 and doc["action"] == "failed"
    assert doc["path"] == 1 and doc["mounted"] is False
    assert [(p["uri"], p["state"]) for p in doc["paths"]] == [(uris[0], "active"), (uris[1], "failed")]
    doc = _json(vstore(home, "path", "reinstate", "mp", "0", uris[1], "--json"))
    assert doc["action"] == "reinstated" and doc["path"] == 1
    assert [p["state"] for p in doc["paths"]] == ["active", "active"]


def test_torture_json_summary_pass_and_fail(tmp_path: Path) -> None:
    home = tmp_path / "home"
    uris = [f"file://{tmp_path}/t{i}.img" for i in range(3)]
    doc = _json(vstore(home, "torture", "--level", "raid5", "--rounds", "2", "--time", "20s",
                       "--seed", "1", "--json", *uris))
    assert doc["ok"] is True and doc["mode"] == "campaign" and doc["seed"] == 1
    assert doc["level"] == "raid5" and doc["rounds"] == 2 and doc["ops"] > 0 and doc["checks"] > 0
    assert doc["failure"] is None
    for key in ("crashes", "failures", "rebuilds", "moves", "switches", "paths", "bytes_written"):
        assert isinstance(doc[key], int), key
    # A layer that drops flushes loses acknowledged data after a power cut: FAIL, exit 1.
    proc = vstore(home, "torture", "--level", "raid5", "--seed", "1", "--json",
                  "--wrap", "vstore.testing.faults:DropFlushes",
                  "--replay", "w:0:4096:5,f,crash@1.0:drop:1,r:0:4096", *uris, check=False)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["mode"] == "replay" and doc["rounds"] is None
    fail = doc["failure"]
    assert fail["message"].startswith("(a)") and fail["minimal_steps"] == 4
    assert fail["minimal"] == "w:0:4096:5,f,crash@1:drop:1,r:0:4096"
    assert fail["rerun"].startswith("vstore torture --level raid5") and "--replay" in fail["rerun"]
    assert "FAIL" in proc.stderr  # the human report went to stderr


def _popen(home: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, VSTORE_HOME=str(home))
    return subprocess.Popen([sys.executable, "-m", "vstore.cli.main", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_status_watch_redraws_until_interrupted(tmp_path: Path) -> None:
    home = tmp_path / "home"
    vstore(home, "create", "tank", "--level", "raid1", "--size", "8M", *members(tmp_path, 2))
    env = dict(os.environ, VSTORE_HOME=str(home))
    # Ctrl-C raises KeyboardInterrupt in the child whatever disposition the test process passed on.
    start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "sys.argv = ['vstore', 'status', 'tank', '--watch', '0.5', '--json']; "
             "runpy.run_module('vstore.cli.main', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", start], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # Interrupt once it has drawn twice (a loaded machine may take seconds just to start it), as a
    # user does: again if the first Ctrl-C went unheard (a known window: the closing note of session 5).
    first = proc.stdout.readline()
    first += proc.stdout.readline()
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    frames = [json.loads(line) for line in (first + out).splitlines()]
    assert len(frames) >= 2
    assert all(f["name"] == "tank" and f["state"] == "clean" for f in frames)
    # Not a terminal: text frames separated by a blank line; --count stops.
    text = vstore(home, "status", "tank", "--watch", "0.1", "--count", "3").stdout
    assert text.count("every 0.1s: vstore status tank") == 3
    assert text.count("\n\nevery 0.1s") == 2


def test_shell_completion(tmp_path: Path) -> None:
    env = dict(os.environ, VSTORE_HOME=str(tmp_path / "home"), _VSTORE_COMPLETE="bash_source")
    cmd = [sys.executable, "-m", "vstore.cli.main"]
    src = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert src.returncode == 0 and "_vstore_completion" in src.stdout and "complete " in src.stdout
    env.update(_VSTORE_COMPLETE="bash_complete", COMP_WORDS="vstore sta", COMP_CWORD="1")
    got = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0 and got.stdout.split() == ["plain,status"]
    env.update(COMP_WORDS="vstore status tank --wa", COMP_CWORD="3")
    got = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert got.stdout.split() == ["plain,--watch"]
    # POOL arguments complete from the config directory's pools.
    home = tmp_path / "home"
    vstore(home, "create", "tank", "--level", "raid1", "--size", "8M", *members(tmp_path, 2))
    vstore(home, "create", "tub", "--level", "linear", "--size", "8M", f"file://{tmp_path}/l.img")
    env.update(COMP_WORDS="vstore volume list t", COMP_CWORD="3")
    got = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert got.stdout.split() == ["plain,tank", "plain,tub"]
    env.update(COMP_WORDS="vstore scrub ta", COMP_CWORD="2")
    got = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert got.stdout.split() == ["plain,tank"]


def test_json_through_a_mount_background_and_followed(tmp_path: Path) -> None:
    """A mounted pool: --background --json announces the start; a followed move ends in its JSON result."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("needs /dev/fuse and fusermount3")
    home, mp = tmp_path / "home", tmp_path / "mnt"
    mp.mkdir()
    vstore(home, "create", "p", "--level", "raid1", "--size", "16M", *members(tmp_path, 2))
    try:
        vstore(home, "mount", "p", str(mp))
        vstore(home, "fail", "p", "1")
        doc = _json(vstore(home, "replace", "p", "1", f"file://{tmp_path}/n1.img", "--size", "16M",
                           "--background", "--json"))
        assert doc["pool"] == "p" and doc["started"]["kind"] == "rebuild"
        deadline = time.monotonic() + 60
        while _json(vstore(home, "status", "p", "--json"))["state"] != "clean":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        doc = _json(vstore(home, "move", "p", "0", f"file://{tmp_path}/m0.img", "--size", "16M", "--json"))
        assert doc["pool"] == "p" and doc["kind"] == "move" and doc["member"] == 0
        assert doc["uri"] == f"file://{tmp_path}/m0.img" and doc["state"] == "done"
        vstore(home, "umount", str(mp))
    finally:
        if (mp / ".vstore").exists():
            vstore(home, "umount", str(mp), check=False)
        force_unmount(mp)


def test_import_pool_fail_and_stop_json(tmp_path: Path) -> None:
    home = tmp_path / "home"
    uris = members(tmp_path, 2)
    vstore(home, "create", "q", "--level", "raid1", "--size", "8M", *uris)
    vstore(home, "forget", "q")
    doc = _json(vstore(home, "import-pool", "--json", *uris))
    assert doc == {"name": "q", "level": "raid1", "members": 2, "found": 2}
    assert _json(vstore(home, "stop", "q", "--json")) == {"pool": "q", "stopped": False}
    st = _json(vstore(home, "fail", "q", "1", "--json"))
    assert st["name"] == "q" and st["state"] == "degraded"
    assert [m["state"] for m in st["members"]] == ["active", "failed"]


def test_create_volume_spare_and_journal_json(tmp_path: Path) -> None:
    home = tmp_path / "home"
    st = _json(vstore(home, "create", "z", "--level", "raid1", "--size", "8M", "--json", *members(tmp_path, 2)))
    assert st["name"] == "z" and st["level"] == "raid1" and st["state"] == "clean" and st["volumes"] == []
    assert _json(vstore(home, "volume", "create", "z", "a", "--size", "1M", "--json")) == {
        "pool": "z", "name": "a", "size": 1 << 20}
    assert _json(vstore(home, "volume", "resize", "z", "a", "--size", "2M", "--json"))["size"] == 2 << 20
    spare = f"file://{tmp_path}/s.img"
    doc = _json(vstore(home, "spare", "add", "z", spare, "--size", "8M", "--json"))
    assert doc == {"pool": "z", "spares": [{"uri": spare, "size": 8 << 20}]}
    assert _json(vstore(home, "spare", "remove", "z", spare, "--json")) == {"pool": "z", "spares": []}
    jr = f"file://{tmp_path}/j.img"
    doc = _json(vstore(home, "journal", "attach", "z", jr, "--size", "4M", "--json"))
    assert doc["mode"] == "journal" and doc["uri"] == jr and doc["state"] == "active"
    doc = _json(vstore(home, "journal", "detach", "z", "--json"))
    assert doc["mode"] == "none" and "bitmap" in doc
