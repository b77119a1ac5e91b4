"""A raid5 pool of three iSCSI LUNs through the CLI: plain, with CRC32C digests, with CHAP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli import vstore
from vstore.testing.iscsi_target import TgtServer

SIZE = 40 << 20


@pytest.fixture(scope="module")
def tgt():
    with TgtServer() as server:
        yield server


@pytest.mark.parametrize("mode", ["plain", "digests", "chap"])
def test_raid5_over_three_luns(tgt: TgtServer, tmp_path: Path, mode: str):
    urls = []
    for i in range(3):
        t = tgt.add_target(f"iqn.2026-11.test:r5-{mode}-{i}")
        tgt.add_lun(t.tid, 1, SIZE, scsi_id=f"{mode}{i}", scsi_sn=f"SN-{mode}-{i}")
        if mode == "digests":
            tgt.set_param(t.tid, "HeaderDigest", "CRC32C")
            tgt.set_param(t.tid, "DataDigest", "CRC32C")
        if mode == "chap":
            tgt.add_account(t.tid, f"user{i}", f"Secret-{mode}-{i}x")
            urls.append(tgt.url(t.tid, 1, user=f"user{i}", password=f"Secret-{mode}-{i}x"))
        else:
            urls.append(tgt.url(t.tid, 1))
    home = tmp_path / "home"
    vstore(home, "create", "san", "--level", "raid5", *urls)
    src = tmp_path / "src.bin"
    np.random.default_rng(11).integers(0, 256, 9 << 20, dtype=np.uint8).tofile(src)
    vstore(home, "import", "san", "v", str(src))
    out = tmp_path / "out.bin"
    vstore(home, "export", "san", "v", str(out))
    assert out.read_bytes() == src.read_bytes()
    # The LUN backing files hold a vstore superblock: the bytes went over iSCSI.
    for t in list(tgt.targets.values())[-3:]:
        with open(t.luns[1].path, "rb") as f:
            assert f.read(8) == b"VSTORESB"
    st = vstore(home, "status", "san", "--json").stdout
    if mode == "chap":
        # Secrets never reach status, logs or the metadata written on the members.
        assert "Secret-chap" not in st
        for t in list(tgt.targets.values())[-3:]:
            with open(t.luns[1].path, "rb") as f:
                assert b"Secret-chap" not in f.read(3 << 20)
        record = (home / "pools" / "san.json")
        assert os.stat(record).st_mode & 0o077 == 0
    assert json.loads(st)["state"] == "clean"
    vstore(home, "fail", "san", "1")
    out.unlink()
    vstore(home, "export", "san", "v", str(out))
    assert out.read_bytes() == src.read_bytes()


async def test_unaligned_volume_io_over_iscsi_members(tgt: TgtServer, tmp_path: Path):
    from vstore.pool.home import Home
    from vstore.pool.pool import Pool

    urls = []
    for i in range(3):
        t = tgt.add_target(f"iqn.2026-11.test:align-{i}")
        tgt.add_lun(t.tid, 1, SIZE, scsi_id=f"align{i}", scsi_sn=f"SN-align-{i}")
        urls.append(tgt.url(t.tid, 1))
    home = Home(tmp_path / "home")
    pool = await Pool.create(home, "a", "raid5", urls)
    try:
        vol = await pool.create_volume("v", 1 << 20)
        model = np.zeros(1 << 20, np.uint8)
        rng = np.random.default_rng(3)
        for _ in range(40):  # what a FUSE file receives: any offset, any length
            off = int(rng.integers(0, (1 << 20) - 5000))
            n = int(rng.integers(1, 5000))
            data = rng.integers(0, 256, n, dtype=np.uint8)
            await vol.write(off, data)
            model[off : off + n] = data
            got = await vol.read(off + 1, n - 1)
            assert (got == model[off + 1 : off + n]).all()
        await pool.flush()
        assert (await vol.read(0, 1 << 20) == model).all()
        assert pool.state == "clean"  # no member was failed by a refused unaligned command
    finally:
        await pool.aclose()
