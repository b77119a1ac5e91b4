"""The BlockDevice interface: capabilities with defaults, FilterDevice, and backends found by scheme."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import trio

from backends.memory import MemoryDevice
from vstore import uri as uri_mod
from vstore.errors import ConfigError, MemberIOError
from vstore.stack.align import AlignedDevice
from vstore.stack.device import BlockDevice, DeviceBase, FilterDevice
from vstore.stack.offset import OffsetDevice
from vstore.testing.fault_device import FaultDevice
from vstore.testing.faults import DropFlushes, SlowDevice

ROOT = Path(__file__).resolve().parents[1]


class _Plain(DeviceBase):
    """A device with only the required methods: every capability is DeviceBase's default."""

    def __init__(self) -> None:
        self.store = np.zeros(8192, np.uint8)
        self.size, self.block_size = len(self.store), 512
        self.reads = 0

    async def read(self, offset: int, length: int) -> np.ndarray:
        self.reads += 1
        return self.store[offset : offset + length].copy()

    async def write(self, offset: int, data) -> None:
        self.store[offset : offset + len(data)] = data

    async def flush(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class _Capable(_Plain):
    """A device with every capability of its own, recording the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def identity(self) -> str:
        return "capable:1"

    def prepare_io(self, is_write, offset, views):
        self.calls.append(("prepare_io", is_write, offset))
        return "op"

    async def probe(self, timeout=None) -> None:
        self.calls.append(("probe", timeout))

    def forget_range(self, offset: int, length: int) -> None:
        self.calls.append(("forget_range", offset, length))


async def test_defaults_of_every_capability() -> None:
    dev = _Plain()
    assert isinstance(dev, BlockDevice)
    assert dev.identity() is None and dev.prepare_io(False, 0, [np.zeros(512, np.uint8)]) is None
    assert dev.created is False and dev.timeout == 0.0
    dev.forget_range(0, 512)  # a no-op
    await dev.probe(1.0)
    assert dev.reads == 1  # the default probe reads the first block
    dev.store[:3] = [1, 2, 3]
    out = [np.zeros(2, np.uint8), np.zeros(1, np.uint8)]
    await dev.readv_into(0, out)  # the vectored pair is always there
    assert list(out[0]) + list(out[1]) == [1, 2, 3]
    assert dev.take_unstable() == []  # nothing kept to resend
    dev.adopt_unstable([])
    with pytest.raises(TypeError):
        dev.adopt_unstable([(0, np.zeros(1, np.uint8), b"v")])  # another kind's: refused
    started = []
    async with trio.open_nursery() as n:
        await n.start(dev.run_background)  # no background work: started, then done
        started.append(True)
    assert started == [True]


async def test_a_plain_filter_forwards_everything() -> None:
    inner = _Capable()
    f = FilterDevice(inner)
    assert (f.size, f.block_size, f.identity()) == (inner.size, inner.block_size, "capable:1")
    await f.write(512, np.full(4, 7, np.uint8))
    assert (await f.read(512, 4) == 7).all()
    assert f.prepare_io(True, 1024, []) == "op"
    await f.probe(2.0)
    f.forget_range(10, 20)
    assert inner.calls == [("prepare_io", True, 1024), ("probe", 2.0), ("forget_range", 10, 20)]
    assert f.created is False and f.timeout == 0.0  # the inner device's file and timeout are not ours


async def test_a_filter_that_changes_the_data_path_keeps_its_io() -> None:
    """Overriding any of read/write/readv_into/writev: no engine ops handed on, the probe reads through."""
    inner = _Capable()
    for f in (FaultDevice(inner), SlowDevice(inner, 0.0), AlignedDevice(inner)):
        assert f.prepare_io(False, 0, [np.zeros(512, np.uint8)]) is None, type(f)
        assert f.identity() == "capable:1"
    assert DropFlushes(inner).prepare_io(False, 0, []) == "op"  # only flush changes there
    f = FaultDevice(inner)
    f.fail("read")
    with pytest.raises(MemberIOError, match="injected read failure"):
        await f.probe(1.0)  # through the fault, not around it
    assert ("probe", 1.0) not in inner.calls


async def test_offset_window_translates_its_capabilities() -> None:
    inner = _Capable()
    win = OffsetDevice(inner, 1024, 4096)
    assert win.prepare_io(True, 512, [np.zeros(512, np.uint8)]) == "op"
    win.forget_range(0, 100)
    assert inner.calls == [("prepare_io", True, 1536), ("forget_range", 1024, 100)]
    with pytest.raises(Exception, match="outside"):
        win.prepare_io(False, 4096, [np.zeros(512, np.uint8)])
    assert win.identity() == "capable:1@1024+4096"
    assert OffsetDevice(_Plain(), 0, 4096).identity().startswith("dev:")


def test_aligned_device_does_not_hand_on_the_layout() -> None:
    inner = MemoryDevice(np.zeros(4096, np.uint8))
    with pytest.raises(AttributeError):
        AlignedDevice(inner).store  # noqa: B018


def test_every_entry_point_is_its_schemes_backend() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        table = tomllib.load(f)["project"]["entry-points"][uri_mod.GROUP]
    assert set(table) == {"file", "memory", "nfs", "iscsi", "rbd"}
    for scheme in table:
        backend = uri_mod.backend_for(scheme)
        assert isinstance(backend, uri_mod.Backend) and backend.scheme == scheme


async def test_a_registered_backend_is_parsed_validated_and_opened() -> None:
    opened = []

    def check(u: uri_mod.MemberURI) -> None:
        if not u.host:
            raise ConfigError("toy URI needs a name")

    async def open_toy(u, *, create_size=None, **opts):
        opened.append((u.host, create_size))
        return MemoryDevice(np.zeros(4096, np.uint8))

    with pytest.raises(ConfigError, match="unknown URI scheme 'toy'"):
        uri_mod.parse_uri("toy://a")
    uri_mod.register(uri_mod.Backend("toy", open_toy, frozenset({"speed"}), check))
    try:
        assert uri_mod.parse_uri("toy://a?speed=1&prio=2").params == {"speed": "1", "prio": "2"}
        with pytest.raises(ConfigError, match="unknown parameter 'sped'.*known for toy://: path, prio, speed"):
            uri_mod.parse_uri("toy://a?sped=1")
        with pytest.raises(ConfigError, match="needs a name"):
            uri_mod.parse_uri("toy:///x")
        dev = await uri_mod.open_uri("toy://a", create_size=4096)
        assert dev.size == 4096 and opened == [("a", 4096)]
    finally:
        uri_mod.unregister("toy")


def test_test_schemes_register_only_when_asked() -> None:
    """Importing the test tools registers nothing; a CrashRecorder or a Rig registers its scheme."""
    code = (
        "import vstore.testing.faults as F, vstore.testing.crash as C, vstore.uri as U\n"
        "for s in ('crashsim', 'vrig'):\n"
        "    try:\n"
        "        U.parse_uri(s + '://g/m')\n"
        "    except Exception as e:\n"
        "        assert 'unknown URI scheme' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit(s + ' registered on import')\n"
        "F.Rig()\n"
        "U.parse_uri('crashsim://g/m'); U.parse_uri('vrig://g/m')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout


def test_the_uri_module_names_no_backend() -> None:
    from vstore.testing.imports import graph

    assert not {m for m in graph(ROOT)["vstore.uri"] if m.startswith("backends")}
