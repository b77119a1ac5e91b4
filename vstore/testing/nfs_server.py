"""Start and stop a real NFS-Ganesha (with rpcbind) on loopback for tests and benchmarks.

Ganesha's ports are fixed (NFS 2049, MOUNT 20048), so only one instance can run
at a time: use one server per test module (or session). ``rpcbind -w`` is
started when it is not running, and stopped afterwards only if we started it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

NFS_PORT = 2049
MOUNT_PORT = 20048
LOCK_PATH = "/tmp/vstore-ganesha.lock"

CONFIG = """\
NFS_CORE_PARAM {{ Protocols = 3, 4; NFS_Port = {nfs_port}; MNT_Port = {mount_port};
                 Bind_addr = 127.0.0.1; Enable_NLM = false; Enable_RQUOTA = false;
                 Enable_UDP = false; }}
NFSV4    {{ Graceless = true; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{ Export_Id = 1; Path = {export}; Pseudo = {export}; Protocols = 3, 4;
         Transports = TCP; Access_Type = RW; Squash = No_Root_Squash; SecType = sys;
         Attr_Expiration_Time = 0;
         MaxRead = {max_read}; MaxWrite = {max_write};
         PrefRead = {max_read}; PrefWrite = {max_write};
         FSAL {{ Name = VFS; }} }}
LOG {{ Default_Log_Level = WARN; }}
"""


class ServerError(RuntimeError):
    """The test server could not be started or stopped."""


def rpc_null(port: int, prog: int = 100003, vers: int = 3, timeout: float = 1.0) -> bool:
    """True when an RPC NULL call to 127.0.0.1:port is answered."""
    xid = 0x5E5E0001
    call = struct.pack(">IIIIII", xid, 0, 2, prog, vers, 0) + b"\0" * 16
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(struct.pack(">I", 0x80000000 | len(call)) + call)
            data = b""
            while len(data) < 4 + 24:
                chunk = s.recv(256)
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False
    rxid, mtype, rstat = struct.unpack(">III", data[4:16])
    return rxid == xid and mtype == 1 and rstat == 0


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _filesystem_type(path: str) -> str:
    out = subprocess.run(["df", "--output=fstype", path], capture_output=True, text=True)
    lines = out.stdout.split()
    return lines[-1] if lines else "?"


class Ganesha:
    """One NFS-Ganesha exporting a fresh temporary directory over NFSv3 on 127.0.0.1."""

    def __init__(self, *, base: str | None = None, max_write: int = 1 << 20,
                 max_read: int = 1 << 20) -> None:
        for tool in ("ganesha.nfsd", "rpcbind"):
            if shutil.which(tool) is None:
                raise ServerError(f"{tool} is not installed (bash scripts/setup.sh installs it)")
        self.workdir = Path(tempfile.mkdtemp(prefix="vstore-ganesha-", dir=base))
        self.export = self.workdir / "export"
        self.export.mkdir()
        fstype = _filesystem_type(str(self.export))
        if fstype not in ("ext4", "xfs", "btrfs"):
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise ServerError(f"export {self.export} is on {fstype}; Ganesha's VFS needs ext4/xfs/btrfs")
        self.max_write = max_write
        self.max_read = max_read
        self.proc: subprocess.Popen | None = None
        self.rpcbind_pid: int | None = None
        self.epoch = int(time.time())
        self.log = self.workdir / "ganesha.log"
        self._lock_fd: int | None = None

    # ---- URLs ---------------------------------------------------------------------------

    def url(self, name: str, *, ports: bool = True, **params: object) -> str:
        """nfs:// URL of a file in the export (with explicit ports unless ports=False)."""
        q = dict(params)
        if ports:
            q = {"nfsport": NFS_PORT, "mountport": MOUNT_PORT, **q}
        query = "&".join(f"{k}={v}" for k, v in q.items())
        return f"nfs://127.0.0.1{self.export}/{name}" + (f"?{query}" if query else "")

    def path(self, name: str) -> Path:
        """The file in the export's directory on the local disk."""
        return self.export / name

    # ---- lifecycle ----------------------------------------------------------------------

    def _ensure_rpcbind(self) -> None:
        if rpc_null(111, prog=100000, vers=2):
            return
        # A port that is open but does not answer is an rpcbind still shutting down.
        deadline = time.monotonic() + 5
        while _port_busy(111) and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["rpcbind", "-w"], check=True)
        deadline = time.monotonic() + 5
        while not rpc_null(111, prog=100000, vers=2):
            if time.monotonic() > deadline:
                raise ServerError("rpcbind did not start listening on port 111")
            time.sleep(0.05)
        out = subprocess.run(["pidof", "rpcbind"], capture_output=True, text=True).stdout.split()
        self.rpcbind_pid = int(out[0]) if out else None

    def start(self, *, epoch: int | None = None, wait_free: float = 60.0) -> None:
        """Start Ganesha (after rpcbind) and wait until it answers an RPC NULL."""
        for attempt in range(3):
            try:
                return self._start(epoch=epoch, wait_free=wait_free)
            except ServerError as e:
                # rpcbind restarting under us makes Ganesha's registration fail: try again.
                if "Cannot register" not in str(e) or attempt == 2:
                    raise
                time.sleep(0.5)

    def _take_lock(self, deadline: float) -> None:
        # Ports are fixed: two instances (e.g. two test runs at once) would answer each
        # other's clients. A lock file serializes them across processes.
        if self._lock_fd is not None:
            return
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ServerError(f"another test NFS server holds {LOCK_PATH}") from None
                time.sleep(0.2)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _start(self, *, epoch: int | None, wait_free: float) -> None:
        deadline = time.monotonic() + wait_free
        self._take_lock(deadline)
        self._ensure_rpcbind()
        # Another test run may still hold the fixed ports: wait for it, then give up clearly.
        while _port_busy(NFS_PORT) or _port_busy(MOUNT_PORT):
            if time.monotonic() > deadline:
                raise ServerError(f"port {NFS_PORT} or {MOUNT_PORT} is in use by another NFS server")
            time.sleep(0.2)
        self.epoch = epoch if epoch is not None else max(self.epoch + 1, int(time.time()))
        conf = self.workdir / "ganesha.conf"
        conf.write_text(CONFIG.format(nfs_port=NFS_PORT, mount_port=MOUNT_PORT,
                                      export=self.export, max_write=self.max_write,
                                      max_read=self.max_read))
        self.proc = subprocess.Popen(
            ["ganesha.nfsd", "-F", "-f", str(conf), "-L", str(self.log),
             "-p", str(self.workdir / "ganesha.pid"), "-E", str(self.epoch)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not rpc_null(NFS_PORT):
            if self.proc.poll() is not None:
                raise ServerError(f"ganesha.nfsd exited with {self.proc.returncode}: "
                                  f"{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"ganesha.nfsd did not answer within 30 s: {self._log_tail()}")
            time.sleep(0.1)

    def _log_tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-5:])

    def stop(self) -> None:
        """SIGTERM Ganesha (SIGKILL if it does not exit in 10 s)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            proc.terminate()
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        # The kernel may keep the listening ports for a moment after exit.
        deadline = time.monotonic() + 10
        while _port_busy(NFS_PORT) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self, *, epoch: int | None = None, **config: int) -> None:
        """Stop and start again (a new epoch means a new write verifier); config may change."""
        self.stop()
        for k, v in config.items():
            setattr(self, k, v)
        self.start(epoch=epoch)

    def pause(self) -> None:
        """SIGSTOP Ganesha: it keeps its sockets but answers nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        # The signal lands asynchronously: a worker thread on another CPU could still answer
        # a request. Wait until every thread is really stopped.
        deadline = time.monotonic() + 5
        while not self._all_threads_stopped():
            if time.monotonic() > deadline:
                raise ServerError("ganesha.nfsd did not stop on SIGSTOP")
            time.sleep(0.01)

    def _all_threads_stopped(self) -> bool:
        assert self.proc is not None
        tasks = Path(f"/proc/{self.proc.pid}/task")
        try:
            for t in tasks.iterdir():
                stat = (t / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] not in ("T", "t"):
                    return False
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that exits is not answering anyone
        return True

    def resume(self) -> None:
        """SIGCONT Ganesha after pause()."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Stop Ganesha, rpcbind if we started it, and remove the export."""
        try:
            self.stop()
        finally:
            if self.rpcbind_pid is not None:
                try:
                    os.kill(self.rpcbind_pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                self.rpcbind_pid = None
                deadline = time.monotonic() + 5
                while _port_busy(111) and time.monotonic() < deadline:
                    time.sleep(0.05)
            self._release_lock()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Ganesha:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RpcRelay:
    """A loopback TCP relay in front of an RPC server, for fault injection in tests.

    It records every call (``calls``: xid, procedure, bytes), can rewrite replies
    (``reply_filter(xid, message) -> message``), cut the connection right after
    forwarding a call (``cut_after(xid, procedure) -> bool``: the server acts on
    it, its reply is lost) and cut every connection at once (``sever()``).
    Start it with ``port = await nursery.start(relay.serve)``.
    """

    def __init__(self, target_port: int = NFS_PORT) -> None:
        self.target_port = target_port
        self.calls: list[tuple[int, int, bytes]] = []
        self.reply_filter = None
        self.cut_after = None
        self.connections = 0
        self._scopes: set = set()

    async def serve(self, *, task_status=None) -> None:
        """Listen on an ephemeral loopback port; report the port through task_status."""
        import trio

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        if task_status is not None:
            task_status.started(port)
        await trio.serve_listeners(self._handle, listeners)

    def sever(self) -> None:
        """Cut every relayed connection now."""
        for scope in list(self._scopes):
            scope.cancel()

    async def _handle(self, client) -> None:
        import trio

        from backends.nfs.rpc import RecordReceiver, record_mark

        self.connections += 1
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        up_rx, down_rx = RecordReceiver(), RecordReceiver()
        swallow = False
        async with client, server, trio.open_nursery() as nursery:
            self._scopes.add(nursery.cancel_scope)

            async def upstream() -> None:
                nonlocal swallow
                async for chunk in client:
                    cut = False
                    for m in up_rx.feed(chunk):
                        proc = int.from_bytes(m.data[20:24], "big")
                        self.calls.append((m.xid, proc, bytes(m.data)))
                        if self.cut_after is not None and self.cut_after(m.xid, proc):
                            cut = swallow = True
                    await server.send_all(chunk)
                    if cut:
                        await trio.sleep(0.3)  # let the server act; its reply is swallowed
                        break
                nursery.cancel_scope.cancel()

            async def downstream() -> None:
                async for chunk in server:
                    if swallow:
                        continue
                    if self.reply_filter is None:
                        await client.send_all(chunk)
                        continue
                    for m in down_rx.feed(chunk):
                        msg = self.reply_filter(m.xid, bytes(m.data))
                        await client.send_all(record_mark(len(msg)) + msg)
                nursery.cancel_scope.cancel()

            nursery.start_soon(upstream)
            nursery.start_soon(downstream)
        self._scopes.discard(nursery.cancel_scope)
