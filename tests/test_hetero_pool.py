"""The heterogeneous pool the project exists for: raid6 over local files, NFS files and iSCSI LUNs,
built, imported, exported, degraded and verified through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli import vstore
from vstore.testing.iscsi_target import TgtServer
from vstore.testing.nfs_server import Ganesha, ServerError


@pytest.fixture(scope="module")
def servers():
    try:
        nfs = Ganesha()
    except ServerError as e:
        pytest.skip(str(e))
    with nfs, TgtServer() as tgt:
        yield nfs, tgt


def test_raid6_over_file_nfs_iscsi(servers, tmp_path: Path):
    nfs, tgt = servers
    home = tmp_path / "home"
    size = 48 << 20
    t1 = tgt.add_target("iqn.2026-11.test:hetero1")
    t2 = tgt.add_target("iqn.2026-11.test:hetero2")
    l1 = tgt.add_lun(t1.tid, 1, size, scsi_id="hetero1", scsi_sn="HET1")
    l2 = tgt.add_lun(t2.tid, 1, size, scsi_id="hetero2", scsi_sn="HET2")
    members = [
        f"file://{tmp_path}/local0.img",
        nfs.url("nas0.img"),
        tgt.url(t1.tid, 1),
        f"file://{tmp_path}/local1.img",
        nfs.url("nas1.img"),
        tgt.url(t2.tid, 1),
    ]
    vstore(home, "create", "mixed", "--level", "raid6", "--size", str(size), *members)
    st = json.loads(vstore(home, "status", "mixed", "--json").stdout)
    assert st["state"] == "clean" and [m["uri"].split(":")[0] for m in st["members"]] == [
        "file", "nfs", "iscsi", "file", "nfs", "iscsi"]
    assert nfs.path("nas0.img").stat().st_size == size  # created on the export by vstore

    src = tmp_path / "src.bin"
    payload = np.random.default_rng(7).integers(0, 256, 20 << 20, dtype=np.uint8)
    payload.tofile(src)
    vstore(home, "import", "mixed", "data", str(src))
    out = tmp_path / "out.bin"
    vstore(home, "export", "mixed", "data", str(out))
    assert out.read_bytes() == src.read_bytes()

    # The members really hold the bytes: the superblock magic is on each backing store.
    for backing in (tmp_path / "local0.img", nfs.path("nas1.img"), Path(l1.path), Path(l2.path)):
        with open(backing, "rb") as f:
            assert f.read(8) == b"VSTORESB"

    # Lose an NFS member and an iSCSI member: raid6 still returns every byte.
    vstore(home, "fail", "mixed", "1")
    vstore(home, "fail", "mixed", "5")
    st = json.loads(vstore(home, "status", "mixed", "--json").stdout)
    assert st["state"] == "degraded"
    out.unlink()
    vstore(home, "export", "mixed", "data", str(out))
    assert out.read_bytes() == src.read_bytes()
