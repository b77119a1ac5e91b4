"""XDR (RFC 4506): big-endian 4-byte units, opaques padded to 4 bytes.

Sans-IO: a ``Packer`` collects encoded parts, an ``Unpacker`` walks a buffer.
Any truncated or malformed input raises ``vstore.errors.ProtocolError``.
"""

from __future__ import annotations

import struct

from vstore.errors import ProtocolError

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")


def pad_len(n: int) -> int:
    """Number of zero bytes that pad n bytes to a 4-byte boundary."""
    return -n & 3


def padding(n: int) -> bytes:
    """The zero padding that follows n bytes of opaque data."""
    return _PADS[n & 3]


class Packer:
    """Build an XDR encoding part by part; ``bytes()`` joins the parts once."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def uint(self, v: int) -> Packer:
        """Append an unsigned 32-bit integer."""
        self._parts.append(_U32.pack(v))
        return self

    def int(self, v: int) -> Packer:
        """Append a signed 32-bit integer."""
        self._parts.append(_I32.pack(v))
        return self

    def uhyper(self, v: int) -> Packer:
        """Append an unsigned 64-bit integer."""
        self._parts.append(_U64.pack(v))
        return self

    def hyper(self, v: int) -> Packer:
        """Append a signed 64-bit integer."""
        self._parts.append(_I64.pack(v))
        return self

    def bool(self, v: bool) -> Packer:
        """Append a boolean (one unit, 0 or 1)."""
        self._parts.append(_U32.pack(1 if v else 0))
        return self

    def fopaque(self, data: bytes, n: int) -> Packer:
        """Append fixed-length opaque data of exactly n bytes (no length word)."""
        if len(data) != n:
            raise ValueError(f"fixed opaque needs {n} bytes, got {len(data)}")
        self._parts.append(bytes(data))
        self._parts.append(_PADS[n & 3])
        return self

    def opaque(self, data: bytes) -> Packer:
        """Append variable-length opaque data: length, bytes, padding."""
        self._parts.append(_U32.pack(len(data)))
        self._parts.append(bytes(data))
        self._parts.append(_PADS[len(data) & 3])
        return self

    def string(self, s: str) -> Packer:
        """Append a string as UTF-8 opaque data."""
        return self.opaque(s.encode())

    def raw(self, data: bytes) -> Packer:
        """Append bytes already in XDR form."""
        self._parts.append(bytes(data))
        return self

    def bytes(self) -> bytes:
        """The encoding so far."""
        return b"".join(self._parts)


class Unpacker:
    """Decode XDR from a buffer, position by position; raises ProtocolError on garbage."""

    __slots__ = ("_buf", "pos", "_end")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0, end: int | None = None):
        self._buf = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self.pos = pos
        self._end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        """Bytes not consumed yet."""
        return self._end - self.pos

    def _need(self, n: int) -> int:
        p = self.pos
        if n < 0 or p + n > self._end:
            raise ProtocolError(f"XDR data truncated: need {n} bytes at {p}, have {self._end - p}")
        self.pos = p + n
        return p

    def uint(self) -> int:
        """Read an unsigned 32-bit integer."""
        return _U32.unpack_from(self._buf, self._need(4))[0]

    def int(self) -> int:
        """Read a signed 32-bit integer."""
        return _I32.unpack_from(self._buf, self._need(4))[0]

    def uhyper(self) -> int:
        """Read an unsigned 64-bit integer."""
        return _U64.unpack_from(self._buf, self._need(8))[0]

    def hyper(self) -> int:
        """Read a signed 64-bit integer."""
        return _I64.unpack_from(self._buf, self._need(8))[0]

    def bool(self) -> bool:
        """Read a boolean; anything but 0 or 1 is a protocol error."""
        v = self.uint()
        if v > 1:
            raise ProtocolError(f"XDR boolean has value {v}")
        return v == 1

    def enum(self, valid: range | frozenset[int] | dict[int, str] | None = None) -> int:
        """Read an enum value (signed 32 bits), optionally checking it is known."""
        v = self.int()
        if valid is not None and v not in valid:
            raise ProtocolError(f"XDR enum has unknown value {v}")
        return v

    def fopaque(self, n: int) -> bytes:
        """Read fixed-length opaque data of n bytes (plus padding)."""
        p = self._need(n + pad_len(n))
        return bytes(self._buf[p : p + n])

    def opaque(self, maxlen: int | None = None) -> bytes:
        """Read variable-length opaque data, refusing more than maxlen bytes."""
        return bytes(self.opaque_view(maxlen))

    def opaque_view(self, maxlen: int | None = None) -> memoryview:
        """Read variable-length opaque data as a view into the buffer (no copy)."""
        n = self.uint()
        if maxlen is not None and n > maxlen:
            raise ProtocolError(f"XDR opaque of {n} bytes exceeds its limit {maxlen}")
        p = self._need(n + pad_len(n))
        return memoryview(self._buf)[p : p + n]

    def string(self, maxlen: int | None = None) -> str:
        """Read a string (UTF-8; undecodable bytes are replaced, never fatal)."""
        return self.opaque(maxlen).decode("utf-8", "replace")

    def skip(self, n: int) -> None:
        """Skip n bytes."""
        self._need(n)

    def done(self) -> None:
        """Raise ProtocolError unless the whole buffer was consumed."""
        if self.pos != self._end:
            raise ProtocolError(f"{self._end - self.pos} unexpected trailing bytes in XDR data")
