"""The iSCSI PDU codec and SCSI helpers, from bytes alone (no sockets)."""

from __future__ import annotations

import struct

import crc32c as crc32c_pkg
import crcmod.predefined
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.iscsi import pdu as P
from backends.iscsi import scsi
from backends.iscsi.session import chap_response
from vstore.errors import ProtocolError

CRCMOD = crcmod.predefined.mkPredefinedCrcFun("crc-32c")

VECTORS = [
    (bytes(32), "aa36918a"),
    (b"\xff" * 32, "43aba862"),
    (bytes(range(32)), "4e79dd46"),
]


def test_crcmod_uses_the_c_extension():
    import crcmod._crcfunext  # noqa: F401  (ImportError here means the slow pure-Python fallback)


@pytest.mark.parametrize("data,wire", VECTORS)
def test_crc32c_vectors(data, wire):
    assert struct.pack("<I", CRCMOD(data)).hex() == wire
    assert struct.pack("<I", crc32c_pkg.crc32c(data)).hex() == wire
    assert P.data_digest(data).hex() == wire
    assert P.crc32c(b"123456789") == 0xE3069283 == CRCMOD(b"123456789")


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_crc32c_matches_crcmod_and_chains(a, b):
    assert P.crc32c(a + b) == CRCMOD(a + b)
    assert P.crc32c(b, P.crc32c(a)) == CRCMOD(b, CRCMOD(a))


def test_data_digest_covers_padding():
    data = b"abcde"  # 3 bytes of padding on the wire
    assert P.data_digest(data) == struct.pack("<I", CRCMOD(data + b"\0\0\0"))


def test_login_request_layout():
    bhs = P.encode_login_request(
        isid=bytes.fromhex("80aabbcc0001"), tsih=0, itt=7, cid=1, cmd_sn=5, exp_stat_sn=9,
        csg=1, nsg=3, transit=True, data_length=10,
    )
    assert len(bhs) == 48
    assert bhs[0] == 0x43 and bhs[1] == 0x87
    assert bhs[5:8] == b"\0\0\x0a"
    assert bhs[8:14] == bytes.fromhex("80aabbcc0001")
    assert struct.unpack_from(">IHHII", bhs, 16) == (7, 1, 0, 5, 9)
    sec = P.encode_login_request(isid=bytes(6), tsih=0, itt=1, cid=0, cmd_sn=0, exp_stat_sn=0,
                                 csg=0, nsg=1, transit=True, data_length=0)
    assert sec[1] == 0x81
    # Without T the NSG field is not set.
    assert P.encode_login_request(isid=bytes(6), tsih=0, itt=1, cid=0, cmd_sn=0, exp_stat_sn=0,
                                  csg=0, nsg=1, transit=False, data_length=0)[1] == 0x00


def test_scsi_command_layout():
    cdb = scsi.read_16(0x1122334455, 8)
    bhs = P.encode_scsi_command(lun=1, itt=0x42, cdb=cdb, expected_length=4096, cmd_sn=100,
                                exp_stat_sn=200, read=True)
    assert bhs[0] == 0x01 and bhs[1] == 0x80 | 0x40 | 1
    assert bhs[8:16] == bytes([0, 1, 0, 0, 0, 0, 0, 0])
    assert struct.unpack_from(">IIII", bhs, 16) == (0x42, 4096, 100, 200)
    assert bhs[32:48] == cdb
    assert cdb[0] == 0x88 and int.from_bytes(cdb[2:10], "big") == 0x1122334455
    assert int.from_bytes(cdb[10:14], "big") == 8
    w = P.encode_scsi_command(lun=3, itt=1, cdb=scsi.write_16(0, 1), expected_length=512, cmd_sn=0,
                              exp_stat_sn=0, write=True, final=False, data_length=512)
    assert w[1] == 0x20 | 1 and w[5:8] == b"\0\x02\0"


def test_other_initiator_pdus():
    d = P.encode_data_out(lun=1, itt=5, ttt=6, exp_stat_sn=7, data_sn=2, buffer_offset=8192,
                          data_length=512, final=True)
    assert d[0] == 0x05 and d[1] == 0x80
    assert struct.unpack_from(">IIIIIII", d, 16) == (5, 6, 0, 7, 0, 2, 8192)
    n = P.encode_nop_out(itt=P.NO_TAG, ttt=0x1234, cmd_sn=3, exp_stat_sn=4, lun=P.encode_lun(1))
    assert n[0] == 0x40 and struct.unpack_from(">II", n, 16) == (P.NO_TAG, 0x1234)
    lo = P.encode_logout_request(itt=9, cid=2, cmd_sn=1, exp_stat_sn=1)
    assert lo[0] == 0x46 and lo[1] == 0x80 and lo[20:22] == b"\0\x02"
    t = P.encode_text_request(itt=1, ttt=P.NO_TAG, cmd_sn=0, exp_stat_sn=0, data_length=16)
    assert t[0] == 0x44 and t[1] == 0x80


def test_lun_encoding():
    assert P.encode_lun(1) == bytes([0, 1]) + bytes(6)
    assert P.decode_lun(P.encode_lun(1)) == 1
    assert P.decode_lun(P.encode_lun(300)) == 300
    with pytest.raises(ProtocolError):
        P.decode_lun(bytes([0xC0]) + bytes(7))


def test_text_keys():
    data = P.encode_text([("TargetName", "iqn.x:y"), ("TargetAddress", "1.2.3.4:3260,1")])
    assert data == b"TargetName=iqn.x:y\0TargetAddress=1.2.3.4:3260,1\0"
    assert P.decode_text(data) == [("TargetName", "iqn.x:y"), ("TargetAddress", "1.2.3.4:3260,1")]
    assert P.decode_text(b"A=\0") == [("A", "")]
    for bad in (b"novalue\0", b"=x\0", b"\xff\xfe=1\0"):
        with pytest.raises(ProtocolError):
            P.decode_text(bad)


def _data_in(itt=1, data=b"hello", offset=0, status=None, hd=False, dd=False):
    flags = P.F_FINAL | (P.F_STATUS if status is not None else 0)
    bhs = P.encode_target_pdu(P.Opcode.DATA_IN, flags=flags, itt=itt, stat_sn=10, exp_cmd_sn=2,
                              max_cmd_sn=33, f40=offset, b3=status or 0, data_length=len(data))
    return P.encode_pdu(bhs, data, header_digest_on=hd, data_digest_on=dd)


@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (False, True), (True, True)])
def test_decoder_roundtrip_with_digests(hd, dd):
    wire = _data_in(data=b"hello", offset=512, status=0, hd=hd, dd=dd) + _data_in(itt=2, data=b"", hd=hd, dd=dd)
    dec = P.PDUDecoder(header_digest_on=hd, data_digest_on=dd)
    # Byte by byte: the decoder must wait, not fail, on a partial PDU.
    out = []
    for i in range(len(wire)):
        dec.feed(wire[i : i + 1])
        while (p := dec.next_pdu()) is not None:
            out.append(p)
    dec.end_of_stream()
    assert [p.header.itt for p in out] == [1, 2]
    h = out[0].header
    assert h.opcode == P.Opcode.DATA_IN and h.buffer_offset == 512 and h.has_status
    assert (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn) == (10, 2, 33)
    assert out[0].data == b"hello" and out[0].data_digest_ok
    assert not out[1].header.has_status


def test_decoder_header_digest_mismatch():
    wire = bytearray(_data_in(hd=True))
    wire[48] ^= 1
    dec = P.PDUDecoder(header_digest_on=True)
    dec.feed(wire)
    with pytest.raises(ProtocolError, match="header digest"):
        dec.next_pdu()


def test_decoder_data_digest_mismatch_is_reported_not_returned_as_good():
    wire = bytearray(_data_in(data=b"abcdefgh", dd=True))
    wire[50] ^= 0x80  # flip a data bit
    dec = P.PDUDecoder(data_digest_on=True)
    dec.feed(wire)
    p = dec.next_pdu()
    assert p is not None and not p.data_digest_ok


def test_decoder_rejects_garbage():
    cases = [
        bytes([0x01]) + bytes(47),  # initiator opcode from a target
        bytes([0x80 | 0x21]) + bytes(47),  # reserved bit
        bytes([0x40 | 0x21]) + bytes(47),  # target PDU with I bit
        bytes([0x3A]) + bytes(47),  # unknown opcode
    ]
    for c in cases:
        dec = P.PDUDecoder()
        dec.feed(c)
        with pytest.raises(ProtocolError):
            dec.next_pdu()
    big = bytearray(_data_in())
    big[5:8] = (1 << 20).to_bytes(3, "big")
    dec = P.PDUDecoder(max_data_length=262144)
    dec.feed(big)
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.next_pdu()


def test_truncated_stream_is_a_protocol_error():
    wire = _data_in(data=b"x" * 100)
    for cut in (1, 47, 48, 60, len(wire) - 1):
        dec = P.PDUDecoder()
        dec.feed(wire[:cut])
        assert dec.next_pdu() is None
        with pytest.raises(ProtocolError):
            dec.end_of_stream()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400), st.booleans(), st.booleans())
def test_random_bytes_never_crash_the_decoder(blob, hd, dd):
    dec = P.PDUDecoder(header_digest_on=hd, data_digest_on=dd, max_data_length=262144)
    dec.feed(blob)
    try:
        for _ in range(len(blob) // 48 + 2):  # each PDU consumes >= 48 bytes: bounded
            if dec.next_pdu() is None:
                break
        dec.end_of_stream()
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 0xFFFF), st.data())
def test_truncated_valid_pdus_never_parse(payload, itt, data):
    wire = _data_in(itt=itt, data=payload)
    cut = data.draw(st.integers(0, len(wire) - 1))
    dec = P.PDUDecoder()
    dec.feed(wire[:cut])
    assert dec.next_pdu() is None
    if cut:
        with pytest.raises(ProtocolError):
            dec.end_of_stream()


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=48, max_size=48))
def test_parse_header_total(raw):
    try:
        h = P.parse_header(raw, max_data_length=8192)
    except ProtocolError:
        return
    assert h.opcode in P.TARGET_OPCODES and h.data_length <= 8192


def test_serial_arithmetic():
    assert P.serial_gt(1, 0) and not P.serial_gt(0, 1)
    assert P.serial_gt(0, 0xFFFFFFFF)  # wraps
    assert P.serial_le(5, 5) and P.serial_le(0xFFFFFFF0, 3)


# ---------------------------------------------------------------- SCSI helpers


def test_sense_fixed_and_descriptor():
    fixed = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0x00]) + bytes(4)
    s = scsi.parse_sense(fixed)
    assert (s.key, s.asc, s.ascq) == (5, 0x24, 0)
    assert "ILLEGAL REQUEST" in s.describe() and "0x24/0x00" in s.describe()
    desc = bytes([0x72, 0x06, 0x29, 0x00, 0, 0, 0, 0])
    s = scsi.parse_sense(desc)
    assert (s.key, s.asc, s.ascq) == (6, 0x29, 0)
    assert "UNIT ATTENTION" in s.describe()
    seg = struct.pack(">H", len(fixed)) + fixed
    assert scsi.parse_response_sense(seg).key == 5
    assert scsi.parse_response_sense(b"") is None
    with pytest.raises(ProtocolError):
        scsi.parse_response_sense(struct.pack(">H", 100) + fixed)
    with pytest.raises(ProtocolError):
        scsi.parse_sense(b"\x10\x00\x00")


def test_read_capacity_and_vpd():
    cap = scsi.parse_read_capacity_16(struct.pack(">QI", 2047, 512) + bytes(20))
    assert (cap.blocks, cap.block_size, cap.size) == (2048, 512, 1 << 20)
    with pytest.raises(ProtocolError):
        scsi.parse_read_capacity_16(struct.pack(">QI", 1, 1000))
    serial = bytes([0, 0x80, 0, 6]) + b"beaf11"
    assert scsi.parse_vpd_serial(serial) == "beaf11"
    naa = bytes([0x01, 0x03, 0, 8]) + bytes.fromhex("6001405abcdef012")
    t10 = bytes([0x02, 0x01, 0, 8]) + b"IET     "
    port = bytes([0x01, 0x14, 0, 4]) + bytes(4)  # target port association: ignored
    page = bytes([0, 0x83]) + struct.pack(">H", len(naa + t10 + port)) + t10 + port + naa
    ds = scsi.parse_vpd_device_id(page)
    assert len(ds) == 3
    assert scsi.lun_identity(ds, "beaf11") == "naa:6001405abcdef012/serial:beaf11"
    assert scsi.lun_identity([], "x") == "serial:x"
    with pytest.raises(ProtocolError):
        scsi.parse_vpd_serial(bytes([0, 0x83, 0, 0]))


def test_cdbs():
    assert scsi.test_unit_ready() == bytes(6)
    assert scsi.inquiry(0x83, 1024) == bytes([0x12, 1, 0x83, 4, 0, 0])
    assert scsi.read_capacity_16()[:2] == bytes([0x9E, 0x10])
    assert len(scsi.write_16(1, 2)) == 16 and scsi.write_16(1, 2, fua=True)[1] == 0x08
    assert scsi.synchronize_cache_10() == bytes([0x35]) + bytes(9)
    assert scsi.report_luns()[0] == 0xA0
    luns = struct.pack(">I", 16) + bytes(4) + P.encode_lun(0) + P.encode_lun(1)
    assert scsi.parse_report_luns(luns) == [0, 1]


def test_chap_response():
    # RFC 1994: MD5 over identifier, secret, challenge.
    import hashlib

    r = chap_response(7, b"secret", bytes.fromhex("0011"))
    assert r == "0x" + hashlib.md5(b"\x07secret\x00\x11").hexdigest()
