"""Member URIs: parse them and open the backend device each one names.

Forms (QEMU / libiscsi / libnfs conventions):
  file:///srv/disk0.img                      a regular file or a block device
  memory://NAME?size=1G                      RAM, for tests and benchmarks
  nfs://HOST[:PORT]/EXPORT/PATH/FILE         a file on an NFSv3 export
  iscsi://[USER[%PASSWORD]@]HOST[:PORT]/IQN/LUN   an iSCSI LUN
A member reached over several paths is written as several URIs joined by commas.

This module names no backend. Each backend module describes itself with a
``Backend`` (its scheme, the query parameters it understands, its host/path
rules and its opener) and is found through the ``vstore.backends`` entry-point
group (``pyproject.toml``: ``file = "backends.local:BACKEND"``); a test or plug-in
backend can also ``register`` one at run time. A backend's module is imported the
first time a URI of its scheme is parsed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from vstore.errors import ConfigError

GROUP = "vstore.backends"  # the entry-point group backends register their scheme in

# Query parameters of every scheme, the multipath layer's: ``prio`` (a path's priority)
# and ``path`` (a label that tells two URIs of one path apart).
PATH_PARAMS = frozenset({"prio", "path"})


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
        if self.password is None:  # none parsed; a raw "/" in one can hide it from urlsplit
            return redact_text(self.text)
        parts = urlsplit(self.text)
        userinfo, hostport = parts.netloc.rsplit("@", 1)
        sep = ":" if ":" in userinfo else "%"
        netloc = f"{userinfo.split(sep, 1)[0]}{sep}***@{hostport}"
        return urlunsplit(parts._replace(netloc=netloc))

    def __str__(self) -> str:
        return self.redacted()


# The secret runs to the next "@": it may hold a raw "/" (a Ceph key is base64), which makes
# the URI itself malformed, and the error about that must not show it.
_SECRET_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@\s:%]+[:%])[^@\s]+?@")


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
    if scheme not in _known():
        raise ConfigError(
            f"unknown URI scheme {scheme!r} in {redact_text(text)!r} (known: {', '.join(sorted(_known()))})"
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
    backend_for(scheme).validate(uri)
    return uri


@dataclass(frozen=True)
class Backend:
    """What the URI layer knows of a backend: its scheme, its URI rules and how to open a URI."""

    scheme: str
    open_uri: Callable[..., Awaitable[Any]]  # async def open_uri(uri, *, create_size=None, **opts)
    params: frozenset[str] | None = None  # the query parameters it understands (None: any)
    check: Callable[[MemberURI], None] | None = None  # host/port/path rules: raises ConfigError

    def validate(self, uri: MemberURI) -> None:
        """Raise ConfigError unless the URI keeps this backend's rules (a typo is reported, not ignored)."""
        if self.params is not None:
            unknown = sorted({k for k, _ in uri.query} - self.params - PATH_PARAMS)
            if unknown:
                raise ConfigError(
                    f"unknown parameter {unknown[0]!r} in {uri.redacted()!r} "
                    f"(known for {uri.scheme}://: {', '.join(sorted(self.params | PATH_PARAMS))})")
        if self.check is not None:
            self.check(uri)


_REGISTERED: dict[str, Backend] = {}  # registered at run time (test and plug-in backends)
_LOADED: dict[str, Backend] = {}  # found through the entry points, loaded on first use
_ENTRY_POINTS: dict[str, str] | None = None  # scheme -> "module:attribute"


def register(backend: Backend) -> None:
    """Let parse_uri and open_uri take ``backend.scheme://`` URIs (test and plug-in backends)."""
    _REGISTERED[backend.scheme.lower()] = backend


def unregister(scheme: str) -> None:
    """Forget a backend given to register."""
    _REGISTERED.pop(scheme.lower(), None)


def _entry_points() -> dict[str, str]:
    """scheme -> "module:attribute" of the installed backends (read once)."""
    global _ENTRY_POINTS
    if _ENTRY_POINTS is None:
        _ENTRY_POINTS = {ep.name.lower(): ep.value
                         for ep in importlib.metadata.entry_points(group=GROUP)}
        _ENTRY_POINTS.update(_checkout_entry_points())
    return _ENTRY_POINTS


def _checkout_entry_points() -> dict[str, str]:
    """The group's entry points in the pyproject.toml of the source tree vstore runs from, if any.

    An installed package's metadata lists the backends of the tree it was installed from; a
    checkout run through PYTHONPATH may have more (or newer) ones, and its own code wins.
    """
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        with pyproject.open("rb") as f:
            table = tomllib.load(f).get("project", {}).get("entry-points", {}).get(GROUP, {})
    except (OSError, ValueError):
        return {}
    return {str(k).lower(): str(v) for k, v in table.items()}


def _known() -> set[str]:
    return set(_REGISTERED) | set(_entry_points())


def backend_for(scheme: str) -> Backend:
    """The backend that takes ``scheme://`` URIs (ConfigError when none does)."""
    scheme = scheme.lower()
    backend = _REGISTERED.get(scheme) or _LOADED.get(scheme)
    if backend is not None:
        return backend
    target = _entry_points().get(scheme)
    if target is None:
        raise ConfigError(f"unknown URI scheme {scheme!r} (known: {', '.join(sorted(_known()))})")
    modname, _, attr = target.partition(":")
    obj: Any = importlib.import_module(modname)
    for name in attr.split(".") if attr else ("BACKEND",):
        obj = getattr(obj, name)
    if not isinstance(obj, Backend) or obj.scheme != scheme:
        raise ConfigError(f"entry point {scheme} = {target!r} of {GROUP} is not the {scheme}:// Backend")
    _LOADED[scheme] = obj
    return obj


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
    return await backend_for(uri.scheme).open_uri(uri, create_size=create_size, **opts)
