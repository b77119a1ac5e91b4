"""A small etcd v3 client over its JSON gateway (``/v3/...``), on trio sockets.

Only what the ownership lease needs: range, txn (compare-and-put), lease grant,
keepalive and revoke. Each call is one HTTP/1.1 POST on a fresh connection
(``Connection: close``): a lease is renewed every second or so, and a connection
that a paused process left half-used is never reused. Keys and values travel
base64-encoded, 64-bit integers as decimal strings, as the gateway does.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import trio

from vstore.errors import ConfigError, VstoreError

DEFAULT_PORT = 2379
DEFAULT_TTL = 10  # seconds a lease outlives its owner's last renewal


class EtcdError(VstoreError):
    """etcd could not be reached or refused a request."""


def b64(data: bytes | str) -> str:
    """Base64 text of bytes (a str is UTF-8 encoded first)."""
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def unb64(text: str | None) -> bytes:
    """Bytes of base64 text (empty for None)."""
    return base64.b64decode(text) if text else b""


@dataclass(frozen=True)
class LeaseURI:
    """``etcd://HOST[:PORT]/PREFIX[?ttl=SECONDS]``: where a pool's ownership lease lives."""

    host: str
    port: int
    prefix: str
    ttl: int = DEFAULT_TTL

    @classmethod
    def parse(cls, text: str) -> LeaseURI:
        """Parse a lease URI or raise ConfigError."""
        u = urlsplit(text)
        if u.scheme != "etcd" or not u.hostname:
            raise ConfigError(f"lease URI must be etcd://HOST[:PORT]/PREFIX, got {text!r}")
        if u.fragment or u.username or u.password:
            raise ConfigError(f"lease URI {text!r}: no user or fragment is allowed")
        ttl = DEFAULT_TTL
        for k, v in parse_qsl(u.query, keep_blank_values=True):
            if k != "ttl":
                raise ConfigError(f"lease URI {text!r}: unknown parameter {k!r} (only ttl)")
            if not v.isdigit() or not 2 <= int(v) <= 3600:
                raise ConfigError(f"lease URI {text!r}: ttl must be 2..3600 seconds")
            ttl = int(v)
        try:
            port = u.port or DEFAULT_PORT
        except ValueError:
            raise ConfigError(f"lease URI {text!r}: bad port") from None
        prefix = u.path.strip("/")
        if not prefix:
            raise ConfigError(f"lease URI {text!r} needs a key prefix (etcd://HOST:PORT/PREFIX)")
        return cls(u.hostname, port, prefix, ttl)

    def __str__(self) -> str:
        tail = f"?ttl={self.ttl}" if self.ttl != DEFAULT_TTL else ""
        return f"etcd://{self.host}:{self.port}/{self.prefix}{tail}"


@dataclass(frozen=True)
class KeyValue:
    """One key's value and revisions."""

    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


class EtcdClient:
    """The JSON gateway of one etcd endpoint."""

    def __init__(self, host: str, port: int = DEFAULT_PORT, *, timeout: float = 2.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST body as JSON to /v3/path; the decoded reply (EtcdError on any failure)."""
        payload = json.dumps(body).encode()
        head = (f"POST /v3/{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Content-Type: application/json\r\nConnection: close\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        where = f"etcd at {self.host}:{self.port}"
        try:
            with trio.fail_after(self.timeout):
                stream = await trio.open_tcp_stream(self.host, self.port)
                async with stream:
                    await stream.send_all(head + payload)
                    raw = bytearray()
                    while chunk := await stream.receive_some(65536):
                        raw += chunk
        except trio.TooSlowError:
            raise EtcdError(f"{where}: no answer within {self.timeout:g}s") from None
        except OSError as e:
            raise EtcdError(f"{where}: {e.strerror or e}") from None
        status, headers, content = parse_response(bytes(raw), where)
        try:
            doc = json.loads(content.decode() or "{}") if content.strip() else {}
        except ValueError:
            raise EtcdError(f"{where}: not a JSON reply to {path}") from None
        # A streaming call (keepalive) answers {"result": ...}; errors come as {"error": ...}.
        if isinstance(doc, dict) and "error" in doc and doc["error"]:
            err = doc["error"]
            msg = err.get("message", err) if isinstance(err, dict) else err
            raise EtcdError(f"{where}: {path}: {msg}")
        if status != 200:
            raise EtcdError(f"{where}: {path}: HTTP {status}: {doc.get('message', '') if isinstance(doc, dict) else ''}")
        if isinstance(doc, dict) and "result" in doc:
            doc = doc["result"]
        return doc

    async def get(self, key: str) -> KeyValue | None:
        """The key's value, or None when it is absent."""
        doc = await self.call("kv/range", {"key": b64(key)})
        kvs = doc.get("kvs") or []
        return kv_of(kvs[0]) if kvs else None

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, ttl granted)."""
        doc = await self.call("lease/grant", {"TTL": str(ttl), "ID": "0"})
        return int(doc["ID"]), int(doc.get("TTL", ttl))

    async def keepalive(self, lease: int) -> int:
        """Renew the lease once: its remaining TTL (0: the lease has expired or is gone)."""
        doc = await self.call("lease/keepalive", {"ID": str(lease)})
        return int(doc.get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """Revoke the lease (its keys go with it); a lease already gone is fine."""
        try:
            await self.call("lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if "not found" not in str(e):
                raise

    async def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
                  failure: list[dict[str, Any]] | None = None) -> bool:
        """An atomic transaction: whether the compares held (and success ran)."""
        doc = await self.call("kv/txn", {"compare": compare, "success": success,
                                         "failure": failure or []})
        return bool(doc.get("succeeded"))


def kv_of(doc: dict[str, Any]) -> KeyValue:
    """A KeyValue from the gateway's JSON."""
    return KeyValue(unb64(doc.get("value")), int(doc.get("create_revision", 0)),
                    int(doc.get("mod_revision", 0)), int(doc.get("lease", 0)))


def put_op(key: str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    """A txn request putting value at key (attached to lease when non-zero)."""
    req: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def compare_revision(key: str, target: str, revision: int) -> dict[str, Any]:
    """A txn compare: key's CREATE or MOD revision equals revision (0: the key is absent)."""
    field = "create_revision" if target == "CREATE" else "mod_revision"
    return {"key": b64(key), "result": "EQUAL", "target": target, field: str(revision)}


def parse_response(raw: bytes, where: str) -> tuple[int, dict[str, str], bytes]:
    """Split an HTTP/1.1 response into (status, headers, body), undoing chunked encoding."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1."):
        raise EtcdError(f"{where}: not an HTTP reply")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise EtcdError(f"{where}: bad HTTP status line {lines[0]!r}") from None
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        pos = 0
        while True:
            end = body.find(b"\r\n", pos)
            if end < 0:
                raise EtcdError(f"{where}: truncated chunked reply")
            size = int(body[pos:end].split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out += body[end + 2 : end + 2 + size]
            pos = end + 2 + size + 2
        body = bytes(out)
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return status, headers, body
