"""rbd:// members: a Ceph RBD image through librbd (Debian's python3-rbd / python3-rados).

URI: ``rbd://[ID@]POOL/IMAGE[?conf=/etc/ceph/ceph.conf&keyring=PATH&timeout=30]``.
``ID`` is the cephx client name without ``client.`` (default ``admin``); the key
comes from the keyring file (never from the URI: it would end up in status and logs).
``timeout`` bounds the monitor and OSD operations (seconds): a cluster that stops
answering fails the I/O with a clear error instead of hanging.

librbd's asynchronous calls (``aio_read``/``aio_write``/``aio_flush``/
``aio_write_zeroes``) run without a thread per I/O: the calling trio task parks
(``trio.lowlevel.wait_task_rescheduled``) and the completion callback, which fires
on a librbd thread, hands the result back through the trio token's
``run_sync_soon``. Connecting and opening (blocking in librados) run in a worker
thread once per device.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import numpy as np
import outcome
import trio

from vstore.errors import ConfigError, MemberIOError, NotFoundError
from vstore.stack.device import Buffer, DeviceBase, as_u8
from vstore.uri import Backend, MemberURI

DEFAULT_CONF = "/etc/ceph/ceph.conf"
DEFAULT_TIMEOUT = 30.0


def _libs() -> tuple[Any, Any]:
    """The rados and rbd modules (a clear error when python3-rados/python3-rbd are missing)."""
    try:
        import rados
        import rbd
    except ImportError as e:
        raise ConfigError(f"rbd:// members need librbd's Python bindings ({e}); "
                          "run scripts/setup.sh (python3-rados, python3-rbd)") from None
    return rados, rbd


def _pool_of(uri_text: str) -> tuple[str | None, str]:
    """(ID, POOL) from the URI text as written (urlsplit's hostname would lowercase the pool)."""
    netloc = urlsplit(uri_text).netloc
    user, _, pool = netloc.rpartition("@")
    return (unquote(user) if user else None), unquote(pool)


class _Where:
    """What an rbd:// URI names: client id, pool, image, conf, keyring, timeout."""

    def __init__(self, text: str, params: dict[str, str], path: str) -> None:
        self.client_id, self.pool = _pool_of(text)
        self.client_id = self.client_id or "admin"
        self.image = path.strip("/")
        self.conf = params.get("conf") or DEFAULT_CONF
        self.keyring = params.get("keyring") or None
        try:
            self.timeout = float(params.get("timeout", DEFAULT_TIMEOUT))
        except ValueError:
            raise ConfigError(f"rbd: timeout={params.get('timeout')!r} is not a number of seconds") from None
        if not self.timeout > 0:
            raise ConfigError("rbd: timeout must be more than 0 seconds")
        self.name = f"rbd://{self.pool}/{self.image}" if self.image else f"rbd://{self.pool}"


def _check_text(netloc: str, path: str, password: str | None, port: int | None, text: str,
                need_image: bool) -> None:
    pool = netloc.rpartition("@")[2]
    if password is not None or ":" in netloc.rpartition("@")[0]:
        raise ConfigError("rbd URI must not carry a key: put it in a keyring file (?keyring=PATH)")
    if port is not None or ":" in pool:
        raise ConfigError(f"rbd URI takes a pool, not a host:port: {text!r} (rbd://[ID@]POOL/IMAGE)")
    if not pool:
        raise ConfigError(f"rbd URI needs a pool: {text!r} (rbd://[ID@]POOL/IMAGE)")
    image = path.strip("/")
    if need_image and (not image or "/" in image):
        raise ConfigError(f"rbd URI needs a pool and one image name: {text!r} (rbd://[ID@]POOL/IMAGE)")
    if not need_image and image:
        raise ConfigError(f"discover takes a pool, not an image: {text!r} (rbd://[ID@]POOL)")


def _check_uri(uri: MemberURI) -> None:
    netloc = urlsplit(uri.text).netloc
    _check_text(netloc, uri.path, uri.password, uri.port, uri.redacted(), need_image=True)


def _connect(where: _Where) -> tuple[Any, Any]:
    """A connected cluster handle and an ioctx on the pool (blocking: run in a thread)."""
    rados, _ = _libs()
    if not os.path.isfile(where.conf):
        raise ConfigError(f"{where.name}: Ceph configuration {where.conf} does not exist (?conf=PATH)")
    if where.keyring is not None and not os.path.isfile(where.keyring):
        raise ConfigError(f"{where.name}: keyring {where.keyring} does not exist (?keyring=PATH)")
    t = str(int(where.timeout + 0.999))
    conf = {"rados_osd_op_timeout": t, "rados_mon_op_timeout": t, "client_mount_timeout": t,
            "rbd_cache": "false", "log_to_stderr": "false", "err_to_stderr": "false"}
    if where.keyring is not None:
        conf["keyring"] = where.keyring
    try:
        cluster = rados.Rados(conffile=where.conf, rados_id=where.client_id, conf=conf)
    except rados.Error as e:
        raise ConfigError(f"{where.name}: bad Ceph configuration {where.conf}: {_why(e)}") from None
    try:
        cluster.connect(timeout=int(where.timeout + 0.999))
    except rados.Error as e:
        cluster.shutdown()
        raise MemberIOError(f"{where.name}: cannot connect to the Ceph cluster of {where.conf} "
                            f"as client.{where.client_id}: {_why(e)}") from None
    try:
        ioctx = cluster.open_ioctx(where.pool)
    except rados.ObjectNotFound:
        cluster.shutdown()
        raise NotFoundError(f"{where.name}: no pool {where.pool!r} in the Ceph cluster") from None
    except rados.Error as e:
        cluster.shutdown()
        raise MemberIOError(f"{where.name}: cannot open pool {where.pool!r}: {_why(e)}") from None
    return cluster, ioctx


def _why(e: BaseException) -> str:
    """One line for a rados/rbd exception (its errno's text when it has one)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    code = getattr(e, "errno", None)
    if code and os.strerror(abs(code)) not in text:
        text += f" ({os.strerror(abs(code))})"
    return text


def _open_sync(where: _Where, create_size: int | None, block_size: int) -> RbdDevice:
    _, rbd = _libs()
    cluster, ioctx = _connect(where)
    try:
        created = False
        if create_size is not None:
            if create_size <= 0 or create_size % block_size:
                raise ConfigError(f"{where.name}: size must be a positive multiple of {block_size}")
            try:
                rbd.RBD().create(ioctx, where.image, create_size, old_format=False)
                created = True
            except rbd.ImageExists:
                pass  # open what is there, as a file member does
            except rbd.Error as e:
                raise MemberIOError(f"{where.name}: cannot create the image: {_why(e)}") from None
        try:
            image = rbd.Image(ioctx, where.image)
        except rbd.ImageNotFound:
            raise NotFoundError(f"{where.name}: no such image (give --size to create it)") from None
        except rbd.Error as e:
            raise MemberIOError(f"{where.name}: cannot open the image: {_why(e)}") from None
        try:
            size = image.size()
            ident = f"rbd:{cluster.get_fsid()}:{ioctx.get_pool_id()}:{image.id()}"
        except BaseException:
            image.close()
            raise
    except BaseException:
        ioctx.close()
        cluster.shutdown()
        raise
    size -= size % block_size
    if size <= 0:
        image.close()
        ioctx.close()
        cluster.shutdown()
        raise ConfigError(f"{where.name}: empty image (size {size})")
    dev = RbdDevice(where, cluster, ioctx, image, size, block_size, ident)
    dev.created = created
    return dev


class RbdDevice(DeviceBase):
    """A BlockDevice over one open RBD image; every I/O is one librbd aio call."""

    def __init__(self, where: _Where, cluster: Any, ioctx: Any, image: Any, size: int,
                 block_size: int, ident: str) -> None:
        self.where = where
        self.name = where.name
        self._cluster, self._ioctx, self._image = cluster, ioctx, image
        self.size = size
        self.block_size = block_size
        self.timeout = where.timeout
        self._ident = ident
        self.created = False  # this open created the image (a failed create removes it again)
        self._closed = False

    def identity(self) -> str:
        """Cluster fsid, pool id and image id: equal exactly when two URIs reach the same image."""
        return self._ident

    async def _aio(self, what: str, offset: int, start: Callable[[Callable[..., None]], Any]) -> Any:
        """Start a librbd aio call and park this task until its completion callback reschedules it.

        The callback runs on a librbd thread: it only reads the result and hands it to trio
        with ``run_sync_soon``. The I/O cannot be cancelled once submitted (librbd has no
        such call), so a cancel waits for it; the OSD op timeout bounds that wait.
        """
        if self._closed:
            raise MemberIOError(f"{self.name}: {what} on a closed device")
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def done(completion: Any, data: Any = None) -> None:  # on a librbd thread
            try:
                result = outcome.Value((completion.get_return_value(), data))
            except BaseException as e:  # never raise into librbd
                result = outcome.Error(e)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:
                pass

        try:
            start(done)
        except Exception as e:
            raise MemberIOError(f"{self.name}: {what} at {offset}: {_why(e)}") from None
        rv, data = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        if rv < 0:
            raise MemberIOError(f"{self.name}: {what} at offset {offset}: {os.strerror(-rv)}")
        return rv, data

    async def _read_bytes(self, offset: int, length: int) -> bytes:
        self.check(offset, length)
        if not length:
            return b""
        rv, data = await self._aio("read", offset,
                                   lambda cb: self._image.aio_read(offset, length, cb))
        if rv != length or data is None or len(data) != length:
            raise MemberIOError(f"{self.name}: short read at offset {offset}: {rv} of {length} bytes")
        return data

    async def read(self, offset: int, length: int) -> np.ndarray:
        """Read length bytes at offset."""
        data = await self._read_bytes(offset, length)
        out = np.empty(length, dtype=np.uint8)
        out[:] = np.frombuffer(data, dtype=np.uint8)
        return out

    async def readv_into(self, offset: int, views: list[np.ndarray]) -> None:
        """Read consecutive bytes at offset into the views (one aio_read; copied in on completion)."""
        total = sum(len(v) for v in views)
        src = np.frombuffer(await self._read_bytes(offset, total), dtype=np.uint8)
        pos = 0
        for v in views:
            as_u8(v)[:] = src[pos : pos + len(v)]
            pos += len(v)

    async def write(self, offset: int, data: Buffer) -> None:
        """Write the bytes at offset (acknowledged once the OSDs have them)."""
        if not isinstance(data, bytes):  # librbd's binding takes bytes: one copy of anything else
            data = np.ascontiguousarray(as_u8(data)).tobytes()
        await self._write_bytes(offset, data)

    async def writev(self, offset: int, views: list[np.ndarray]) -> None:
        """Write the views as consecutive bytes at offset (one aio_write)."""
        await self._write_bytes(offset, b"".join(np.ascontiguousarray(as_u8(v)) for v in views))

    async def _write_bytes(self, offset: int, data: bytes) -> None:
        self.check(offset, len(data))
        if not data:
            return
        rv, _ = await self._aio("write", offset, lambda cb: self._image.aio_write(data, offset, cb))
        if rv not in (0, len(data)):
            raise MemberIOError(f"{self.name}: short write at offset {offset}: {rv} of {len(data)} bytes")

    async def flush(self) -> None:
        """aio_flush: every write that returned is on the OSDs' stable storage."""
        await self._aio("flush", 0, lambda cb: self._image.aio_flush(cb))

    async def discard(self, offset: int, length: int) -> None:
        """Deallocate the range; it reads back as zeros (librbd's write_zeroes: discard, zeroing the edges)."""
        self.check(offset, length)
        if not length:
            return
        await self._aio("discard", offset, lambda cb: self._image.aio_write_zeroes(offset, length, cb))

    async def remove_created(self) -> None:
        """Remove the image this open created, over a new connection (the device is closed)."""
        if not self.created:
            return
        where = self.where

        def remove() -> None:
            _, rbd = _libs()
            try:
                cluster, ioctx = _connect(where)
            except Exception:
                return
            try:
                rbd.RBD().remove(ioctx, where.image)
            except rbd.Error:
                pass
            finally:
                ioctx.close()
                cluster.shutdown()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(remove)
        self.created = False

    async def aclose(self) -> None:
        """Close the image and the cluster connection (in a worker thread: they block)."""
        if self._closed:
            return
        self._closed = True
        image, ioctx, cluster = self._image, self._ioctx, self._cluster

        def close() -> None:
            try:
                image.close()
            finally:
                ioctx.close()
                cluster.shutdown()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close)


def _where(uri: MemberURI) -> _Where:
    return _Where(uri.text, uri.params, uri.path)


async def open_uri(uri: MemberURI, *, create_size: int | None = None, **opts: Any) -> RbdDevice:
    """Open rbd://[ID@]POOL/IMAGE (creating the image when missing and create_size is given)."""
    _libs()
    block_size = int(uri.params.get("block_size", 512))
    return await trio.to_thread.run_sync(_open_sync, _where(uri), create_size, block_size)


def _list_sync(where: _Where) -> list[dict]:
    _, rbd = _libs()
    cluster, ioctx = _connect(where)
    try:
        out = []
        for name in sorted(rbd.RBD().list(ioctx)):
            entry: dict[str, Any] = {"image": name}
            try:
                with rbd.Image(ioctx, name, read_only=True) as image:
                    entry["size"] = image.size()
                    entry["id"] = image.id()
            except rbd.Error as e:
                entry["error"] = _why(e)
            out.append(entry)
        return out
    finally:
        ioctx.close()
        cluster.shutdown()


async def discover(pool_uri: str) -> list[dict]:
    """The images of rbd://[ID@]POOL[?conf=...&keyring=...], each with its member URI and size."""
    parts = urlsplit(pool_uri.strip())
    if parts.scheme.lower() != "rbd":
        raise ConfigError(f"not an rbd:// pool URI: {pool_uri!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"rbd URI takes a pool, not a host:port: {pool_uri!r}") from None
    _check_text(parts.netloc, parts.path, parts.password, port, pool_uri, need_image=False)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(params) - {"conf", "keyring", "timeout"})
    if unknown:
        raise ConfigError(f"unknown parameter {unknown[0]!r} in {pool_uri!r} (known: conf, keyring, timeout)")
    where = _Where(pool_uri, params, "")
    images = await trio.to_thread.run_sync(_list_sync, where)
    base = f"rbd://{parts.netloc}"
    for entry in images:
        entry["uri"] = f"{base}/{entry['image']}" + (f"?{parts.query}" if parts.query else "")
    return images


BACKEND = Backend("rbd", open_uri, frozenset({"conf", "keyring", "timeout", "block_size"}), _check_uri)

__all__ = ["BACKEND", "RbdDevice", "discover", "open_uri"]
