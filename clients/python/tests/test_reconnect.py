"""The client across a daemon's crash: events written but not answered when the daemon
dies are sent again on the next connection and acked once, and a command that was not
acked comes again and can be acked then.

Needs BOTFLOW_DAEMON_PID (a `botflow serve` that tests/clients.rs starts again
when it exits), BOTFLOW_SOCKET, BOTFLOW_TOKEN and BOTFLOW_CHATBOT (a workflow on x.go
replying "done <event id>"); skipped without them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import unittest

from botflow_client import Ack, Client

from .support import DEADLINE, env, event, eventually, unique

PID = int(env("BOTFLOW_DAEMON_PID") or 0)
SOCKET = env("BOTFLOW_SOCKET")
TOKEN = env("BOTFLOW_TOKEN")
CHATBOT = env("BOTFLOW_CHATBOT")


@unittest.skipUnless(PID and SOCKET and TOKEN and CHATBOT,
                     "needs a daemon it may kill (run by tests/clients.rs)")
class AcrossARestart(unittest.IsolatedAsyncioTestCase):

    async def test_unanswered_events_are_resent_and_an_unacked_command_comes_again(self):
        c = await Client.connect_unix(SOCKET, TOKEN, subscribe=[CHATBOT],
                                      reconnect_initial_delay=0.05, reconnect_max_delay=0.5)
        try:
            await self.run_it(c)
        finally:
            await c.close()

    async def run_it(self, c: Client):
        before = unique("before")
        deliveries: dict[str, int] = {}  # reply text -> times delivered

        async def handle():
            async for cmd in c.commands():
                text = cmd.payload.get("text", "")
                deliveries[text] = deliveries.get(text, 0) + 1
                # The first command is left unacked until it comes again.
                if text != f"done {before}" or deliveries[text] > 1:
                    await cmd.ack()

        handler = asyncio.create_task(handle())
        first = await asyncio.wait_for(c.send(event(before, CHATBOT, "x.go")), DEADLINE)
        self.assertEqual(len(first.executions), 1)
        await eventually("the first command", lambda: deliveries.get(f"done {before}"))

        # Stopped, the daemon reads nothing more: the next events are written and stay
        # unanswered until it is killed.
        os.kill(PID, signal.SIGSTOP)
        ids = [unique(f"during{i}") for i in range(30)]
        try:
            sends = [asyncio.create_task(c.send(event(i, CHATBOT, "x.go"))) for i in ids]
            await eventually("30 events written", lambda: c.in_flight == len(ids))
        finally:
            os.kill(PID, signal.SIGKILL)

        results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 45)
        for eid, r in zip(ids, results):
            self.assertIsInstance(r, Ack, f"{eid}: {r!r}")
            self.assertEqual(len(r.executions), 1, r)
        self.assertGreaterEqual(c.stats["reconnects"], 1)
        self.assertGreaterEqual(c.stats["resent"], len(ids))

        await eventually("a reply for every event, and the unacked one again", lambda: (
            all(deliveries.get(f"done {i}") for i in ids) and deliveries.get(f"done {before}", 0) >= 2),
            deadline=45)
        # A resent event that was committed is a duplicate with its first execution.
        again = await asyncio.wait_for(c.send(event(before, CHATBOT, "x.go")), DEADLINE)
        self.assertTrue(again.duplicate)
        self.assertEqual(again.executions, first.executions)
        handler.cancel()


if __name__ == "__main__":
    unittest.main()
