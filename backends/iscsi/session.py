"""The trio transport of the iSCSI initiator: one TCP connection = one session (ERL 0).

``Session.connect`` logs in (AuthMethod None or CHAP-MD5, then operational
negotiation). After login a reader task (``Session.reader``, started by the
owner in its nursery) routes every target PDU by ITT to the waiting task, so
many commands are in flight at once; senders take one lock so CmdSN is assigned
in send order and PDUs never interleave on the wire. Data-In payloads are
received straight into the caller's buffer at their BufferOffset; Data-Out is
sent from the caller's buffer with scatter-gather ``sendmsg``. That buffer may
be an ``IoVec`` (the views of a vectored request): received into with
``recvmsg_into``, sent from piece by piece. Data-In for a command its caller
abandoned (cancelled) is received and dropped, never placed in the buffer.

When the connection dies every in-flight command fails with
``ConnectionLostError``; the device layer (``backends.iscsi``) reconnects and
reissues them. Discovery (SendTargets) uses ``discovery_targets``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from backends.iscsi import pdu as P
from backends.iscsi import scsi
from backends.iscsi.errors import ConnectionLostError
from vstore.errors import AuthError, DeviceTimeoutError, MemberIOError, NotFoundError, ProtocolError
from vstore.stack.iovec import IoVec, pieces_of

log = logging.getLogger("vstore.iscsi")

IOV_MAX = 512  # stay well under the kernel's 1024 iovecs per sendmsg
_RECV_BUF = 256 * 1024
_READ_AHEAD = 8192  # bytes asked for when the buffer needs more for a header
_DIRECT_MIN = 32 * 1024  # receive payload tails this big straight into the caller's buffer
_LOGIN_MAX_SEGMENT = 65536


@dataclass
class Credentials:
    """A CHAP user and secret (the secret never appears in repr or messages)."""

    user: str
    secret: bytes = field(repr=False)


@dataclass
class Params:
    """Negotiated session parameters (RFC 7143 defaults until login says otherwise)."""

    header_digest: bool = False
    data_digest: bool = False
    target_max_recv: int = 8192  # the target's MaxRecvDataSegmentLength: limit on what we send
    our_max_recv: int = 262144  # ours: limit on what the target sends
    max_burst: int = 262144
    first_burst: int = 65536
    immediate_data: bool = True
    initial_r2t: bool = True
    max_outstanding_r2t: int = 1


@dataclass
class Options:
    """What the initiator proposes at login."""

    initiator_name: str
    header_digest: str = "None,CRC32C"
    data_digest: str = "None,CRC32C"
    max_recv: int = 1 << 20  # one Data-In PDU per READ command up to 1 MiB (fewer PDUs to handle)
    max_burst: int = 1 << 20
    first_burst: int = 262144
    immediate_data: bool = True
    initial_r2t: bool = False
    login_timeout: float = 10.0
    command_timeout: float = 30.0  # no answer to a command for this long: the connection is dead


@dataclass
class Completion:
    """How a SCSI command ended."""

    status: int
    sense: scsi.Sense | None = None
    residual: int = 0
    underflow: bool = False
    overflow: bool = False
    received: int = 0  # Data-In bytes placed
    digest_error: bool = False


class _Task:
    """One command (or ping/logout) waiting for the target."""

    __slots__ = (
        "itt", "lun", "read_buf", "write_buf", "wake", "r2ts", "done", "error",
        "completion", "received", "digest_error", "reply", "abandoned", "started",
    )

    def __init__(self, itt: int, lun: int, read_buf=None, write_buf=None) -> None:
        self.itt = itt
        self.lun = lun
        self.read_buf = read_buf
        self.write_buf = write_buf
        self.wake = trio.Event()
        self.r2ts: list[tuple[int, int, int]] = []
        self.done = False
        self.error: BaseException | None = None
        self.completion: Completion | None = None
        self.received = 0
        self.digest_error = False
        self.reply: P.PDU | None = None
        self.abandoned = False
        self.started = trio.current_time()

    def wanted(self) -> bool:
        """Whether Data-In may still land in read_buf (its caller has not given it up)."""
        return not self.abandoned


class Wire:
    """A non-blocking TCP socket driven by trio: exact reads of headers, direct reads of payloads.

    The syscalls are tried first and trio is asked to wait only when the kernel
    says EAGAIN, so a PDU that is already there costs no trip through the
    scheduler (trio's socket wrapper yields once per call). Callers yield
    often enough on their own (the reader after every PDU that wakes a task).
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.sock.setblocking(False)
        self.buf = bytearray(_RECV_BUF)
        self.mv = memoryview(self.buf)
        self.lo = 0
        self.hi = 0
        self.closed = False

    def close(self) -> None:
        """Close the socket, waking any task waiting on it (it gets ConnectionLostError)."""
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    async def _recv(self, into) -> int:
        while True:
            try:
                n = self.sock.recv_into(into)
                break
            except BlockingIOError:
                pass
            except OSError as e:
                raise ConnectionLostError(f"connection to the target failed: {e.strerror or e}") from e
            try:
                await trio.lowlevel.wait_readable(self.sock)
            except (trio.ClosedResourceError, OSError) as e:
                raise ConnectionLostError("the connection was closed") from e
        if n == 0:
            raise ConnectionLostError("the target closed the connection")
        return n

    async def read_exact(self, n: int) -> memoryview:
        """The next n bytes, as a view valid until the next read."""
        if self.hi - self.lo < n:
            if len(self.buf) - self.lo < n:
                k = self.hi - self.lo
                self.mv[:k] = self.mv[self.lo : self.hi]
                self.lo, self.hi = 0, k
            while self.hi - self.lo < n:
                # Read ahead only a little: a big payload after this header is better
                # received straight into its destination than copied from here.
                stop = min(len(self.buf), self.lo + max(n, _READ_AHEAD))
                self.hi += await self._recv(self.mv[self.hi : stop])
        v = self.mv[self.lo : self.lo + n]
        self.lo += n
        if self.lo == self.hi:
            self.lo = self.hi = 0
        return v

    async def read_into(self, dest: memoryview) -> None:
        """Fill dest: first from the buffer, then big tails straight from the socket."""
        want = len(dest)
        k = min(self.hi - self.lo, want)
        if k:
            dest[:k] = self.mv[self.lo : self.lo + k]
            self.lo += k
            if self.lo == self.hi:
                self.lo = self.hi = 0
        while k < want:
            if want - k >= _DIRECT_MIN:
                k += await self._recv(dest[k:])
            else:
                part = await self.read_exact(min(want - k, len(self.buf) // 2))
                dest[k : k + len(part)] = part
                k += len(part)

    async def _recv_some(self, bufs: list[memoryview]) -> int:
        """One (scatter) receive into bufs; 0 when the socket had nothing yet (after waiting for it)."""
        try:
            n = self.sock.recv_into(bufs[0]) if len(bufs) == 1 else self.sock.recvmsg_into(bufs)[0]
        except BlockingIOError:
            try:
                await trio.lowlevel.wait_readable(self.sock)
            except (trio.ClosedResourceError, OSError) as e:
                raise ConnectionLostError("the connection was closed") from e
            return 0
        except OSError as e:
            raise ConnectionLostError(f"connection to the target failed: {e.strerror or e}") from e
        if n == 0:
            raise ConnectionLostError("the target closed the connection")
        return n

    async def readv_into(self, pieces: list[memoryview], wanted: Callable[[], bool]) -> None:
        """Fill the pieces in order: buffered bytes first, big tails straight from the socket.

        ``wanted()`` is asked before every copy or receive into the pieces: once it
        says False (the caller gave the buffers up), the rest is received and dropped.
        """
        pieces = [p for p in pieces if len(p)]
        left = sum(len(p) for p in pieces)
        i = 0
        while left:
            if not wanted():
                await self.skip(left)
                return
            if self.hi > self.lo:
                p = pieces[i]
                n = min(self.hi - self.lo, len(p))
                p[:n] = self.mv[self.lo : self.lo + n]
                self.lo += n
                if self.lo == self.hi:
                    self.lo = self.hi = 0
            elif left >= _DIRECT_MIN:
                n = await self._recv_some(pieces[i : i + IOV_MAX])
            else:
                # A small tail: through the (empty) buffer, reading a little ahead (the next header).
                self.lo = self.hi = 0
                stop = min(len(self.buf), max(left, _READ_AHEAD))
                self.hi += await self._recv_some([self.mv[:stop]])
                continue
            left -= n
            while n:
                if n >= len(pieces[i]):
                    n -= len(pieces[i])
                    i += 1
                else:
                    pieces[i] = pieces[i][n:]
                    n = 0

    async def skip(self, n: int) -> None:
        """Receive and drop the next n bytes."""
        while n:
            if self.hi == self.lo:
                self.lo = self.hi = 0
                self.hi += await self._recv_some([self.mv[: min(len(self.buf), max(n, _READ_AHEAD))]])
                continue
            k = min(self.hi - self.lo, n)
            self.lo += k
            n -= k
            if self.lo == self.hi:
                self.lo = self.hi = 0

    async def send(self, parts: list) -> None:
        """Send all buffers (scatter-gather, partial sends resumed)."""
        views = [p if isinstance(p, bytes) else memoryview(p).cast("B") for p in parts]
        views = [v for v in views if len(v)]
        while views:
            try:
                n = self.sock.sendmsg(views[:IOV_MAX])
            except BlockingIOError:
                n = 0
            except OSError as e:
                raise ConnectionLostError(f"sending to the target failed: {e.strerror or e}") from e
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
                    await trio.lowlevel.wait_writable(self.sock)
                except (trio.ClosedResourceError, OSError) as e:
                    raise ConnectionLostError("the connection was closed") from e


async def open_socket(host: str, port: int, timeout: float) -> trio.socket.SocketType:
    """A connected TCP socket (TCP_NODELAY, large buffers)."""
    with trio.move_on_after(timeout) as cs:
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise ConnectionLostError(f"cannot resolve {host}: {e}") from e
        last: Exception | None = None
        for family, type_, proto, _, addr in infos:
            sock = trio.socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
                await sock.connect(addr)
                return sock
            except OSError as e:
                sock.close()
                last = e
        raise ConnectionLostError(
            f"cannot connect to iSCSI portal {host}:{port}: {getattr(last, 'strerror', None) or last}"
        )
    if cs.cancelled_caught:
        raise DeviceTimeoutError(f"connecting to iSCSI portal {host}:{port} timed out after {timeout:g} s")
    raise AssertionError("unreachable")


def chap_response(ident: int, secret: bytes, challenge: bytes) -> str:
    """CHAP_R for CHAP_A=5: MD5(id || secret || challenge) as 0x-hex."""
    return "0x" + hashlib.md5(bytes([ident]) + secret + challenge).hexdigest()


def _chap_bytes(value: str) -> bytes:
    try:
        if value[:2] in ("0x", "0X"):
            return bytes.fromhex(value[2:])
        if value[:2] in ("0b", "0B"):
            import base64

            return base64.b64decode(value[2:])
    except ValueError as e:
        raise ProtocolError("malformed CHAP challenge from target") from e
    raise ProtocolError("CHAP challenge in an unknown encoding")


def new_isid() -> bytes:
    """A random-type ISID (0x80 + 3 random bytes + a random qualifier)."""
    return b"\x80" + os.urandom(5)


class Session:
    """One logged-in connection to a target."""

    def __init__(
        self,
        host: str,
        port: int,
        target: str | None,
        options: Options,
        *,
        isid: bytes | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.portal = f"{host}:{port}"
        self.target = target
        self.options = options
        self.isid = isid or new_isid()
        self.credentials = credentials
        self.params = Params(our_max_recv=options.max_recv)
        self.wire: Wire | None = None
        self.cmd_sn = 0
        self.exp_cmd_sn = 0
        self.max_cmd_sn = 0
        self.exp_stat_sn = 0
        self.tsih = 0
        self._itt = int.from_bytes(os.urandom(2), "big")
        self._tasks: dict[int, _Task] = {}
        self._send_lock = trio.Lock()
        self._window = trio.Event()
        self.dead: BaseException | None = None
        self.closed = False
        self.closing = False
        self.window_waits = 0  # commands that found the CmdSN window closed
        self._woke = False
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        return f"<iSCSI session {self.target} @ {self.portal} tsih={self.tsih}>"

    # ------------------------------------------------------------ state

    @property
    def alive(self) -> bool:
        """Logged in and the connection has not failed."""
        return self.dead is None and self.wire is not None and not self.closed

    @property
    def in_flight(self) -> int:
        """Tasks waiting for the target."""
        return len(self._tasks)

    def _next_itt(self) -> int:
        while True:
            self._itt = (self._itt + 1) & 0xFFFFFFFF
            if self._itt != P.NO_TAG and self._itt not in self._tasks:
                return self._itt

    def _window_open(self) -> bool:
        return P.serial_le(self.cmd_sn, self.max_cmd_sn)

    def _update_sn(self, h: P.Header) -> None:
        if h.has_status:
            nxt = (h.stat_sn + 1) & 0xFFFFFFFF
            if P.serial_gt(nxt, self.exp_stat_sn):
                self.exp_stat_sn = nxt
        if h.opcode in (P.Opcode.LOGIN_RESPONSE,):
            return
        exp, mx = h.exp_cmd_sn, h.max_cmd_sn
        # A window with MaxCmdSN < ExpCmdSN - 1 is invalid: ignore it (RFC 7143 4.2.2.1).
        if P.serial_gt(exp, (mx + 1) & 0xFFFFFFFF):
            return
        changed = False
        if P.serial_gt(exp, self.exp_cmd_sn):
            self.exp_cmd_sn = exp
            changed = True
        if P.serial_gt(mx, self.max_cmd_sn):
            self.max_cmd_sn = mx
            changed = True
        if changed:
            self._woke = True
            self._window.set()
            self._window = trio.Event()

    def abort(self, error: BaseException) -> None:
        """Tear the connection down; every waiting task fails with error."""
        if self.dead is None:
            self.dead = error
        if self.wire is not None:
            self.wire.close()
        tasks, self._tasks = self._tasks, {}
        for t in tasks.values():
            if not t.done:
                t.error = error
                t.done = True
                t.wake.set()
        self._window.set()

    async def _lock(self) -> None:
        # The uncontended case without a trip through the scheduler (fair: a free
        # trio.Lock with waiters still refuses acquire_nowait).
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()

    async def _send_guarded(self, parts: list) -> None:
        """Send a whole PDU train; if that fails or is cancelled midway, the stream is unusable."""
        try:
            await self.wire.send(parts)
        except BaseException as e:
            self.abort(e if isinstance(e, MemberIOError) else ConnectionLostError("a send was interrupted"))
            raise

    def _complete(self, t: _Task) -> None:
        self._woke = True
        t.done = True
        self._tasks.pop(t.itt, None)
        t.wake.set()

    # ------------------------------------------------------------ login

    async def _send_pdu(self, bhs: bytes, data=b"") -> None:
        digests = self._ffp_digests
        await self.wire.send(
            P.frame(bhs, data, header_digest_on=digests and self.params.header_digest,
                    data_digest_on=digests and self.params.data_digest)
        )

    _ffp_digests = False  # digests apply only in full-feature phase

    async def _recv_pdu(self, max_data: int) -> P.PDU:
        """Read one whole PDU (used during login and discovery, before any reader task)."""
        w = self.wire
        raw = await w.read_exact(P.BHS_SIZE)
        h = P.parse_header(raw, max_data_length=max_data)
        hd = self._ffp_digests and self.params.header_digest
        dd = self._ffp_digests and self.params.data_digest
        ahs = bytes(await w.read_exact(h.ahs_length)) if h.ahs_length else b""
        if hd:
            P.check_header_digest(h.raw + ahs, await w.read_exact(4))
        data = bytearray(h.data_length)
        if h.data_length:
            await w.read_into(memoryview(data))
        pad = P.pad_length(h.data_length)
        if pad:
            await w.read_exact(pad)
        ok = True
        if dd and h.data_length:
            ok = P.data_digest_ok(data, pad, await w.read_exact(4))
        self._update_sn(h)
        return P.PDU(h, ahs, bytes(data), ok)

    async def _login_step(self, csg: int, nsg: int, transit: bool, pairs) -> tuple[P.Header, dict]:
        data = P.encode_text(pairs) if pairs else b""
        bhs = P.encode_login_request(
            isid=self.isid, tsih=self.tsih, itt=self._login_itt, cid=0, cmd_sn=self.cmd_sn,
            exp_stat_sn=self.exp_stat_sn, csg=csg, nsg=nsg, transit=transit,
            data_length=len(data),
        )
        await self._send_pdu(bhs, data)
        # A Login Response may span several PDUs (C bit): gather its text.
        text = b""
        while True:
            reply = await self._recv_pdu(_LOGIN_MAX_SEGMENT)
            h = reply.header
            if h.opcode == P.Opcode.REJECT:
                raise ProtocolError(f"target rejected the login request (reason 0x{h.reject_reason:02x})")
            if h.opcode != P.Opcode.LOGIN_RESPONSE:
                raise ProtocolError(f"expected a Login Response, got opcode 0x{h.opcode:02x}")
            self._check_login_status(h)
            text += reply.data
            if not h.flags & P.F_CONTINUE:
                break
            # Acknowledge a partial response with an empty request to get the rest.
            await self._send_pdu(
                P.encode_login_request(
                    isid=self.isid, tsih=self.tsih, itt=self._login_itt, cid=0,
                    cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn, csg=csg, nsg=nsg,
                    transit=False, data_length=0,
                )
            )
        if h.tsih:
            self.tsih = h.tsih
        return h, dict(P.decode_text(text))

    def _check_login_status(self, h: P.Header) -> None:
        cls, detail = h.status_class, h.status_detail
        if cls == 0:
            return
        where = f"iSCSI target {self.target or '(discovery)'} at {self.portal}"
        if cls == 1:
            raise MemberIOError(f"{where} redirected the login (redirection is not supported)")
        if cls == 2 and detail in (1, 2):
            if self.credentials is None:
                raise AuthError(
                    f"{where} refused the login: authentication required "
                    "(give CHAP credentials as iscsi://USER%SECRET@... or a credentials file)"
                )
            raise AuthError(
                f"{where} refused CHAP login for user {self.credentials.user!r}: "
                "wrong user or secret, or the account is not bound to this target"
            )
        if cls == 2 and detail in (3, 4):
            raise NotFoundError(f"{where}: no such target")
        if cls == 2:
            raise MemberIOError(f"{where} rejected the login (status 2/{detail})")
        raise ConnectionLostError(f"{where} could not log in now (target error 3/{detail})")

    async def connect(self, *, discovery: bool = False) -> None:
        """Open the connection and log in; raises AuthError, NotFoundError, ProtocolError, ..."""
        opts = self.options
        self.wire = Wire(await open_socket(self.host, self.port, opts.login_timeout))
        try:
            with trio.fail_after(opts.login_timeout):
                await self._login(discovery)
        except trio.TooSlowError:
            self.wire.close()
            raise DeviceTimeoutError(
                f"login to iSCSI target {self.target or '(discovery)'} at {self.portal} "
                f"timed out after {opts.login_timeout:g} s"
            ) from None
        except BaseException:
            self.wire.close()
            raise
        self._ffp_digests = True

    async def _login(self, discovery: bool) -> None:
        self._login_itt = self._next_itt()
        self.cmd_sn = int.from_bytes(os.urandom(2), "big")
        first = [("InitiatorName", self.options.initiator_name)]
        if discovery:
            first.append(("SessionType", "Discovery"))
        else:
            first += [("SessionType", "Normal"), ("TargetName", self.target)]
        creds = self.credentials
        if creds is None:
            h, keys = await self._login_step(0, 1, True, first + [("AuthMethod", "None")])
        else:
            h, keys = await self._login_step(0, 1, False, first + [("AuthMethod", "CHAP,None")])
        method = keys.get("AuthMethod", "None")
        if method == "CHAP":
            if creds is None:
                raise AuthError(f"iSCSI target {self.target} at {self.portal} requires CHAP")
            h, keys = await self._login_step(0, 1, False, [("CHAP_A", "5")])
            if keys.get("CHAP_A") != "5" or "CHAP_I" not in keys or "CHAP_C" not in keys:
                raise ProtocolError("target did not offer CHAP with MD5 (CHAP_A=5)")
            try:
                ident = int(keys["CHAP_I"], 0)
            except ValueError as e:
                raise ProtocolError("malformed CHAP_I from target") from e
            if not 0 <= ident <= 255:
                raise ProtocolError("CHAP_I out of range")
            challenge = _chap_bytes(keys["CHAP_C"])
            resp = chap_response(ident, creds.secret, challenge)
            h, keys = await self._login_step(0, 1, True, [("CHAP_N", creds.user), ("CHAP_R", resp)])
        elif method not in ("None",):
            raise AuthError(f"target wants AuthMethod {method}, which vstore does not support")
        # Security stage may need more empty round trips until the target transits.
        for _ in range(4):
            if h.transit and h.nsg >= 1:
                break
            h, keys = await self._login_step(0, 1, True, [])
        else:
            raise ProtocolError("target never left the security stage")
        await self._operational(discovery)

    async def _operational(self, discovery: bool) -> None:
        o = self.options
        if discovery:
            offer = [
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("MaxRecvDataSegmentLength", str(o.max_recv)),
            ]
        else:
            offer = [
                ("HeaderDigest", o.header_digest),
                ("DataDigest", o.data_digest),
                ("MaxRecvDataSegmentLength", str(o.max_recv)),
                ("MaxBurstLength", str(o.max_burst)),
                ("FirstBurstLength", str(o.first_burst)),
                ("ImmediateData", "Yes" if o.immediate_data else "No"),
                ("InitialR2T", "Yes" if o.initial_r2t else "No"),
                ("MaxOutstandingR2T", "1"),
                ("MaxConnections", "1"),
                ("ErrorRecoveryLevel", "0"),
                ("DataPDUInOrder", "Yes"),
                ("DataSequenceInOrder", "Yes"),
                ("DefaultTime2Wait", "2"),
                ("DefaultTime2Retain", "0"),
            ]
        got: dict[str, str] = {}
        h, keys = await self._login_step(1, 3, True, offer)
        got.update(keys)
        for _ in range(8):
            if h.transit and h.nsg == 3:
                break
            h, keys = await self._login_step(1, 3, True, [])
            got.update(keys)
        else:
            raise ProtocolError("target never reached full-feature phase")
        self._apply(got)
        # The first command uses the login's CmdSN; the window comes from the last response.
        self.exp_cmd_sn = h.exp_cmd_sn
        self.max_cmd_sn = h.max_cmd_sn

    def _apply(self, keys: dict[str, str]) -> None:
        p = self.params

        def num(key: str, default: int) -> int:
            v = keys.get(key)
            if v is None or v in ("Irrelevant", "NotUnderstood", "Reject"):
                return default
            try:
                n = int(v, 0)
            except ValueError as e:
                raise ProtocolError(f"target sent a non-numeric {key}") from e
            if n <= 0:
                raise ProtocolError(f"target sent {key}={n}")
            return n

        def yes(key: str, default: bool) -> bool:
            v = keys.get(key)
            return default if v not in ("Yes", "No") else v == "Yes"

        def digest(key: str) -> bool:
            v = keys.get(key, "None")
            if v not in ("None", "CRC32C"):
                raise ProtocolError(f"target chose unknown {key} {v!r}")
            return v == "CRC32C"

        p.header_digest = digest("HeaderDigest")
        p.data_digest = digest("DataDigest")
        p.target_max_recv = num("MaxRecvDataSegmentLength", 8192)
        p.max_burst = min(num("MaxBurstLength", 262144), self.options.max_burst)
        p.first_burst = min(num("FirstBurstLength", 65536), p.max_burst)
        p.immediate_data = yes("ImmediateData", True) and self.options.immediate_data
        p.initial_r2t = yes("InitialR2T", True) or self.options.initial_r2t
        p.max_outstanding_r2t = num("MaxOutstandingR2T", 1)
        if p.target_max_recv < 512:
            raise ProtocolError(f"target MaxRecvDataSegmentLength {p.target_max_recv} is too small")

    # ------------------------------------------------------------ discovery, logout

    async def send_targets(self) -> list[tuple[str, list[str]]]:
        """SendTargets=All on a discovery session: [(target name, [addresses])]."""
        text = b""
        ttt = P.NO_TAG
        payload = P.encode_text([("SendTargets", "All")])
        itt = self._next_itt()
        for _ in range(1000):
            bhs = P.encode_text_request(itt=itt, ttt=ttt, cmd_sn=self.cmd_sn,
                                        exp_stat_sn=self.exp_stat_sn, data_length=len(payload))
            await self._send_pdu(bhs, payload)
            reply = await self._recv_pdu(max(self.params.our_max_recv, _LOGIN_MAX_SEGMENT))
            h = reply.header
            if h.opcode != P.Opcode.TEXT_RESPONSE:
                raise ProtocolError(f"expected a Text Response, got opcode 0x{h.opcode:02x}")
            text += reply.data
            if h.final:
                break
            ttt = h.ttt
            payload = b""
        else:
            raise ProtocolError("SendTargets reply never ended")
        out: list[tuple[str, list[str]]] = []
        for key, value in P.decode_text(text):
            if key == "TargetName":
                out.append((value, []))
            elif key == "TargetAddress" and out:
                out[-1][1].append(value)
        return out

    async def logout_sync(self) -> None:
        """Logout without a reader task (discovery sessions)."""
        if self.wire is None:
            return
        try:
            with trio.move_on_after(5):
                await self._send_pdu(P.encode_logout_request(
                    itt=self._next_itt(), cid=0, cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn))
                await self._recv_pdu(_LOGIN_MAX_SEGMENT)
        except (MemberIOError, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        """Close the socket; waiting tasks fail."""
        self.closed = True
        self.abort(ConnectionLostError(f"iSCSI session to {self.target} at {self.portal} closed"))

    async def logout(self, timeout: float = 5.0) -> None:
        """Log out (reader task running) and close."""
        if self.alive:
            self.closing = True
            t = _Task(self._next_itt(), 0)
            self._tasks[t.itt] = t
            with trio.move_on_after(timeout):
                try:
                    async with self._send_lock:
                        await self._send_guarded(P.frame(
                            P.encode_logout_request(itt=t.itt, cid=0, cmd_sn=self.cmd_sn,
                                                    exp_stat_sn=self.exp_stat_sn),
                            header_digest_on=self.params.header_digest,
                        ))
                    await t.wake.wait()
                except MemberIOError:
                    pass
        self.close()

    # ------------------------------------------------------------ reader

    async def reader(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Route target PDUs to tasks until the connection ends (never raises, except Cancelled)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._watchdog)
            task_status.started()
            try:
                n = 0
                while True:
                    n += 1
                    # Wire reads do not yield while data is there: let the woken tasks
                    # run (and the rest of the program, now and then).
                    if await self._read_one() or n % 64 == 0:
                        await trio.lowlevel.checkpoint()
            except (MemberIOError, OSError, trio.ClosedResourceError, trio.BrokenResourceError) as e:
                if not isinstance(e, MemberIOError):
                    e = ConnectionLostError(f"connection to {self.portal} failed: {e}")
                if not (self.closed or self.closing):
                    log.warning("iSCSI %s at %s: %s", self.target, self.portal, e)
                self.abort(e)
            except BaseException:
                self.abort(ConnectionLostError(f"iSCSI session to {self.portal} shut down"))
                raise
            finally:
                nursery.cancel_scope.cancel()

    async def _read_one(self) -> bool:
        """Read and route one PDU; True if it woke a waiting task."""
        self._woke = False
        w = self.wire
        p = self.params
        raw = await w.read_exact(P.BHS_SIZE)
        h = P.parse_header(raw, max_data_length=p.our_max_recv)
        ahs = b""
        if h.ahs_length:
            ahs = bytes(await w.read_exact(h.ahs_length))
        if p.header_digest:
            P.check_header_digest(h.raw + ahs if ahs else h.raw, await w.read_exact(4))
        self._update_sn(h)
        op = h.opcode
        n = h.data_length
        pad = P.pad_length(n)
        dd = p.data_digest and n > 0
        if op == P.Opcode.DATA_IN:
            t = self._tasks.get(h.itt)
            if t is None or t.read_buf is None:
                raise ProtocolError(f"Data-In for unknown task 0x{h.itt:08x}")
            off = h.buffer_offset
            if off + n > len(t.read_buf):
                raise ProtocolError(
                    f"Data-In at offset {off} length {n} overruns the {len(t.read_buf)}-byte buffer"
                )
            if n:
                # Straight into the caller's buffer (or the pieces of an IoVec), unless
                # the caller gave it up: an abandoned command's data is dropped.
                dest = pieces_of(t.read_buf[off : off + n])
                await w.readv_into(dest, t.wanted)
                if pad:
                    await w.read_exact(pad)
                if dd and not P.data_digest_ok(dest, pad, await w.read_exact(4)):
                    t.digest_error = True
                t.received += n
            if h.flags & P.F_STATUS:
                t.completion = Completion(
                    h.status, None, h.residual, bool(h.flags & P.F_UNDERFLOW),
                    bool(h.flags & P.F_OVERFLOW), t.received, t.digest_error,
                )
                self._complete(t)
            return self._woke
        data = b""
        ok = True
        if n:
            buf = bytearray(n)
            await w.read_into(memoryview(buf))
            data = bytes(buf)
            if pad:
                await w.read_exact(pad)
            if dd:
                ok = P.data_digest_ok(data, pad, await w.read_exact(4))
        if op == P.Opcode.SCSI_RESPONSE:
            t = self._tasks.get(h.itt)
            if t is None:
                raise ProtocolError(f"SCSI Response for unknown task 0x{h.itt:08x}")
            if not ok:
                # The status itself is fine; only the sense bytes are suspect.
                t.digest_error = True
                data = b""
            sense = None
            if h.response == 0 and h.status == scsi.CHECK_CONDITION:
                sense = scsi.parse_response_sense(data)
            if h.response != 0:
                t.error = MemberIOError(
                    f"iSCSI target {self.target} could not complete a command (response 0x{h.response:02x})"
                )
            t.completion = Completion(
                h.status, sense, h.residual, bool(h.flags & P.F_UNDERFLOW),
                bool(h.flags & P.F_OVERFLOW), t.received, t.digest_error,
            )
            self._complete(t)
        elif op == P.Opcode.R2T:
            t = self._tasks.get(h.itt)
            if t is None or t.write_buf is None:
                raise ProtocolError(f"R2T for unknown task 0x{h.itt:08x}")
            off, length = h.buffer_offset, h.desired_length
            if off + length > len(t.write_buf) or length == 0:
                raise ProtocolError(f"R2T for offset {off} length {length} is outside the write")
            t.r2ts.append((h.ttt, off, length))
            t.wake.set()
            self._woke = True
        elif op == P.Opcode.NOP_IN:
            if h.itt != P.NO_TAG:
                t = self._tasks.get(h.itt)
                if t is not None:
                    self._complete(t)
            elif h.ttt != P.NO_TAG:
                # A target ping: answer from another task so this reader never blocks on sends.
                self._nursery.start_soon(self._answer_nop, h.ttt, h.lun_bytes, data)
        elif op in (P.Opcode.LOGOUT_RESPONSE, P.Opcode.TEXT_RESPONSE, P.Opcode.TASK_MGMT_RESPONSE):
            t = self._tasks.get(h.itt)
            if t is not None:
                t.reply = P.PDU(h, ahs, data, ok)
                self._complete(t)
        elif op == P.Opcode.REJECT:
            # At ERL 0 a rejected PDU leaves its task in an unknown state: start over.
            raise ProtocolError(f"target rejected a PDU (reason 0x{h.reject_reason:02x})")
        elif op == P.Opcode.ASYNC:
            if h.async_event in (1, 2, 3):
                # Target asks for logout / drops the connection or session: reconnect.
                raise ConnectionLostError(
                    f"target {self.target} asked to end the session (async event {h.async_event})"
                )
        else:
            raise ProtocolError(f"unexpected PDU opcode 0x{op:02x} in full-feature phase")
        return self._woke

    async def _watchdog(self) -> None:
        # One timer for all commands (cheaper than a cancel scope per command): a
        # task unanswered for command_timeout means the connection is dead, and
        # the device layer reissues everything that was in flight on it.
        limit = self.options.command_timeout
        while self.dead is None:
            await trio.sleep(min(1.0, limit / 4))
            now = trio.current_time()
            oldest = min((t.started for t in self._tasks.values()), default=now)
            if now - oldest > limit:
                err = DeviceTimeoutError(
                    f"iSCSI target {self.target} at {self.portal} did not answer a command "
                    f"within {limit:g} s"
                )
                log.warning("%s", err)
                self.abort(err)

    async def _answer_nop(self, ttt: int, lun: bytes, data: bytes) -> None:
        try:
            async with self._send_lock:
                await self._send_guarded(P.frame(
                    P.encode_nop_out(itt=P.NO_TAG, ttt=ttt, cmd_sn=self.cmd_sn,
                                     exp_stat_sn=self.exp_stat_sn, lun=lun, data_length=len(data)),
                    data, header_digest_on=self.params.header_digest,
                    data_digest_on=self.params.data_digest,
                ))
        except MemberIOError as e:
            self.abort(e)

    # ------------------------------------------------------------ commands

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise self.dead if isinstance(self.dead, MemberIOError) else ConnectionLostError(str(self.dead))

    async def ping(self) -> None:
        """NOP-Out with a real ITT; returns when the target answers."""
        self._check_alive()
        t = _Task(self._next_itt(), 0)
        self._tasks[t.itt] = t
        try:
            async with self._send_lock:
                self._check_alive()
                await self._send_guarded(P.frame(
                    P.encode_nop_out(itt=t.itt, ttt=P.NO_TAG, cmd_sn=self.cmd_sn,
                                     exp_stat_sn=self.exp_stat_sn),
                    header_digest_on=self.params.header_digest,
                ))
            await t.wake.wait()
        finally:
            self._tasks.pop(t.itt, None)
        if t.error is not None:
            raise t.error

    async def command(self, lun: int, cdb: bytes, *, read_buf=None, write_buf=None) -> Completion:
        """Run one SCSI command; read_buf/write_buf are uint8 memoryviews of the transfer."""
        t = await self.submit(lun, cdb, read_buf=read_buf, write_buf=write_buf)
        await self.finish([t])
        if t.error is not None:
            raise t.error
        return t.completion

    async def submit(self, lun: int, cdb: bytes, *, read_buf=None, write_buf=None) -> _Task:
        """Send a SCSI command (and its immediate/unsolicited data); ``finish`` waits for it."""
        expected = len(read_buf) if read_buf is not None else (len(write_buf) if write_buf is not None else 0)
        t = _Task(0, lun, read_buf, write_buf)
        p = self.params
        # Wait for room in the CmdSN window, then send under the lock so CmdSN
        # order matches wire order. Never wait for the window while holding the
        # lock: Data-Out answering R2Ts of earlier commands (which open it) needs it.
        while True:
            self._check_alive()
            if not self._window_open():
                self.window_waits += 1
                await self._window.wait()
                continue
            await self._lock()
            if self._window_open() and self.dead is None:
                break
            self._send_lock.release()
        try:
            t.itt = self._next_itt()
            t.started = trio.current_time()
            self._tasks[t.itt] = t
            parts: list = []
            immediate = 0
            unsolicited_outs: list = []
            if write_buf is not None:
                if p.immediate_data:
                    immediate = min(p.first_burst, p.target_max_recv, expected)
                if not p.initial_r2t:
                    # Unsolicited Data-Out up to FirstBurstLength after the immediate part.
                    end = min(p.first_burst, expected)
                    unsolicited_outs = self._data_outs(t, P.NO_TAG, immediate, end - immediate)
            cmd = P.encode_scsi_command(
                lun=lun, itt=t.itt, cdb=cdb, expected_length=expected, cmd_sn=self.cmd_sn,
                exp_stat_sn=self.exp_stat_sn, read=read_buf is not None,
                write=write_buf is not None, final=not unsolicited_outs, data_length=immediate,
            )
            self.cmd_sn = (self.cmd_sn + 1) & 0xFFFFFFFF
            parts += P.frame(cmd, _segment(write_buf[:immediate]) if immediate else b"",
                             header_digest_on=p.header_digest, data_digest_on=p.data_digest)
            parts += unsolicited_outs
            await self._send_guarded(parts)
        finally:
            self._send_lock.release()
        return t

    async def finish(self, tasks: list[_Task]) -> None:
        """Serve R2Ts of the submitted tasks until every one has ended (its error or completion set)."""
        try:
            while True:
                # Install a fresh shared event before looking at the state, so a
                # wake-up while we send Data-Out is never lost.
                ev = trio.Event()
                for t in tasks:
                    t.wake = ev
                for t in tasks:
                    while t.r2ts and not t.done:
                        ttt, off, length = t.r2ts.pop(0)
                        outs = self._data_outs(t, ttt, off, length)
                        await self._lock()
                        try:
                            self._check_alive()
                            await self._send_guarded(outs)
                        finally:
                            self._send_lock.release()
                if all(t.done for t in tasks):
                    return
                await ev.wait()
        except BaseException:
            for t in tasks:
                if not t.done:
                    # Cancelled (or failed) mid-command. A write the target still waits
                    # on would hold its task forever: drop the connection (ERL 0 cleans up).
                    if t.write_buf is not None:
                        self.abort(ConnectionLostError("a write was abandoned mid-transfer"))
                    else:
                        t.abandoned = True
            raise

    def _data_outs(self, t: _Task, ttt: int, offset: int, length: int) -> list:
        """Buffers of the Data-Out PDUs carrying write_buf[offset:offset+length]."""
        p = self.params
        seg = p.target_max_recv
        parts: list = []
        data_sn = 0
        end = offset + length
        pos = offset
        buf = t.write_buf
        # An IoVec is walked once, not sliced per PDU (tgt's default segment is 8 KiB).
        segments = buf.segments(offset, end, seg) if isinstance(buf, IoVec) else None
        while pos < end:
            n = min(seg, end - pos)
            bhs = P.encode_data_out(
                lun=t.lun, itt=t.itt, ttt=ttt, exp_stat_sn=self.exp_stat_sn, data_sn=data_sn,
                buffer_offset=pos, data_length=n, final=pos + n >= end,
            )
            if segments is None:
                data = buf[pos : pos + n]
            else:
                data = next(segments)
                if len(data) == 1:
                    data = data[0]  # within one view (the usual case): frame's plain path
            parts += P.frame(bhs, data,
                             header_digest_on=p.header_digest, data_digest_on=p.data_digest)
            data_sn += 1
            pos += n
        return parts


def _segment(buf: memoryview | IoVec) -> memoryview | list[memoryview]:
    """A data segment for ``pdu.frame``: one buffer, or the pieces of an IoVec (sent as they are)."""
    return buf.pieces if isinstance(buf, IoVec) else buf


async def discovery_targets(
    host: str, port: int, options: Options, credentials: Credentials | None = None
) -> list[tuple[str, list[str]]]:
    """Log in for discovery, SendTargets=All, log out."""
    s = Session(host, port, None, options, credentials=credentials)
    await s.connect(discovery=True)
    try:
        with trio.fail_after(options.login_timeout):
            return await s.send_targets()
    except trio.TooSlowError:
        raise DeviceTimeoutError(f"SendTargets at {host}:{port} timed out") from None
    finally:
        await s.logout_sync()

