"""ONC RPC v2 (RFC 5531) over TCP record marking, sans-IO.

* ``encode_call`` builds a call header; the procedure's arguments follow it.
* ``decode_reply`` checks a reply and hands back an Unpacker at the results.
* ``RecordReceiver`` reassembles record-marked messages from whatever a socket
  delivers. It always says exactly where the next bytes must go
  (``buffer()``), so it never reads past a message, keeps all its state in
  itself (a cancelled reader leaves nothing half-done), and can steer the bulk
  payload of a message (READ data) straight into a caller's buffer.

Garbage from a peer raises ``ProtocolError``; a well-formed refusal raises
``RpcError`` (carrying the XID, so a client can fail just that call).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from vstore.errors import AuthError, MemberIOError, ProtocolError
from vstore.stack.iovec import IoVec, pieces_of

from .xdr import Packer, Unpacker

CALL, REPLY = 0, 1
MSG_ACCEPTED, MSG_DENIED = 0, 1
AUTH_NONE, AUTH_SYS = 0, 1
RPC_VERSION = 2
MAX_AUTH_BYTES = 400
LAST_FRAGMENT = 0x80000000

ACCEPT_STAT = {
    0: "SUCCESS",
    1: "PROG_UNAVAIL",
    2: "PROG_MISMATCH",
    3: "PROC_UNAVAIL",
    4: "GARBAGE_ARGS",
    5: "SYSTEM_ERR",
}
AUTH_STAT = {
    0: "AUTH_OK",
    1: "AUTH_BADCRED",
    2: "AUTH_REJECTEDCRED",
    3: "AUTH_BADVERF",
    4: "AUTH_REJECTEDVERF",
    5: "AUTH_TOOWEAK",
    6: "AUTH_INVALIDRESP",
    7: "AUTH_FAILED",
}

_HDR = struct.Struct(">IIIIII")  # xid, CALL, rpcvers, prog, vers, proc
_MARK = struct.Struct(">I")
AUTH_NONE_BYTES = b"\0" * 8  # flavor 0, empty body


class RpcError(MemberIOError):
    """The server refused an RPC (accepted with an error status, or denied)."""

    def __init__(self, message: str, xid: int = 0) -> None:
        super().__init__(message)
        self.xid = xid


class RpcAuthError(RpcError, AuthError):
    """The server denied an RPC's credentials."""


def auth_sys(uid: int, gid: int, gids: tuple[int, ...] = (), machine: str = "vstore",
             stamp: int = 0) -> bytes:
    """An AUTH_SYS credential (flavor + opaque body) for a call header."""
    body = Packer().uint(stamp).string(machine[:255]).uint(uid).uint(gid)
    body.uint(len(gids[:16]))
    for g in gids[:16]:
        body.uint(g)
    return Packer().uint(AUTH_SYS).opaque(body.bytes()).bytes()


def encode_call(xid: int, prog: int, vers: int, proc: int, cred: bytes = AUTH_NONE_BYTES) -> bytes:
    """The header of an RPC call (arguments follow it), without a record mark."""
    return _HDR.pack(xid, CALL, RPC_VERSION, prog, vers, proc) + cred + AUTH_NONE_BYTES


def record_mark(length: int, last: bool = True) -> bytes:
    """The 4-byte record-marking header of a fragment of ``length`` bytes."""
    if not 0 <= length < LAST_FRAGMENT:
        raise ValueError(f"fragment length {length} out of range")
    return _MARK.pack(length | (LAST_FRAGMENT if last else 0))


def decode_reply(buf: bytes | bytearray | memoryview, end: int | None = None) -> tuple[int, Unpacker]:
    """Check an RPC reply; return its XID and an Unpacker positioned at the results."""
    u = Unpacker(buf, 0, end)
    xid = u.uint()
    mtype = u.uint()
    if mtype != REPLY:
        raise ProtocolError(f"RPC message type {mtype} where a reply was expected (xid {xid:#x})")
    rstat = u.uint()
    if rstat == MSG_ACCEPTED:
        u.uint()  # verifier flavor: AUTH_NONE or AUTH_SYS carry nothing we check
        u.opaque_view(MAX_AUTH_BYTES)
        astat = u.uint()
        if astat == 0:
            return xid, u
        name = ACCEPT_STAT.get(astat)
        if name is None:
            raise ProtocolError(f"RPC reply with unknown accept status {astat} (xid {xid:#x})")
        if astat == 2:
            low, high = u.uint(), u.uint()
            name += f" (server supports versions {low}-{high})"
        raise RpcError(f"RPC call failed: {name}", xid)
    if rstat == MSG_DENIED:
        rej = u.uint()
        if rej == 0:
            low, high = u.uint(), u.uint()
            raise RpcError(f"RPC denied: RPC_MISMATCH (server speaks RPC {low}-{high})", xid)
        if rej == 1:
            ast = u.uint()
            name = AUTH_STAT.get(ast)
            if name is None:
                raise ProtocolError(f"RPC auth error with unknown status {ast} (xid {xid:#x})")
            raise RpcAuthError(f"RPC denied: {name}", xid)
        raise ProtocolError(f"RPC reply with unknown reject status {rej} (xid {xid:#x})")
    raise ProtocolError(f"RPC reply with unknown reply status {rstat} (xid {xid:#x})")


@dataclass(slots=True)
class Message:
    """One reassembled RPC message.

    ``data`` holds the message, except that when a sink took the payload,
    ``data`` ends where the payload began and ``sunk`` counts the bytes placed
    in the sink (``sunk`` is -1 when no sink was used).
    """

    xid: int
    data: memoryview
    sunk: int = -1


# A splitter looks at the head of a message (its XID and first bytes) and may
# return (offset of the payload in the message, destination); the payload is
# then received straight into the destination: one view, or the pieces of an
# IoVec in turn.
Splitter = Callable[[int, memoryview, int], "tuple[int, memoryview | IoVec] | None"]

_MARK_STATE, _HEAD, _BODY, _SINK, _TAIL, _FRAG = range(6)


class RecordReceiver:
    """Reassemble record-marked RPC messages; the caller receives into ``buffer()``."""

    HEAD = 512  # enough for an RPC reply header plus a READ result header

    def __init__(self, splitter: Splitter | None = None, max_message: int = 8 << 20) -> None:
        self._splitter = splitter
        self._max = max_message
        self._mark = bytearray(4)
        self._head = bytearray(self.HEAD)
        self._state = _MARK_STATE
        self._view = memoryview(self._mark)
        self._pos = 0
        self._frag_len = 0
        self._last = False
        self._parts: list[bytearray] = []  # fragments of a multi-fragment message
        self._total = 0
        self._body: bytearray | None = None
        self._msg: Message | None = None
        self._tail_len = 0
        self._sink_rest: list[memoryview] = []  # pieces of the sink after the current one

    def buffer(self) -> memoryview:
        """Where the next received bytes must go (never empty)."""
        return self._view[self._pos :]

    def feed(self, data: bytes) -> list[Message]:
        """Feed bytes (copying them in); return the messages they complete."""
        out: list[Message] = []
        mv = memoryview(data)
        while mv:
            buf = self.buffer()
            n = min(len(buf), len(mv))
            buf[:n] = mv[:n]
            mv = mv[n:]
            out.extend(self.received(n))
        return out

    def received(self, n: int) -> list[Message]:
        """Account for n bytes received into ``buffer()``; return completed messages."""
        self._pos += n
        out: list[Message] = []
        while self._pos == len(self._view):
            msg = self._advance()
            if msg is not None:
                out.append(msg)
                break  # a finished message leaves us waiting for a new mark
        return out

    def _expect(self, state: int, view: memoryview) -> None:
        self._state, self._view, self._pos = state, view, 0

    def _advance(self) -> Message | None:
        st = self._state
        if st == _MARK_STATE:
            word = _MARK.unpack(self._mark)[0]
            self._last = bool(word & LAST_FRAGMENT)
            n = self._frag_len = word & ~LAST_FRAGMENT
            if self._total + n > self._max:
                raise ProtocolError(
                    f"RPC record of {self._total + n} bytes exceeds the limit of {self._max}"
                )
            if not self._parts and self._last:
                self._expect(_HEAD, memoryview(self._head)[: min(n, self.HEAD)])
            else:
                if len(self._parts) >= 4096:
                    raise ProtocolError("RPC record split into too many fragments")
                part = bytearray(n)
                self._parts.append(part)
                self._total += n
                self._expect(_FRAG, memoryview(part))
            return self._finish_if_empty()
        if st == _FRAG:
            if not self._last:
                self._expect(_MARK_STATE, memoryview(self._mark))
                return None
            data = b"".join(self._parts)
            self._parts, self._total = [], 0
            return self._complete(Message(_xid(data), memoryview(data)))
        if st == _HEAD:
            return self._after_head()
        if st == _BODY:
            assert self._body is not None
            body, self._body = self._body, None
            return self._complete(Message(_xid(body), memoryview(body)))
        if st == _SINK:
            if self._sink_rest:
                self._expect(_SINK, self._sink_rest.pop(0))
                return None
            return self._after_sink()
        # _TAIL: padding after a sunk payload, discarded
        msg, self._msg = self._msg, None
        return self._complete(msg)

    def _finish_if_empty(self) -> Message | None:
        # A zero-length fragment completes at once.
        if len(self._view) == 0:
            return self._advance()
        return None

    def _after_head(self) -> Message | None:
        n = self._frag_len
        hlen = len(self._view)
        head = memoryview(self._head)[:hlen]
        if hlen == n:
            data = bytes(head)
            return self._complete(Message(_xid(data), memoryview(data)))
        plan = None
        if self._splitter is not None and hlen >= 4:
            plan = self._splitter(_xid(head), head, n)
        if plan is None:
            body = bytearray(n)
            body[:hlen] = head
            self._body = body
            self._expect(_BODY, memoryview(body)[hlen:])
            return None
        off, dest = plan
        dlen = len(dest)
        if not 0 <= off <= hlen or off + dlen > n:
            raise ProtocolError(f"RPC payload at {off}+{dlen} does not fit a {n}-byte message")
        have = min(hlen - off, dlen)
        dest[:have] = head[off : off + have]
        # The header is copied out: self._head is reused for the next message.
        self._msg = Message(_xid(head), memoryview(bytes(head[:off])), dlen)
        self._tail_len = n - off - dlen - max(0, hlen - off - dlen)
        if have == dlen:
            return self._after_sink()
        rest = pieces_of(dest[have:])
        self._sink_rest = rest[1:]
        self._expect(_SINK, rest[0])
        return None

    def drop_sink(self, xid: int) -> None:
        """The caller of message xid gave up: receive the rest of its payload into scratch, not its sink."""
        if self._state == _SINK and self._msg is not None and self._msg.xid == xid:
            left = len(self._view) - self._pos + sum(len(p) for p in self._sink_rest)
            self._sink_rest = []
            self._expect(_SINK, memoryview(bytearray(left)))

    def _after_sink(self) -> Message | None:
        if self._tail_len:
            self._expect(_TAIL, memoryview(bytearray(self._tail_len)))
            return None
        msg, self._msg = self._msg, None
        return self._complete(msg)

    def _complete(self, msg: Message | None) -> Message | None:
        self._expect(_MARK_STATE, memoryview(self._mark))
        return msg


def _xid(data: bytes | bytearray | memoryview) -> int:
    if len(data) < 4:
        raise ProtocolError(f"RPC message of {len(data)} bytes is too short for an XID")
    return int.from_bytes(data[:4], "big")
