"""The local config directory: which member URIs form which pool, locks, sockets, logs.

``--home DIR`` or ``VSTORE_HOME``, else ``$XDG_DATA_HOME/vstore`` (``~/.local/share/vstore``).
Everything in it is owner-only: pool records may hold CHAP secrets in member URIs.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from vstore.errors import ConfigError, ExistsError, NotFoundError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(kind: str, name: str) -> str:
    """Validate a pool or volume name (letters, digits, '_', '.', '-'; at most 64)."""
    if not NAME_RE.match(name or ""):
        raise ConfigError(
            f"invalid {kind} name {name!r}: use letters, digits, '_', '.', '-' (at most 64)"
        )
    return name


def default_home() -> Path:
    """The config directory from VSTORE_HOME or the user's data directory."""
    env = os.environ.get("VSTORE_HOME")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return Path(data) / "vstore"


class Home:
    """Paths and pool records inside one config directory."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.default = not root and not os.environ.get("VSTORE_HOME")
        self.root = Path(root) if root else default_home()
        self._checked = False

    def _check_root(self) -> None:
        """Refuse a config directory another user could tamper with (as ssh does for its files).

        It holds pool records (member URIs, maybe credentials), lock files and control
        sockets: it must be the caller's and writable by nobody else. Missing parents
        are created only for the default directory.
        """
        if self._checked:
            return
        try:
            self.root.mkdir(parents=self.default, exist_ok=True, mode=0o700)
        except FileNotFoundError:
            raise ConfigError(f"config directory {self.root}: its parent does not exist") from None
        except OSError as e:
            raise ConfigError(f"config directory {self.root}: {e.strerror}") from None
        st = os.stat(self.root)
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"config directory {self.root} is not a directory")
        if st.st_uid != os.geteuid():
            raise ConfigError(f"config directory {self.root} belongs to uid {st.st_uid}, not to you "
                              f"(uid {os.geteuid()}): refusing to use it")
        if st.st_mode & 0o022:
            raise ConfigError(f"config directory {self.root} is writable by others "
                              f"(mode {stat.S_IMODE(st.st_mode):o}): refusing to use it (chmod 700)")
        os.chmod(self.root, 0o700)
        self._checked = True

    def _dir(self, name: str) -> Path:
        self._check_root()
        d = self.root / name
        d.mkdir(exist_ok=True, mode=0o700)
        if d.is_symlink() or os.stat(d).st_uid != os.geteuid():
            raise ConfigError(f"{d} is a symlink or not yours: refusing to use it")
        return d

    def pool_record_path(self, pool: str) -> Path:
        """Where a pool's record (its member URIs) is kept."""
        return self._dir("pools") / f"{check_name('pool', pool)}.json"

    def lock_path(self, pool: str) -> Path:
        """The lock file that makes one process the owner of a pool."""
        return self._dir("locks") / f"{pool}.lock"

    def socket_path(self, pool: str) -> Path:
        """The control socket of the process that has the pool mounted."""
        return self._dir("run") / f"{pool}.sock"

    def log_path(self, name: str) -> Path:
        """A log file."""
        return self._dir("logs") / f"{name}.log"

    @property
    def mounts_dir(self) -> Path:
        """Records of live mounts."""
        return self._dir("mounts")

    def list_pools(self) -> list[str]:
        """Names of pools recorded here."""
        return sorted(p.stem for p in self._dir("pools").glob("*.json"))

    def read_pool(self, pool: str) -> dict[str, Any]:
        """A pool's record: {name, pool_uuid, members: [[uri, ...], ...]}."""
        path = self.pool_record_path(pool)
        try:
            rec = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise NotFoundError(
                f"pool {pool!r} not found in {self.root} (see 'vstore list' or 'vstore import-pool')"
            ) from e
        except ValueError as e:
            raise ConfigError(f"pool record {path} is not valid JSON: {e}") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("members"), list):
            raise ConfigError(f"pool record {path} is malformed (no member list)")
        return rec

    def write_pool(self, pool: str, record: dict[str, Any], *, new: bool = False) -> None:
        """Store a pool's record atomically, owner-only."""
        path = self.pool_record_path(pool)
        if new and path.exists():
            raise ExistsError(f"pool {pool!r} already exists in {self.root}")
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def remove_pool(self, pool: str) -> None:
        """Forget a pool's record."""
        self.pool_record_path(pool).unlink(missing_ok=True)

    def pool_storage_of(self, path: str) -> str | None:
        """'member 2 of pool p' when path is the same storage (device and inode) as a local
        member, spare or journal of a pool recorded here, else None (also when path does not exist)."""
        from vstore.errors import VstoreError
        from vstore.uri import split_paths

        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        want = (st.st_dev, st.st_ino)
        for pool in self.list_pools():
            try:
                record = self.read_pool(pool)
            except VstoreError:
                continue
            groups = [("member", i, m) for i, m in enumerate(record.get("members", []))]
            groups += [("spare", i, s) for i, s in enumerate(record.get("spares", []))]
            groups += [("journal", None, [record[k]]) for k in ("journal", "journal_previous") if record.get(k)]
            for kind, i, texts in groups:
                for text in texts:
                    try:
                        uris = split_paths(text)
                    except VstoreError:
                        continue
                    for uri in uris:
                        if uri.scheme != "file":
                            continue
                        try:
                            other = os.stat(uri.path)
                        except (OSError, ValueError):
                            continue
                        if (other.st_dev, other.st_ino) == want:
                            return f"{kind} {i} of pool {pool!r}" if i is not None else f"the {kind} of pool {pool!r}"
        return None
