"""One iSCSI connection as a sans-IO state machine (RFC 7143, ERL 0): bytes in, events out.

``Connection`` holds everything a connection knows — the login and its text
negotiation (CHAP-MD5, digests, MaxRecvDataSegmentLength, burst sizes, R2T
settings), the sequence numbers (CmdSN, ExpCmdSN/MaxCmdSN: whether a command
may be sent now, ExpStatSN), the tasks in flight by ITT — and does no I/O:

* Received bytes go in with ``receive_data(bytes)`` (copied), or without a copy:
  ``receive_buffers()`` says where the next bytes must go and ``received(n)``
  accounts for them. While a Data-In payload is due, those buffers are the
  command's own (its read buffer, or the pieces of an ``IoVec``), so big reads
  land straight where the caller wants them; otherwise they are a read-ahead
  buffer from which headers and small payloads are parsed (the framing is
  ``pdu.PDUReceiver``'s, the same ``pdu.PDUDecoder`` runs on). Both return the
  events the bytes completed (``LoggedIn``, ``TaskDone``, ``R2TReceived``,
  ``WindowOpened``, ``TargetPing``, ``AsyncMessage``, ``Rejected``, ``Send``).
* Requests give back the buffers of their PDUs for a scatter-gather send:
  ``start_login``, ``command`` (with immediate and unsolicited data), ``data_out``
  (answering an R2T), ``ping``, ``answer_ping``, ``logout``, ``text_request``.
  Payloads are never copied.

Anything a target sends that does not parse or breaks the protocol raises
``ProtocolError``; a refused login raises ``AuthError``, ``NotFoundError`` or
``MemberIOError``. The trio driver is ``backends.iscsi.session.Session``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from backends.iscsi import pdu as P
from backends.iscsi import scsi
from backends.iscsi.errors import ConnectionLostError
from vstore.errors import AuthError, MemberIOError, NotFoundError, ProtocolError, VstoreError
from vstore.stack.iovec import IoVec, pieces_of

LOGIN_MAX_SEGMENT = 65536


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


class Task:
    """One command (or ping, logout, text request) waiting for the target.

    ``wake`` and ``started`` belong to the driver (its wake-up and its clock).
    """

    __slots__ = (
        "itt", "lun", "read_buf", "write_buf", "wake", "r2ts", "done", "error",
        "completion", "received", "digest_error", "reply", "abandoned", "started", "text",
    )

    def __init__(self, lun: int = 0, read_buf=None, write_buf=None) -> None:
        self.itt = P.NO_TAG
        self.lun = lun
        self.read_buf = read_buf
        self.write_buf = write_buf
        self.wake: Any = None
        self.r2ts: list[tuple[int, int, int]] = []  # (TTT, offset, length) not yet answered
        self.done = False
        self.error: BaseException | None = None
        self.completion: Completion | None = None
        self.received = 0
        self.digest_error = False
        self.reply: P.PDU | None = None
        self.abandoned = False
        self.started = 0.0
        self.text = b""

    def wanted(self) -> bool:
        """Whether Data-In may still land in read_buf (its caller has not given it up)."""
        return not self.abandoned


# ---------------------------------------------------------------- events


class Event:
    """Something the received bytes completed."""

    __slots__ = ()


class Send(Event):
    """Buffers the connection needs sent now (the next login or text request)."""

    __slots__ = ("parts",)

    def __init__(self, parts: list) -> None:
        self.parts = parts


class LoggedIn(Event):
    """Login reached full-feature phase; ``params`` holds the negotiated values."""

    __slots__ = ("params",)

    def __init__(self, params: Params) -> None:
        self.params = params


class TaskDone(Event):
    """A task ended: its completion, reply or error is set."""

    __slots__ = ("task",)

    def __init__(self, task: Task) -> None:
        self.task = task


class R2TReceived(Event):
    """The target asks for Data-Out (also queued in ``task.r2ts``)."""

    __slots__ = ("task", "ttt", "offset", "length")

    def __init__(self, task: Task, ttt: int, offset: int, length: int) -> None:
        self.task, self.ttt, self.offset, self.length = task, ttt, offset, length


class WindowOpened(Event):
    """ExpCmdSN or MaxCmdSN moved: commands held for the window may go."""

    __slots__ = ()


class TargetPing(Event):
    """A NOP-In from the target that wants an answer (``answer_ping``)."""

    __slots__ = ("ttt", "lun", "data")

    def __init__(self, ttt: int, lun: bytes, data: bytes) -> None:
        self.ttt, self.lun, self.data = ttt, lun, data


class AsyncMessage(Event):
    """An Async Message; ``ends_session`` when the target asks to log out or drops us."""

    __slots__ = ("code", "header")

    def __init__(self, code: int, header: P.Header) -> None:
        self.code, self.header = code, header

    @property
    def ends_session(self) -> bool:
        """Event 1 (logout requested), 2 (connection dropped) or 3 (session dropped)."""
        return self.code in (1, 2, 3)


class Rejected(Event):
    """The target rejected a PDU (at ERL 0 the connection must start over)."""

    __slots__ = ("reason", "header")

    def __init__(self, reason: int, header: P.Header) -> None:
        self.reason, self.header = reason, header


_WINDOW_OPENED = WindowOpened()


# ---------------------------------------------------------------- CHAP


def chap_response(ident: int, secret: bytes, challenge: bytes) -> str:
    """CHAP_R for CHAP_A=5: MD5(id || secret || challenge) as 0x-hex."""
    return "0x" + hashlib.md5(bytes([ident]) + secret + challenge).hexdigest()


def chap_bytes(value: str) -> bytes:
    """A CHAP binary value (0x hex or 0b base64) as bytes."""
    try:
        if value[:2] in ("0x", "0X"):
            return bytes.fromhex(value[2:])
        if value[:2] in ("0b", "0B"):
            return base64.b64decode(value[2:])
    except ValueError as e:
        raise ProtocolError("malformed CHAP challenge from target") from e
    raise ProtocolError("CHAP challenge in an unknown encoding")


def new_isid() -> bytes:
    """A random-type ISID (0x80 + 3 random bytes + a random qualifier)."""
    return b"\x80" + os.urandom(5)


# ---------------------------------------------------------------- the connection

# Login steps.
_LOGIN_FIRST, _LOGIN_CHAP_A, _LOGIN_CHAP_R, _LOGIN_SECURITY, _LOGIN_OPERATIONAL = range(5)


class Connection:
    """The protocol state of one iSCSI connection (one session, ERL 0), without I/O."""

    def __init__(
        self,
        options: Options,
        *,
        target: str | None,
        isid: bytes | None = None,
        credentials: Credentials | None = None,
        portal: str = "",
    ) -> None:
        self.options = options
        self.target = target
        self.isid = isid or new_isid()
        self.credentials = credentials
        self.portal = portal
        self.params = Params(our_max_recv=options.max_recv)
        self.cmd_sn = 0
        self.exp_cmd_sn = 0
        self.max_cmd_sn = 0
        self.exp_stat_sn = 0
        self.tsih = 0
        self.tasks: dict[int, Task] = {}
        self._itt = int.from_bytes(os.urandom(2), "big")
        self.logged_in = False
        self.discovery = False
        self._digests = False  # digests apply only in full-feature phase
        # Login.
        self._login_step = -1
        self._login_itt = 0
        self._login_text = b""
        self._login_stage = (0, 1, False)
        self._login_rounds = 0
        self._negotiated: dict[str, str] = {}
        # Receiving: the framing (and where Data-In payloads land) is the PDU receiver's.
        self._rx = P.PDUReceiver(self._on_pdu, max_data_length=LOGIN_MAX_SEGMENT, steer=self._steer)
        self._events: list[Event] = []
        self._error: VstoreError | None = None  # found after events not handed out yet
        self._window_moved = False

    def __repr__(self) -> str:
        return f"<iSCSI connection {self.target} @ {self.portal} tsih={self.tsih}>"

    # ------------------------------------------------------------ sequence numbers

    @property
    def window_open(self) -> bool:
        """Whether the target accepts a new (non-immediate) command now (CmdSN <= MaxCmdSN)."""
        return P.serial_le(self.cmd_sn, self.max_cmd_sn)

    def _next_itt(self) -> int:
        while True:
            self._itt = (self._itt + 1) & 0xFFFFFFFF
            if self._itt != P.NO_TAG and self._itt not in self.tasks:
                return self._itt

    def _update_sn(self, h: P.Header) -> None:
        if h.has_status:
            nxt = (h.stat_sn + 1) & 0xFFFFFFFF
            if P.serial_gt(nxt, self.exp_stat_sn):
                self.exp_stat_sn = nxt
        if h.opcode == P.Opcode.LOGIN_RESPONSE:
            return
        exp, mx = h.exp_cmd_sn, h.max_cmd_sn
        # A window with MaxCmdSN < ExpCmdSN - 1 is invalid: ignore it (RFC 7143 4.2.2.1).
        if P.serial_gt(exp, (mx + 1) & 0xFFFFFFFF):
            return
        if P.serial_gt(exp, self.exp_cmd_sn):
            self.exp_cmd_sn = exp
            self._window_moved = True
        if P.serial_gt(mx, self.max_cmd_sn):
            self.max_cmd_sn = mx
            self._window_moved = True

    # ------------------------------------------------------------ login

    def start_login(self, *, discovery: bool = False) -> list:
        """The first Login Request; the rest of the login follows from the responses (``Send``)."""
        if self._login_step != -1:
            raise RuntimeError("login already started")
        self.discovery = discovery
        self._login_itt = self._next_itt()
        self.cmd_sn = int.from_bytes(os.urandom(2), "big")
        first = [("InitiatorName", self.options.initiator_name)]
        if discovery:
            first.append(("SessionType", "Discovery"))
        else:
            first += [("SessionType", "Normal"), ("TargetName", self.target)]
        self._login_step = _LOGIN_FIRST
        if self.credentials is None:
            return self._login_request(0, 1, True, first + [("AuthMethod", "None")])
        return self._login_request(0, 1, False, first + [("AuthMethod", "CHAP,None")])

    def _login_request(self, csg: int, nsg: int, transit: bool, pairs) -> list:
        self._login_stage = (csg, nsg, transit)
        self._login_text = b""
        data = P.encode_text(pairs) if pairs else b""
        bhs = P.encode_login_request(
            isid=self.isid, tsih=self.tsih, itt=self._login_itt, cid=0, cmd_sn=self.cmd_sn,
            exp_stat_sn=self.exp_stat_sn, csg=csg, nsg=nsg, transit=transit, data_length=len(data),
        )
        return P.frame(bhs, data)

    def _on_login_pdu(self, h: P.Header, data: bytes, events: list) -> None:
        if h.opcode == P.Opcode.REJECT:
            raise ProtocolError(f"target rejected the login request (reason 0x{h.reject_reason:02x})")
        if h.opcode != P.Opcode.LOGIN_RESPONSE:
            raise ProtocolError(f"expected a Login Response, got opcode 0x{h.opcode:02x}")
        if self._login_step == -1:
            raise ProtocolError("Login Response before any Login Request")
        self._check_login_status(h)
        self._login_text += data
        if h.flags & P.F_CONTINUE:
            # A partial response: acknowledge it with an empty request to get the rest.
            csg, nsg, _ = self._login_stage
            text = self._login_text
            parts = self._login_request(csg, nsg, False, [])
            self._login_text = text
            events.append(Send(parts))
            return
        if h.tsih:
            self.tsih = h.tsih
        keys = dict(P.decode_text(self._login_text))
        nxt = self._login_next(h, keys)
        if nxt is not None:
            events.append(Send(nxt))
        else:
            events.append(LoggedIn(self.params))

    def _login_next(self, h: P.Header, keys: dict[str, str]) -> list | None:
        """The next Login Request after a whole response, or None when login is complete."""
        step = self._login_step
        if step == _LOGIN_FIRST:
            method = keys.get("AuthMethod", "None")
            creds = self.credentials
            if method == "CHAP":
                if creds is None:
                    raise AuthError(f"iSCSI target {self.target} at {self.portal} requires CHAP")
                self._login_step = _LOGIN_CHAP_A
                return self._login_request(0, 1, False, [("CHAP_A", "5")])
            if method != "None":
                raise AuthError(f"target wants AuthMethod {method}, which vstore does not support")
            self._login_step = _LOGIN_SECURITY
            return self._after_security(h)
        if step == _LOGIN_CHAP_A:
            if keys.get("CHAP_A") != "5" or "CHAP_I" not in keys or "CHAP_C" not in keys:
                raise ProtocolError("target did not offer CHAP with MD5 (CHAP_A=5)")
            try:
                ident = int(keys["CHAP_I"], 0)
            except ValueError as e:
                raise ProtocolError("malformed CHAP_I from target") from e
            if not 0 <= ident <= 255:
                raise ProtocolError("CHAP_I out of range")
            challenge = chap_bytes(keys["CHAP_C"])
            assert self.credentials is not None
            resp = chap_response(ident, self.credentials.secret, challenge)
            self._login_step = _LOGIN_CHAP_R
            return self._login_request(0, 1, True, [("CHAP_N", self.credentials.user), ("CHAP_R", resp)])
        if step in (_LOGIN_CHAP_R, _LOGIN_SECURITY):
            self._login_step = _LOGIN_SECURITY
            return self._after_security(h)
        # Operational stage.
        self._negotiated.update(keys)
        if h.transit and h.nsg == P.STAGE_FULL_FEATURE:
            self._apply(self._negotiated)
            # The first command uses the login's CmdSN; the window comes from the last response.
            self.exp_cmd_sn = h.exp_cmd_sn
            self.max_cmd_sn = h.max_cmd_sn
            self.logged_in = True
            self._digests = True
            self._login_step = -2
            # Digests and our limit apply from the next PDU on (the receiver has not read it yet).
            self._rx.header_digest_on = self.params.header_digest
            self._rx.data_digest_on = self.params.data_digest
            self._rx.max_data_length = self.params.our_max_recv
            return None
        self._login_rounds += 1
        if self._login_rounds > 8:
            raise ProtocolError("target never reached full-feature phase")
        return self._login_request(1, 3, True, [])

    def _after_security(self, h: P.Header) -> list:
        if h.transit and h.nsg >= 1:
            self._login_step = _LOGIN_OPERATIONAL
            self._login_rounds = 0
            return self._login_request(1, 3, True, self._offer())
        # The security stage may need more empty round trips until the target transits.
        self._login_rounds += 1
        if self._login_rounds > 4:
            raise ProtocolError("target never left the security stage")
        return self._login_request(0, 1, True, [])

    def _offer(self) -> list[tuple[str, str]]:
        o = self.options
        if self.discovery:
            return [
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("MaxRecvDataSegmentLength", str(o.max_recv)),
            ]
        return [
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

    # ------------------------------------------------------------ requests

    def _frame(self, bhs: bytes, data=b"") -> list:
        p = self.params
        return P.frame(bhs, data, header_digest_on=self._digests and p.header_digest,
                       data_digest_on=self._digests and p.data_digest)

    def _check_ffp(self) -> None:
        if not self.logged_in:
            raise RuntimeError("not logged in")

    def command(self, task: Task, cdb: bytes) -> list:
        """The buffers of a SCSI Command (and its immediate and unsolicited data) for task.

        Takes a CmdSN: only when ``window_open``. The task is registered until it ends.
        """
        self._check_ffp()
        if not self.window_open:
            raise RuntimeError("the CmdSN window is closed")
        p = self.params
        read_buf, write_buf = task.read_buf, task.write_buf
        expected = len(read_buf) if read_buf is not None else (len(write_buf) if write_buf is not None else 0)
        task.itt = self._next_itt()
        self.tasks[task.itt] = task
        immediate = 0
        unsolicited: list = []
        if write_buf is not None:
            if p.immediate_data:
                immediate = min(p.first_burst, p.target_max_recv, expected)
            if not p.initial_r2t:
                # Unsolicited Data-Out up to FirstBurstLength after the immediate part.
                end = min(p.first_burst, expected)
                unsolicited = self.data_out(task, P.NO_TAG, immediate, end - immediate)
        cmd = P.encode_scsi_command(
            lun=task.lun, itt=task.itt, cdb=cdb, expected_length=expected, cmd_sn=self.cmd_sn,
            exp_stat_sn=self.exp_stat_sn, read=read_buf is not None,
            write=write_buf is not None, final=not unsolicited, data_length=immediate,
        )
        self.cmd_sn = (self.cmd_sn + 1) & 0xFFFFFFFF
        parts = self._frame(cmd, _segment(write_buf[:immediate]) if immediate else b"")
        if unsolicited:
            parts += unsolicited
        return parts

    def data_out(self, task: Task, ttt: int, offset: int, length: int) -> list:
        """The buffers of the Data-Out PDUs carrying write_buf[offset:offset+length]."""
        p = self.params
        seg = p.target_max_recv
        hd, dd = self._digests and p.header_digest, self._digests and p.data_digest
        parts: list = []
        data_sn = 0
        end = offset + length
        pos = offset
        buf = task.write_buf
        # An IoVec is walked once, not sliced per PDU (tgt's default segment is 8 KiB).
        segments = buf.segments(offset, end, seg) if isinstance(buf, IoVec) else None
        while pos < end:
            n = min(seg, end - pos)
            bhs = P.encode_data_out(
                lun=task.lun, itt=task.itt, ttt=ttt, exp_stat_sn=self.exp_stat_sn, data_sn=data_sn,
                buffer_offset=pos, data_length=n, final=pos + n >= end,
            )
            if segments is None:
                data = buf[pos : pos + n]
            else:
                data = next(segments)
                if len(data) == 1:
                    data = data[0]  # within one view (the usual case): frame's plain path
            parts += P.frame(bhs, data, header_digest_on=hd, data_digest_on=dd)
            data_sn += 1
            pos += n
        return parts

    def next_data_out(self, task: Task) -> list | None:
        """The Data-Out answering task's oldest unanswered R2T, or None."""
        if not task.r2ts or task.done:
            return None
        ttt, off, length = task.r2ts.pop(0)
        return self.data_out(task, ttt, off, length)

    def ping(self, task: Task) -> list:
        """An immediate NOP-Out with task's new ITT; the NOP-In answer ends the task."""
        self._check_ffp()
        task.itt = self._next_itt()
        self.tasks[task.itt] = task
        return self._frame(P.encode_nop_out(itt=task.itt, ttt=P.NO_TAG, cmd_sn=self.cmd_sn,
                                            exp_stat_sn=self.exp_stat_sn))

    def answer_ping(self, ping: TargetPing) -> list:
        """The NOP-Out answering a target's NOP-In (its TTT, LUN and data echoed)."""
        return self._frame(
            P.encode_nop_out(itt=P.NO_TAG, ttt=ping.ttt, cmd_sn=self.cmd_sn,
                             exp_stat_sn=self.exp_stat_sn, lun=ping.lun, data_length=len(ping.data)),
            ping.data,
        )

    def logout(self, task: Task) -> list:
        """An immediate Logout Request (close the session); the Logout Response ends the task."""
        self._check_ffp()
        task.itt = self._next_itt()
        self.tasks[task.itt] = task
        return self._frame(P.encode_logout_request(itt=task.itt, cid=0, cmd_sn=self.cmd_sn,
                                                   exp_stat_sn=self.exp_stat_sn))

    def text_request(self, task: Task, pairs) -> list:
        """An immediate Text Request; its (possibly multi-PDU) answer collects in ``task.text``."""
        self._check_ffp()
        task.itt = self._next_itt()
        task.text = b""
        self.tasks[task.itt] = task
        payload = P.encode_text(pairs)
        return self._frame(P.encode_text_request(itt=task.itt, ttt=P.NO_TAG, cmd_sn=self.cmd_sn,
                                                 exp_stat_sn=self.exp_stat_sn,
                                                 data_length=len(payload)), payload)

    def forget(self, task: Task) -> None:
        """Stop tracking a task (its waiter is gone and no answer is wanted)."""
        if self.tasks.get(task.itt) is task:
            del self.tasks[task.itt]

    def fail_all(self, error: BaseException) -> list[Task]:
        """End every task with error (the connection is gone); return them."""
        tasks, self.tasks = self.tasks, {}
        out = []
        for t in tasks.values():
            if not t.done:
                t.error = error
                t.done = True
                out.append(t)
        return out

    # ------------------------------------------------------------ receiving

    def receive_buffers(self) -> list[memoryview]:
        """Where the next received bytes must go (one or more buffers, filled in order; never empty)."""
        if self._error is not None:
            raise self._error
        return self._rx.buffers()

    def received(self, n: int) -> list[Event]:
        """Account for n bytes received into ``receive_buffers()``; return the events they complete."""
        if self._error is not None:
            raise self._error
        events = self._events = []
        try:
            self._rx.received(n)
        except VstoreError as e:
            if not events:
                raise
            self._error = e  # the events before it first; the next call raises it
        if self._window_moved:
            self._window_moved = False
            events.append(_WINDOW_OPENED)
        return events

    def receive_data(self, data) -> list[Event]:
        """Feed received bytes (copied in); return the events they complete."""
        events: list[Event] = []
        mv = memoryview(data).cast("B")
        while len(mv):
            k = P.fill(self.receive_buffers(), mv)
            mv = mv[k:]
            events += self.received(k)
        return events

    @property
    def buffered(self) -> int:
        """Bytes received but not yet used."""
        return self._rx.buffered

    def end_of_stream(self) -> None:
        """The peer closed the connection; ProtocolError if it stopped inside a PDU."""
        self._rx.end_of_stream()

    def _steer(self, h: P.Header) -> tuple[list[memoryview], Any] | None:
        """Data-In payloads go straight into their command's buffer (unless it was given up)."""
        if h.opcode != P.Opcode.DATA_IN or not self.logged_in:
            return None
        t = self._data_in_task(h)
        off, n = h.buffer_offset, h.data_length
        if off + n > len(t.read_buf):
            raise ProtocolError(
                f"Data-In at offset {off} length {n} overruns the {len(t.read_buf)}-byte buffer"
            )
        # The caller's buffer, or the pieces of an IoVec; an abandoned command's data is dropped.
        return pieces_of(t.read_buf[off : off + n]), t.wanted

    def _data_in_task(self, h: P.Header) -> Task:
        t = self.tasks.get(h.itt)
        if t is None or t.read_buf is None:
            raise ProtocolError(f"Data-In for unknown task 0x{h.itt:08x}")
        return t

    def _on_pdu(self, pdu: P.PDU) -> None:
        h = pdu.header
        if self.logged_in or h.opcode == P.Opcode.LOGIN_RESPONSE:
            self._update_sn(h)
        if not self.logged_in:
            self._on_login_pdu(h, pdu.data, self._events)
        elif h.opcode == P.Opcode.DATA_IN:
            self._on_data_in(pdu)
        else:
            self._on_response(h, pdu.ahs, pdu.data, pdu.data_digest_ok, self._events)

    def _on_data_in(self, pdu: P.PDU) -> None:
        h = pdu.header
        t = self._data_in_task(h)
        n = h.data_length
        if n:
            if not pdu.data_digest_ok:
                t.digest_error = True
            t.received += n
        if h.flags & P.F_STATUS:
            t.completion = Completion(
                h.status, None, h.residual, bool(h.flags & P.F_UNDERFLOW),
                bool(h.flags & P.F_OVERFLOW), t.received, t.digest_error,
            )
            self._complete(t, self._events)

    def _complete(self, t: Task, events: list) -> None:
        t.done = True
        self.tasks.pop(t.itt, None)
        events.append(TaskDone(t))

    def _on_response(self, h: P.Header, ahs: bytes, data: bytes, ok: bool, events: list) -> None:
        """A whole PDU other than Data-In, in full-feature phase."""
        op = h.opcode
        if op == P.Opcode.SCSI_RESPONSE:
            t = self.tasks.get(h.itt)
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
            self._complete(t, events)
        elif op == P.Opcode.R2T:
            t = self.tasks.get(h.itt)
            if t is None or t.write_buf is None:
                raise ProtocolError(f"R2T for unknown task 0x{h.itt:08x}")
            off, length = h.buffer_offset, h.desired_length
            if off + length > len(t.write_buf) or length == 0:
                raise ProtocolError(f"R2T for offset {off} length {length} is outside the write")
            t.r2ts.append((h.ttt, off, length))
            events.append(R2TReceived(t, h.ttt, off, length))
        elif op == P.Opcode.NOP_IN:
            if h.itt != P.NO_TAG:
                t = self.tasks.get(h.itt)
                if t is not None:
                    self._complete(t, events)
            elif h.ttt != P.NO_TAG:
                events.append(TargetPing(h.ttt, h.lun_bytes, data))
        elif op == P.Opcode.TEXT_RESPONSE:
            t = self.tasks.get(h.itt)
            if t is not None:
                t.text += data
                if h.final:
                    t.reply = P.PDU(h, ahs, data, ok)
                    self._complete(t, events)
                else:
                    # More to come: ask for it with the target's TTT.
                    events.append(Send(self._frame(P.encode_text_request(
                        itt=t.itt, ttt=h.ttt, cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn,
                        data_length=0))))
        elif op in (P.Opcode.LOGOUT_RESPONSE, P.Opcode.TASK_MGMT_RESPONSE):
            t = self.tasks.get(h.itt)
            if t is not None:
                t.reply = P.PDU(h, ahs, data, ok)
                self._complete(t, events)
        elif op == P.Opcode.REJECT:
            events.append(Rejected(h.reject_reason, h))
        elif op == P.Opcode.ASYNC:
            events.append(AsyncMessage(h.async_event, h))
        else:
            raise ProtocolError(f"unexpected PDU opcode 0x{op:02x} in full-feature phase")


def _segment(buf: memoryview | IoVec) -> memoryview | list[memoryview]:
    """A data segment for ``pdu.frame``: one buffer, or the pieces of an IoVec (sent as they are)."""
    return buf.pieces if isinstance(buf, IoVec) else buf


def parse_send_targets(text: bytes) -> list[tuple[str, list[str]]]:
    """[(target name, [addresses])] from the text of a SendTargets answer."""
    out: list[tuple[str, list[str]]] = []
    for key, value in P.decode_text(text):
        if key == "TargetName":
            out.append((value, []))
        elif key == "TargetAddress" and out:
            out[-1][1].append(value)
    return out
