"""The client against a running daemon: acks with executions, nacks raised with their
code, the in-flight window, retried rate limits, commands and their acks, TLS, ping,
and the daemon's error lines.

Needs BOTFLOW_SOCKET, BOTFLOW_TCP (host:port, TLS), BOTFLOW_CA_FILE, BOTFLOW_TOKEN,
BOTFLOW_CHATBOT (workflows `load` on x.load and `echo`, a reply, on messages with
"echo"), BOTFLOW_LIMITED_CHATBOT (2 events per second) and BOTFLOW_MAX_IN_FLIGHT;
skipped without them.
"""

from __future__ import annotations

import asyncio
import ssl
import unittest
import uuid

from botflow_client import Client, DaemonError, Nacked

from .support import DEADLINE, env, event, eventually, unique

SOCKET = env("BOTFLOW_SOCKET")
TCP = env("BOTFLOW_TCP")
CA_FILE = env("BOTFLOW_CA_FILE")
TOKEN = env("BOTFLOW_TOKEN")
CHATBOT = env("BOTFLOW_CHATBOT")
LIMITED = env("BOTFLOW_LIMITED_CHATBOT")
MAX_IN_FLIGHT = int(env("BOTFLOW_MAX_IN_FLIGHT") or 0)


@unittest.skipUnless(SOCKET and TCP and TOKEN and CHATBOT and LIMITED,
                     "needs a daemon (run by tests/clients.rs)")
class AgainstTheDaemon(unittest.IsolatedAsyncioTestCase):

    async def asyncSetUp(self):
        self.clients: list[Client] = []

    async def asyncTearDown(self):
        for c in self.clients:
            await c.close()

    async def unix(self, **options) -> Client:
        c = await Client.connect_unix(SOCKET, TOKEN, **options)
        self.clients.append(c)
        return c

    async def tls(self, **options) -> Client:
        host, port = TCP.rsplit(":", 1)
        context = ssl.create_default_context(cafile=CA_FILE)
        c = await Client.connect_tcp(host, int(port), TOKEN, tls=context, **options)
        self.clients.append(c)
        return c

    async def test_an_event_is_acked_with_its_executions_and_again_as_a_duplicate(self):
        c = await self.unix()
        self.assertEqual(c.max_in_flight, MAX_IN_FLIGHT)
        eid = unique("ack")
        ack = await asyncio.wait_for(c.send(event(eid, CHATBOT)), DEADLINE)
        self.assertEqual(ack.event_id, eid)
        self.assertFalse(ack.duplicate)
        self.assertEqual(len(ack.executions), 1, ack)
        uuid.UUID(ack.executions[0].execution_id)
        again = await asyncio.wait_for(c.send(event(eid, CHATBOT)), DEADLINE)
        self.assertTrue(again.duplicate)
        self.assertEqual(again.executions, ack.executions)
        # An event no workflow matches is acked with none.
        none = await asyncio.wait_for(c.send(event(unique("none"), CHATBOT, "x.nothing")), DEADLINE)
        self.assertEqual(none.executions, ())

    async def test_nacks_raise_with_their_code_and_field(self):
        c = await self.unix()
        with self.assertRaises(Nacked) as caught:
            await asyncio.wait_for(c.send(event(unique("nobody"), str(uuid.uuid4()))), DEADLINE)
        self.assertEqual(caught.exception.code, "unknown_chatbot")
        with self.assertRaises(Nacked) as caught:
            await asyncio.wait_for(
                c.send(event(unique("bad"), CHATBOT, "message.received", {"sender": "user"})), DEADLINE)
        self.assertEqual(caught.exception.code, "invalid_event")
        self.assertEqual(caught.exception.field, "data.text")
        self.assertEqual(c.stats["retried"], 0, "these codes are not retried")
        # The connection goes on after nacks.
        ack = await asyncio.wait_for(c.send(event(unique("after"), CHATBOT)), DEADLINE)
        self.assertEqual(len(ack.executions), 1)
        # An id the daemon could not echo back is refused before it is sent.
        with self.assertRaises(ValueError):
            await c.send(event("x" * 300, CHATBOT))

    async def test_many_concurrent_sends_stay_within_max_in_flight_and_are_all_acked(self):
        c = await self.unix()
        window = c.max_in_flight
        self.assertEqual(window, MAX_IN_FLIGHT)
        peak = 0

        async def one(i):
            nonlocal peak
            ack = await c.send(event(unique(f"many{i}"), CHATBOT))
            peak = max(peak, c.in_flight)
            return ack

        acks = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), DEADLINE)
        self.assertEqual(len(acks), 200)
        self.assertTrue(all(len(a.executions) == 1 for a in acks))
        self.assertEqual(c.stats["peak_in_flight"], window, "the window was filled, never passed")
        self.assertLessEqual(peak, window)
        self.assertEqual(c.in_flight, 0)

    async def test_rate_limited_events_are_retried_after_the_hint_and_acked(self):
        c = await self.unix()
        ids = [unique(f"limited{i}") for i in range(6)]
        acks = await asyncio.wait_for(
            asyncio.gather(*(c.send(event(i, LIMITED)) for i in ids)), DEADLINE)
        self.assertEqual([a.event_id for a in acks], ids)
        self.assertGreater(sum(a.retries for a in acks), 0, "a burst of 6 over a limit of 2 was limited")
        self.assertEqual(c.stats["retried"], sum(a.retries for a in acks))

    async def test_rate_limited_past_max_retries_raises_with_the_hint(self):
        c = await self.unix(max_retries=0)
        results = await asyncio.wait_for(
            c.send_many([event(unique(f"nolimit{i}"), LIMITED) for i in range(6)]), DEADLINE)
        refused = [r for r in results if isinstance(r, Nacked)]
        self.assertTrue(refused, results)
        for r in refused:
            self.assertEqual(r.code, "rate_limited")
            self.assertGreater(r.retry_after_ms, 0)

    async def test_a_reply_command_arrives_and_is_acked(self):
        c = await self.unix(subscribe=[CHATBOT])
        conversation = unique("conv-cmd")
        ack = await asyncio.wait_for(
            c.send(event(unique("echo"), CHATBOT, "message.received",
                         {"text": "please echo this"}, conversation)), DEADLINE)
        self.assertEqual(len(ack.executions), 1)

        async def first_of_conversation():
            async for cmd in c.commands():
                await cmd.ack()  # every command of the chatbot: none is left pending
                if cmd.conversation_id == conversation:
                    return cmd

        cmd = await asyncio.wait_for(first_of_conversation(), DEADLINE)
        self.assertEqual(cmd.kind, "reply")
        self.assertEqual(cmd.chatbot_id, CHATBOT)
        self.assertEqual(cmd.execution_id, ack.executions[0].execution_id)
        self.assertEqual(cmd.payload, {"text": "echo: please echo this"})
        self.assertTrue(cmd.command_id.startswith(cmd.execution_id + ":"))

    async def test_over_tls_with_a_command_callback_and_ping(self):
        got: asyncio.Queue = asyncio.Queue()

        async def on_command(cmd):
            await cmd.ack()
            await got.put(cmd)

        c = await self.tls(subscribe=[CHATBOT], on_command=on_command)
        await asyncio.wait_for(c.ping(), DEADLINE)
        conversation = unique("conv-tls")
        ack = await asyncio.wait_for(
            c.send(event(unique("tls"), CHATBOT, "message.received", {"text": "echo over tls"},
                         conversation)), DEADLINE)
        self.assertEqual(len(ack.executions), 1)
        while True:
            cmd = await asyncio.wait_for(got.get(), DEADLINE)
            if cmd.conversation_id == conversation:
                break
        self.assertEqual(cmd.payload, {"text": "echo: echo over tls"})

    async def test_a_tls_client_that_does_not_trust_the_certificate_cannot_connect(self):
        host, port = TCP.rsplit(":", 1)
        with self.assertRaises(ssl.SSLError):
            await Client.connect_tcp(host, int(port), TOKEN, tls=ssl.create_default_context())

    async def test_a_wrong_token_is_refused_with_its_code(self):
        with self.assertRaises(DaemonError) as caught:
            await Client.connect_unix(SOCKET, "not-a-key")
        self.assertEqual(caught.exception.code, "unauthenticated")

    async def test_a_refused_subscription_surfaces_as_an_error_with_its_code(self):
        seen: list[DaemonError] = []
        c = await self.unix(subscribe=[str(uuid.uuid4())], on_error=seen.append)
        await eventually("the subscription's error line", lambda: seen)
        self.assertEqual(seen[0].code, "unknown_chatbot")
        self.assertEqual(list(c.errors), seen)
        # The connection goes on.
        ack = await asyncio.wait_for(c.send(event(unique("kept"), CHATBOT)), DEADLINE)
        self.assertEqual(len(ack.executions), 1)

if __name__ == "__main__":
    unittest.main()
