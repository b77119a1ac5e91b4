"""The registry of pool commands (vstore.pool.commands): arguments, dispatch, progress, background."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import pytest
import trio

from vstore.errors import ConfigError, NotFoundError
from vstore.pool.commands import POOL_COMMANDS, Registry, run_command
from vstore.pool.home import Home
from vstore.pool.pool import Pool

MEMBER = 8 << 20


def test_arguments_are_checked_and_converted() -> None:
    reg = Registry()

    @reg.command("op", quick=True, label="doing {index}")
    async def op(target: dict, *, index: int, force: bool = False, size: int | None = None,
                 path: int | str = 0) -> dict:
        return {"target": target, "index": index, "force": force, "size": size, "path": path}

    cmd = reg.lookup("op")
    assert cmd.quick and cmd.writable and not cmd.background and not cmd.takes_progress
    assert cmd.arguments({"index": "3", "force": 1, "size": None, "path": "p"}) == {
        "index": 3, "force": True, "size": None, "path": "p"}
    assert cmd.request(index=2) == {"cmd": "op", "index": 2}
    assert cmd.label_for({"index": 2}) == "doing 2"
    with pytest.raises(ConfigError, match="unknown argument 'nope'"):
        cmd.arguments({"index": 1, "nope": 1})
    with pytest.raises(ConfigError, match="missing argument 'index'"):
        cmd.arguments({})
    with pytest.raises(ConfigError, match="index must be an integer"):
        cmd.arguments({"index": "x"})
    with pytest.raises(ConfigError, match="unknown command 'other'"):
        reg.lookup("other")
    with pytest.raises(ValueError, match="twice"):
        reg.command("op")(op)
    with pytest.raises(TypeError, match="keyword-only"):
        reg.command("positional")(lambda target, x: None)


async def test_dispatch_carries_out_a_request() -> None:
    reg = Registry()

    @reg.command("add")
    async def add(target: list, *, value: int) -> dict:
        target.append(value)
        return {"n": len(target)}

    seen: list[int] = []
    assert await reg.dispatch(seen, {"cmd": "add", "value": "7"}) == {"n": 1}
    assert seen == [7]
    with pytest.raises(ConfigError, match="unknown command None"):
        await reg.dispatch(seen, {"value": 1})


def test_every_pool_command_is_registered_once() -> None:
    assert set(POOL_COMMANDS) == {
        "status", "fail", "path_fail", "path_reinstate", "volume_list", "volume_create",
        "volume_resize", "volume_remove", "volume_rename", "operation", "operation_stop",
        "replace", "move", "resume", "scrub", "spare_add", "spare_remove",
        "journal_attach", "journal_detach", "journal_status", "grow"}
    assert {n for n, c in POOL_COMMANDS.items() if c.background} == {"replace", "move", "resume", "scrub",
                                                                     "grow"}
    assert {n for n, c in POOL_COMMANDS.items() if not c.writable} == {"status", "volume_list", "operation",
                                                                        "journal_status"}
    assert {n for n, c in POOL_COMMANDS.items() if c.guards_open_volume} == {"volume_remove", "volume_rename"}


async def _pool(tmp_path: Path, level: str = "raid1", n: int = 2) -> Pool:
    tag = uuid.uuid4().hex
    home = Home(tmp_path / tag)
    return await Pool.create(home, "p", level, [f"memory://{tag}-{i}?size={MEMBER}" for i in range(n)],
                             chunk=4096)


async def test_pool_commands_on_an_open_pool(tmp_path: Path) -> None:
    pool = await _pool(tmp_path)
    labels: list[str] = []

    @contextlib.contextmanager
    def progress(label: str | None = None):
        labels.append(label)
        yield lambda done, total: None

    try:
        r = await run_command(pool, "volume_create", name="v", size=1 << 20, progress=progress)
        assert r == {"name": "v", "size": 1 << 20} and labels == ["zeroing v"]
        assert (await run_command(pool, "volume_list"))["volumes"] == [{"name": "v", "size": 1 << 20}]
        await run_command(pool, "volume_rename", name="v", new="w")
        r = await run_command(pool, "volume_resize", name="w", size=2 << 20)
        assert r == {"name": "w", "size": 2 << 20}
        await run_command(pool, "volume_remove", name="w")
        with pytest.raises(NotFoundError):
            await run_command(pool, "volume_remove", name="w")
        assert (await run_command(pool, "status"))["volumes"] == []
        # Not resident (a command that opened the pool): a scrub runs to its end here.
        r = await run_command(pool, "scrub", progress=progress)
        assert r["mismatches"] == 0 and labels[-1] == "scrub"
        assert await run_command(pool, "operation_stop") == {"stopped": False}
        st = await run_command(pool, "fail", index=1)
        assert st["members"][1]["state"] != "active"
    finally:
        await pool.aclose()


async def test_a_resident_pool_starts_long_operations_in_the_background(tmp_path: Path) -> None:
    pool = await _pool(tmp_path)
    pool.lifecycle.resident = True  # as in the mount process
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.lifecycle.run_background)
            r = await run_command(pool, "scrub")
            assert r["started"]["kind"] == "scrub"
            op = pool.lifecycle.current
            if op is not None:
                await op.finished.wait()
            r = await run_command(pool, "operation")
            assert r["current"] is None and r["last"]["kind"] == "scrub"
            nursery.cancel_scope.cancel()
    finally:
        await pool.aclose()
