"""One owner per pool: a lock file in the config directory plus an owner token in
the pool metadata (host, pid, time), as s3backer's mount token.

The lock file stops two processes of this host sharing one config directory; the
token stops two hosts (or two config directories) opening the same members. A
token left by a process of this host that no longer runs is stale and is taken
over; the caller then recovers the pool before use.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any

from vstore.errors import PoolBusyError


def describe(token: dict[str, Any] | None) -> str:
    """Human description of an owner token."""
    if not token:
        return "nobody"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(token.get("time", 0)))
    return f"pid {token.get('pid')} on host {token.get('host')} since {when}"


def my_token() -> dict[str, Any]:
    """The owner token of this process."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": int(time.time())}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def token_is_stale(token: dict[str, Any] | None) -> bool:
    """True when the token belongs to a dead process of this host (or there is none)."""
    if not token:
        return True
    if token.get("host") != socket.gethostname():
        return False
    pid = int(token.get("pid", 0))
    return not pid_alive(pid)


def refuse_live_owner(meta: dict[str, Any] | None, what: str) -> None:
    """PoolBusyError when this metadata's pool is open in a live process: --force never overrides that."""
    token = (meta or {}).get("owner")
    if token and not token_is_stale(token):
        name = (meta or {}).get("name", "?")
        raise PoolBusyError(f"{what} is a member of pool {name!r}, which is in use by {describe(token)}; "
                            "--force does not override a live owner")


class PoolLock:
    """An exclusive, non-blocking flock on the pool's lock file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, pool: str, token_hint: dict[str, Any] | None = None) -> None:
        """Take the lock or raise PoolBusyError naming who holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:  # ELOOP: a symlink planted in place of the lock file
            raise PoolBusyError(f"lock file {self.path}: {e.strerror} (refusing to follow a symlink)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise PoolBusyError(f"pool {pool!r} is in use by {holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, describe(my_token()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Drop the lock."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
