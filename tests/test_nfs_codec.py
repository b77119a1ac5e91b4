"""XDR, ONC RPC and NFSv3 codecs from bytes alone (no server)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.nfs import nfs3
from backends.nfs.device import UncommittedRanges, _longest_export
from backends.nfs.rpc import (
    RecordReceiver,
    RpcAuthError,
    RpcError,
    auth_sys,
    decode_reply,
    encode_call,
    record_mark,
)
from backends.nfs.xdr import Packer, Unpacker
from vstore.errors import MemberIOError, NotFoundError, ProtocolError
from vstore.stack.iovec import IoVec

# ---- XDR -------------------------------------------------------------------------------


def test_xdr_round_trip():
    p = Packer().uint(7).int(-2).uhyper(2**40 + 3).hyper(-5).bool(True)
    p.opaque(b"abcde").string("héllo").fopaque(b"12345678", 8)
    data = p.bytes()
    assert len(data) % 4 == 0
    u = Unpacker(data)
    assert (u.uint(), u.int(), u.uhyper(), u.hyper(), u.bool()) == (7, -2, 2**40 + 3, -5, True)
    assert u.opaque() == b"abcde"
    assert u.string() == "héllo"
    assert u.fopaque(8) == b"12345678"
    u.done()


def test_xdr_opaque_padding_is_exact():
    assert Packer().opaque(b"abc").bytes() == b"\0\0\0\3abc\0"
    assert Packer().opaque(b"abcd").bytes() == b"\0\0\0\4abcd"
    assert Packer().opaque(b"").bytes() == b"\0\0\0\0"


@pytest.mark.parametrize("data", [b"", b"\0\0", b"\0\0\0\5ab", b"\0\0\0\2"])
def test_xdr_truncated_opaque_is_protocol_error(data):
    with pytest.raises(ProtocolError):
        Unpacker(data).opaque()


def test_xdr_limits_and_bad_bool():
    with pytest.raises(ProtocolError):
        Unpacker(b"\0\0\0\x41" + b"x" * 68).opaque(64)
    with pytest.raises(ProtocolError):
        Unpacker(b"\0\0\0\2").bool()
    with pytest.raises(ProtocolError):
        Unpacker(b"\0\0\0\1\0\0\0\2").done() if False else Unpacker(b"\0\0\0\1").done()


# ---- RPC -------------------------------------------------------------------------------


def test_encode_call_layout():
    cred = auth_sys(1000, 100, (100, 5), machine="host", stamp=9)
    hdr = encode_call(0x12345678, 100003, 3, 6, cred)
    u = Unpacker(hdr)
    assert [u.uint() for _ in range(6)] == [0x12345678, 0, 2, 100003, 3, 6]
    assert u.uint() == 1  # AUTH_SYS
    body = Unpacker(u.opaque())
    assert body.uint() == 9 and body.string() == "host"
    assert (body.uint(), body.uint(), body.uint(), body.uint(), body.uint()) == (1000, 100, 2, 100, 5)
    body.done()
    assert (u.uint(), u.opaque()) == (0, b"")  # verifier AUTH_NONE
    u.done()
    assert record_mark(10) == b"\x80\0\0\x0a"
    assert record_mark(10, last=False) == b"\0\0\0\x0a"


def reply(xid: int, results: bytes = b"", *, accept: int = 0, extra: bytes = b"") -> bytes:
    """An accepted RPC reply with an AUTH_NONE verifier."""
    return struct.pack(">IIIII", xid, 1, 0, 0, 0) + struct.pack(">I", accept) + extra + results


def test_decode_reply_success():
    xid, u = decode_reply(reply(42, b"\0\0\0\7"))
    assert xid == 42 and u.uint() == 7


@pytest.mark.parametrize(
    "accept,extra,name",
    [(1, b"", "PROG_UNAVAIL"), (2, struct.pack(">II", 2, 2), "PROG_MISMATCH"),
     (3, b"", "PROC_UNAVAIL"), (4, b"", "GARBAGE_ARGS"), (5, b"", "SYSTEM_ERR")],
)
def test_decode_reply_accept_errors(accept, extra, name):
    with pytest.raises(RpcError, match=name) as ei:
        decode_reply(reply(7, accept=accept, extra=extra))
    assert ei.value.xid == 7
    assert isinstance(ei.value, MemberIOError)


def test_decode_reply_denied():
    with pytest.raises(RpcAuthError, match="AUTH_TOOWEAK"):
        decode_reply(struct.pack(">IIIII", 1, 1, 1, 1, 5))
    with pytest.raises(RpcError, match="RPC_MISMATCH"):
        decode_reply(struct.pack(">IIIIII", 1, 1, 1, 0, 2, 2))


def test_decode_reply_rejects_calls_and_unknown_states():
    with pytest.raises(ProtocolError):
        decode_reply(encode_call(1, 2, 3, 4))
    with pytest.raises(ProtocolError):
        decode_reply(struct.pack(">III", 1, 1, 9))


def frame(msg: bytes, sizes: list[int] | None = None) -> bytes:
    """Record-mark a message, split into fragments of the given sizes."""
    if not sizes:
        return record_mark(len(msg)) + msg
    out, pos = b"", 0
    for i, n in enumerate(sizes):
        last = i == len(sizes) - 1
        chunk = msg[pos:] if last else msg[pos : pos + n]
        out += record_mark(len(chunk), last) + chunk
        pos += len(chunk)
    return out


def test_record_receiver_single_and_fragmented_byte_by_byte():
    m1 = reply(1, b"\0\0\0\0")
    m2 = reply(2, b"x" * 1000)
    stream = frame(m1) + frame(m2, [5, 100, 0, 300])
    rx = RecordReceiver()
    got = []
    for b in stream:
        got.extend(rx.feed(bytes([b])))
    assert [(m.xid, bytes(m.data)) for m in got] == [(1, m1), (2, m2)]
    rx2 = RecordReceiver()
    assert [bytes(m.data) for m in rx2.feed(stream)] == [m1, m2]


def read_reply(xid: int, data: bytes, *, attrs: bool = True, eof: bool = False) -> bytes:
    p = Packer().uint(0).bool(attrs)
    if attrs:
        p.raw(fattr_bytes(size=len(data)))
    p.uint(len(data)).bool(eof).opaque(data)
    return reply(xid, p.bytes())


def fattr_bytes(ftype: int = 1, size: int = 0, fsid: int = 0xF5, fileid: int = 77) -> bytes:
    return struct.pack(">IIIIIQQIIQQIIIIII", ftype, 0o644, 1, 0, 0, size, size, 0, 0,
                       fsid, fileid, 1, 0, 2, 0, 3, 0)


@pytest.mark.parametrize("size", [0, 3, 100, 600, 5000])
def test_record_receiver_sinks_read_data(size):
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    msg = read_reply(9, data)
    sink = bytearray(size + 8)

    def splitter(xid, head, n):
        layout = nfs3.read_reply_layout(head, n)
        assert xid == 9
        return None if layout is None else (layout[0], memoryview(sink)[: layout[1]])

    rx = RecordReceiver(splitter)
    stream = frame(msg) + frame(reply(10, b"\0\0\0\1"))
    got = []
    for i in range(0, len(stream), 7):
        got.extend(rx.feed(stream[i : i + 7]))
    first, second = got
    if len(msg) > RecordReceiver.HEAD:
        assert first.sunk == size and bytes(sink[:size]) == data
        _, u = decode_reply(first.data)
        r = nfs3.decode_read(u)
        assert (r.count, r.data_len, r.data_offset) == (size, size, len(first.data))
    else:
        assert first.sunk == -1 and bytes(first.data) == msg
    assert second.xid == 10


@pytest.mark.parametrize("size", [600, 5000, 70000])
@pytest.mark.parametrize("chunk", [7, 4096, 1 << 20])
def test_record_receiver_scatters_read_data_over_an_iovec(size, chunk):
    """A READ payload lands across the pieces of an IoVec sink, wherever the receive chunks end."""
    data = (bytes(range(251)) * (size // 251 + 1))[:size]
    bufs = [bytearray(n) for n in (1, 300, 17, size)]  # more room than the payload needs

    def splitter(xid, head, n):
        layout = nfs3.read_reply_layout(head, n)
        return None if layout is None else (layout[0], IoVec(memoryview(b) for b in bufs)[: layout[1]])

    rx = RecordReceiver(splitter)
    stream = frame(read_reply(9, data)) + frame(reply(10, b"\0\0\0\1"))
    got = []
    for i in range(0, len(stream), chunk):
        got.extend(rx.feed(stream[i : i + chunk]))
    first, second = got
    assert first.sunk == size and b"".join(bytes(b) for b in bufs)[:size] == data
    assert second.xid == 10


def test_record_receiver_drops_the_rest_of_an_abandoned_sink():
    """drop_sink mid-payload: nothing more lands in the sink, and the stream stays in step."""
    size = 20000
    data = bytes([7]) * size
    bufs = [bytearray(b"-" * 5000), bytearray(b"-" * 15000)]

    def splitter(xid, head, n):
        layout = nfs3.read_reply_layout(head, n)
        return layout[0], IoVec(memoryview(b) for b in bufs)[: layout[1]]

    rx = RecordReceiver(splitter)
    stream = frame(read_reply(9, data)) + frame(reply(10, b"\0\0\0\1"))
    cut = 3000
    assert rx.feed(stream[:cut]) == []
    landed = sum(b.count(7) for b in bufs)
    assert 0 < landed < size
    rx.drop_sink(8)  # another call: no effect
    rx.drop_sink(9)
    got = rx.feed(stream[cut:])
    assert [m.xid for m in got] == [9, 10]
    assert sum(b.count(7) for b in bufs) == landed  # the rest went to scratch


def test_record_receiver_limits():
    with pytest.raises(ProtocolError):
        RecordReceiver(max_message=1000).feed(record_mark(5000) + b"x")
    with pytest.raises(ProtocolError):
        RecordReceiver().feed(record_mark(2) + b"ab")  # no room for an XID


# ---- hypothesis: garbage never crashes or hangs the decoders ---------------------------------


def decode_everything(msg: bytes) -> None:
    """Decode a reply as every result type the client uses."""
    for dec in (nfs3.decode_getattr, nfs3.decode_read, nfs3.decode_write, nfs3.decode_commit,
                nfs3.decode_lookup, nfs3.decode_create, nfs3.decode_fsinfo, nfs3.decode_setattr,
                nfs3.decode_mnt, lambda u, w="": nfs3.decode_export(u),
                lambda u, w="": nfs3.decode_getport(u)):
        try:
            _, u = decode_reply(msg)
            dec(u, "x")
        except (ProtocolError, RpcError, nfs3.NfsError):
            pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_random_replies_raise_only_vstore_errors(data):
    decode_everything(data)
    try:
        RecordReceiver(lambda x, h, n: None, max_message=1 << 16).feed(data)
    except ProtocolError:
        pass


VALID_REPLIES = [
    read_reply(1, b"hello world" * 50),
    reply(2, Packer().uint(0).bool(False).bool(True).raw(fattr_bytes()).uint(4096)
          .uint(nfs3.UNSTABLE).fopaque(b"verifier", 8).bytes()),
    reply(3, Packer().uint(0).raw(fattr_bytes(size=10)).bytes()),
    reply(4, Packer().uint(0).opaque(b"F" * 28).bool(True).raw(fattr_bytes()).bool(False).bytes()),
    reply(5, Packer().uint(0).opaque(b"R" * 16).uint(1).uint(1).bytes()),
    reply(6, Packer().bool(True).string("/srv/a").bool(True).string("*").bool(False)
          .bool(False).bytes()),
]
DECODERS = [nfs3.decode_read, nfs3.decode_write, nfs3.decode_getattr, nfs3.decode_lookup,
            nfs3.decode_mnt, lambda u, w="": nfs3.decode_export(u)]


@pytest.mark.parametrize("msg,dec", list(zip(VALID_REPLIES, DECODERS, strict=True)))
def test_valid_replies_decode_and_every_truncation_is_a_protocol_error(msg, dec):
    _, u = decode_reply(msg)
    dec(u, "x")
    for cut in range(len(msg)):
        with pytest.raises(ProtocolError):
            _, u = decode_reply(msg[:cut])
            r = dec(u, "x")
            if isinstance(r, nfs3.ReadResult):  # the header may be whole; the data is not
                u.skip(r.data_len + (-r.data_len & 3))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(VALID_REPLIES) - 1), st.data())
def test_mutated_replies_raise_only_vstore_errors(i, data):
    msg = bytearray(VALID_REPLIES[i])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(msg) - 1))
        msg[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(msg)))
    decode_everything(bytes(msg[:cut]))
    # The stream decoder with a READ sink: garbage lengths must not make it crash or hang.
    sink = bytearray(4096)

    def splitter(xid, head, n):
        layout = nfs3.read_reply_layout(head, n)
        if layout is None or layout[1] > len(sink):
            return None
        return layout[0], memoryview(sink)[: layout[1]]

    stream = record_mark(len(msg)) + bytes(msg)
    try:
        RecordReceiver(splitter, max_message=1 << 16).feed(stream[: data.draw(
            st.integers(0, len(stream)))])
    except ProtocolError:
        pass


# ---- NFSv3 ----------------------------------------------------------------------------------


def test_nfs_status_errors_are_named_and_typed():
    u = Unpacker(struct.pack(">I", 2))
    with pytest.raises(NotFoundError, match="NFS3ERR_NOENT"):
        nfs3.decode_getattr(u, "GETATTR f")
    u = Unpacker(struct.pack(">II", 70, 0))
    with pytest.raises(nfs3.NfsError, match="NFS3ERR_STALE"):
        nfs3.decode_lookup(u)
    with pytest.raises(nfs3.NfsJukeboxError, match="JUKEBOX"):
        nfs3.decode_write(Unpacker(struct.pack(">III", 10008, 0, 0)))
    with pytest.raises(nfs3.NfsError, match="MNT3ERR_ACCES"):
        nfs3.decode_mnt(Unpacker(struct.pack(">I", 13)))


def test_write_args_and_fsinfo():
    head = nfs3.write_args_head(b"fh", 1 << 33, 5, nfs3.UNSTABLE)
    u = Unpacker(head)
    assert (u.opaque(), u.uhyper(), u.uint(), u.uint(), u.uint()) == (b"fh", 1 << 33, 5, 0, 5)
    assert nfs3.write_padding(5) == b"\0\0\0"
    fsinfo = Packer().uint(0).bool(False)
    for v in (1 << 26, 1 << 20, 4096, 1 << 26, 1 << 20, 4096, 8192):
        fsinfo.uint(v)
    fsinfo.uhyper(2**63).uint(0).uint(1).uint(0x1B)
    info = nfs3.decode_fsinfo(Unpacker(fsinfo.bytes()))
    assert (info.rtmax, info.wtpref, info.maxfilesize, info.properties) == (1 << 26, 1 << 20, 2**63, 0x1B)


def test_sattr_args():
    u = Unpacker(nfs3.setattr_size_args(b"h", 12345))
    assert u.opaque() == b"h"
    assert [u.bool() for _ in range(3)] == [False, False, False]
    assert u.bool() and u.uhyper() == 12345
    assert (u.uint(), u.uint(), u.bool()) == (0, 0, False)
    u.done()
    u = Unpacker(nfs3.create_args(b"d", "f.img"))
    assert (u.opaque(), u.string(), u.uint()) == (b"d", "f.img", nfs3.GUARDED)
    assert u.bool() and u.uint() == 0o600


def test_longest_export():
    exports = ["/", "/srv", "/srv/nfs", "/srv/nfs2"]
    assert _longest_export("/srv/nfs/a/b.img", exports) == "/srv/nfs"
    assert _longest_export("/srv/nfs2/b.img", exports) == "/srv/nfs2"
    assert _longest_export("/other/b.img", exports) == "/"
    assert _longest_export("/srv/nfs", ["/srv/nfs"]) is None  # the export itself is no file
    assert _longest_export("/x/y", ["/srv"]) is None


def test_uncommitted_ranges_keep_newest_bytes():
    import numpy as np

    c = UncommittedRanges()
    c.add(0, np.full(100, 1, np.uint8), b"a" * 8, 1)
    c.add(200, np.full(100, 2, np.uint8), b"a" * 8, 2)
    c.add(50, np.full(200, 3, np.uint8), b"b" * 8, 3)
    got = [(r.start, r.end, int(r.data[0]), r.seq) for r in c]
    assert got == [(0, 50, 1, 1), (50, 250, 3, 3), (250, 300, 2, 2)]
    assert c.nbytes == 300
    c.add(60, np.full(10, 4, np.uint8), b"c" * 8, 4)
    assert [(r.start, r.end) for r in c] == [(0, 50), (50, 60), (60, 70), (70, 250), (250, 300)]
    for r in list(c):
        c.discard(r)
    assert c.nbytes == 0 and len(c) == 0


@pytest.mark.parametrize("attrs", [True, False])
@pytest.mark.parametrize("eof", [True, False])
def test_read_reply_layout_fast_path_agrees_with_the_decoder(attrs, eof):
    msg = read_reply(3, b"z" * 1000, attrs=attrs, eof=eof)
    _, u = decode_reply(msg)
    r = nfs3.decode_read(u)
    head = memoryview(msg)[:512]
    assert nfs3.read_reply_layout(head, len(msg)) == (r.data_offset, 1000, eof)
    # A reply with a verifier body takes the general path and still agrees.
    verf = struct.pack(">IIIII", 3, 1, 0, 1, 8) + b"v" * 8 + msg[20:]
    assert nfs3.read_reply_layout(memoryview(verf)[:512], len(verf)) == (r.data_offset + 8, 1000, eof)
    # Errors and nonsense give None (the full decoder then reports them).
    bad = msg[:24] + struct.pack(">I", 5) + msg[28:]
    assert nfs3.read_reply_layout(memoryview(bad)[:512], len(bad)) is None
    assert nfs3.read_reply_layout(memoryview(msg)[:512], 600) is None
