"""The asyncio client of wire protocol v1: one connection at a time to the daemon (Unix
socket, or TCP with optional TLS), the hello, the in-flight window, answers matched to
the events they are for, retries of retryable nacks, reconnecting with the resend of
every event not answered yet, commands and their acks, ping and pong.

Every event the caller hands to `send` stays in `_pending` until its final answer (an
ack, or a nack the client does not retry). That table is the whole delivery state: a
lost connection only turns its written entries back into queued ones, and the next
connection writes them again in the order they were first sent. The daemon's
deduplication by (chatbot, event id) makes the second copy of an event that was in
fact committed harmless: it is acked as a duplicate with the first executions.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import ssl
from collections import OrderedDict, deque
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

from .errors import ConnectionClosed, DaemonError, Nacked
from .types import Ack, Command

log = logging.getLogger("botflow_client")

PROTOCOL_VERSION = 1
# Nack codes that say "not now" rather than "never": the same event may succeed later.
RETRYABLE = frozenset({"rate_limited", "overloaded", "unavailable"})
# Handshake errors that the same hello will get again: reconnecting cannot help.
PERMANENT = frozenset({"unauthenticated", "forbidden", "unsupported_version"})
# Lines are read whole; the daemon's frames are at most max_frame_bytes (1 MiB by
# default) but a command carries a payload rendered by a workflow, so leave room.
READ_LIMIT = 64 * 1024 * 1024
# How many acked command ids are remembered to ack their redeliveries without
# handing them out again.
ACKED_MEMORY = 10_000
MAX_ID_BYTES = 256

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


def _encode(msg: Mapping[str, Any]) -> bytes:
    # ensure_ascii: a lone surrogate in a Python string becomes a \ud800 escape, which
    # the daemon nacks naming the field, instead of a UTF-8 encoding error here.
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def _check_id(event_id: Any) -> str:
    # An id the daemon cannot read is nacked without the id, and such a nack could not
    # be matched to its event: refuse it here.
    if not isinstance(event_id, str) or not event_id:
        raise ValueError("an event needs an \"id\" (a non-empty string)")
    if len(event_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise ValueError(f"event id {event_id[:40]!r}... is longer than {MAX_ID_BYTES} bytes")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in event_id):
        raise ValueError(f"event id {event_id!r} contains a control character")
    return event_id


class _Pending:
    """One event between `send` and its final answer."""

    __slots__ = ("event_id", "line", "future", "state", "retries", "timer")

    def __init__(self, event_id: str, line: bytes, future: asyncio.Future):
        self.event_id = event_id
        self.line = line
        self.future = future
        # "queued": to be written on the next (or current) connection;
        # "written": written on the current connection, answer awaited;
        # "waiting": nacked with a retryable code, written again when its timer fires.
        self.state = "queued"
        self.retries = 0
        self.timer: asyncio.TimerHandle | None = None


class Client:
    """A connection to botflow that survives the daemon's restarts.

    Create one with `await Client.connect_unix(...)` or `await Client.connect_tcp(...)`;
    it is connected and welcomed when they return. Use it as an async context manager
    or call `close()`.
    """

    def __init__(
        self,
        opener: Opener,
        token: str,
        *,
        subscribe: list[str] | tuple[str, ...] = (),
        client_name: str = "botflow-python",
        reconnect: bool = True,
        reconnect_initial_delay: float = 0.1,
        reconnect_max_delay: float = 5.0,
        retry_codes: frozenset[str] | set[str] = RETRYABLE,
        max_retries: int = 20,
        retry_default_ms: int = 100,
        retry_max_ms: int = 30_000,
        connect_timeout: float = 10.0,
        ping_interval: float | None = None,
        on_command: Callable[[Command], Any] | None = None,
        on_error: Callable[[DaemonError], Any] | None = None,
    ):
        self._opener = opener
        self._token = token
        self._subscribe = [str(s) for s in subscribe]
        self._client_name = client_name
        self._reconnect = reconnect
        self._reconnect_initial = reconnect_initial_delay
        self._reconnect_max = reconnect_max_delay
        self._retry_codes = frozenset(retry_codes)
        self._max_retries = max_retries
        self._retry_default_ms = retry_default_ms
        self._retry_max_ms = retry_max_ms
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._on_command = on_command
        self._on_error = on_error

        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._reconnect_task: asyncio.Task | None = None
        self._ping_task: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self._fatal: BaseException | None = None
        self._window: asyncio.Semaphore | None = None
        self._window_size = 0
        self._background: set[asyncio.Task] = set()
        self._pongs: deque[asyncio.Future] = deque()
        self._acked: OrderedDict[str, None] = OrderedDict()
        self._commands: asyncio.Queue = asyncio.Queue()
        self.max_in_flight = 0
        self.max_frame_bytes = 0
        # Error lines received after the handshake, newest last (bounded).
        self.errors: deque[DaemonError] = deque(maxlen=100)
        self.stats = {"sent": 0, "resent": 0, "retried": 0, "reconnects": 0, "peak_in_flight": 0}

    # ---------------------------------------------------------------- connecting

    @classmethod
    async def connect_unix(cls, path: str, token: str, **options: Any) -> "Client":
        """Connects over the daemon's Unix socket (`ingest.unix_socket`)."""
        async def opener():
            return await asyncio.open_unix_connection(str(path), limit=READ_LIMIT)
        client = cls(opener, token, **options)
        await client._start()
        return client

    @classmethod
    async def connect_tcp(cls, host: str, port: int, token: str, *,
                          tls: ssl.SSLContext | bool | None = None,
                          server_hostname: str | None = None, **options: Any) -> "Client":
        """Connects over TCP (`ingest.tcp`); with `tls` (an `ssl.SSLContext`, or True for
        the system's default context) over TLS, checking the certificate against
        `server_hostname` (default: `host`)."""
        context = ssl.create_default_context() if tls is True else (tls or None)

        async def opener():
            return await asyncio.open_connection(
                host, port, limit=READ_LIMIT, ssl=context,
                server_hostname=(server_hostname or host) if context else None)
        client = cls(opener, token, **options)
        await client._start()
        return client

    async def _start(self) -> None:
        # The first connection's failure is the caller's to see, never retried here.
        await self._open()
        if self._ping_interval:
            self._ping_task = asyncio.create_task(self._keepalive())

    async def _open(self) -> None:
        """One connection: open, hello, welcome; then the reader runs and every queued
        event is written."""
        reader, writer = await asyncio.wait_for(self._opener(), self._connect_timeout)
        try:
            hello = {"op": "hello", "version": PROTOCOL_VERSION, "token": self._token,
                     "client": self._client_name, "subscribe": self._subscribe}
            writer.write(_encode(hello))
            await writer.drain()
            welcome = await asyncio.wait_for(self._read_welcome(reader), self._connect_timeout)
        except BaseException:
            writer.close()
            raise
        if self._closed:
            # close() ran while this reconnect was under way.
            writer.close()
            raise ConnectionClosed("the client is closed")
        self.max_in_flight = int(welcome.get("max_in_flight") or 1)
        self.max_frame_bytes = int(welcome.get("max_frame_bytes") or 1 << 20)
        self._resize_window(self.max_in_flight)
        self._writer = writer
        self._connected.set()
        self._reader_task = asyncio.create_task(self._read_loop(reader, writer))
        self._flush()
        await self._drain()

    async def _read_welcome(self, reader: asyncio.StreamReader) -> dict:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("the daemon closed the connection during the handshake")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            op = msg.get("op")
            if op == "welcome":
                return msg
            if op == "error":
                # Our hello is well formed, so an error before the welcome refuses the
                # connection (the daemon closes it).
                err = msg.get("error") or {}
                raise DaemonError(err.get("code", "unknown"), err.get("message", ""))

    def _resize_window(self, size: int) -> None:
        if self._window is None:
            self._window = asyncio.Semaphore(size)
        elif size > self._window_size:
            for _ in range(size - self._window_size):
                self._window.release()
        elif size < self._window_size:
            # Take the surplus back as slots free up.
            self._spawn(self._shrink_window(self._window_size - size))
        self._window_size = size

    async def _shrink_window(self, n: int) -> None:
        for _ in range(n):
            await self._window.acquire()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ---------------------------------------------------------------- sending

    @property
    def in_flight(self) -> int:
        """Events sent and not finally answered yet (retries waiting included)."""
        return len(self._pending)

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def send(self, event: Mapping[str, Any]) -> Ack:
        """Sends one event and returns its `Ack` once its executions are committed.

        Waits while `max_in_flight` events are already unanswered. Nacks with a
        retryable code are sent again after the daemon's `retry_after_ms` (at most
        `max_retries` times); other nacks raise `Nacked`. While the connection is down
        the event waits for the next one. Cancelling the call stops the wait, not the
        delivery: the event is still written (again) until the daemon answers it.
        """
        self._check_open()
        msg = dict(event)
        msg["op"] = "event"
        event_id = _check_id(msg.get("id"))
        line = _encode(msg)
        if self.max_frame_bytes and len(line) - 1 > self.max_frame_bytes:
            raise ValueError(f"event {event_id!r} is {len(line) - 1} bytes, over the daemon's "
                             f"max_frame_bytes of {self.max_frame_bytes}")
        if event_id in self._pending:
            raise ValueError(f"event {event_id!r} is already in flight on this client")
        await self._window.acquire()
        if event_id in self._pending or self._closed:
            self._window.release()
            self._check_open()
            raise ValueError(f"event {event_id!r} is already in flight on this client")
        future = asyncio.get_running_loop().create_future()
        # A caller that stopped waiting (cancelled) never reads the outcome: mark it read
        # so asyncio does not report it as lost.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        p = _Pending(event_id, line, future)
        self._pending[event_id] = p
        self.stats["sent"] += 1
        self.stats["peak_in_flight"] = max(self.stats["peak_in_flight"], len(self._pending))
        self._write(p)
        await self._drain()
        return await asyncio.shield(future)

    async def send_many(self, events: list[Mapping[str, Any]]) -> list[Ack | BaseException]:
        """Sends events concurrently (within the window); answers in the same order,
        each an `Ack` or the exception its send raised."""
        return await asyncio.gather(*(self.send(e) for e in events), return_exceptions=True)

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise ConnectionClosed("the client is closed")

    def _write(self, p: _Pending) -> None:
        w = self._writer
        if w is None or w.is_closing() or p.state != "queued":
            return
        w.write(p.line)
        p.state = "written"

    def _flush(self) -> None:
        """Writes every queued event, in the order they were first sent."""
        for p in list(self._pending.values()):
            self._write(p)

    async def _drain(self) -> None:
        w = self._writer
        if w is None:
            return
        try:
            await w.drain()
        except (ConnectionError, OSError):
            # The reader sees the same loss and starts the reconnect.
            pass

    def _finish(self, p: _Pending) -> None:
        if self._pending.get(p.event_id) is p:
            del self._pending[p.event_id]
            self._window.release()
        if p.timer is not None:
            p.timer.cancel()

    # ---------------------------------------------------------------- reading

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line or not line.endswith(b"\n"):
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.warning("botflow sent a line that is not JSON: %r", line[:200])
                    continue
                self._dispatch(msg)
        except (ConnectionError, OSError, ValueError, asyncio.IncompleteReadError) as e:
            log.info("botflow connection lost: %s", e)
        finally:
            self._connection_lost(writer)

    def _dispatch(self, msg: dict) -> None:
        op = msg.get("op")
        if op == "ack":
            p = self._pending.get(msg.get("id"))
            if p is not None and p.state == "written":
                self._finish(p)
                if not p.future.done():
                    p.future.set_result(Ack.from_line(msg, p.retries))
        elif op == "nack":
            p = self._pending.get(msg.get("id"))
            if p is not None and p.state == "written":
                self._nacked(p, msg.get("error") or {})
        elif op == "command":
            self._command(msg)
        elif op == "error":
            err = msg.get("error") or {}
            self._error(DaemonError(err.get("code", "unknown"), err.get("message", "")))
        elif op == "pong":
            while self._pongs:
                f = self._pongs.popleft()
                if not f.done():
                    f.set_result(None)
                    break

    def _nacked(self, p: _Pending, error: dict) -> None:
        code = error.get("code", "unknown")
        hint = error.get("retry_after_ms")
        if code in self._retry_codes and p.retries < self._max_retries:
            p.retries += 1
            self.stats["retried"] += 1
            if isinstance(hint, (int, float)) and hint >= 0:
                wait_ms = hint
            else:
                wait_ms = self._retry_default_ms * 2 ** min(p.retries - 1, 16)
            wait_ms = min(wait_ms, self._retry_max_ms)
            p.state = "waiting"
            p.timer = asyncio.get_running_loop().call_later(wait_ms / 1000, self._retry_due, p)
            return
        self._finish(p)
        if not p.future.done():
            p.future.set_exception(Nacked(p.event_id, code, error.get("message", ""),
                                          error.get("field"), hint))

    def _retry_due(self, p: _Pending) -> None:
        p.timer = None
        if self._pending.get(p.event_id) is not p or p.state != "waiting":
            return
        p.state = "queued"
        self._write(p)
        self._spawn(self._drain())

    def _error(self, err: DaemonError) -> None:
        self.errors.append(err)
        if self._on_error is None:
            log.warning("botflow error line: %s", err)
            return
        try:
            result = self._on_error(err)
            if inspect.isawaitable(result):
                self._spawn(result)
        except Exception:
            log.exception("on_error raised")

    def _connection_lost(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        if self._writer is not writer:
            return
        self._writer = None
        self._connected.clear()
        resend = 0
        for p in self._pending.values():
            if p.state == "written":
                p.state = "queued"
                resend += 1
        self.stats["resent"] += resend
        while self._pongs:
            f = self._pongs.popleft()
            if not f.done():
                f.set_exception(ConnectionClosed("the connection was lost before the pong"))
        if self._closed:
            return
        if self._reconnect:
            self._reconnect_task = asyncio.create_task(self._reconnect_loop())
        else:
            self._shut(ConnectionClosed("the connection to botflow was lost"))

    async def _reconnect_loop(self) -> None:
        delay = self._reconnect_initial
        while not self._closed:
            # Full jitter, so that clients of a restarted daemon do not come back at once.
            await asyncio.sleep(random.uniform(delay / 2, delay))
            try:
                await self._open()
            except DaemonError as e:
                if e.code in PERMANENT:
                    log.error("botflow refused the reconnect: %s", e)
                    self._shut(e)
                    return
                log.info("botflow reconnect refused: %s", e)
            except ConnectionClosed:
                return
            except (OSError, ConnectionError, asyncio.TimeoutError) as e:
                log.info("botflow reconnect failed: %s", e)
            else:
                self.stats["reconnects"] += 1
                return
            delay = min(delay * 2, self._reconnect_max)

    # ---------------------------------------------------------------- commands

    def _command(self, msg: dict) -> None:
        command_id = msg.get("command_id")
        if not isinstance(command_id, str):
            return
        if command_id in self._acked:
            # A redelivery of a command already handled (the ack was lost with a
            # connection, or written before the daemon's restart): ack it again.
            self._spawn(self._send_ack(command_id))
            return
        cmd = Command.from_line(msg, self._ack_command)
        if self._on_command is None:
            self._commands.put_nowait(cmd)
            return
        try:
            result = self._on_command(cmd)
            if inspect.isawaitable(result):
                self._spawn(self._guard(result))
        except Exception:
            log.exception("on_command raised for %s", command_id)

    @staticmethod
    async def _guard(awaitable) -> None:
        try:
            await awaitable
        except Exception:
            log.exception("on_command raised")

    async def _ack_command(self, command_id: str) -> None:
        self._acked[command_id] = None
        self._acked.move_to_end(command_id)
        while len(self._acked) > ACKED_MEMORY:
            self._acked.popitem(last=False)
        await self._send_ack(command_id)

    async def _send_ack(self, command_id: str) -> None:
        w = self._writer
        if w is None or w.is_closing():
            return  # remembered in _acked; the redelivery is acked on the next connection
        w.write(_encode({"op": "ack", "command_id": command_id}))
        await self._drain()

    async def commands(self) -> AsyncIterator[Command]:
        """The commands for the subscribed chatbots, as they arrive (when no
        `on_command` callback was given); ends when the client closes."""
        while True:
            cmd = await self._commands.get()
            if cmd is None:
                return
            yield cmd

    # ---------------------------------------------------------------- ping, close

    async def ping(self, timeout: float = 10.0) -> None:
        """Round trip to the daemon; raises on timeout or a lost connection."""
        w = self._writer
        if w is None:
            raise ConnectionClosed("not connected")
        f = asyncio.get_running_loop().create_future()
        self._pongs.append(f)
        w.write(_encode({"op": "ping"}))
        await self._drain()
        await asyncio.wait_for(f, timeout)

    async def _keepalive(self) -> None:
        # A silent peer (a half-open TCP connection) is only noticed by asking it.
        while not self._closed:
            await asyncio.sleep(self._ping_interval)
            w = self._writer
            if w is None:
                continue
            try:
                await self.ping(timeout=self._ping_interval)
            except asyncio.TimeoutError:
                log.warning("botflow did not answer a ping; reconnecting")
                if w.transport is not None:
                    w.transport.abort()
            except ConnectionClosed:
                pass

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Waits until a connection is up and welcomed."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    def _shut(self, reason: BaseException) -> None:
        """Ends the client: no reconnect, every unanswered send raises `reason`."""
        self._closed = True
        if isinstance(reason, DaemonError):
            self._fatal = reason
        for p in list(self._pending.values()):
            self._finish(p)
            if not p.future.done():
                p.future.set_exception(reason)
        self._commands.put_nowait(None)

    async def close(self) -> None:
        """Closes the connection; sends still waiting for an answer raise
        `ConnectionClosed` (their events may or may not have been committed)."""
        if self._closed and self._writer is None:
            return
        self._shut(ConnectionClosed("the client is closed"))
        for task in (self._reconnect_task, self._ping_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        w = self._writer
        self._writer = None
        if w is not None:
            w.close()
            try:
                await w.wait_closed()
            except (ConnectionError, OSError, ssl.SSLError):
                pass
        if self._reader_task is not None:
            self._reader_task.cancel()
        for task in list(self._background):
            task.cancel()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
