"""Start and stop a real etcd (Debian's etcd-server) on loopback for tests.

Each instance gets its own data directory and two free ports (client, peer), so
instances never collide; ``close`` always stops the process and removes its data.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ETCD = "etcd"


class ServerError(RuntimeError):
    """The test server could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """One etcd member on 127.0.0.1 with a throw-away data directory."""

    def __init__(self, *, base: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vstore-etcd-", dir=base))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """HOST:PORT of the client endpoint."""
        return f"127.0.0.1:{self.port}"

    def lease_uri(self, prefix: str) -> str:
        """An etcd:// lease URI under prefix on this server."""
        return f"etcd://{self.endpoint}/{prefix}"

    def start(self, timeout: float = 30.0) -> None:
        """Start etcd and wait until it answers."""
        if shutil.which(ETCD) is None:
            raise ServerError("etcd is not installed (apt-get install etcd-server)")
        self.port = free_port()
        peer = free_port()
        log = open(self.dir / "etcd.log", "wb")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [ETCD, "--name", "vstore-test", "--data-dir", str(self.dir / "data"),
             "--listen-client-urls", f"http://127.0.0.1:{self.port}",
             "--advertise-client-urls", f"http://127.0.0.1:{self.port}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"vstore-test=http://127.0.0.1:{peer}",
             "--log-level", "warn", "--logger", "zap"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"etcd exited with {self.proc.returncode}: {self._log_tail()}")
            if self.healthy():
                return
            time.sleep(0.1)
        self.close()
        raise ServerError(f"etcd did not answer within {timeout}s: {self._log_tail()}")

    def healthy(self) -> bool:
        """Whether etcd answers a range request."""
        try:
            req = urllib.request.Request(f"http://{self.endpoint}/v3/kv/range",
                                         data=json.dumps({"key": "AA=="}).encode(), method="POST")
            with urllib.request.urlopen(req, timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return (self.dir / "etcd.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        """Stop etcd (if running) and remove its data directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Etcd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
