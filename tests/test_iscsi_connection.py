"""The sans-IO iSCSI connection, from bytes alone: login, CHAP, negotiation, the CmdSN window, data."""

from __future__ import annotations

import hashlib
import itertools
import socket

import numpy as np
import pytest
import trio

from backends.iscsi import pdu as P
from backends.iscsi.connection import (
    AsyncMessage,
    Connection,
    Credentials,
    LoggedIn,
    Options,
    R2TReceived,
    Rejected,
    Send,
    TargetPing,
    Task,
    TaskDone,
    WindowOpened,
    parse_send_targets,
)
from backends.iscsi.session import Session
from vstore.errors import AuthError, MemberIOError, NotFoundError, ProtocolError
from vstore.stack.iovec import IoVec

TARGET = "iqn.2026-11.test:conn"
PIECES = (1, 7, 13, 48, 100, 3, 4096, 5)


def connection(**kw) -> Connection:
    creds = kw.pop("credentials", None)
    return Connection(Options(initiator_name="iqn.2026-11.test:init", **kw), target=TARGET,
                      credentials=creds, portal="127.0.0.1:3260")


def sent(parts: list) -> list[P.PDU]:
    """The PDUs in buffers the connection produced (decoded as a target would)."""
    raw = b"".join(bytes(p) for p in parts)
    return decode_initiator(raw)


def decode_initiator(raw: bytes, *, header_digest: bool = False, data_digest: bool = False) -> list[P.PDU]:
    d = P.PDUDecoder(from_target=False, header_digest_on=header_digest, data_digest_on=data_digest)
    d.feed(raw)
    out = []
    while (pdu := d.next_pdu()) is not None:
        out.append(pdu)
    assert d.buffered == 0
    return out


def feed(conn: Connection, data: bytes, sizes=PIECES) -> list:
    """Feed bytes in odd-sized pieces; return every event."""
    events = []
    pos = 0
    for n in itertools.cycle(sizes):
        if pos >= len(data):
            break
        events += conn.receive_data(data[pos : pos + n])
        pos += n
    return events


def feed_zero_copy(conn: Connection, data: bytes, max_recv: int = 65536) -> list:
    """Feed bytes through receive_buffers()/received(), as the driver does."""
    events = []
    pos = 0
    while pos < len(data):
        bufs = conn.receive_buffers()
        n = 0
        for b in bufs:
            k = min(len(b), len(data) - pos - n, max_recv - n)
            b[:k] = data[pos + n : pos + n + k]
            n += k
            if k < len(b):
                break
        pos += n
        events += conn.received(n)
    return events


def kinds(events: list) -> set:
    """The kinds of events (the window may move with a header, before its payload is in)."""
    return {type(e) for e in events}


def done(events: list) -> list[Task]:
    """The tasks the events ended."""
    return [e.task for e in events if isinstance(e, TaskDone)]


def login_response(itt: int, *, csg: int, nsg: int, transit: bool, text=(), stat_sn: int = 100,
                   exp_cmd_sn: int = 0, max_cmd_sn: int = 0, status: tuple[int, int] = (0, 0),
                   tsih: int = 0x1234, more: bool = False) -> bytes:
    data = P.encode_text(list(text)) if text else b""
    flags = (P.F_LOGIN_TRANSIT if transit else 0) | (P.F_CONTINUE if more else 0) | (csg << 2) | nsg
    bhs = bytearray(P.encode_target_pdu(
        P.Opcode.LOGIN_RESPONSE, flags=flags, itt=itt, stat_sn=stat_sn, exp_cmd_sn=exp_cmd_sn,
        max_cmd_sn=max_cmd_sn, f36=(status[0] << 24) | (status[1] << 16), data_length=len(data),
    ))
    bhs[14:16] = tsih.to_bytes(2, "big")
    return P.encode_pdu(bytes(bhs), data)


OPERATIONAL = [
    ("HeaderDigest", "None"), ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "8192"),
    ("MaxBurstLength", "262144"), ("FirstBurstLength", "65536"), ("ImmediateData", "Yes"),
    ("InitialR2T", "Yes"),
]


def login(conn: Connection, *, keys=OPERATIONAL, window: int = 32) -> int:
    """Log conn in (no CHAP); return the CmdSN of its first command."""
    req = sent(conn.start_login())[0]
    itt, cmd_sn = req.header.itt, req.header.u32(24)
    events = feed(conn, login_response(itt, csg=0, nsg=1, transit=True, text=[("AuthMethod", "None")],
                                       exp_cmd_sn=cmd_sn, max_cmd_sn=cmd_sn))
    (step,) = events
    assert isinstance(step, Send)
    events = feed(conn, login_response(itt, csg=1, nsg=3, transit=True, text=keys, stat_sn=101,
                                       exp_cmd_sn=cmd_sn, max_cmd_sn=cmd_sn + window - 1))
    assert [type(e) for e in events] == [LoggedIn]
    return cmd_sn


class Target:
    """The target side of a logged-in connection: builds its PDUs with the negotiated digests."""

    def __init__(self, conn: Connection, cmd_sn: int) -> None:
        self.conn = conn
        self.stat_sn = 102
        self.exp_cmd_sn = cmd_sn
        self.max_cmd_sn = conn.max_cmd_sn

    def pdu(self, opcode: int, data=b"", *, status: bool = True, **fields) -> bytes:
        fields.setdefault("exp_cmd_sn", self.exp_cmd_sn)
        fields.setdefault("max_cmd_sn", self.max_cmd_sn)
        if status:
            fields.setdefault("stat_sn", self.stat_sn)
            self.stat_sn += 1
        bhs = P.encode_target_pdu(opcode, data_length=len(data), **fields)
        p = self.conn.params
        return P.encode_pdu(bhs, data, header_digest_on=p.header_digest, data_digest_on=p.data_digest)

    def response(self, t: Task, *, scsi_status: int = 0, sense: bytes = b"", advance: int = 1) -> bytes:
        self.exp_cmd_sn += advance
        self.max_cmd_sn += advance
        return self.pdu(P.Opcode.SCSI_RESPONSE, sense, itt=t.itt, b3=scsi_status)

    def data_in(self, t: Task, offset: int, data: bytes, *, last: bool = False, data_sn: int = 0) -> bytes:
        flags = P.F_FINAL | P.F_STATUS if last else 0
        if last:
            self.exp_cmd_sn += 1
            self.max_cmd_sn += 1
        return self.pdu(P.Opcode.DATA_IN, data, status=last, flags=flags, itt=t.itt, f36=data_sn,
                        f40=offset)

    def requests(self, parts: list) -> list[P.PDU]:
        p = self.conn.params
        return decode_initiator(b"".join(bytes(x) for x in parts), header_digest=p.header_digest,
                                data_digest=p.data_digest)


# ---------------------------------------------------------------- login and negotiation


def test_login_without_chap_and_negotiation_results():
    conn = connection()
    req = sent(conn.start_login())
    assert len(req) == 1 and req[0].opcode == P.Opcode.LOGIN
    h = req[0].header
    assert h.immediate and h.flags & P.F_LOGIN_TRANSIT and (h.flags >> 2) & 3 == 0 and h.flags & 3 == 1
    keys = dict(P.decode_text(req[0].data))
    assert keys == {"InitiatorName": "iqn.2026-11.test:init", "SessionType": "Normal",
                    "TargetName": TARGET, "AuthMethod": "None"}
    cmd_sn = h.u32(24)
    (step,) = feed(conn, login_response(h.itt, csg=0, nsg=1, transit=True, text=[("AuthMethod", "None")],
                                        exp_cmd_sn=cmd_sn, max_cmd_sn=cmd_sn))
    assert isinstance(step, Send) and not conn.logged_in
    (op,) = sent(step.parts)
    assert (op.header.flags >> 2) & 3 == 1 and op.header.flags & 3 == 3
    offer = dict(P.decode_text(op.data))
    assert offer["HeaderDigest"] == "None,CRC32C" and offer["MaxRecvDataSegmentLength"] == str(1 << 20)
    assert offer["ErrorRecoveryLevel"] == "0" and offer["InitialR2T"] == "No"
    events = feed(conn, login_response(h.itt, csg=1, nsg=3, transit=True, stat_sn=101, text=[
        ("HeaderDigest", "CRC32C"), ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "512"),
        ("MaxBurstLength", "65536"), ("FirstBurstLength", "8192"), ("ImmediateData", "No"),
        ("InitialR2T", "Yes"), ("MaxOutstandingR2T", "1"),
    ], exp_cmd_sn=cmd_sn, max_cmd_sn=cmd_sn + 9, tsih=0x4242))
    assert [type(e) for e in events] == [LoggedIn]
    p = events[0].params
    assert (p.header_digest, p.data_digest) == (True, False)
    assert (p.target_max_recv, p.our_max_recv) == (512, 1 << 20)
    assert (p.max_burst, p.first_burst, p.immediate_data, p.initial_r2t) == (65536, 8192, False, True)
    assert conn.logged_in and conn.tsih == 0x4242 and conn.exp_stat_sn == 102
    assert (conn.cmd_sn, conn.exp_cmd_sn, conn.max_cmd_sn) == (cmd_sn, cmd_sn, cmd_sn + 9)
    assert conn.window_open


def test_login_digests_off_and_what_we_propose():
    conn = connection(header_digest="None", data_digest="None", max_recv=4096)
    login(conn, keys=[("HeaderDigest", "None"), ("DataDigest", "None")])
    p = conn.params
    assert not p.header_digest and not p.data_digest
    assert p.target_max_recv == 8192  # the RFC default when the target says nothing
    assert p.our_max_recv == 4096


def test_login_with_data_digest_applies_to_full_feature_phase_only():
    conn = connection()
    cmd_sn = login(conn, keys=[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")])
    tgt = Target(conn, cmd_sn)
    t = Task(0, memoryview(bytearray(1000)))
    cmd = tgt.requests(conn.command(t, bytes(16)))  # decodes only with both digests
    assert len(cmd) == 1 and cmd[0].opcode == P.Opcode.SCSI_COMMAND
    data = bytes(range(256)) * 3 + bytes(232)
    events = feed(conn, tgt.data_in(t, 0, data, last=True))
    assert kinds(events) == {TaskDone, WindowOpened} and done(events) == [t]
    assert not t.digest_error and bytes(t.read_buf) == data
    # A flipped payload bit: the digest says so, the task says so.
    t2 = Task(0, memoryview(bytearray(8)))
    conn.command(t2, bytes(16))
    raw = bytearray(tgt.data_in(t2, 0, b"abcdefgh", last=True))
    raw[P.BHS_SIZE + 4] ^= 1
    feed(conn, bytes(raw))
    assert t2.done and t2.digest_error and t2.completion.digest_error
    # A flipped header bit: the header cannot be trusted.
    t3 = Task(0, memoryview(bytearray(8)))
    conn.command(t3, bytes(16))
    raw = bytearray(tgt.data_in(t3, 0, b"abcdefgh", last=True))
    raw[20] ^= 1
    with pytest.raises(ProtocolError, match="header digest"):
        feed(conn, bytes(raw))


def test_chap_login():
    creds = Credentials("alice", b"s3cret-secret")
    conn = connection(credentials=creds)
    req = sent(conn.start_login())[0]
    assert dict(P.decode_text(req.data))["AuthMethod"] == "CHAP,None"
    assert not req.header.flags & P.F_LOGIN_TRANSIT  # security negotiation continues
    itt, cmd_sn = req.header.itt, req.header.u32(24)
    (step,) = feed(conn, login_response(itt, csg=0, nsg=1, transit=False, text=[("AuthMethod", "CHAP")]))
    assert dict(P.decode_text(sent(step.parts)[0].data)) == {"CHAP_A": "5"}
    challenge = bytes(range(16))
    (step,) = feed(conn, login_response(itt, csg=0, nsg=1, transit=False, text=[
        ("CHAP_A", "5"), ("CHAP_I", "7"), ("CHAP_C", "0x" + challenge.hex())]))
    answer = sent(step.parts)[0]
    keys = dict(P.decode_text(answer.data))
    assert keys["CHAP_N"] == "alice"
    assert keys["CHAP_R"] == "0x" + hashlib.md5(bytes([7]) + b"s3cret-secret" + challenge).hexdigest()
    assert answer.header.flags & P.F_LOGIN_TRANSIT
    assert "s3cret" not in repr(creds) and "s3cret" not in repr(conn)
    (step,) = feed(conn, login_response(itt, csg=0, nsg=1, transit=True))
    assert (sent(step.parts)[0].header.flags >> 2) & 3 == 1  # on to the operational stage
    events = feed(conn, login_response(itt, csg=1, nsg=3, transit=True, text=OPERATIONAL,
                                       exp_cmd_sn=cmd_sn, max_cmd_sn=cmd_sn + 3))
    assert isinstance(events[0], LoggedIn)


def test_chap_challenge_in_base64():
    conn = connection(credentials=Credentials("bob", b"pw-pw-pw-pw-pw"))
    itt = sent(conn.start_login())[0].header.itt
    feed(conn, login_response(itt, csg=0, nsg=1, transit=False, text=[("AuthMethod", "CHAP")]))
    (step,) = feed(conn, login_response(itt, csg=0, nsg=1, transit=False, text=[
        ("CHAP_A", "5"), ("CHAP_I", "200"), ("CHAP_C", "0bAAECAw==")]))
    keys = dict(P.decode_text(sent(step.parts)[0].data))
    assert keys["CHAP_R"] == "0x" + hashlib.md5(bytes([200]) + b"pw-pw-pw-pw-pw" + bytes([0, 1, 2, 3])).hexdigest()


@pytest.mark.parametrize("text,error,match", [
    ([("CHAP_A", "7"), ("CHAP_I", "1"), ("CHAP_C", "0x00")], ProtocolError, "CHAP_A=5"),
    ([("CHAP_A", "5"), ("CHAP_I", "x"), ("CHAP_C", "0x00")], ProtocolError, "CHAP_I"),
    ([("CHAP_A", "5"), ("CHAP_I", "300"), ("CHAP_C", "0x00")], ProtocolError, "CHAP_I"),
    ([("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "0xZZ")], ProtocolError, "CHAP challenge"),
    ([("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "plain")], ProtocolError, "encoding"),
])
def test_bad_chap_offers(text, error, match):
    conn = connection(credentials=Credentials("bob", b"pw"))
    itt = sent(conn.start_login())[0].header.itt
    feed(conn, login_response(itt, csg=0, nsg=1, transit=False, text=[("AuthMethod", "CHAP")]))
    with pytest.raises(error, match=match):
        feed(conn, login_response(itt, csg=0, nsg=1, transit=False, text=text))


@pytest.mark.parametrize("creds,status,text,error,match", [
    (None, (2, 1), (), AuthError, "authentication required"),
    (Credentials("u", b"n0tTheS3cret"), (2, 1), (), AuthError, "refused CHAP login for user 'u'"),
    (None, (2, 3), (), NotFoundError, "no such target"),
    (None, (2, 9), (), MemberIOError, "rejected the login"),
    (None, (1, 1), (), MemberIOError, "redirect"),
    (None, (3, 2), (), MemberIOError, "could not log in now"),
    (None, (0, 0), [("AuthMethod", "CHAP")], AuthError, "requires CHAP"),
    (None, (0, 0), [("AuthMethod", "KRB5")], AuthError, "KRB5"),
])
def test_login_refusals(creds, status, text, error, match):
    conn = connection(credentials=creds)
    itt = sent(conn.start_login())[0].header.itt
    with pytest.raises(error, match=match) as e:
        feed(conn, login_response(itt, csg=0, nsg=1, transit=False, text=text, status=status))
    assert "n0tTheS3cret" not in str(e.value)


def test_login_continuation_and_stalls():
    conn = connection()
    itt = sent(conn.start_login())[0].header.itt
    # A response split over two PDUs (C bit): an empty request asks for the rest.
    (step,) = feed(conn, login_response(itt, csg=0, nsg=1, transit=False, more=True,
                                        text=[("TargetAlias", "x")]))
    ack = sent(step.parts)[0]
    assert ack.data == b"" and not ack.header.flags & P.F_LOGIN_TRANSIT
    (step,) = feed(conn, login_response(itt, csg=0, nsg=1, transit=True, text=[("AuthMethod", "None")]))
    assert "HeaderDigest" in dict(P.decode_text(sent(step.parts)[0].data))
    # The target never transits to full-feature phase: a clear error, not a loop.
    with pytest.raises(ProtocolError, match="never reached full-feature"):
        for _ in range(10):
            feed(conn, login_response(itt, csg=1, nsg=3, transit=False))


def test_login_answered_with_something_else():
    conn = connection()
    conn.start_login()
    with pytest.raises(ProtocolError, match="expected a Login Response"):
        feed(conn, P.encode_pdu(P.encode_target_pdu(P.Opcode.NOP_IN)))
    conn = connection()
    conn.start_login()
    with pytest.raises(ProtocolError, match="rejected the login"):
        feed(conn, P.encode_pdu(P.encode_target_pdu(P.Opcode.REJECT, b2=9)))


def test_discovery_login_and_send_targets():
    conn = connection()
    req = sent(conn.start_login(discovery=True))[0]
    assert dict(P.decode_text(req.data))["SessionType"] == "Discovery"
    itt, cmd_sn = req.header.itt, req.header.u32(24)
    (step,) = feed(conn, login_response(itt, csg=0, nsg=1, transit=True))
    assert dict(P.decode_text(sent(step.parts)[0].data)) == {
        "HeaderDigest": "None", "DataDigest": "None", "MaxRecvDataSegmentLength": str(1 << 20)}
    feed(conn, login_response(itt, csg=1, nsg=3, transit=True, exp_cmd_sn=cmd_sn, max_cmd_sn=cmd_sn))
    tgt = Target(conn, cmd_sn)
    t = Task()
    (text_req,) = sent(conn.text_request(t, [("SendTargets", "All")]))
    assert text_req.data == b"SendTargets=All\0"
    first = P.encode_text([("TargetName", "iqn.a"), ("TargetAddress", "10.0.0.1:3260,1")])
    (more,) = feed(conn, tgt.pdu(P.Opcode.TEXT_RESPONSE, first, flags=0, itt=t.itt, ttt=0x77))
    assert isinstance(more, Send) and not t.done
    assert sent(more.parts)[0].header.ttt == 0x77
    events = feed(conn, tgt.pdu(P.Opcode.TEXT_RESPONSE, P.encode_text([("TargetName", "iqn.b")]),
                                itt=t.itt))
    assert [type(e) for e in events] == [TaskDone] and t.done
    assert parse_send_targets(t.text) == [("iqn.a", ["10.0.0.1:3260,1"]), ("iqn.b", [])]


# ---------------------------------------------------------------- commands


def test_cmdsn_window_holds_and_releases_commands():
    conn = connection()
    cmd_sn = login(conn, window=2)
    tgt = Target(conn, cmd_sn)
    a, b, c = (Task(0, memoryview(bytearray(512))) for _ in range(3))
    (pa,) = sent(conn.command(a, bytes(16)))
    (pb,) = sent(conn.command(b, bytes(16)))
    assert (pa.header.u32(24), pb.header.u32(24)) == (cmd_sn, cmd_sn + 1)
    assert not conn.window_open
    with pytest.raises(RuntimeError, match="window"):
        conn.command(c, bytes(16))
    # An answer that leaves MaxCmdSN where it was keeps the window closed.
    events = feed(conn, tgt.response(a, advance=0))
    assert [type(e) for e in events] == [TaskDone] and not conn.window_open
    # A window with MaxCmdSN < ExpCmdSN - 1 is invalid and ignored.
    events = feed(conn, tgt.pdu(P.Opcode.NOP_IN, status=False, exp_cmd_sn=cmd_sn + 9,
                                max_cmd_sn=cmd_sn + 2, ttt=P.NO_TAG))
    assert events == [] and conn.exp_cmd_sn == cmd_sn
    # MaxCmdSN moves on: the window opens.
    events = feed(conn, tgt.response(b, advance=1))
    assert [type(e) for e in events] == [TaskDone, WindowOpened] and conn.window_open
    (pc,) = sent(conn.command(c, bytes(16)))
    assert pc.header.u32(24) == cmd_sn + 2 and not conn.window_open


def test_data_in_lands_in_the_callers_buffer():
    conn = connection()
    tgt = Target(conn, login(conn))
    dest = np.full(300_000, 0xAA, np.uint8)
    t = Task(0, memoryview(dest))
    (cmd,) = sent(conn.command(t, bytes(16)))
    assert cmd.header.flags & P.F_READ and cmd.header.u32(20) == len(dest)
    data = np.random.default_rng(1).integers(0, 256, len(dest), dtype=np.uint8).tobytes()
    # Out of order and in odd pieces; payloads not a multiple of 4 (padding).
    stream = (tgt.data_in(t, 100_001, data[100_001:], data_sn=1)
              + tgt.data_in(t, 0, data[:100_001], data_sn=0, last=True))
    events = feed(conn, stream)
    assert kinds(events) == {TaskDone, WindowOpened} and done(events) == [t]
    assert dest.tobytes() == data
    c = t.completion
    assert c.status == 0 and c.received == len(data) and not c.digest_error
    assert conn.tasks == {} and conn.buffered == 0


def test_big_data_in_is_received_straight_into_the_buffer():
    """The zero-copy path: once the header is in, receive_buffers() hands out the caller's memory."""
    conn = connection()
    tgt = Target(conn, login(conn))
    dest = np.zeros(1 << 20, np.uint8)
    t = Task(0, memoryview(dest))
    conn.command(t, bytes(16))
    data = np.random.default_rng(2).integers(0, 256, len(dest), dtype=np.uint8).tobytes()
    pdu = tgt.data_in(t, 0, data, last=True)
    events = feed_zero_copy(conn, pdu[:P.BHS_SIZE])
    assert done(events) == []
    bufs = conn.receive_buffers()
    assert len(bufs) == 1 and np.shares_memory(np.frombuffer(bufs[0], np.uint8), dest)
    events = feed_zero_copy(conn, pdu[P.BHS_SIZE:], max_recv=40_000)
    assert done(events) == [t] and dest.tobytes() == data


def test_data_in_into_the_pieces_of_an_iovec():
    conn = connection()
    tgt = Target(conn, login(conn))
    views = [np.zeros(n, np.uint8) for n in (100, 70_000, 3, 200_000)]
    t = Task(0, IoVec(memoryview(v) for v in views))
    conn.command(t, bytes(16))
    data = np.random.default_rng(3).integers(0, 256, t.read_buf.nbytes, dtype=np.uint8).tobytes()
    events = feed_zero_copy(conn, tgt.data_in(t, 0, data[:50], data_sn=0)
                            + tgt.data_in(t, 50, data[50:], data_sn=1, last=True), max_recv=10_000)
    assert done(events) == [t]
    assert b"".join(v.tobytes() for v in views) == data


def test_abandoned_read_never_lands():
    conn = connection()
    tgt = Target(conn, login(conn))
    dest = np.full(200_000, 7, np.uint8)
    t = Task(0, memoryview(dest))
    conn.command(t, bytes(16))
    data = bytes(range(200)) * 1000
    pdu = tgt.data_in(t, 0, data, last=True)
    feed_zero_copy(conn, pdu[:70_000])
    t.abandoned = True  # the caller gave up mid-payload
    events = feed_zero_copy(conn, pdu[70_000:])
    assert done(events) == [t]
    assert (dest[70_000 - P.BHS_SIZE:] == 7).all()


def test_write_with_immediate_data_and_r2t():
    conn = connection()
    cmd_sn = login(conn, keys=[("MaxRecvDataSegmentLength", "8192"), ("FirstBurstLength", "16384"),
                               ("ImmediateData", "Yes"), ("InitialR2T", "Yes")])
    tgt = Target(conn, cmd_sn)
    src = np.random.default_rng(4).integers(0, 256, 40_000, dtype=np.uint8)
    t = Task(0, None, memoryview(src))
    pdus = tgt.requests(conn.command(t, bytes(16)))
    assert len(pdus) == 1  # InitialR2T: nothing unsolicited after the immediate data
    cmd = pdus[0]
    assert cmd.header.flags & P.F_WRITE and cmd.header.final
    assert cmd.data == src[:8192].tobytes()  # immediate: min(FirstBurst, target's MaxRecv)
    events = feed(conn, tgt.pdu(P.Opcode.R2T, status=False, itt=t.itt, ttt=0x99, f40=8192,
                                f44=40_000 - 8192))
    assert [type(e) for e in events] == [R2TReceived]
    assert (events[0].ttt, events[0].offset, events[0].length) == (0x99, 8192, 40_000 - 8192)
    outs = tgt.requests(conn.next_data_out(t))
    assert [o.opcode for o in outs] == [P.Opcode.DATA_OUT] * 4
    assert [o.header.buffer_offset for o in outs] == [8192, 16384, 24576, 32768]
    assert [o.header.data_sn for o in outs] == [0, 1, 2, 3]
    assert all(o.header.ttt == 0x99 for o in outs) and [o.header.final for o in outs] == [False] * 3 + [True]
    assert b"".join(o.data for o in outs) == src[8192:].tobytes()
    assert conn.next_data_out(t) is None
    events = feed(conn, tgt.response(t))
    assert done(events) == [t] and t.completion.status == 0


def test_write_with_unsolicited_data_out():
    conn = connection()
    tgt = Target(conn, login(conn, keys=[("MaxRecvDataSegmentLength", "4096"), ("FirstBurstLength", "10000"),
                                         ("ImmediateData", "No"), ("InitialR2T", "No")]))
    src = bytes(range(256)) * 100
    t = Task(0, None, memoryview(src))
    pdus = tgt.requests(conn.command(t, bytes(16)))
    cmd, outs = pdus[0], pdus[1:]
    assert cmd.data == b"" and not cmd.header.final
    assert [o.header.buffer_offset for o in outs] == [0, 4096, 8192]
    assert all(o.header.ttt == P.NO_TAG for o in outs)
    assert b"".join(o.data for o in outs) == src[:10000]


def test_check_condition_sense_and_target_failure():
    conn = connection()
    tgt = Target(conn, login(conn))
    t = Task(0, memoryview(bytearray(512)))
    conn.command(t, bytes(16))
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0])
    feed(conn, tgt.response(t, scsi_status=0x02, sense=len(sense).to_bytes(2, "big") + sense))
    c = t.completion
    assert c.status == 0x02 and (c.sense.key, c.sense.asc, c.sense.ascq) == (5, 0x21, 0)
    t2 = Task(0, memoryview(bytearray(512)))
    conn.command(t2, bytes(16))
    feed(conn, tgt.pdu(P.Opcode.SCSI_RESPONSE, itt=t2.itt, b2=1))
    assert isinstance(t2.error, MemberIOError)


def test_nop_async_reject_and_logout():
    conn = connection()
    tgt = Target(conn, login(conn))
    (ping,) = feed(conn, tgt.pdu(P.Opcode.NOP_IN, b"echo", status=False, itt=P.NO_TAG, ttt=0x31))
    assert isinstance(ping, TargetPing) and ping.data == b"echo"
    (answer,) = sent(conn.answer_ping(ping))
    assert answer.opcode == P.Opcode.NOP_OUT and answer.header.ttt == 0x31
    assert answer.header.itt == P.NO_TAG and answer.data == b"echo" and answer.header.immediate
    t = Task()
    (out,) = sent(conn.ping(t))
    assert out.header.itt == t.itt and out.header.ttt == P.NO_TAG
    assert isinstance(feed(conn, tgt.pdu(P.Opcode.NOP_IN, itt=t.itt))[0], TaskDone)
    (ev,) = feed(conn, tgt.pdu(P.Opcode.ASYNC, status=False, f36=1 << 24))
    assert isinstance(ev, AsyncMessage) and ev.code == 1 and ev.ends_session
    (ev,) = feed(conn, tgt.pdu(P.Opcode.REJECT, b"x" * 48, b2=9, itt=P.NO_TAG))
    assert isinstance(ev, Rejected) and ev.reason == 9
    t = Task()
    (out,) = sent(conn.logout(t))
    assert out.opcode == P.Opcode.LOGOUT
    feed(conn, tgt.pdu(P.Opcode.LOGOUT_RESPONSE, itt=t.itt))
    assert t.done and t.reply.opcode == P.Opcode.LOGOUT_RESPONSE


def test_fail_all_ends_every_task():
    conn = connection()
    login(conn)
    tasks = [Task(0, memoryview(bytearray(512))) for _ in range(3)]
    for t in tasks:
        conn.command(t, bytes(16))
    err = MemberIOError("gone")
    assert conn.fail_all(err) == tasks
    assert all(t.done and t.error is err for t in tasks) and conn.tasks == {}


# ---------------------------------------------------------------- garbage


@pytest.mark.parametrize("raw,match", [
    (bytes([0x80]) + bytes(47), "reserved bit"),
    (bytes([0x07]) + bytes(47), "opcode"),
    (bytes([0x25 | 0x40]) + bytes(47), "immediate bit"),
    (bytes([0x25, 0x81, 0, 0, 0, 0x10, 0, 0]) + bytes(40), "exceeds the limit"),
    (P.encode_target_pdu(P.Opcode.DATA_IN, itt=0x1234, data_length=4) + bytes(4), "unknown task"),
    (P.encode_target_pdu(P.Opcode.SCSI_RESPONSE, itt=0x1234), "unknown task"),
    (P.encode_target_pdu(P.Opcode.R2T, itt=0x1234, f44=512), "unknown task"),
    (P.encode_target_pdu(P.Opcode.LOGIN_RESPONSE), "unexpected PDU opcode"),
])
def test_garbage_gives_a_clear_error(raw, match):
    conn = connection(max_recv=65536)
    login(conn)
    with pytest.raises(ProtocolError, match=match):
        feed(conn, raw)


def test_random_bytes_are_refused():
    rng = np.random.default_rng(5)
    for _ in range(50):
        conn = connection()
        conn.start_login()
        raw = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
        try:
            feed(conn, raw)
        except (ProtocolError, MemberIOError):
            continue
        assert not conn.logged_in  # never a crash of another kind, never logged in by noise


def test_data_in_and_r2t_outside_the_buffer():
    conn = connection()
    tgt = Target(conn, login(conn))
    t = Task(0, memoryview(bytearray(512)))
    conn.command(t, bytes(16))
    with pytest.raises(ProtocolError, match="overruns"):
        feed(conn, tgt.data_in(t, 256, bytes(512)))
    conn = connection()
    tgt = Target(conn, login(conn))
    w = Task(0, None, memoryview(bytearray(100_000)))
    conn.command(w, bytes(16))
    with pytest.raises(ProtocolError, match="outside the write"):
        feed(conn, tgt.pdu(P.Opcode.R2T, status=False, itt=w.itt, f40=90_000, f44=20_000))


def test_end_of_stream_inside_a_pdu():
    conn = connection()
    conn.start_login()
    feed(conn, login_response(1, csg=0, nsg=1, transit=True)[:30])
    with pytest.raises(ProtocolError, match="inside a PDU"):
        conn.end_of_stream()


# ---------------------------------------------------------------- the trio driver against a fake target


async def fake_target(stream: trio.SocketStream, *, window: int, log: list) -> None:
    """Logs in anyone (no digests); answers READs with zeros, MaxCmdSN moving one at a time."""
    d = P.PDUDecoder(from_target=False)
    stat_sn = 1
    exp = mx = 0
    pending: list[P.PDU] = []

    async def send(opcode: int, data=b"", **fields) -> None:
        await stream.send_all(P.encode_pdu(P.encode_target_pdu(opcode, data_length=len(data), **fields), data))

    async def answer() -> None:
        nonlocal exp, mx, stat_sn
        for p in pending:
            exp += 1
            mx += 1
            await send(P.Opcode.DATA_IN, bytes(p.header.u32(20)), flags=P.F_FINAL | P.F_STATUS,
                       itt=p.header.itt, stat_sn=stat_sn, exp_cmd_sn=exp, max_cmd_sn=mx)
            stat_sn += 1
        pending.clear()

    while True:
        chunk = None
        with trio.move_on_after(0.05):
            chunk = await stream.receive_some(65536)
        if chunk is None:  # quiet for a while: answer what is there
            await answer()
            continue
        if not chunk:
            return
        d.feed(chunk)
        while (pdu := d.next_pdu()) is not None:
            h = pdu.header
            if h.opcode == P.Opcode.LOGIN:
                csg = (h.flags >> 2) & 3
                exp = h.u32(24)
                mx = exp + window - 1
                nsg = 1 if csg == 0 else 3
                await stream.send_all(login_response(h.itt, csg=csg, nsg=nsg, transit=True,
                                                     stat_sn=stat_sn, exp_cmd_sn=exp, max_cmd_sn=mx))
                stat_sn += 1
            elif h.opcode == P.Opcode.SCSI_COMMAND:
                cmd_sn = h.u32(24)
                log.append((cmd_sn, mx))
                pending.append(pdu)
                # Answer once the window is full: commands beyond it must wait for this.
                if cmd_sn == mx:
                    await answer()
            elif h.opcode == P.Opcode.LOGOUT:
                await send(P.Opcode.LOGOUT_RESPONSE, itt=h.itt, stat_sn=stat_sn, exp_cmd_sn=exp,
                           max_cmd_sn=mx)
                return


async def test_session_holds_commands_for_the_window():
    """Through the trio driver: more commands than the window; none is sent beyond MaxCmdSN."""
    log: list = []
    async with trio.open_nursery() as n:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def handle(stream: trio.SocketStream) -> None:
            async with stream:
                await fake_target(stream, window=4, log=log)

        n.start_soon(trio.serve_listeners, handle, listeners)
        s = Session("127.0.0.1", port, TARGET, Options(initiator_name="iqn.2026-11.test:init"))
        await s.connect()
        try:
            results = {}

            async def read(i: int) -> None:
                buf = bytearray(512)
                c = await s.command(0, bytes(16), read_buf=memoryview(buf))
                results[i] = c.received

            async with trio.open_nursery() as m:
                for i in range(30):
                    m.start_soon(read, i)
            assert results == {i: 512 for i in range(30)}
            assert s.window_waits > 0
            assert all(P.serial_le(cmd_sn, mx) for cmd_sn, mx in log) and len(log) == 30
        finally:
            await s.logout()
        assert not s.alive
        n.cancel_scope.cancel()


async def test_stream_send_and_exact_receive():
    """vstore.io.stream over a socket pair: scatter-gather send, exact receive, end of stream."""
    from vstore.io.stream import EndOfStream, Stream

    a, b = socket.socketpair()
    for x in (a, b):
        x.setblocking(False)
    sa, sb = Stream(a), Stream(b)
    payload = np.arange(300_000, dtype=np.uint32).view(np.uint8)
    out = bytearray(len(payload) + 3)

    async def writer() -> None:
        await sa.send_all([b"abc", memoryview(payload)])
        sa.close()

    async with trio.open_nursery() as n:
        n.start_soon(writer)
        await sb.recv_exactly_into(memoryview(out))
    assert bytes(out) == b"abc" + payload.tobytes()
    with pytest.raises(EndOfStream):
        await sb.recv_into([memoryview(bytearray(10))])
    sb.close()


async def test_session_readers_hand_over_under_cancellation():
    """Many tasks, some cancelled mid-wait: the reader role always finds a taker, nothing hangs,
    and a cancelled read's buffer is never written after its caller left."""
    import random

    log: list = []
    rng = random.Random(7)
    async with trio.open_nursery() as n:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def handle(stream: trio.SocketStream) -> None:
            async with stream:
                await fake_target(stream, window=8, log=log)

        n.start_soon(trio.serve_listeners, handle, listeners)
        s = Session("127.0.0.1", port, TARGET, Options(initiator_name="iqn.2026-11.test:init"))
        await s.connect()
        done = 0
        late: list[tuple[bytearray, bytes]] = []

        async def worker(k: int) -> None:
            nonlocal done
            for _ in range(20):
                buf = bytearray(b"\x5a" * 4096)
                with trio.move_on_after(rng.choice([0, 0.001, 0.01, 10])) as cs:
                    await s.command(0, bytes(16), read_buf=memoryview(buf))
                    done += 1
                if cs.cancelled_caught:
                    late.append((buf, bytes(buf)))  # as the caller left it

        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as m:
                    for k in range(24):
                        m.start_soon(worker, k)
                # The session is still usable, and its reader role is free.
                buf = bytearray(512)
                await s.command(0, bytes(16), read_buf=memoryview(buf))
            assert s.alive and not s._reading and done > 0
            await trio.sleep(0.2)
            assert late and all(bytes(b) == seen for b, seen in late)
        finally:
            await s.logout()
        n.cancel_scope.cancel()
