"""A TCP byte stream for the network backends' protocol drivers (NFS's RPC client, iSCSI).

The drivers keep their protocol state in sans-IO objects (``backends.nfs.rpc.
RecordReceiver``, ``backends.iscsi.connection.Connection``) that say where the
next received bytes must go and hand over the buffers to send; this module only
moves bytes. A plain non-blocking socket is driven with
``trio.lowlevel.wait_readable``/``wait_writable``: the system call is tried
first and trio is asked to wait only on EAGAIN, so bytes already there cost no
trip through the scheduler (trio's socket wrapper yields on every call).

* ``open_stream`` connects (TCP_NODELAY, optional socket buffer sizes, a timeout).
* ``Stream.send_all`` writes a list of buffers with scatter-gather ``sendmsg``,
  resuming partial sends, never joining them.
* ``Stream.try_recv`` / ``try_recv_into`` receive once, without waiting, into a
  buffer or (scattered) a list of them; ``wait_readable`` waits for more;
  ``recv_into`` does both; ``recv_exactly_into`` fills a buffer.
* ``Stream.close`` wakes any task waiting on the socket.

Failures are ``OSError``s for the caller to word: ``EndOfStream`` when the peer
closed, ``StreamClosedError`` when this side closed the stream, ``TimeoutError``
when connecting took too long, the kernel's error otherwise.
"""

from __future__ import annotations

import os
import socket

import trio

IOV_MAX = 512  # stay well under the kernel's 1024 iovecs per sendmsg/recvmsg


class EndOfStream(ConnectionError):
    """The peer closed the connection."""


class StreamClosedError(ConnectionError):
    """The stream was closed on this side (by ``close``) while a task used it."""


async def open_stream(host: str, port: int, *, timeout: float | None = None,
                      buffer_size: int | None = None) -> Stream:
    """A connected TCP stream to host:port (every address of host tried in turn)."""
    with trio.move_on_after(timeout if timeout is not None else float("inf")) as cs:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if buffer_size:
                    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                        sock.setsockopt(socket.SOL_SOCKET, opt, buffer_size)
                await _connect(sock, addr)
                return Stream(sock)
            except BaseException as e:
                sock.close()
                if not isinstance(e, OSError):
                    raise
                last = e
        raise last if last is not None else OSError(f"no address for {host}")
    assert cs.cancelled_caught
    raise TimeoutError(f"connecting to {host}:{port} timed out after {timeout:g} s")


async def _connect(sock: socket.socket, addr) -> None:
    try:
        sock.connect(addr)
        return
    except BlockingIOError:
        pass
    await trio.lowlevel.wait_writable(sock)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


class Stream:
    """One connected non-blocking socket: scatter-gather sends, receives into given buffers."""

    __slots__ = ("sock", "closed", "torn")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False
        self.torn = False  # a send stopped (error, cancellation) with part of its bytes sent

    def close(self) -> None:
        """Close the socket; a task waiting on it gets ``StreamClosedError``."""
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    async def wait_readable(self) -> None:
        try:
            await trio.lowlevel.wait_readable(self.sock)
        except (trio.ClosedResourceError, OSError) as e:
            raise StreamClosedError("the connection was closed") from e

    async def send_all(self, buffers: list) -> None:
        """Send every buffer in order (partial sends resumed); one stopped halfway sets ``torn``."""
        views = []
        for b in buffers:
            if not isinstance(b, bytes):
                b = memoryview(b)
                if b.format != "B" or b.ndim != 1:
                    b = b.cast("B")
            if len(b):
                views.append(b)
        sock = self.sock
        started = False
        try:
            while views:
                try:
                    n = sock.sendmsg(views[:IOV_MAX])
                except BlockingIOError:
                    n = 0
                except ValueError as e:  # the socket was closed meanwhile (fileno -1)
                    raise StreamClosedError("the connection was closed") from e
                if n:
                    started = True
                while n:
                    first = views[0]
                    if n >= len(first):
                        n -= len(first)
                        views.pop(0)
                    else:
                        views[0] = memoryview(first)[n:]
                        n = 0
                if views:
                    try:
                        await trio.lowlevel.wait_writable(sock)
                    except (trio.ClosedResourceError, OSError) as e:
                        raise StreamClosedError("the connection was closed") from e
        except BaseException:
            if started and views:
                self.torn = True
            raise

    def try_recv(self, buffer: memoryview) -> int:
        """One receive into one buffer without waiting: bytes received, 0 if none were there."""
        return self.try_recv_into([buffer])

    def try_recv_into(self, buffers: list[memoryview]) -> int:
        """One receive into the buffers without waiting: bytes received, 0 if none were there."""
        try:
            if len(buffers) == 1:
                n = self.sock.recv_into(buffers[0])
            else:
                n = self.sock.recvmsg_into(buffers[:IOV_MAX])[0]
        except BlockingIOError:
            return 0
        except ValueError as e:
            raise StreamClosedError("the connection was closed") from e
        if n == 0:
            raise EndOfStream("the peer closed the connection")
        return n

    async def recv_into(self, buffers: list[memoryview]) -> int:
        """Receive once into the buffers (scattered in order), waiting until bytes arrive."""
        while True:
            n = self.try_recv_into(buffers)
            if n:
                return n
            await self.wait_readable()

    async def recv_exactly_into(self, buffer: memoryview) -> None:
        """Fill buffer with the next len(buffer) bytes."""
        got = 0
        while got < len(buffer):
            got += await self.recv_into([buffer[got:]])
