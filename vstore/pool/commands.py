"""Every command on a pool, defined once: a name, an async function of the pool and its arguments.

A command is registered with ``@command(NAME, ...)`` on an async function that takes
the open pool and keyword arguments (typed: ``int`` and ``bool`` arguments are
converted, unknown or missing ones refused) and returns a JSON-able dict. It is
carried out in one of two places, always by the same function:

- while the pool is mounted, the CLI sends ``{"cmd": NAME, **arguments}`` over the
  mount's control socket (``vstore.pool.control``) and the mount process
  (``fuse_mount.daemon``) looks NAME up here and calls it on the pool it holds;
- otherwise the CLI opens the pool itself and calls it (``vstore.cli.common``).

Long operations (rebuild, move, scrub) start in the background in the mount
process (``pool.lifecycle.resident``) and answer ``{"started": ...}`` at once; a
command that opened the pool runs them to completion. The metadata next to the
name tells the CLI the rest: whether the pool must be writable, whether the
command is a quick query, whether it may start in the background, what its
progress bar is called, and whether a mount refuses it while the volume's file is open.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import UnionType
from typing import TYPE_CHECKING, Any, Protocol, Union, get_args, get_origin

from vstore.errors import ConfigError

if TYPE_CHECKING:
    from vstore.pool.pool import Pool

Progress = Callable[[int, int], None]


class ProgressFactory(Protocol):
    """Opens a progress report: ``with progress(label) as cb: cb(done, total)`` (cb may be None)."""

    def __call__(self, label: str | None = None) -> AbstractContextManager[Progress | None]: ...


def no_progress(label: str | None = None) -> AbstractContextManager[Progress | None]:
    """The progress factory of a command nobody watches (the mount process): reports nothing."""
    return contextlib.nullcontext(None)


# The one argument a command function may take that does not come from the request.
PROGRESS = "progress"


@dataclass(frozen=True)
class Command:
    """One registered command: its function and what a caller needs to know about it."""

    name: str
    fn: Callable[..., Awaitable[dict[str, Any]]]
    writable: bool = True  # a command that opens the pool itself opens it writable
    quick: bool = False  # a query a live mount answers at once (a short timeout suffices)
    background: bool = False  # in a mount it starts an operation and answers {"started": ...}
    label: str | None = None  # its progress label, formatted with its arguments
    guards_open_volume: bool = False  # a mount refuses it while volume `name` is open (unless force)
    params: dict[str, inspect.Parameter] = field(default_factory=dict, repr=False)
    takes_progress: bool = False

    def label_for(self, args: Mapping[str, Any]) -> str:
        """Its progress label for these arguments."""
        return self.label.format(**args) if self.label else self.name

    def arguments(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The given arguments checked against the function's and converted to their types."""
        out: dict[str, Any] = {}
        for key, value in given.items():
            param = self.params.get(key)
            if param is None:
                raise ConfigError(f"command {self.name!r}: unknown argument {key!r}")
            out[key] = _convert(self.name, key, param.annotation, value)
        for key, param in self.params.items():
            if param.default is inspect.Parameter.empty and key not in out:
                raise ConfigError(f"command {self.name!r}: missing argument {key!r}")
        return out

    def request(self, **args: Any) -> dict[str, Any]:
        """The control-socket request that carries this command out in a mount process."""
        return {"cmd": self.name, **self.arguments(args)}

    async def call(self, target: Any, args: Mapping[str, Any],
                   progress: ProgressFactory | None = None) -> dict[str, Any]:
        """Carry the command out on target (an open pool); progress shows it to whoever waits."""
        kwargs = self.arguments(args)
        if self.takes_progress:
            kwargs[PROGRESS] = self._progress(progress, kwargs)
        return await self.fn(target, **kwargs)

    def _progress(self, factory: ProgressFactory | None, args: dict[str, Any]) -> ProgressFactory:
        if factory is None:
            return no_progress

        def bound(label: str | None = None) -> AbstractContextManager[Progress | None]:
            return factory(self.label_for(args) if label is None else label)

        return bound


def _evaluated(fn: Callable[..., Any], param: inspect.Parameter) -> inspect.Parameter:
    """param with its annotation evaluated (the target's may name a type only type checkers import)."""
    hint = param.annotation
    if isinstance(hint, str):
        hint = eval(hint, fn.__globals__)  # noqa: S307 - the annotation of our own function
    return param.replace(annotation=hint)


def _convert(cmd: str, key: str, hint: Any, value: Any) -> Any:
    """int and bool arguments (also optional ones) as their type; the rest as given."""
    alternatives = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    if value is None and type(None) in alternatives:
        return None
    kinds = [t for t in alternatives if t is not type(None)]
    if kinds == [bool]:
        return bool(value)
    if kinds == [int]:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"command {cmd!r}: {key} must be an integer, not {value!r}") from None
    if kinds == [str] and not isinstance(value, str):
        raise ConfigError(f"command {cmd!r}: {key} must be a string, not {value!r}")
    return value


class Registry(Mapping[str, Command]):
    """Commands by name."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def __getitem__(self, name: str) -> Command:
        return self._commands[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._commands)

    def __len__(self) -> int:
        return len(self._commands)

    def command(self, name: str, *, writable: bool = True, quick: bool = False,
                background: bool = False, label: str | None = None,
                guards_open_volume: bool = False) -> Callable[[Callable[..., Awaitable[dict[str, Any]]]],
                                                               Callable[..., Awaitable[dict[str, Any]]]]:
        """Register an async function(target, **arguments) -> dict as command name."""

        def register(fn: Callable[..., Awaitable[dict[str, Any]]]) -> Callable[..., Awaitable[dict[str, Any]]]:
            if name in self._commands:
                raise ValueError(f"command {name!r} registered twice")
            sig = inspect.signature(fn)
            params = {k: _evaluated(fn, p) for k, p in list(sig.parameters.items())[1:]
                      if k != PROGRESS}
            if any(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in params.values()):
                raise TypeError(f"command {name!r}: arguments after the target must be keyword-only")
            self._commands[name] = Command(name, fn, writable=writable, quick=quick,
                                           background=background, label=label,
                                           guards_open_volume=guards_open_volume, params=params,
                                           takes_progress=PROGRESS in sig.parameters)
            return fn

        return register

    def lookup(self, name: Any) -> Command:
        """The command called name; ConfigError when there is none."""
        command = self._commands.get(name) if isinstance(name, str) else None
        if command is None:
            raise ConfigError(f"unknown command {name!r}")
        return command

    async def dispatch(self, target: Any, request: Mapping[str, Any]) -> dict[str, Any]:
        """Carry out a control-socket request ``{"cmd": NAME, **arguments}`` on target."""
        command = self.lookup(request.get("cmd"))
        return await command.call(target, {k: v for k, v in request.items() if k != "cmd"})


# ---------------------------------------------------------------------------- pool commands

POOL_COMMANDS = Registry()
command = POOL_COMMANDS.command


async def run_command(pool: Pool, name: str, /, *, progress: ProgressFactory | None = None,
                      **args: Any) -> dict[str, Any]:
    """Carry out pool command name on an open pool (what a mount does for a request)."""
    return await POOL_COMMANDS.lookup(name).call(pool, args, progress)


@command("status", writable=False, quick=True)
async def status(pool: Pool) -> dict[str, Any]:
    """The pool's level, size, state, members, volumes and operation."""
    return pool.status()


@command("fail")
async def fail(pool: Pool, *, index: int, force: bool = False,
               progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Mark a member failed; a hot spare takes its place (now, or in a mount's background)."""
    await pool.fail_member(index, force=force)
    if not pool.lifecycle.resident:
        await pool.lifecycle.settle(progress)
    return pool.status()


@command("path_fail")
async def path_fail(pool: Pool, *, member: int, path: int | str, force: bool = False) -> dict[str, Any]:
    """Fail one path (index or URI) of a multipath member."""
    await pool.set_path_state(member, path, fail=True, force=force)
    return pool.status()


@command("path_reinstate")
async def path_reinstate(pool: Pool, *, member: int, path: int | str,
                         force: bool = False) -> dict[str, Any]:
    """Probe one path (index or URI) of a multipath member and put it back into service."""
    await pool.set_path_state(member, path, fail=False, force=force)
    return pool.status()


# --- volumes


@command("volume_list", writable=False, quick=True)
async def volume_list(pool: Pool) -> dict[str, Any]:
    """The pool's volumes."""
    return {"volumes": pool.status()["volumes"]}


@command("volume_create", label="zeroing {name}")
async def volume_create(pool: Pool, *, name: str, size: int,
                        progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Create a volume (its bytes read as zeros)."""
    with progress() as cb:
        vol = await pool.create_volume(name, size, progress=cb)
    return {"name": vol.name, "size": vol.size}


@command("volume_resize", label="zeroing {name}")
async def volume_resize(pool: Pool, *, name: str, size: int,
                        progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Grow a volume."""
    with progress() as cb:
        vol = await pool.resize_volume(name, size, progress=cb)
    return {"name": vol.name, "size": vol.size}


@command("volume_remove", guards_open_volume=True)
async def volume_remove(pool: Pool, *, name: str, force: bool = False) -> dict[str, Any]:
    """Remove a volume (force: even while a mount has its file open)."""
    await pool.remove_volume(name)
    return {}


@command("volume_rename", guards_open_volume=True)
async def volume_rename(pool: Pool, *, name: str, new: str) -> dict[str, Any]:
    """Rename a volume."""
    await pool.rename_volume(name, new)
    return {}


# --- member lifecycle (vstore.ops): one operation at a time, see vstore.ops.lifecycle


@command("operation", writable=False, quick=True)
async def operation(pool: Pool) -> dict[str, Any]:
    """The running operation, the last one, and the status entry."""
    lc = pool.lifecycle
    return {"current": lc.current.status() if lc.current else None, "last": lc.last,
            "status": lc.status()}


@command("operation_stop")
async def operation_stop(pool: Pool) -> dict[str, Any]:
    """Stop the running rebuild, move or scrub (once it has checkpointed)."""
    return {"stopped": await pool.lifecycle.stop()}


@command("replace", background=True, label="rebuild member {index}")
async def replace(pool: Pool, *, index: int, uri: str, size: int | None = None, force: bool = False,
                  speed: dict[str, int] | None = None,
                  progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Replace a member by uri and rebuild it (a healthy one is moved)."""
    from vstore.ops import rebuild

    if pool.lifecycle.resident:
        op = await rebuild.start_replace(pool, index, uri, size=size, force=force, speed=speed)
        return {"started": op.status()}
    with progress() as cb:
        return await rebuild.replace(pool, index, uri, size=size, force=force, speed=speed,
                                     progress=cb)


@command("move", background=True, label="move member {index}")
async def move(pool: Pool, *, index: int, uri: str, size: int | None = None, force: bool = False,
               speed: dict[str, int] | None = None,
               progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Move a healthy member to uri while the pool stays in use."""
    from vstore.ops import move as ops_move

    if pool.lifecycle.resident:
        op = await ops_move.start_move(pool, index, uri, size=size, force=force, speed=speed)
        return {"started": op.status()}
    with progress() as cb:
        return await ops_move.move(pool, index, uri, size=size, force=force, speed=speed,
                                   progress=cb)


@command("resume", background=True, label="resume")
async def resume(pool: Pool, *, speed: dict[str, int] | None = None,
                 progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Resume an interrupted rebuild or move from its checkpoint."""
    if pool.lifecycle.resident:
        return {"started": pool.lifecycle.start_resume(speed).status()}
    with progress() as cb:
        return await pool.lifecycle.resume(speed, cb)


@command("grow", background=True, label="grow")
async def grow(pool: Pool, *, add: list[str] | None = None, members_grew: bool = False,
               size: int | None = None, force: bool = False, speed: dict[str, int] | None = None,
               level: str | None = None, progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Add members (linear: space at once; raid1: a copy rebuilt; level: raid1 -> raid5), or take the space members grew by."""
    from vstore.ops import grow as ops_grow

    if members_grew == bool(add):
        raise ConfigError("say what grows: --add URI... (new members) or --members-grew")
    if members_grew:
        if level is not None:
            raise ConfigError("--level goes with --add (a conversion adds a member)")
        with progress("zeroing the space members grew by") as cb:
            return await ops_grow.members_grew(pool, progress=cb)
    from vstore.ops import reshape as ops_reshape

    # Restripe (raid1 -> raid5 too: a conversion, then a reshape), or append.
    extra: dict[str, Any] = {}
    how: Any = ops_grow
    if pool.level in ops_reshape.ONLINE_LEVELS or (level is not None and level != pool.level):
        how, extra = ops_reshape, {"level": level}
    if pool.lifecycle.resident:
        got = await how.start_add(pool, list(add or []), size=size, force=force, speed=speed, **extra)
        return got if isinstance(got, dict) else {"started": got.status()}
    with progress() as cb:
        return await how.add(pool, list(add or []), size=size, force=force, speed=speed, progress=cb, **extra)


@command("scrub", background=True, label="scrub")
async def scrub(pool: Pool, *, repair: bool = False, restart: bool = False,
                speed: dict[str, int] | None = None,
                progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Verify (and with repair, rewrite) parity and mirror copies."""
    from vstore.ops import scrub as ops_scrub

    if pool.lifecycle.resident:
        op = ops_scrub.start_scrub(pool, repair=repair, restart=restart, speed=speed)
        return {"started": op.status()}
    with progress() as cb:
        return await ops_scrub.run_scrub(pool, repair=repair, restart=restart, speed=speed,
                                         progress=cb)


@command("spare_add")
async def spare_add(pool: Pool, *, uri: str, size: int | None = None,
                    force: bool = False) -> dict[str, Any]:
    """Add a hot spare."""
    from vstore.ops import rebuild

    return await rebuild.add_spare(pool, uri, size=size, force=force)


@command("spare_remove")
async def spare_remove(pool: Pool, *, uri: str) -> dict[str, Any]:
    """Remove a hot spare (its superblock is wiped)."""
    from vstore.ops import rebuild

    return await rebuild.remove_spare(pool, uri)


# --- the journal (vstore.pool.consistency): add, replace or remove it on a live pool


@command("journal_attach")
async def journal_attach(pool: Pool, *, uri: str, size: int | None = None,
                         force: bool = False) -> dict[str, Any]:
    """Add a write-ahead journal on uri (or replace the pool's journal by it)."""
    return {"journal": await pool.consistency.attach_journal(uri, size, force=force)}


@command("journal_detach")
async def journal_detach(pool: Pool, *, keep_superblock: bool = False) -> dict[str, Any]:
    """Remove the pool's journal: the pool goes on with its write-intent bitmap."""
    return {"journal": await pool.consistency.detach_journal(wipe=not keep_superblock)}


@command("journal_status", writable=False, quick=True)
async def journal_status(pool: Pool) -> dict[str, Any]:
    """The pool's crash-consistency mode: journal, bitmap or none."""
    return {"journal": pool.consistency.status()}
