"""The control socket: how other vstore commands reach the process that owns a pool.

While a pool is mounted, the mount process owns it (see DESIGN.md, "Who owns a
pool"); every other command on that pool is sent here instead of opening the
pool a second time. The protocol is one JSON object per line, both ways, over a
Unix socket with owner-only permissions:

    request:  {"cmd": NAME, ...arguments}                   (a registered command)
    response: {"ok": true, "result": {...}}                 (the command's dict)
              {"ok": false, "error": "...", "type": "NotFoundError"}

A request is a call of a registered command (``vstore.pool.commands``: a pool's
commands, and the mount's own in ``fuse_mount.daemon``): ``Command.request``
builds it, and the server's handler (``MountSession.handle_command``) looks NAME
up in the registry and calls it. This module only moves the calls and their
answers. A connection may carry several requests, answered in order.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from vstore import errors
from vstore.errors import VstoreError

log = logging.getLogger(__name__)

MAX_LINE = 16 * 1024 * 1024  # a request or response larger than this is refused
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the terminating NUL

Handler = Callable[[dict], Awaitable[dict]]  # a request -> its result (a registry's dispatch)


class ControlSocketError(VstoreError):
    """The control socket of a mount process cannot be reached or answered garbage."""


def json_default(obj: Any) -> Any:
    """Encode numpy scalars and arrays, paths and sets; anything else as its str()."""
    item = getattr(obj, "item", None)
    if callable(item) and getattr(obj, "shape", None) == ():
        return item()
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


def encode(message: dict) -> bytes:
    """One JSON line."""
    return json.dumps(message, default=json_default, separators=(",", ":")).encode() + b"\n"


def error_response(exc: BaseException) -> dict:
    """The response that carries an exception back to the caller."""
    if isinstance(exc, VstoreError):
        return {"ok": False, "error": str(exc), "type": type(exc).__name__}
    return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}", "type": "VstoreError"}


def raise_for_response(response: dict) -> dict:
    """Return the result of a response, or raise its error as the matching vstore.errors class."""
    if not isinstance(response, dict) or "ok" not in response:
        raise ControlSocketError(f"malformed control response: {response!r:.200}")
    if response["ok"]:
        result = response.get("result", {})
        return result if isinstance(result, dict) else {"result": result}
    cls = getattr(errors, str(response.get("type", "")), None)
    if cls is None and response.get("type") == ControlSocketError.__name__:
        cls = ControlSocketError
    if not (isinstance(cls, type) and issubclass(cls, VstoreError)):
        cls = VstoreError
    raise cls(str(response.get("error", "unknown error")))


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """A name for path short enough for sockaddr_un (through /proc/self/fd if needed)."""
    text = os.fspath(path)
    if len(text.encode()) <= _SUN_PATH_MAX:
        yield text
        return
    try:
        dfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise ControlSocketError(f"{path.parent}: no such directory") from e
    try:
        short = f"/proc/self/fd/{dfd}/{path.name}"
        if len(short.encode()) > _SUN_PATH_MAX:
            raise ControlSocketError(f"control socket name too long: {path.name!r}")
        yield short
    finally:
        os.close(dfd)


def _remove_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(f"{path}: exists and is not a socket")
    os.unlink(path)


async def _answer(handler: Handler, line: bytes) -> dict:
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise errors.ConfigError("a control request must be a JSON object")
    except ValueError as e:
        return error_response(errors.ConfigError(f"malformed control request: {e}"))
    except VstoreError as e:
        return error_response(e)
    try:
        result = await handler(request)
    except VstoreError as e:
        return error_response(e)
    except Exception as e:  # a bug in a command must not take the mount down
        log.exception("control command %r failed", request.get("cmd"))
        return error_response(e)
    return {"ok": True, "result": result if result is not None else {}}


async def _serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    buf = bytearray()
    async with stream:
        try:
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > MAX_LINE:
                        await stream.send_all(encode(error_response(
                            errors.ConfigError("control request too long"))))
                        return
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buf += chunk
                    continue
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                if not line.strip():
                    continue
                response = await _answer(handler, line)
                try:
                    data = encode(response)
                except (TypeError, ValueError) as e:
                    log.exception("control response does not encode")
                    data = encode(error_response(e))
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away; nothing to answer


async def serve(
    path: Path,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve JSON-line requests on a Unix socket (mode 0600) until cancelled."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _remove_stale(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _short_path(path) as name:
            old_umask = os.umask(0o177)  # the socket is created 0600: no window of wider access
            try:
                await sock.bind(name)
            finally:
                os.umask(old_umask)
        os.chmod(path, 0o600)
        bound_ino = os.stat(path).st_ino
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise ControlSocketError(f"{path}: cannot listen: {e.strerror}") from e
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            async with listener:
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            log.warning("control socket: accept failed: %s", e)
                            await trio.sleep(0.1)
                            continue
                        raise
                    nursery.start_soon(_serve_connection, stream, handler)
    finally:
        with contextlib.suppress(OSError):
            # Only remove our own socket, not one a later server put in its place.
            if os.stat(path).st_ino == bound_ino:
                os.unlink(path)


async def call(path: Path, request: dict, timeout: float = 600) -> dict:
    """Send one request to a control socket; return its result or raise its error."""
    path = Path(path)
    data = encode(request)
    with trio.move_on_after(timeout) as scope:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            try:
                with _short_path(path) as name:
                    await sock.connect(name)
            except OSError as e:
                raise ControlSocketError(
                    f"{path}: no mount process is listening ({e.strerror})") from e
            stream = trio.SocketStream(sock)
            try:
                await stream.send_all(data)
                buf = bytearray()
                while b"\n" not in buf:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        raise ControlSocketError(f"{path}: the mount process closed the connection")
                    buf += chunk
                    if len(buf) > MAX_LINE:
                        raise ControlSocketError(f"{path}: control response too long")
            except (trio.BrokenResourceError, OSError) as e:
                raise ControlSocketError(f"{path}: connection failed: {e}") from e
    if scope.cancelled_caught:
        raise ControlSocketError(f"{path}: no answer within {timeout:g} s")
    return _parse(path, bytes(buf[: buf.index(b"\n")]))


def _parse(path: Path, line: bytes) -> dict:
    try:
        response = json.loads(line)
    except ValueError as e:
        raise ControlSocketError(f"{path}: malformed control response: {e}") from e
    return raise_for_response(response)


def call_sync(path: Path, request: dict, timeout: float = 600) -> dict:
    """Blocking form of call() for the CLI (usable with or without a running trio loop)."""
    path = Path(path)
    data = encode(request)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _short_path(path) as name:
                sock.connect(name)
            sock.sendall(data)
            buf = bytearray()
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlSocketError(f"{path}: the mount process closed the connection")
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise ControlSocketError(f"{path}: control response too long")
        except TimeoutError as e:
            raise ControlSocketError(f"{path}: no answer within {timeout:g} s") from e
        except OSError as e:
            raise ControlSocketError(f"{path}: no mount process is listening ({e.strerror})") from e
    return _parse(path, bytes(buf[: buf.index(b"\n")]))
