"""Member URIs: parse them and open the backend device each one names.

Forms (QEMU / libiscsi / libnfs conventions):
  file:///srv/disk0.img                      a regular file or a block device
  memory://NAME?size=1G                      RAM, for tests and benchmarks
  nfs://HOST[:PORT]/EXPORT/PATH/FILE         a file on an NFSv3 export
  iscsi://[USER[%PASSWORD]@]HOST[:PORT]/IQN/LUN   an iSCSI LUN
A member reached over several paths is written as several URIs joined by commas.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from vstore.errors import ConfigError

# scheme -> "module:function"; the function is ``async def open_uri(uri, *, create_size=None, **opts)``
_OPENERS: dict[str, str] = {
    "file": "backends.local:open_uri",
    "memory": "backends.memory:open_uri",
    "nfs": "backends.nfs:open_uri",
    "iscsi": "backends.iscsi:open_uri",
}


@dataclass(frozen=True)
class MemberURI:
    """A parsed member URI."""

    scheme: str
    host: str = ""
    port: int | None = None
    path: str = ""
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    query: tuple[tuple[str, str], ...] = ()
    text: str = field(default="", repr=False)

    @property
    def params(self) -> dict[str, str]:
        """The query parameters as a dict."""
        return dict(self.query)

    def redacted(self) -> str:
        """The URI as text with any password replaced by *** (safe for logs and status)."""
        if self.password is None:
            return self.text
        parts = urlsplit(self.text)
        userinfo, hostport = parts.netloc.rsplit("@", 1)
        sep = ":" if ":" in userinfo else "%"
        netloc = f"{userinfo.split(sep, 1)[0]}{sep}***@{hostport}"
        return urlunsplit(parts._replace(netloc=netloc))

    def __str__(self) -> str:
        return self.redacted()


_SECRET_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@\s:%]+[:%])[^@\s/]+@")


def redact_text(text: str) -> str:
    """Any text with the passwords of the URIs in it replaced by *** (for errors and logs)."""
    return _SECRET_RE.sub(r"\1***@", text)


def parse_uri(text: str) -> MemberURI:
    """Parse one member URI, raising ConfigError with the reason when it is malformed."""
    text = text.strip()
    if "://" not in text:
        raise ConfigError(f"not a member URI: {redact_text(text)!r} (expected e.g. file:///path/disk.img)")
    if "\0" in text or "%00" in text:
        raise ConfigError(f"member URI contains a NUL byte: {redact_text(text)!r}")
    try:
        parts = urlsplit(text)
    except ValueError as e:
        raise ConfigError(f"malformed member URI {redact_text(text)!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in _OPENERS:
        raise ConfigError(
            f"unknown URI scheme {scheme!r} in {redact_text(text)!r} (known: {', '.join(sorted(_OPENERS))})"
        )
    try:
        port = parts.port
        host_text = parts.hostname
    except ValueError as e:
        raise ConfigError(f"bad host or port in URI {redact_text(text)!r}") from e
    if port == 0 or (port is None and parts.netloc.rsplit("@", 1)[-1].endswith(":")):
        raise ConfigError(f"bad port in URI {redact_text(text)!r}: give a port from 1 to 65535, or none")
    user = password = None
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        # user:password (percent-encoded) as in RFC 3986, or libiscsi's raw user%password.
        sep = ":" if ":" in userinfo else ("%" if "%" in userinfo else None)
        if sep == ":":
            u, p = userinfo.split(sep, 1)
            user, password = unquote(u), unquote(p)
        elif sep == "%":
            user, password = userinfo.split(sep, 1)
        else:
            user = unquote(userinfo)
    host = host_text or ""
    path = unquote(parts.path)
    query = tuple(parse_qsl(parts.query, keep_blank_values=True))
    uri = MemberURI(scheme, host, port, path, user, password, query, text)
    _validate(uri)
    return uri


# The query parameters each scheme understands; anything else is a typo to report,
# not to ignore. ``prio`` (a multipath path's priority) and ``path`` (a label that
# tells two URIs of one path apart) are the multipath layer's.
_PARAMS: dict[str, frozenset[str]] = {
    "file": frozenset({"block_size", "direct"}),
    "memory": frozenset({"size", "block_size"}),
    "nfs": frozenset({"nfsport", "mountport", "uid", "gid", "depth", "retrans", "timeout", "cache_bytes",
                      "rsize", "wsize"}),
    "iscsi": frozenset({"initiator_name", "header_digest", "data_digest", "max_recv", "max_burst", "timeout",
                        "login_timeout", "queue_depth", "recovery_timeout", "max_transfer", "max_write",
                        "credentials_file"}),
}
_PATH_PARAMS = frozenset({"prio", "path"})


def _validate(uri: MemberURI) -> None:
    known = _PARAMS.get(uri.scheme)
    if known is not None:
        unknown = sorted({k for k, _ in uri.query} - known - _PATH_PARAMS)
        if unknown:
            raise ConfigError(f"unknown parameter {unknown[0]!r} in {uri.redacted()!r} "
                              f"(known for {uri.scheme}://: {', '.join(sorted(known | _PATH_PARAMS))})")
    if uri.scheme == "file":
        if uri.host not in ("", "localhost") or not uri.path.startswith("/"):
            raise ConfigError(f"file URI needs an absolute path: {uri.redacted()!r} (file:///abs/path)")
    elif uri.scheme == "memory":
        if not uri.host:
            raise ConfigError(f"memory URI needs a name: {uri.redacted()!r} (memory://NAME?size=1G)")
    elif uri.scheme == "nfs":
        if not uri.host or len(uri.path.strip("/").split("/")) < 2:
            raise ConfigError(f"NFS URI needs host, export and file: {uri.redacted()!r}")
    elif uri.scheme == "iscsi":
        comps = uri.path.strip("/").split("/")
        if not uri.host or len(comps) != 2 or not comps[1].isdigit():
            raise ConfigError(
                f"iSCSI URI needs host, target IQN and LUN number: {uri.redacted()!r} "
                "(iscsi://HOST[:PORT]/IQN/LUN)"
            )


def register_scheme(scheme: str, opener: str) -> None:
    """Let open_uri open ``scheme://`` URIs with ``"module:function"`` (test and plug-in backends)."""
    _OPENERS[scheme.lower()] = opener


def split_paths(text: str) -> list[MemberURI]:
    """Parse a member argument that may list several paths separated by commas."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError("empty member URI")
    return [parse_uri(t) for t in items]


async def open_uri(uri: MemberURI | str, *, create_size: int | None = None, **opts: Any):
    """Open the backend device a URI names (creating a missing file when create_size is set)."""
    if isinstance(uri, str):
        uri = parse_uri(uri)
    modname, funcname = _OPENERS[uri.scheme].split(":")
    module = importlib.import_module(modname)
    return await getattr(module, funcname)(uri, create_size=create_size, **opts)
