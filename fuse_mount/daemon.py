"""The mount process: mount a pool through FUSE, own it, serve its control socket, unmount cleanly.

Files in the config directory (HOME):

    HOME/mounts/POOL.json   the live mount: pid (+ its start time), pool, mountpoint, socket, log
    HOME/run/POOL.sock      the control socket (owner-only), served while mounted
    HOME/logs/mount-POOL.log  the mount process's log (stderr of a detached mount goes there too)

Lifecycle: ``mount`` opens the target inside the mount process, mounts, starts the
control socket, and only then reports ready (after the volume files are visible).
``unmount`` asks the mount process (control command ``fuse-unmount``) to unmount: a
busy mount (open file, loop device) is refused with PoolBusyError and stays up;
otherwise the process flushes, closes the pool cleanly and exits, and ``unmount``
returns once it has. SIGTERM/SIGINT/SIGHUP do the same, detaching a busy mount lazily.

Durability: fsync/fdatasync (and close after a write) return after ``target.flush()``.
A plain ``sync`` does not reach a FUSE daemon (the kernel sends FUSE_SYNCFS to virtiofs
only), so the mount also flushes every FLUSH_INTERVAL seconds after writes; a loop
device passes its filesystem's flushes down as fsync, so ext4 on a loop is covered.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from fuse_mount.fs import MountTarget, VolumeFS
from vstore import errors
from vstore.errors import ConfigError, NotFoundError, PoolBusyError, VstoreError
from vstore.pool import control
from vstore.pool.commands import POOL_COMMANDS, Registry
from vstore.uri import redact_text

log = logging.getLogger(__name__)

PR_SET_IO_FLUSHER = 57
READ_AHEAD_KB = 1024  # lets 1 MiB buffered reads arrive instead of the default 128 KiB
FLUSH_INTERVAL = 5.0  # written data is made durable at least this often even without fsync
MAX_FUSE_TASKS = 64  # requests in flight at once (each holds at most one 1 MiB buffer)
# Handler tasks kept alive while idle. pyfuse3 starts a task whenever a request
# arrives and no task is waiting, and ends it when more than min_tasks wait: with
# min_tasks=1 a queue depth of 8 costs a task spawn per request. Keep enough for
# the queue depths we serve.
MIN_FUSE_TASKS = 16


def fuse_settings() -> dict[str, Any]:
    """The FUSE options vstore mounts with, for peers that must mount alike (the benchmark's ceiling).

    ``options`` are libfuse mount options besides fsname/subtype/allow_other/ro,
    ``min_tasks``/``max_tasks`` go to ``pyfuse3.main``, ``read_ahead_kb`` is set on
    the mount's BDI once it is up, and ``writeback_cache`` is the FUSE capability.
    """
    return {
        "options": sorted(pyfuse3.default_options),
        "min_tasks": MIN_FUSE_TASKS,
        "max_tasks": MAX_FUSE_TASKS,
        "read_ahead_kb": READ_AHEAD_KB,
        "writeback_cache": VolumeFS.enable_writeback_cache,
    }
READY_TIMEOUT = 30.0
# The I/O threads need the GIL for a few microseconds around each syscall; while the
# trio thread runs Python, a waiting thread gets it only after the switch interval
# (CPython's default 5 ms), which made each member I/O batch take ~5 ms at queue depth 8.
GIL_SWITCH_INTERVAL = float(os.environ.get("VSTORE_SWITCH_INTERVAL", "0.0002"))


# ---------------------------------------------------------------------------- paths and records


def socket_path(home: Path, pool: str) -> Path:
    """The control socket of the process that has pool mounted."""
    return Path(home) / "run" / f"{pool}.sock"


def record_path(home: Path, pool: str) -> Path:
    """The record of a live mount of pool."""
    return Path(home) / "mounts" / f"{pool}.json"


def log_path(home: Path, pool: str) -> Path:
    """The log file of the mount process of pool."""
    return Path(home) / "logs" / f"mount-{pool}.log"


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _proc_start_time(pid: int) -> int | None:
    """The start time of a process (clock ticks since boot): tells a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":  # a zombie has exited
        return None
    return int(fields[19])


def _alive(record: dict[str, Any]) -> bool:
    try:
        pid = int(record["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    started = _proc_start_time(pid)
    return started is not None and started == record.get("start_time")


def _read_records(home: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted((Path(home) / "mounts").glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict):
            out.append((path, rec))
    return out


def _write_record(path: Path, record: dict[str, Any]) -> None:
    _private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def _remove_record(path: Path, pid: int) -> None:
    """Remove a mount record if it is still ours."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()


def live_mounts(home: Path) -> list[dict[str, Any]]:
    """Records of the mounts whose process is alive."""
    return [rec for _, rec in _read_records(home) if _alive(rec)]


def mounted_pool_socket(home: Path, pool_name: str) -> Path | None:
    """The control socket of the live mount process owning pool_name, or None if not mounted."""
    path = record_path(home, pool_name)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or not _alive(rec):
        return None
    sock = Path(rec.get("socket") or socket_path(home, pool_name))
    return sock if sock.exists() else None


# ---------------------------------------------------------------------------- mountpoints


def _unescape_mountinfo(text: str) -> str:
    return text.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def mount_entry(mountpoint: str | Path) -> dict[str, str] | None:
    """The /proc/self/mountinfo entry mounted exactly on mountpoint (the topmost), if any."""
    target = os.path.abspath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                if _unescape_mountinfo(parts[4]) == target:
                    found = {"mountpoint": target, "fstype": parts[sep + 1],
                             "source": _unescape_mountinfo(parts[sep + 2])}
    except OSError:
        return None
    return found


def check_mountpoint(mountpoint: str | Path) -> str:
    """The absolute mountpoint if it is an existing directory with nothing mounted on it."""
    mp = os.path.abspath(mountpoint)
    try:
        st = os.stat(mp)
    except FileNotFoundError:
        raise NotFoundError(f"mountpoint {mp} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise PoolBusyError(
                f"mountpoint {mp} holds a dead FUSE mount: run `vstore umount {mp}` first") from None
        raise ConfigError(f"mountpoint {mp}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"mountpoint {mp} is not a directory")
    entry = mount_entry(mp)
    if entry is not None or os.path.ismount(mp):
        what = f" ({entry['fstype']} {entry['source']})" if entry else ""
        hint = f"; `vstore umount {mp}` removes it" if entry and entry["fstype"] == "fuse.vstore" else ""
        raise PoolBusyError(f"mountpoint {mp} is busy: something is already mounted there{what}{hint}")
    return mp


def _umount_syscall(mountpoint: str, lazy: bool) -> None:
    """Unmount (as root through umount2, else through fusermount3); raise OSError on failure."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        if libc.umount2(os.fsencode(mountpoint), 2 if lazy else 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), mountpoint)
        return
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        busy = "busy" in res.stderr.lower()
        raise OSError(errno.EBUSY if busy else errno.EIO, res.stderr.strip() or "fusermount3 failed",
                      mountpoint)


def _set_io_flusher() -> None:
    """PR_SET_IO_FLUSHER: our own writes must not wait on reclaim that waits on us (loop on FUSE)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            log.info("prctl(PR_SET_IO_FLUSHER) not available (needs CAP_SYS_RESOURCE and"
                     " Linux 5.6): %s", os.strerror(err))
        else:
            log.info("prctl(PR_SET_IO_FLUSHER) set")
    except (OSError, AttributeError) as e:
        log.info("prctl(PR_SET_IO_FLUSHER) not available: %s", e)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _keep_freed_buffers() -> None:
    """Let glibc keep freed request buffers instead of returning them to the kernel.

    Every 1 MiB request buffer would otherwise come back from the kernel as fresh
    pages, faulted in one by one as the member reads fill it (measured: 42 page
    faults per 1 MiB read, 8 % of the throughput); with these thresholds, none.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's upper limit on 64-bit
        libc.mallopt(M_TRIM_THRESHOLD, 128 << 20)
    except (OSError, AttributeError) as e:  # not glibc
        log.info("mallopt not available: %s", e)


def _tune_bdi(mountpoint: str) -> None:
    """Raise the mount's read-ahead so that buffered reads arrive as 1 MiB requests."""
    try:
        dev = os.stat(mountpoint).st_dev
        path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
        log.info("%s = %d", path, READ_AHEAD_KB)
    except OSError as e:
        log.info("cannot raise read_ahead_kb: %s", e)


# ---------------------------------------------------------------------------- the mount itself

# The mount's own control commands (on the MountSession); the target's come from its registry.
MOUNT_COMMANDS = Registry()


@MOUNT_COMMANDS.command("fuse-unmount")
async def _fuse_unmount(session: MountSession) -> dict:
    """Unmount (refused while busy); the process then closes the pool and exits."""
    await session.unmount(lazy=False)
    return {"unmounted": session.mountpoint}


@MOUNT_COMMANDS.command("fuse-stats", quick=True)
async def _fuse_stats(session: MountSession) -> dict:
    """The filesystem's request counters."""
    return session.fs.stats()


@MOUNT_COMMANDS.command("mount-info", quick=True)
async def _mount_info(session: MountSession) -> dict:
    """Which process has which pool mounted where."""
    return {"pid": os.getpid(), "pool": session.target.name, "mountpoint": session.mountpoint}


class MountSession:
    """One mounted target: the FUSE session, its control socket and its shutdown."""

    def __init__(self, target: MountTarget, mountpoint: str, *, home: Path, read_only: bool = False,
                 allow_other: bool = False, uid: int | None = None, gid: int | None = None,
                 commands: Registry = POOL_COMMANDS) -> None:
        self.target = target
        self.commands = commands  # what the control socket carries out on the target
        self.mountpoint = os.path.abspath(mountpoint)
        self.home = Path(home)
        self.read_only = read_only
        self.allow_other = allow_other
        self.fs = VolumeFS(target, read_only=read_only, uid=uid, gid=gid)
        self.socket = socket_path(self.home, target.name)
        self.record = record_path(self.home, target.name)
        self.unmounted = False  # the kernel mount is gone (so close() must not unmount again)
        self.fuse_done = trio.Event()
        self._stopping = False

    def fuse_options(self) -> set[str]:
        """Mount options given to libfuse."""
        opts = set(fuse_settings()["options"])  # default_permissions
        opts |= {f"fsname=vstore:{self.target.name}", "subtype=vstore"}
        if self.allow_other:
            opts.add("allow_other")
        if self.read_only:
            opts.add("ro")
        return opts

    async def handle_command(self, request: dict) -> dict:
        """A control-socket request: one of the mount's own commands, else one of the target's."""
        if request.get("cmd") in MOUNT_COMMANDS:
            return await MOUNT_COMMANDS.dispatch(self, request)
        command = self.commands.lookup(request.get("cmd"))
        args = command.arguments({k: v for k, v in request.items() if k != "cmd"})
        if command.guards_open_volume and not args.get("force"):
            users = self.fs.open_count(str(args.get("name")))
            if users:
                raise PoolBusyError(f"volume {args.get('name')!r} is open in the mount on {self.mountpoint} "
                                    f"({users} open file handle(s), e.g. a loop device); close it first, "
                                    "or use --force")
        try:
            return await command.call(self.target, args)
        finally:
            await self.fs.refresh()  # volumes may have been created, removed or resized

    async def unmount(self, *, lazy: bool) -> None:
        """Unmount the FUSE filesystem (the session then ends); a busy mount is an error unless lazy."""
        if self.unmounted or self.fuse_done.is_set():
            return
        with contextlib.suppress(VstoreError):
            await self.target.flush()
        try:
            await trio.to_thread.run_sync(_umount_syscall, self.mountpoint, lazy)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise PoolBusyError(
                    f"{self.mountpoint} is busy (a file on it is open or a loop device uses it)"
                ) from None
            if e.errno != errno.EINVAL:  # EINVAL: already unmounted
                raise VstoreError(f"cannot unmount {self.mountpoint}: {e.strerror}") from None
        self.unmounted = True
        log.info("unmounted %s", self.mountpoint)

    async def _on_signals(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                log.info("got %s: flushing and unmounting", signal.Signals(signum).name)
                await self.stop()

    async def stop(self) -> None:
        """Unmount now: cleanly if nothing uses the mount, else detach it lazily."""
        if self._stopping:
            pyfuse3.terminate()
            return
        self._stopping = True
        try:
            await self.unmount(lazy=False)
        except VstoreError as e:
            log.warning("%s; stopping anyway (lazy unmount)", e)
            pyfuse3.terminate()  # close() then detaches the mount lazily
        # A clean unmount makes the kernel end the session; do not wait for ever.
        with trio.move_on_after(10):
            await self.fuse_done.wait()
        if not self.fuse_done.is_set():
            pyfuse3.terminate()

    async def _periodic_flush(self) -> None:
        flushed_generation = 0
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            generation = self.fs.write_generation
            if generation != flushed_generation:
                try:
                    await self.target.flush()
                    flushed_generation = generation
                except VstoreError as e:
                    self.fs.errors.report("periodic flush", e, bug=False)
            await self.fs.refresh()

    async def _wait_visible(self) -> None:
        """Return once the volume files can be seen through the mount."""
        wanted = set(self.target.volumes)

        def visible() -> bool:
            try:
                names = set(os.listdir(self.mountpoint))
            except OSError:
                return False
            return ".vstore" in names and wanted <= names

        with trio.move_on_after(READY_TIMEOUT):
            while not await trio.to_thread.run_sync(visible, abandon_on_cancel=True):
                await trio.sleep(0.02)
            return
        raise VstoreError(f"the mount on {self.mountpoint} did not become ready")

    async def run(self, *, handle_signals: bool = True, on_ready: Callable[[], None] | None = None,
                  task_status: trio.TaskStatus[MountSession] = trio.TASK_STATUS_IGNORED) -> None:
        """Mount, serve until unmounted (or stopped), then flush, close the target and clean up."""
        try:
            pyfuse3.init(self.fs, self.mountpoint, self.fuse_options())
        except RuntimeError as e:
            with trio.CancelScope(shield=True):
                await self.target.aclose(clean=True)  # nothing was written: release the pool
            raise VstoreError(f"cannot mount {self.mountpoint}: {e} (see the log)") from None
        ok = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._fuse_main, nursery)
                await nursery.start(control.serve, self.socket, self.handle_command)
                # The pool's path checkers and operations, stopped with the mount.
                await nursery.start(self.target.run_background)
                if handle_signals:
                    await nursery.start(self._on_signals)
                await self._wait_visible()
                await trio.to_thread.run_sync(_tune_bdi, self.mountpoint)
                _write_record(self.record, {
                    "pid": os.getpid(), "start_time": _proc_start_time(os.getpid()),
                    "pool": self.target.name, "mountpoint": self.mountpoint,
                    "socket": str(self.socket), "log": str(log_path(self.home, self.target.name)),
                })
                nursery.start_soon(self._periodic_flush)
                log.info("pool %s mounted on %s", self.target.name, self.mountpoint)
                if on_ready is not None:
                    on_ready()
                task_status.started(self)
            ok = True
        finally:
            with trio.CancelScope(shield=True):
                if handle_signals:
                    # Keep SIGTERM/SIGINT from killing us half-way through closing the pool.
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                        await self._close(ok)
                else:
                    await self._close(ok)

    async def _fuse_main(self, nursery: trio.Nursery) -> None:
        try:
            await pyfuse3.main(min_tasks=MIN_FUSE_TASKS, max_tasks=MAX_FUSE_TASKS)
        finally:
            self.fuse_done.set()
            nursery.cancel_scope.cancel()  # the mount is gone: stop the control socket too

    async def _close(self, ok: bool) -> None:
        _remove_record(self.record, os.getpid())
        try:
            await self.target.flush()
            flushed = True
        except Exception as e:
            log.error("final flush failed: %s", e)
            flushed = False
        try:
            # Lazy detach if still mounted (the daemon is going away either way).
            entry = None if self.unmounted else mount_entry(self.mountpoint)
            ours = entry is not None and entry["source"] == f"vstore:{self.target.name}"
            pyfuse3.close(unmount=ours)
        except Exception as e:
            log.error("closing the FUSE session: %s", e)
        try:
            await self.target.aclose(clean=flushed)
            log.info("pool %s closed (%s)", self.target.name, "clean" if flushed else "not clean")
        except Exception as e:
            log.error("closing pool %s: %s", self.target.name, e)
            if ok:
                raise


async def serve_mount(target: MountTarget, mountpoint: str, *, home: Path, read_only: bool = False,
                      allow_other: bool = False, uid: int | None = None, gid: int | None = None,
                      handle_signals: bool = True, commands: Registry = POOL_COMMANDS,
                      task_status: trio.TaskStatus[MountSession] = trio.TASK_STATUS_IGNORED) -> None:
    """Mount target on mountpoint and serve it until unmounted; for nursery.start() in tests too."""
    session = MountSession(target, mountpoint, home=home, read_only=read_only,
                           allow_other=allow_other, uid=uid, gid=gid, commands=commands)
    await session.run(handle_signals=handle_signals, task_status=task_status)


# ---------------------------------------------------------------------------- process management


class _StderrFormatter(logging.Formatter):
    """One line per message, no tracebacks (those go to the log file)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"vstore mount: {record.getMessage()}"


class _RedactSecrets(logging.Filter):
    """Passwords of URIs in any log record become *** (a failed replace names its URI)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact_text(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = redact_text(str(record.exc_info[1]))
            if text != str(record.exc_info[1]):
                record.exc_info = None
                record.msg = f"{record.msg} ({text})"
        return True


def _private_handler(path: Path) -> logging.FileHandler:
    """A log file only its owner can read (it may name hosts, targets and users)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    os.close(fd)
    handler = logging.FileHandler(path)
    handler.addFilter(_RedactSecrets())
    return handler


def _setup_logging(home: Path, *, to_stderr: bool) -> logging.FileHandler:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = _private_handler(_private_dir(Path(home) / "logs") / "mount.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if to_stderr and not any(type(h) is logging.StreamHandler for h in root.handlers[:-1]):
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.WARNING)
        err.setFormatter(_StderrFormatter())
        root.addHandler(err)
    return handler


def _switch_log(home: Path, pool: str, handler: logging.FileHandler, *, redirect_stderr: bool) -> None:
    """From the generic mount.log to this pool's log once the pool is known."""
    path = log_path(home, pool)
    new = _private_handler(path)
    new.setFormatter(handler.formatter)
    root = logging.getLogger()
    root.addHandler(new)
    root.removeHandler(handler)
    handler.close()
    if redirect_stderr:  # libfuse writes its complaints to fd 2
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(fd, 2)
        os.close(fd)


async def _daemon_main(open_target: Callable[[], Awaitable[MountTarget]], mountpoint: str, *,
                       home: Path, read_only: bool, allow_other: bool, uid: int | None,
                       gid: int | None, commands: Registry, handler: logging.FileHandler,
                       detached: bool, on_ready: Callable[[], None] | None) -> None:
    target = await open_target()
    try:
        _switch_log(home, target.name, handler, redirect_stderr=detached)
        _set_io_flusher()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        _keep_freed_buffers()
        if not getattr(sys.modules.get("pyfuse3._pyfuse3"), "VSTORE_NOGIL_PATCH", 0):
            log.warning("pyfuse3 lacks scripts/pyfuse3-nogil.patch: its copies hold the GIL (slower)")
        session = MountSession(target, mountpoint, home=home, read_only=read_only,
                               allow_other=allow_other, uid=uid, gid=gid, commands=commands)
    except BaseException:
        with trio.CancelScope(shield=True):
            await target.aclose(clean=True)
        raise
    await session.run(on_ready=on_ready)


def mount(open_target: Callable[[], Awaitable[MountTarget]], mountpoint: str, *, home: Path,
          foreground: bool = False, read_only: bool = False, allow_other: bool = False,
          uid: int | None = None, gid: int | None = None, commands: Registry = POOL_COMMANDS) -> int:
    """Mount the target that open_target opens; returns 0 (detached: once the files are visible).

    Its control socket carries out the commands of ``commands`` (a pool's, by default) on it.

    Errors before the mount is ready raise VstoreError (for a detached mount, the child's
    error is re-raised in the caller as the same class).
    """
    home = Path(home)
    mp = check_mountpoint(mountpoint)
    _private_dir(home)
    kwargs = dict(home=home, read_only=read_only, allow_other=allow_other, uid=uid, gid=gid,
                  commands=commands)
    if foreground:
        handler = _setup_logging(home, to_stderr=True)
        try:
            trio.run(functools.partial(_daemon_main, open_target, mp, handler=handler,
                                       detached=False, on_ready=None, **kwargs))
        except BaseExceptionGroup as e:
            raise _single_error(e) from None
        return 0

    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # first child: new session, fork again so the daemon is not our child
        code = 1
        try:
            os.close(read_fd)
            os.setsid()
            if os.fork() == 0:
                code = _detached_child(open_target, mp, write_fd, kwargs)
            else:
                code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    with os.fdopen(read_fd, "rb") as pipe:
        line = pipe.readline(65536)
    try:
        report = json.loads(line) if line else None
    except ValueError:
        report = None
    if report is None:
        raise VstoreError(f"the mount process died before the mount was ready (see {home}/logs/)")
    if not report.get("ok"):
        control.raise_for_response(report)
    return 0


def _single_error(exc: BaseException) -> BaseException:
    """The one error inside nested exception groups (or the group itself if there are several)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _detached_child(open_target: Callable[[], Awaitable[MountTarget]], mp: str, write_fd: int,
                    kwargs: dict[str, Any]) -> int:
    """The mount process of a detached mount: report readiness (or the error) through write_fd."""
    home = kwargs["home"]
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    log_fd = os.open(_private_dir(home / "logs") / "mount.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(log_fd, 2)
    os.close(null)
    os.close(log_fd)
    os.chdir("/")
    root = logging.getLogger()
    for inherited in root.handlers[:]:  # the caller's handlers write to a stderr that is gone
        root.removeHandler(inherited)
    handler = _setup_logging(home, to_stderr=False)
    reported = False

    def report(message: dict[str, Any]) -> None:
        nonlocal reported
        if reported:
            return
        reported = True
        with contextlib.suppress(OSError):
            os.write(write_fd, control.encode(message))
            os.close(write_fd)

    try:
        trio.run(functools.partial(_daemon_main, open_target, mp, handler=handler, detached=True,
                                   on_ready=lambda: report({"ok": True}), **kwargs))
        return 0
    except BaseException as e:
        leaf = _single_error(e)
        if isinstance(leaf, VstoreError):
            log.error("%s", leaf)
        else:
            log.exception("mount process failed")
        report(control.error_response(leaf))
        return 1


def find_mount(home: Path, mountpoint: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The record (path, contents) of the mount on mountpoint, alive or not."""
    mp = os.path.abspath(mountpoint)
    found = None
    for path, rec in _read_records(home):
        if rec.get("mountpoint") == mp:
            if _alive(rec):
                return path, rec
            found = (path, rec)
    return found


def _wait_exit(record: dict[str, Any], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(record):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def unmount(mountpoint: str, *, home: Path, timeout: float = 60) -> None:
    """Flush, close the pool cleanly and unmount: through the mount process, else fusermount3."""
    mp = os.path.abspath(mountpoint)
    found = find_mount(home, mp)
    if found is not None and _alive(found[1]):
        path, rec = found
        sock = Path(rec.get("socket", ""))
        try:
            control.call_sync(sock, MOUNT_COMMANDS.lookup("fuse-unmount").request(), timeout=timeout)
        except control.ControlSocketError as e:
            if mount_entry(mp) is not None:  # not unmounted (else the process is already closing)
                log.info("control socket: %s; sending SIGTERM to %s", e, rec["pid"])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(rec["pid"]), signal.SIGTERM)
        if not _wait_exit(rec, timeout):
            raise errors.DeviceTimeoutError(
                f"the mount process {rec['pid']} of {mp} did not exit within {timeout:g} s "
                f"(see {rec.get('log', 'its log')})")
        return
    # No live mount process: a stale mount (the process was killed) or nothing at all.
    entry = mount_entry(mp)
    if entry is None or not entry["fstype"].startswith("fuse"):
        if found is not None:
            found[0].unlink(missing_ok=True)
        raise NotFoundError(f"{mp} is not a vstore mount")
    try:
        _umount_syscall(mp, lazy=False)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise PoolBusyError(f"{mp} is busy (a file on it is open or a loop device uses it)") from None
        try:
            _umount_syscall(mp, lazy=True)
        except OSError as e2:
            raise VstoreError(f"cannot unmount {mp}: {e2.strerror}") from None
    if found is not None:
        found[0].unlink(missing_ok=True)
