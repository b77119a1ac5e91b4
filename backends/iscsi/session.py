"""The trio driver of the iSCSI initiator: one TCP connection = one session (ERL 0).

The protocol lives in ``backends.iscsi.connection.Connection`` (sans-IO: login,
negotiation, CHAP, the CmdSN window, PDU decoding, tasks by ITT); this module
moves its bytes over a ``vstore.io.stream.Stream`` and turns its events into
wake-ups. ``Session.connect`` logs in. Many commands are in flight at once:
senders take one lock so CmdSN is assigned in send order and PDUs never
interleave on the wire.

There is no reader task of its own. Whichever task waits for the target (for its
commands, for room in the CmdSN window, for a ping) and finds the reader role
free receives for everybody: it feeds the connection and wakes the tasks whose
commands ended, and hands the role on when its own wait is over. ``serve``
takes the role for as long as the session lives (the device's optional
background task: it answers the target's pings while nothing else is going on);
without it, ``refresh`` takes in what arrived during a quiet spell (pings, the
target closing the connection) before the next command. The receiving state lives in the connection, so a reader cancelled between two
receives leaves nothing half-done. Data-In payloads are received straight into
the caller's buffer (``recvmsg_into`` over the pieces of an ``IoVec``); Data-Out
is sent from it with scatter-gather ``sendmsg``. Data-In for a command its
caller abandoned (cancelled) is received and dropped, never placed in the buffer.

A command unanswered for ``command_timeout`` means the connection is dead: the
reader's cancel scope carries the deadline of the oldest command waited for.
When the connection dies every in-flight command fails with
``ConnectionLostError``; the device layer (``backends.iscsi``) reconnects and
reissues them. Discovery (SendTargets) uses ``discovery_targets``.
"""

from __future__ import annotations

import logging
import math

import trio

from backends.iscsi.connection import (
    AsyncMessage,
    Completion,
    Connection,
    Credentials,
    Options,
    Params,
    R2TReceived,
    Rejected,
    Send,
    TargetPing,
    Task,
    TaskDone,
    WindowOpened,
    chap_response,
    new_isid,
    parse_send_targets,
)
from backends.iscsi.errors import ConnectionLostError
from vstore.errors import DeviceTimeoutError, MemberIOError, ProtocolError
from vstore.io.stream import EndOfStream, Stream, StreamClosedError, open_stream

__all__ = [
    "Completion", "Credentials", "Options", "Params", "Session", "chap_response",
    "discovery_targets", "new_isid",
]

log = logging.getLogger("vstore.iscsi")

_SOCKET_BUFFER = 4 << 20
_QUIET = 1.0  # seconds without a reader after which refresh() looks at the socket


class _Waiter:
    """How the reader wakes the tasks waiting for a set of commands: on an R2T, or when all have ended."""

    __slots__ = ("event", "left")

    def __init__(self, left: int) -> None:
        self.event = trio.Event()
        self.left = left

    def set(self) -> None:
        """Wake now (an R2T to answer, or the connection failed)."""
        self.event.set()

    def task_done(self) -> None:
        """One more command ended."""
        self.left -= 1
        if self.left <= 0:
            self.event.set()


def _lost(e: BaseException, portal: str) -> MemberIOError:
    """An error of the stream (or of the protocol) as the session's MemberIOError."""
    if isinstance(e, MemberIOError):
        return e
    if isinstance(e, EndOfStream):
        return ConnectionLostError("the target closed the connection")
    if isinstance(e, StreamClosedError):
        return ConnectionLostError("the connection was closed")
    return ConnectionLostError(f"connection to {portal} failed: {getattr(e, 'strerror', None) or e}")


class Session:
    """One logged-in connection to a target."""

    def __init__(
        self,
        host: str,
        port: int,
        target: str | None,
        options: Options,
        *,
        isid: bytes | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.portal = f"{host}:{port}"
        self.target = target
        self.options = options
        self.conn = Connection(options, target=target, isid=isid, credentials=credentials,
                               portal=self.portal)
        self.isid = self.conn.isid
        self.stream: Stream | None = None
        self._send_lock = trio.Lock()
        self._window_waiters: list[trio.Event] = []
        self._outbox: list = []  # PDUs (or pings to answer) waiting for the send lock
        self._reading = False  # a task holds the reader role
        self._parked: dict[trio.Event, None] = {}  # waiters that would take the role when free
        self._read_scope: trio.CancelScope | None = None
        self._due = math.inf  # no task waited for times out before this
        self._last_read = 0.0  # when a reader last gave up the role
        self.dead: BaseException | None = None
        self.closed = False
        self.closing = False
        self.window_waits = 0  # commands that found the CmdSN window closed

    def __repr__(self) -> str:
        return f"<iSCSI session {self.target} @ {self.portal} tsih={self.conn.tsih}>"

    # ------------------------------------------------------------ state

    @property
    def params(self) -> Params:
        """The negotiated parameters."""
        return self.conn.params

    @property
    def credentials(self) -> Credentials | None:
        """The CHAP credentials of the login."""
        return self.conn.credentials

    @property
    def tsih(self) -> int:
        """The target's session handle."""
        return self.conn.tsih

    @property
    def cmd_sn(self) -> int:
        """The CmdSN of the next command."""
        return self.conn.cmd_sn

    @property
    def exp_cmd_sn(self) -> int:
        """The target's ExpCmdSN."""
        return self.conn.exp_cmd_sn

    @property
    def max_cmd_sn(self) -> int:
        """The target's MaxCmdSN."""
        return self.conn.max_cmd_sn

    @property
    def alive(self) -> bool:
        """Logged in and the connection has not failed."""
        return self.dead is None and self.stream is not None and not self.closed

    @property
    def in_flight(self) -> int:
        """Tasks waiting for the target."""
        return len(self.conn.tasks)

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise self.dead if isinstance(self.dead, MemberIOError) else ConnectionLostError(str(self.dead))

    def abort(self, error: BaseException) -> None:
        """Tear the connection down; every waiting task fails with error."""
        if self.dead is None:
            self.dead = error
        if self.stream is not None:
            self.stream.close()
        for t in self.conn.fail_all(error):
            if t.wake is not None:
                t.wake.set()
        self._outbox.clear()
        self._open_window()
        for ev in self._parked:
            ev.set()

    def close(self) -> None:
        """Close the socket; waiting tasks fail."""
        self.closed = True
        self.abort(ConnectionLostError(f"iSCSI session to {self.target} at {self.portal} closed"))

    def _open_window(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for ev in waiters:
            ev.set()

    # ------------------------------------------------------------ sending

    async def _lock(self) -> None:
        # The uncontended case without a trip through the scheduler (fair: a free
        # trio.Lock with waiters still refuses acquire_nowait).
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()

    def _take_outbox(self) -> list:
        parts: list = []
        for item in self._outbox:
            parts += self.conn.answer_ping(item) if isinstance(item, TargetPing) else item
        self._outbox.clear()
        return parts

    async def _send_locked(self, parts: list) -> None:
        """Send a whole PDU train (the lock held); if that fails or is cancelled midway, the stream is unusable."""
        if self._outbox:
            parts = self._take_outbox() + parts
        try:
            await self.stream.send_all(parts)
        except BaseException as e:
            self.abort(_lost(e, self.portal) if isinstance(e, Exception)
                       else ConnectionLostError("a send was interrupted"))
            if isinstance(e, OSError):
                raise self.dead from e
            raise

    async def _send(self, parts: list) -> None:
        await self._lock()
        try:
            self._check_alive()
            await self._send_locked(parts)
        finally:
            self._send_lock.release()

    # ------------------------------------------------------------ receiving

    async def _wait(self, ev: trio.Event) -> None:
        """Return once ev is set (or the session died), receiving for everybody while nobody else does."""
        if ev.is_set() or self.dead is not None:
            return
        if not self._reading:
            await self._read_until(ev)
            return
        self._parked[ev] = None
        try:
            await ev.wait()
        except BaseException:
            # Cancelled, perhaps just as the role was handed to us: hand it on.
            del self._parked[ev]
            if not self._reading:
                self._pass_role()
            raise
        del self._parked[ev]

    def _deadline(self) -> float:
        """When the oldest task waited for times out (inf: none)."""
        oldest = min((t.started for t in self.conn.tasks.values() if not t.abandoned), default=None)
        return math.inf if oldest is None else oldest + self.options.command_timeout

    def _watch(self, t: Task) -> None:
        """A new task: the reader's deadline covers it too."""
        t.started = trio.current_time()
        due = t.started + self.options.command_timeout
        if due < self._due:
            self._due = due
            scope = self._read_scope
            if scope is not None:
                scope.deadline = due

    async def _read_until(self, ev: trio.Event | None) -> None:
        """Hold the reader role until ev is set (None: until the session ends)."""
        self._reading = True
        try:
            n = 0
            while (ev is None or not ev.is_set()) and self.dead is None:
                # _due is never later than the true deadline (tasks only end after it was
                # set): when it passes, the tasks are looked at and it moves on.
                with trio.CancelScope(deadline=self._due) as scope:
                    self._read_scope = scope
                    while (ev is None or not ev.is_set()) and self.dead is None:
                        n += 1
                        # Receives do not yield while data is there: let the woken tasks
                        # run (and the rest of the program, now and then).
                        if await self._pump() or n % 64 == 0:
                            await trio.lowlevel.checkpoint()
                self._read_scope = None
                if not scope.cancelled_caught:
                    continue
                self._due = self._deadline()
                if trio.current_time() >= self._due:
                    limit = self.options.command_timeout
                    err = DeviceTimeoutError(
                        f"iSCSI target {self.target} at {self.portal} did not answer a command "
                        f"within {limit:g} s"
                    )
                    log.warning("%s", err)
                    self.abort(err)
        finally:
            self._read_scope = None
            self._reading = False
            self._last_read = trio.current_time()
            self._pass_role()

    def _pass_role(self) -> None:
        """Wake a parked waiter that still needs the target (it takes the reader role)."""
        for other in self._parked:
            if not other.is_set():
                other.set()
                return

    async def _pump(self) -> bool:
        """Receive once and act on what it completed; True if it woke a task."""
        conn = self.conn
        stream = self.stream
        try:
            n = stream.try_recv_into(conn.receive_buffers())
            if not n:
                await stream.wait_readable()
                return False
            events = conn.received(n)
        except (OSError, MemberIOError) as e:
            err = _lost(e, self.portal)
            if not (self.closed or self.closing or self.dead is not None):
                log.warning("iSCSI %s at %s: %s", self.target, self.portal, err)
            self.abort(err)
            return True
        if not events:
            return False
        self._dispatch(events)
        if self._outbox and self.dead is None:
            await self._flush_outbox()
        return True

    def _dispatch(self, events: list) -> None:
        """Act on the connection's events: wake tasks, open the window, queue answers, fail."""
        for ev in events:
            if isinstance(ev, TaskDone):
                w = ev.task.wake
                if w is not None:
                    w.task_done()
            elif isinstance(ev, R2TReceived):
                w = ev.task.wake
                if w is not None:
                    w.set()
            elif isinstance(ev, WindowOpened):
                self._open_window()
            elif isinstance(ev, TargetPing | Send):
                self._outbox.append(ev if isinstance(ev, TargetPing) else ev.parts)
            elif isinstance(ev, Rejected):
                # At ERL 0 a rejected PDU leaves its task in an unknown state: start over.
                self.abort(ProtocolError(f"target rejected a PDU (reason 0x{ev.reason:02x})"))
            elif isinstance(ev, AsyncMessage) and ev.ends_session:
                # Target asks for logout / drops the connection or session: reconnect.
                self.abort(ConnectionLostError(
                    f"target {self.target} asked to end the session (async event {ev.code})"))

    def refresh(self) -> bool:
        """Whether the session is alive, after taking in (without waiting) what the target sent
        while nobody received: its pings (answered with the next command) or its closing the
        connection. Only after a quiet spell; cheap otherwise."""
        if self._reading or self.dead is not None or self.stream is None:
            return self.alive
        now = trio.current_time()
        if now - self._last_read < _QUIET:
            return self.alive
        self._last_read = now
        try:
            while n := self.stream.try_recv_into(self.conn.receive_buffers()):
                self._dispatch(self.conn.received(n))
        except (OSError, MemberIOError) as e:
            err = _lost(e, self.portal)
            log.info("iSCSI %s at %s: idle connection gone: %s", self.target, self.portal, err)
            self.abort(err)
        return self.alive

    async def _flush_outbox(self) -> None:
        """Answer pings now if nobody is sending; otherwise the next sender takes them along."""
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            return
        try:
            # Not torn by the reader's deadline (that would cost the connection); bounded.
            with trio.CancelScope(shield=True), trio.move_on_after(self.options.command_timeout):
                await self._send_locked([])
        except MemberIOError:
            pass  # the session is aborted; waiters see it
        finally:
            self._send_lock.release()

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Receive for everybody until the session ends (the optional background reader)."""
        task_status.started()
        while self.dead is None and not self.closed:
            if self._reading:
                ev = trio.Event()
                await self._wait(ev)
                continue
            await self._read_until(None)

    async def _wait_task(self, t: Task) -> None:
        """Wait until one task has ended (the session failing ends it too)."""
        while not t.done:
            w = t.wake = _Waiter(1)
            await self._wait(w.event)

    # ------------------------------------------------------------ login

    async def connect(self, *, discovery: bool = False) -> None:
        """Open the connection and log in; raises AuthError, NotFoundError, ProtocolError, ..."""
        opts = self.options
        try:
            self.stream = await open_stream(self.host, self.port, timeout=opts.login_timeout,
                                            buffer_size=_SOCKET_BUFFER)
        except TimeoutError:
            raise DeviceTimeoutError(
                f"connecting to iSCSI portal {self.portal} timed out after {opts.login_timeout:g} s"
            ) from None
        except OSError as e:
            raise ConnectionLostError(
                f"cannot connect to iSCSI portal {self.portal}: {e.strerror or e}"
            ) from e
        try:
            with trio.fail_after(opts.login_timeout):
                await self._login(discovery)
        except trio.TooSlowError:
            self.stream.close()
            raise DeviceTimeoutError(
                f"login to iSCSI target {self.target or '(discovery)'} at {self.portal} "
                f"timed out after {opts.login_timeout:g} s"
            ) from None
        except OSError as e:
            self.stream.close()
            raise _lost(e, self.portal) from e
        except BaseException:
            self.stream.close()
            raise

    async def _login(self, discovery: bool) -> None:
        conn, stream = self.conn, self.stream
        await stream.send_all(conn.start_login(discovery=discovery))
        while not conn.logged_in:
            n = await stream.recv_into(conn.receive_buffers())
            for ev in conn.received(n):
                if isinstance(ev, Send):
                    await stream.send_all(ev.parts)

    # ------------------------------------------------------------ discovery, logout

    async def send_targets(self) -> list[tuple[str, list[str]]]:
        """SendTargets=All on a discovery session: [(target name, [addresses])]."""
        t = Task()
        parts = self.conn.text_request(t, [("SendTargets", "All")])
        self._watch(t)
        try:
            await self._send(parts)
            await self._wait_task(t)
        finally:
            self.conn.forget(t)
        if t.error is not None:
            raise t.error
        return parse_send_targets(t.text)

    async def logout_sync(self) -> None:
        """Log out a discovery session and close it."""
        await self.logout()

    async def logout(self, timeout: float = 5.0) -> None:
        """Log out and close."""
        if self.alive:
            self.closing = True
            t = Task()
            with trio.move_on_after(timeout):
                try:
                    parts = self.conn.logout(t)
                    self._watch(t)
                    await self._send(parts)
                    await self._wait_task(t)
                except MemberIOError:
                    pass
            self.conn.forget(t)
        self.close()

    # ------------------------------------------------------------ commands

    async def ping(self) -> None:
        """NOP-Out with a real ITT; returns when the target answers."""
        self._check_alive()
        t = Task()
        try:
            await self._lock()
            try:
                self._check_alive()
                parts = self.conn.ping(t)
                self._watch(t)
                await self._send_locked(parts)
            finally:
                self._send_lock.release()
            await self._wait_task(t)
        finally:
            self.conn.forget(t)
        if t.error is not None:
            raise t.error

    async def command(self, lun: int, cdb: bytes, *, read_buf=None, write_buf=None) -> Completion:
        """Run one SCSI command; read_buf/write_buf are uint8 memoryviews of the transfer."""
        t = await self.submit(lun, cdb, read_buf=read_buf, write_buf=write_buf)
        await self.finish([t])
        if t.error is not None:
            raise t.error
        return t.completion

    async def submit(self, lun: int, cdb: bytes, *, read_buf=None, write_buf=None) -> Task:
        """Send a SCSI command (and its immediate/unsolicited data); ``finish`` waits for it."""
        t = Task(lun, read_buf, write_buf)
        conn = self.conn
        # Wait for room in the CmdSN window, then send under the lock so CmdSN
        # order matches wire order. Never wait for the window while holding the
        # lock: Data-Out answering R2Ts of earlier commands (which open it) needs it.
        while True:
            self._check_alive()
            if not conn.window_open:
                self.window_waits += 1
                ev = trio.Event()
                self._window_waiters.append(ev)
                await self._wait(ev)
                continue
            await self._lock()
            if conn.window_open and self.dead is None:
                break
            self._send_lock.release()
        try:
            parts = conn.command(t, cdb)
            self._watch(t)
            await self._send_locked(parts)
        finally:
            self._send_lock.release()
        return t

    async def finish(self, tasks: list[Task]) -> None:
        """Serve R2Ts of the submitted tasks until every one has ended (its error or completion set)."""
        conn = self.conn
        try:
            while True:
                # Install a fresh waiter before looking at the state, so a wake-up
                # while we send Data-Out is never lost. It wakes us on an R2T or
                # when every command has ended, not for each one.
                w = _Waiter(sum(not t.done for t in tasks))
                for t in tasks:
                    t.wake = w
                for t in tasks:
                    while t.r2ts and not t.done:
                        outs = conn.next_data_out(t)
                        await self._lock()
                        try:
                            self._check_alive()
                            await self._send_locked(outs)
                        finally:
                            self._send_lock.release()
                if all(t.done for t in tasks):
                    return
                await self._wait(w.event)
        except BaseException:
            for t in tasks:
                if not t.done:
                    # Cancelled (or failed) mid-command. A write the target still waits
                    # on would hold its task forever: drop the connection (ERL 0 cleans up).
                    if t.write_buf is not None:
                        self.abort(ConnectionLostError("a write was abandoned mid-transfer"))
                    else:
                        t.abandoned = True
            raise


async def discovery_targets(
    host: str, port: int, options: Options, credentials: Credentials | None = None
) -> list[tuple[str, list[str]]]:
    """Log in for discovery, SendTargets=All, log out."""
    s = Session(host, port, None, options, credentials=credentials)
    await s.connect(discovery=True)
    try:
        with trio.fail_after(options.login_timeout):
            return await s.send_targets()
    except trio.TooSlowError:
        raise DeviceTimeoutError(f"SendTargets at {host}:{port} timed out") from None
    finally:
        await s.logout_sync()
