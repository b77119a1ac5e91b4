"""A trio ONC RPC client over one TCP connection with many calls in flight.

* Calls are matched to replies by XID (random start, never reused for a
  different request). Up to ``depth`` calls are in flight at once.
* There is no background task: whichever waiting caller finds the reader role
  free receives for everybody and hands the role on when its own reply is in.
  The receive state lives in a ``RecordReceiver``, so a reader that is
  cancelled (timeout) between two ``recv_into`` calls leaves nothing broken.
* Every call has a timeout per attempt. When it expires, or the connection
  drops, the client reconnects and retransmits the same bytes with the same
  XID, so the server's duplicate-request cache recognises a WRITE it has
  already done. After ``retrans`` retransmissions the call fails with
  ``DeviceTimeoutError``.
* Payloads are sent with ``sendmsg`` as separate buffers (no concatenation),
  and a READ reply's data can be received straight into the caller's buffer
  (or the pieces of an ``IoVec``); once a call is given up, the rest of its
  reply goes to scratch, never into that buffer.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import trio

from vstore.errors import DeviceTimeoutError, MemberIOError, ProtocolError
from vstore.io.stream import EndOfStream, Stream, StreamClosedError, open_stream
from vstore.stack.iovec import IoVec

from .nfs3 import decode_read, read_reply_layout
from .rpc import Message, RecordReceiver, decode_reply, encode_call, record_mark
from .xdr import Unpacker

BufferLike = bytes | bytearray | memoryview | np.ndarray


class _Call:
    __slots__ = ("xid", "parts", "sink", "eof", "msg", "error", "wake", "waiting")

    def __init__(self, xid: int, parts: list[memoryview], sink: memoryview | IoVec | None) -> None:
        self.xid = xid
        self.parts = parts
        self.sink = sink
        self.eof = False  # of a READ whose data went to the sink
        self.msg: Message | None = None
        self.error: Exception | None = None
        self.wake = trio.Event()
        self.waiting = False

    @property
    def done(self) -> bool:
        return self.msg is not None or self.error is not None


class RpcClient:
    """One TCP connection to one RPC program on a server; many concurrent calls."""

    def __init__(self, host: str, port: int, prog: int, vers: int, *, cred: bytes,
                 depth: int = 32, timeout: float = 10.0, retrans: int = 2,
                 label: str = "") -> None:
        self.host, self.port, self.prog, self.vers = host, port, prog, vers
        self.cred = cred
        self.timeout = timeout
        self.retrans = retrans
        self.label = label or f"rpc {prog} {host}:{port}"
        self._slots = trio.Semaphore(depth)
        self._xid = secrets.randbits(32)
        self._pending: dict[int, _Call] = {}
        self._stream: Stream | None = None
        self._rx = RecordReceiver(self._split)
        self._gen = 0  # bumped on every new connection
        self._ever_connected = False
        self._closed = False
        self._send_lock = trio.Lock()
        self._connect_lock = trio.Lock()
        self._reader: _Call | None = None
        self._last_error = ""
        self.reconnects = 0
        self.retransmits = 0

    # ---- connection -------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection now (errors surface at once, not after timeouts)."""
        await self._ensure_connected()

    async def _ensure_connected(self) -> int:
        delay = 0.05
        while True:
            if self._closed:
                raise MemberIOError(f"{self.label}: client is closed")
            if self._stream is not None:
                return self._gen
            async with self._connect_lock:
                if self._stream is not None:
                    continue
                try:
                    # No timeout of its own: the call's deadline bounds it.
                    stream = await open_stream(self.host, self.port)
                except OSError as e:
                    self._last_error = f"connect: {e.strerror or e}"
                    if not self._ever_connected:
                        raise MemberIOError(f"{self.label}: cannot connect: {e.strerror or e}") from e
                    # The server may be restarting: retry until the call's deadline.
                    await trio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                if self._ever_connected:
                    self.reconnects += 1
                self._ever_connected = True
                self._stream = stream
                self._gen += 1
                self._rx = RecordReceiver(self._split)
                return self._gen

    def _break(self, gen: int, reason: str) -> None:
        """Drop connection ``gen`` (if still current); waiting calls will resend."""
        if gen != self._gen or self._stream is None:
            return
        self._last_error = reason
        stream, self._stream = self._stream, None
        stream.close()  # a task waiting on it gets StreamClosedError
        for c in self._pending.values():
            c.wake.set()

    async def aclose(self) -> None:
        """Close the connection; calls still waiting fail."""
        self._closed = True
        if self._stream is not None:
            self._break(self._gen, "closed")
        await trio.lowlevel.checkpoint()

    # ---- calls ------------------------------------------------------------------------

    def _next_xid(self) -> int:
        while True:
            self._xid = (self._xid + 1) & 0xFFFFFFFF
            if self._xid not in self._pending:
                return self._xid

    async def call(self, proc: int, args: Sequence[BufferLike] | bytes = b"", *,
                   timeout: float | None = None) -> tuple[Unpacker, Message]:
        """Call a procedure; return an Unpacker at its results and the raw message.

        ``args`` may be several buffers: they are sent as they are, never joined.
        """
        c = await self._exchange(proc, args, None, timeout)
        assert c.msg is not None
        _, u = decode_reply(c.msg.data)
        return u, c.msg

    async def call_read(self, proc: int, args: Sequence[BufferLike] | bytes, sink: memoryview | IoVec,
                        what: str = "READ", *, timeout: float | None = None) -> tuple[int, bool]:
        """An NFSv3 READ whose data lands in ``sink`` (a view, or an IoVec's pieces): return (bytes read, eof).

        Usually the data is received straight into ``sink``; an unusual reply is
        decoded in full and copied. NFS errors raise ``NfsError``.
        """
        c = await self._exchange(proc, args, sink, timeout)
        m = c.msg
        assert m is not None
        if m.sunk >= 0:
            return m.sunk, c.eof
        _, u = decode_reply(m.data)
        r = decode_read(u, what)
        if r.data_len > sink.nbytes:
            raise ProtocolError(f"{what}: {r.data_len} bytes returned, {sink.nbytes} asked")
        if r.data_offset + r.data_len > len(m.data):
            raise ProtocolError(f"{what}: reply shorter than its data")
        sink[: r.data_len] = m.data[r.data_offset : r.data_offset + r.data_len]
        return r.data_len, r.eof

    async def _exchange(self, proc: int, args: Sequence[BufferLike] | bytes,
                        sink: memoryview | IoVec | None, timeout: float | None) -> _Call:
        if isinstance(args, (bytes, bytearray, memoryview)):
            args = [args]
        async with self._slots:
            xid = self._next_xid()
            header = encode_call(xid, self.prog, self.vers, proc, self.cred)
            views = [memoryview(header)]
            for a in args:
                if len(a):
                    views.append(memoryview(a).cast("B") if isinstance(a, memoryview) else memoryview(a))
            total = sum(v.nbytes for v in views)
            c = _Call(xid, [memoryview(record_mark(total))] + views, sink)
            self._pending[xid] = c
            try:
                await self._run(c, self.timeout if timeout is None else timeout, proc)
            finally:
                del self._pending[xid]
                if sink is not None and not c.done:
                    # Given up (cancelled): the rest of a reply already streaming in
                    # must not land in the caller's buffer any more.
                    self._rx.drop_sink(xid)
        if c.error is not None:
            raise c.error
        return c

    async def _run(self, c: _Call, timeout: float, proc: int) -> None:
        for attempt in range(self.retrans + 1):
            if attempt:
                self.retransmits += 1
            gen = 0
            with trio.move_on_after(timeout):
                while True:
                    gen = await self._ensure_connected()
                    if await self._send(c, gen) and await self._wait(c, gen):
                        return
                    # The connection dropped: resend the same bytes on a new one.
            # No reply in time: the server may have lost the request with the connection.
            self._break(gen, f"no reply within {timeout:g} s")
        raise DeviceTimeoutError(
            f"{self.label}: procedure {proc} got no reply in {self.retrans + 1} tries of "
            f"{timeout:g} s ({self._last_error})"
        )

    async def _send(self, c: _Call, gen: int) -> bool:
        async with self._send_lock:
            if gen != self._gen or self._stream is None:
                return False
            stream = self._stream
            try:
                await stream.send_all(c.parts)
            except OSError as e:
                self._break(gen, f"send: {getattr(e, 'strerror', None) or e}")
                return False
            except BaseException:
                # Cancelled halfway through a message: the stream is torn.
                if stream.torn:
                    self._break(gen, "send interrupted")
                raise
            return True

    async def _wait(self, c: _Call, gen: int) -> bool:
        """Wait for c's reply; True when it is in, False when the connection dropped."""
        while True:
            if c.done:
                return True
            if gen != self._gen or self._stream is None:
                return False
            if self._reader is None:
                self._reader = c
                try:
                    while not c.done and gen == self._gen and self._stream is not None:
                        await self._receive(gen)
                finally:
                    self._reader = None
                    self._pass_reader_role()
                continue
            c.waiting = True
            try:
                await c.wake.wait()
            finally:
                c.waiting = False
                c.wake = trio.Event()

    def _pass_reader_role(self) -> None:
        for other in self._pending.values():
            if other.waiting and not other.done:
                other.wake.set()
                return

    async def _receive(self, gen: int) -> None:
        stream = self._stream
        assert stream is not None
        rx = self._rx
        while True:
            try:
                n = stream.try_recv(rx.buffer())
                if not n:
                    await stream.wait_readable()
                    continue
            except EndOfStream:
                self._break(gen, "server closed the connection")
                return
            except StreamClosedError:
                self._break(gen, "connection closed")
                return
            except OSError as e:
                self._break(gen, f"receive: {e.strerror or e}")
                return
            try:
                msgs = rx.received(n)
            except ProtocolError as e:
                # Garbage on the stream: fail every call on it rather than loop resending.
                for c in self._pending.values():
                    if not c.done:
                        c.error = ProtocolError(f"{self.label}: {e}")
                self._break(gen, str(e))
                return
            if msgs:
                for m in msgs:
                    c = self._pending.get(m.xid)
                    if c is not None and not c.done:
                        c.msg = m
                        c.wake.set()
                # Let the woken callers run (and send more) before reading on.
                await trio.lowlevel.checkpoint()
                return

    def _split(self, xid: int, head: memoryview, msg_len: int) -> tuple[int, memoryview | IoVec] | None:
        c = self._pending.get(xid)
        if c is None or c.sink is None or c.done:
            return None
        layout = read_reply_layout(head, msg_len)
        if layout is None or layout[1] > c.sink.nbytes:
            return None
        c.eof = layout[2]
        return layout[0], c.sink[: layout[1]]
