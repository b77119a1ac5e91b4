"""NFSv3 and MOUNT v3 (RFC 1813) and portmap GETPORT (RFC 1833) codecs, sans-IO.

Argument encoders return bytes (WRITE returns only the part before its payload,
so the payload can be sent without copying it). Result decoders take an
``Unpacker`` positioned at the procedure results (see ``rpc.decode_reply``);
a result with an error status raises ``NfsError`` named after the status.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vstore.errors import AuthError, ExistsError, MemberIOError, NotFoundError, ProtocolError

from .rpc import RpcError, decode_reply
from .xdr import Packer, Unpacker, padding

PMAP_PROG, PMAP_VERS, PMAP_PORT = 100000, 2, 111
PMAPPROC_GETPORT = 3
MOUNT_PROG, MOUNT_VERS = 100005, 3
MOUNTPROC_MNT, MOUNTPROC_UMNT, MOUNTPROC_EXPORT = 1, 3, 5
NFS_PROG, NFS_VERS = 100003, 3
IPPROTO_TCP = 6

NULL, GETATTR, SETATTR, LOOKUP, READ, WRITE, CREATE, FSINFO, COMMIT = 0, 1, 2, 3, 6, 7, 8, 19, 21
PROC_NAMES = {0: "NULL", 1: "GETATTR", 2: "SETATTR", 3: "LOOKUP", 6: "READ", 7: "WRITE",
              8: "CREATE", 19: "FSINFO", 21: "COMMIT"}

UNSTABLE, DATA_SYNC, FILE_SYNC = 0, 1, 2
UNCHECKED, GUARDED, EXCLUSIVE = 0, 1, 2
NF3REG, NF3DIR = 1, 2
FHSIZE3 = 64
NFS3_WRITEVERFSIZE = 8

NFS3_OK = 0
NFS3ERR_NOENT = 2
NFS3ERR_EXIST = 17
NFS3ERR_JUKEBOX = 10008
STATUS_NAMES = {
    0: "NFS3_OK", 1: "NFS3ERR_PERM", 2: "NFS3ERR_NOENT", 5: "NFS3ERR_IO", 6: "NFS3ERR_NXIO",
    13: "NFS3ERR_ACCES", 17: "NFS3ERR_EXIST", 18: "NFS3ERR_XDEV", 19: "NFS3ERR_NODEV",
    20: "NFS3ERR_NOTDIR", 21: "NFS3ERR_ISDIR", 22: "NFS3ERR_INVAL", 27: "NFS3ERR_FBIG",
    28: "NFS3ERR_NOSPC", 30: "NFS3ERR_ROFS", 31: "NFS3ERR_MLINK", 63: "NFS3ERR_NAMETOOLONG",
    66: "NFS3ERR_NOTEMPTY", 69: "NFS3ERR_DQUOT", 70: "NFS3ERR_STALE", 71: "NFS3ERR_REMOTE",
    10001: "NFS3ERR_BADHANDLE", 10002: "NFS3ERR_NOT_SYNC", 10003: "NFS3ERR_BAD_COOKIE",
    10004: "NFS3ERR_NOTSUPP", 10005: "NFS3ERR_TOOSMALL", 10006: "NFS3ERR_SERVERFAULT",
    10007: "NFS3ERR_BADTYPE", 10008: "NFS3ERR_JUKEBOX",
}
MOUNT_STATUS_NAMES = {
    0: "MNT3_OK", 1: "MNT3ERR_PERM", 2: "MNT3ERR_NOENT", 5: "MNT3ERR_IO", 13: "MNT3ERR_ACCES",
    20: "MNT3ERR_NOTDIR", 22: "MNT3ERR_INVAL", 63: "MNT3ERR_NAMETOOLONG",
    10004: "MNT3ERR_NOTSUPP", 10006: "MNT3ERR_SERVERFAULT",
}


class NfsError(MemberIOError):
    """An NFS or MOUNT procedure failed with an error status (its name is in the message)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class NfsNotFoundError(NfsError, NotFoundError):
    """NFS3ERR_NOENT / MNT3ERR_NOENT: the file, directory or export does not exist."""


class NfsExistsError(NfsError, ExistsError):
    """NFS3ERR_EXIST: the file already exists."""


class NfsAccessError(NfsError, AuthError):
    """NFS3ERR_ACCES / NFS3ERR_PERM: the server refused access."""


class NfsJukeboxError(NfsError):
    """NFS3ERR_JUKEBOX: the server asks to try again later."""


def status_error(status: int, what: str, names: dict[int, str] = STATUS_NAMES) -> NfsError:
    """The exception for an error status of a procedure (``what`` says which and on what)."""
    name = names.get(status, f"unknown status {status}")
    cls: type[NfsError] = NfsError
    if status == 2:
        cls = NfsNotFoundError
    elif status == 17:
        cls = NfsExistsError
    elif status in (1, 13):
        cls = NfsAccessError
    elif status == NFS3ERR_JUKEBOX:
        cls = NfsJukeboxError
    return cls(f"{what}: {name}", status)


@dataclass(frozen=True, slots=True)
class Fattr3:
    """NFSv3 file attributes (times as (seconds, nanoseconds))."""

    type: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    used: int
    rdev: tuple[int, int]
    fsid: int
    fileid: int
    atime: tuple[int, int]
    mtime: tuple[int, int]
    ctime: tuple[int, int]


_FATTR = struct.Struct(">IIIIIQQIIQQIIIIII")  # 84 bytes


def _fattr3(u: Unpacker) -> Fattr3:
    p = u.pos
    u.skip(_FATTR.size)
    v = _FATTR.unpack_from(u._buf, p)
    if not 1 <= v[0] <= 7:
        raise ProtocolError(f"fattr3 with unknown file type {v[0]}")
    return Fattr3(v[0], v[1], v[2], v[3], v[4], v[5], v[6], (v[7], v[8]), v[9], v[10],
                  (v[11], v[12]), (v[13], v[14]), (v[15], v[16]))


def _post_op_attr(u: Unpacker) -> Fattr3 | None:
    return _fattr3(u) if u.bool() else None


def _wcc_data(u: Unpacker) -> Fattr3 | None:
    if u.bool():
        u.skip(24)  # pre_op_attr: size, mtime, ctime
    return _post_op_attr(u)


def _skip_post_op_attr(u: Unpacker) -> None:
    # The hot path (READ, WRITE) has no use for the attributes: skip, do not build them.
    if u.bool():
        u.skip(_FATTR.size)


def _skip_wcc_data(u: Unpacker) -> None:
    if u.bool():
        u.skip(24)
    _skip_post_op_attr(u)


def _status(u: Unpacker) -> int:
    return u.uint()


def _fh(u: Unpacker) -> bytes:
    return u.opaque(FHSIZE3)


# ---- arguments ---------------------------------------------------------------------------


def fh_args(fh: bytes) -> bytes:
    """Arguments that are just a file handle (GETATTR, FSINFO)."""
    return Packer().opaque(fh).bytes()


def lookup_args(dir_fh: bytes, name: str) -> bytes:
    """LOOKUP arguments: directory handle and component name."""
    return Packer().opaque(dir_fh).string(name).bytes()


def read_args(fh: bytes, offset: int, count: int) -> bytes:
    """READ arguments."""
    return Packer().opaque(fh).uhyper(offset).uint(count).bytes()


def write_args_head(fh: bytes, offset: int, count: int, stable: int) -> bytes:
    """WRITE arguments up to the payload (its length word included); then payload, padding."""
    return Packer().opaque(fh).uhyper(offset).uint(count).uint(stable).uint(count).bytes()


write_padding = padding


def commit_args(fh: bytes, offset: int = 0, count: int = 0) -> bytes:
    """COMMIT arguments (count 0 means to the end of the file)."""
    return Packer().opaque(fh).uhyper(offset).uint(count).bytes()


def _sattr3(p: Packer, mode: int | None = None, size: int | None = None) -> None:
    p.bool(mode is not None)
    if mode is not None:
        p.uint(mode)
    p.bool(False).bool(False)  # uid, gid
    p.bool(size is not None)
    if size is not None:
        p.uhyper(size)
    p.uint(0).uint(0)  # atime, mtime: leave alone


def create_args(dir_fh: bytes, name: str, mode: int = 0o600, how: int = GUARDED) -> bytes:
    """CREATE arguments (UNCHECKED or GUARDED, with the initial mode)."""
    p = Packer().opaque(dir_fh).string(name).uint(how)
    _sattr3(p, mode=mode)
    return p.bytes()


def setattr_size_args(fh: bytes, size: int) -> bytes:
    """SETATTR arguments that set only the size (no guard)."""
    p = Packer().opaque(fh)
    _sattr3(p, size=size)
    p.bool(False)
    return p.bytes()


def mnt_args(path: str) -> bytes:
    """MOUNT MNT arguments: the export path."""
    return Packer().string(path).bytes()


def getport_args(prog: int, vers: int, prot: int = IPPROTO_TCP) -> bytes:
    """Portmap GETPORT arguments."""
    return Packer().uint(prog).uint(vers).uint(prot).uint(0).bytes()


# ---- results -----------------------------------------------------------------------------


def decode_getattr(u: Unpacker, what: str = "GETATTR") -> Fattr3:
    """GETATTR result: the attributes."""
    st = _status(u)
    if st != NFS3_OK:
        raise status_error(st, what)
    return _fattr3(u)


def decode_setattr(u: Unpacker, what: str = "SETATTR") -> Fattr3 | None:
    """SETATTR result: the attributes after, if sent."""
    st = _status(u)
    attrs = _wcc_data(u)
    if st != NFS3_OK:
        raise status_error(st, what)
    return attrs


def decode_lookup(u: Unpacker, what: str = "LOOKUP") -> tuple[bytes, Fattr3 | None]:
    """LOOKUP result: the handle and, if sent, the object's attributes."""
    st = _status(u)
    if st != NFS3_OK:
        raise status_error(st, what)
    fh = _fh(u)
    attrs = _post_op_attr(u)
    _post_op_attr(u)
    return fh, attrs


def decode_create(u: Unpacker, what: str = "CREATE") -> tuple[bytes | None, Fattr3 | None]:
    """CREATE result: the new handle and attributes (either may be absent)."""
    st = _status(u)
    if st != NFS3_OK:
        raise status_error(st, what)
    fh = _fh(u) if u.bool() else None
    attrs = _post_op_attr(u)
    _wcc_data(u)
    return fh, attrs


@dataclass(frozen=True, slots=True)
class FsInfo:
    """FSINFO result: transfer sizes and limits."""

    rtmax: int
    rtpref: int
    rtmult: int
    wtmax: int
    wtpref: int
    wtmult: int
    dtpref: int
    maxfilesize: int
    properties: int


def decode_fsinfo(u: Unpacker, what: str = "FSINFO") -> FsInfo:
    """FSINFO result."""
    st = _status(u)
    _post_op_attr(u)
    if st != NFS3_OK:
        raise status_error(st, what)
    rtmax, rtpref, rtmult, wtmax, wtpref, wtmult, dtpref = (u.uint() for _ in range(7))
    maxfilesize = u.uhyper()
    u.skip(8)  # time_delta
    props = u.uint()
    return FsInfo(rtmax, rtpref, rtmult, wtmax, wtpref, wtmult, dtpref, maxfilesize, props)


@dataclass(frozen=True, slots=True)
class ReadResult:
    """READ result header: the payload is ``data_len`` bytes at ``data_offset`` of the message."""

    count: int
    eof: bool
    data_offset: int
    data_len: int


def decode_read(u: Unpacker, what: str = "READ") -> ReadResult:
    """READ result up to its data: where the data lies (the caller slices it)."""
    st = _status(u)
    _skip_post_op_attr(u)
    if st != NFS3_OK:
        raise status_error(st, what)
    count = u.uint()
    eof = u.bool()
    n = u.uint()
    if n != count:
        raise ProtocolError(f"READ reply says count {count} but carries {n} bytes")
    return ReadResult(count, eof, u.pos, n)


_READ_HEAD = struct.Struct(">IIIIIIII")  # xid .. accept_stat, READ status, attributes_follow
_READ_TAIL = struct.Struct(">III")  # count, eof, data length


def read_reply_layout(head: memoryview, msg_len: int) -> tuple[int, int, bool] | None:
    """(offset, length, eof) of the data of a successful READ reply given its head, else None.

    None also when the head is unusual or wrong: the caller then decodes the whole
    message with the full decoders, which report what is wrong.
    """
    if len(head) >= _READ_HEAD.size:
        # Fast path for the usual shape: empty verifier, success, attributes present or not.
        _, mtype, rstat, _, vlen, astat, status, attrs = _READ_HEAD.unpack_from(head)
        if (mtype, rstat, vlen, astat, status) == (1, 0, 0, 0, NFS3_OK) and attrs <= 1:
            pos = _READ_HEAD.size + (_FATTR.size if attrs else 0)
            if pos + _READ_TAIL.size > len(head):
                return None
            count, eof, n = _READ_TAIL.unpack_from(head, pos)
            pos += _READ_TAIL.size
            if n != count or eof > 1 or pos + n > msg_len:
                return None
            return pos, n, eof == 1
    try:
        _, u = decode_reply(head)
        r = decode_read(u)
    except (ProtocolError, RpcError, NfsError):
        return None
    if r.data_offset + r.data_len > msg_len:
        return None
    return r.data_offset, r.data_len, r.eof


@dataclass(frozen=True, slots=True)
class WriteResult:
    """WRITE result."""

    count: int
    committed: int
    verf: bytes


def decode_write(u: Unpacker, what: str = "WRITE") -> WriteResult:
    """WRITE result: bytes written, how stable, and the write verifier."""
    st = _status(u)
    _skip_wcc_data(u)
    if st != NFS3_OK:
        raise status_error(st, what)
    count = u.uint()
    committed = u.uint()
    if committed > FILE_SYNC:
        raise ProtocolError(f"WRITE reply with unknown stability {committed}")
    return WriteResult(count, committed, u.fopaque(NFS3_WRITEVERFSIZE))


def decode_commit(u: Unpacker, what: str = "COMMIT") -> bytes:
    """COMMIT result: the write verifier."""
    st = _status(u)
    _wcc_data(u)
    if st != NFS3_OK:
        raise status_error(st, what)
    return u.fopaque(NFS3_WRITEVERFSIZE)


def decode_mnt(u: Unpacker, what: str = "MNT") -> tuple[bytes, list[int]]:
    """MOUNT MNT result: the export's root handle and the auth flavors it accepts."""
    st = _status(u)
    if st != 0:
        raise status_error(st, what, MOUNT_STATUS_NAMES)
    fh = _fh(u)
    n = u.uint()
    if n > 64:
        raise ProtocolError(f"MNT reply lists {n} auth flavors")
    return fh, [u.uint() for _ in range(n)]


def decode_export(u: Unpacker) -> list[str]:
    """MOUNT EXPORT result: the exported paths."""
    out: list[str] = []
    while u.bool():
        out.append(u.string(1024))
        while u.bool():  # groups allowed to mount it
            u.string(255)
        if len(out) > 100000:
            raise ProtocolError("EXPORT reply lists too many exports")
    return out


def decode_getport(u: Unpacker) -> int:
    """Portmap GETPORT result: the port, 0 when the program is not registered."""
    port = u.uint()
    if port > 65535:
        raise ProtocolError(f"GETPORT returned port {port}")
    return port
