"""The client against a scripted stand-in for the daemon, for what a real daemon does
not do on demand: a nack's retry hint honoured, answers withheld, a connection dropped
at a chosen moment, a reconnect refused for good, a command redelivered after its ack.
Needs no daemon."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import unittest

from botflow_client import Ack, Client, DaemonError, Nacked

from .support import DEADLINE, event, eventually


class FakeDaemon:
    """A Unix socket server; each connection is handled by the next coroutine of
    `script` (called with a `Conn`), after the hello is read and answered."""

    def __init__(self, script, max_in_flight: int = 16, refuse_after: int | None = None):
        self.script = list(script)
        self.max_in_flight = max_in_flight
        self.refuse_after = refuse_after
        self.connections = 0
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "fake.sock")
        self.server = None

    async def __aenter__(self):
        self.server = await asyncio.start_unix_server(self.serve, self.path)
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        self.dir.cleanup()

    async def serve(self, reader, writer):
        conn = Conn(reader, writer)
        self.connections += 1
        hello = await conn.recv()
        assert hello["op"] == "hello", hello
        if self.refuse_after is not None and self.connections > self.refuse_after:
            await conn.send({"op": "error", "error": {"code": "unauthenticated", "message": "no"}})
            writer.close()
            return
        await conn.send({"op": "welcome", "version": 1, "max_in_flight": self.max_in_flight,
                         "max_frame_bytes": 1 << 20})
        if self.script:
            try:
                await self.script.pop(0)(conn)
            except (ConnectionError, asyncio.CancelledError):
                pass  # the client went away, as some tests make it
            finally:
                writer.close()


class Conn:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    async def recv(self) -> dict:
        line = await asyncio.wait_for(self.reader.readline(), DEADLINE)
        if not line:
            raise ConnectionError("client closed")
        return json.loads(line)

    async def send(self, msg: dict) -> None:
        self.writer.write(json.dumps(msg).encode() + b"\n")
        await self.writer.drain()

    async def ack(self, event_id: str) -> None:
        await self.send({"op": "ack", "id": event_id, "executions": [], "duplicate": False})


def bot() -> str:
    return "00000000-0000-0000-0000-000000000001"


class AgainstAStandIn(unittest.IsolatedAsyncioTestCase):

    async def connect(self, fake: FakeDaemon, **options) -> Client:
        options.setdefault("reconnect_initial_delay", 0.01)
        c = await Client.connect_unix(fake.path, "key", **options)
        self.addAsyncCleanup(c.close)
        return c

    async def test_a_rate_limited_nack_is_sent_again_after_its_hint(self):
        seen = []

        async def script(conn):
            e = await conn.recv()
            seen.append(time.monotonic())
            await conn.send({"op": "nack", "id": e["id"],
                             "error": {"code": "rate_limited", "message": "slow down", "retry_after_ms": 300}})
            e = await conn.recv()
            seen.append(time.monotonic())
            await conn.ack(e["id"])
            await asyncio.sleep(DEADLINE)

        async with FakeDaemon([script]) as fake:
            c = await self.connect(fake)
            ack = await asyncio.wait_for(c.send(event("e1", bot())), DEADLINE)
        self.assertEqual(ack.retries, 1)
        self.assertGreaterEqual(seen[1] - seen[0], 0.29, "sent again before retry_after_ms")

    async def test_unavailable_without_a_hint_backs_off_and_the_retries_are_bounded(self):
        async def script(conn):
            while True:
                e = await conn.recv()
                await conn.send({"op": "nack", "id": e["id"], "error": {"code": "unavailable", "message": "db"}})

        async with FakeDaemon([script]) as fake:
            c = await self.connect(fake, max_retries=3, retry_default_ms=10)
            with self.assertRaises(Nacked) as caught:
                await asyncio.wait_for(c.send(event("e1", bot())), DEADLINE)
        self.assertEqual(caught.exception.code, "unavailable")
        self.assertEqual(c.stats["retried"], 3)

    async def test_unanswered_events_are_resent_in_order_with_their_ids_after_a_reconnect(self):
        first_ids, second_ids = [], []

        async def drop(conn):
            for _ in range(3):
                first_ids.append((await conn.recv())["id"])
            # Closed without answering: the events are lost with the connection.

        async def answer(conn):
            for _ in range(3):
                e = await conn.recv()
                second_ids.append(e["id"])
                await conn.ack(e["id"])
            await asyncio.sleep(DEADLINE)

        async with FakeDaemon([drop, answer]) as fake:
            c = await self.connect(fake)
            acks = await asyncio.wait_for(
                asyncio.gather(*(c.send(event(f"e{i}", bot())) for i in range(3))), DEADLINE)
        self.assertEqual([a.event_id for a in acks], ["e0", "e1", "e2"])
        self.assertEqual(first_ids, ["e0", "e1", "e2"])
        self.assertEqual(second_ids, first_ids)
        self.assertEqual(c.stats["resent"], 3)
        self.assertEqual(c.stats["reconnects"], 1)

    async def test_the_window_is_the_welcomes_max_in_flight(self):
        most = 0

        async def script(conn):
            nonlocal most
            unanswered, answered = [], 0
            while answered < 6:
                try:
                    unanswered.append((await asyncio.wait_for(conn.recv(), 0.2))["id"])
                    most = max(most, len(unanswered))
                except asyncio.TimeoutError:
                    # Nothing more comes: the window is full (or all is sent); answer one.
                    if unanswered:
                        await conn.ack(unanswered.pop(0))
                        answered += 1
            await asyncio.sleep(DEADLINE)

        async with FakeDaemon([script], max_in_flight=2) as fake:
            c = await self.connect(fake)
            acks = await asyncio.wait_for(
                asyncio.gather(*(c.send(event(f"e{i}", bot())) for i in range(6))), DEADLINE)
        self.assertEqual(len(acks), 6)
        self.assertEqual(most, 2, "the client wrote more than max_in_flight unanswered events")

    async def test_a_command_redelivered_after_its_ack_is_acked_again_not_handed_out(self):
        command = {"op": "command", "command_id": "x:say", "chatbot_id": bot(), "conversation_id": "c",
                   "kind": "reply", "payload": {"text": "hi"}, "execution_id": "x"}
        acks = []

        async def first(conn):
            await conn.send(command)
            acks.append((await conn.recv())["command_id"])

        async def second(conn):
            await conn.send(command)
            acks.append((await conn.recv())["command_id"])
            await asyncio.sleep(DEADLINE)

        async with FakeDaemon([first, second]) as fake:
            c = await self.connect(fake)
            got = []

            async def handle():
                async for cmd in c.commands():
                    got.append(cmd)
                    await cmd.ack()

            task = asyncio.create_task(handle())
            await eventually("both acks", lambda: len(acks) == 2)
            task.cancel()
        self.assertEqual(acks, ["x:say", "x:say"])
        self.assertEqual(len(got), 1, "a redelivery of an acked command was handed out again")

    async def test_a_reconnect_refused_for_good_fails_the_waiting_sends(self):
        async def drop(conn):
            await conn.recv()

        async with FakeDaemon([drop], refuse_after=1) as fake:
            c = await self.connect(fake)
            with self.assertRaises(DaemonError) as caught, self.assertLogs("botflow_client", "ERROR"):
                await asyncio.wait_for(c.send(event("e1", bot())), DEADLINE)
        self.assertEqual(caught.exception.code, "unauthenticated")
        with self.assertRaises(DaemonError):
            await c.send(event("e2", bot()))

    async def test_without_reconnect_a_lost_connection_fails_the_waiting_sends(self):
        from botflow_client import ConnectionClosed

        async def drop(conn):
            await conn.recv()

        async with FakeDaemon([drop]) as fake:
            c = await self.connect(fake, reconnect=False)
            with self.assertRaises(ConnectionClosed):
                await asyncio.wait_for(c.send(event("e1", bot())), DEADLINE)


if __name__ == "__main__":
    unittest.main()
