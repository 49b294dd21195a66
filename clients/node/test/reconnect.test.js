// The client across a daemon's crash: events written but not answered when the daemon
// dies are sent again on the next connection and acked once, and a command that was not
// acked comes again and can be acked then.
//
// Needs BOTFLOW_DAEMON_PID (a `botflow serve` that tests/clients.rs starts again when
// it exits), BOTFLOW_SOCKET, BOTFLOW_TOKEN and BOTFLOW_CHATBOT (a workflow on x.go
// replying "done <event id>"); skipped without them.

import assert from "node:assert/strict";
import { test } from "node:test";

import { Client } from "../index.js";
import { env, event, eventually, unique, within } from "./support.js";

const PID = Number(env("BOTFLOW_DAEMON_PID") ?? 0);
const SOCKET = env("BOTFLOW_SOCKET");
const TOKEN = env("BOTFLOW_TOKEN");
const CHATBOT = env("BOTFLOW_CHATBOT");

const ready = PID && SOCKET && TOKEN && CHATBOT;

test("unanswered events are resent and an unacked command comes again",
  { skip: !ready && "needs a daemon it may kill (run by tests/clients.rs)" }, async () => {
    const c = await Client.connectUnix(SOCKET, TOKEN, {
      subscribe: [CHATBOT], reconnectInitialDelayMs: 50, reconnectMaxDelayMs: 500,
    });
    try {
      await acrossARestart(c);
    } finally {
      await c.close();
    }
  });

async function acrossARestart(c) {
  const before = unique("before");
  const deliveries = new Map(); // reply text -> times delivered
  const handler = (async () => {
    for await (const cmd of c.commands()) {
      const text = cmd.payload.text ?? "";
      deliveries.set(text, (deliveries.get(text) ?? 0) + 1);
      // The first command is left unacked until it comes again.
      if (text !== `done ${before}` || deliveries.get(text) > 1) await cmd.ack();
    }
  })();

  const first = await within(c.send(event(before, CHATBOT, "x.go")), "the first ack");
  assert.equal(first.executions.length, 1);
  await eventually("the first command", () => deliveries.has(`done ${before}`));

  // Stopped, the daemon reads nothing more: the next events are written and stay
  // unanswered until it is killed.
  process.kill(PID, "SIGSTOP");
  const ids = Array.from({ length: 30 }, (_, i) => unique(`during${i}`));
  let sends;
  try {
    sends = ids.map((i) => c.send(event(i, CHATBOT, "x.go")));
    await eventually("30 events written", () => c.inFlight === ids.length);
  } finally {
    process.kill(PID, "SIGKILL");
  }

  const results = await within(Promise.allSettled(sends), "the answers after the restart", 45_000);
  results.forEach((r, i) => {
    assert.equal(r.status, "fulfilled", `${ids[i]}: ${r.reason}`);
    assert.equal(r.value.executions.length, 1, JSON.stringify(r.value));
  });
  assert.ok(c.stats.reconnects >= 1, JSON.stringify(c.stats));
  assert.ok(c.stats.resent >= ids.length, JSON.stringify(c.stats));

  await eventually("a reply for every event, and the unacked one again", () =>
    ids.every((i) => deliveries.has(`done ${i}`)) && (deliveries.get(`done ${before}`) ?? 0) >= 2, 45_000);
  // A resent event that was committed is a duplicate with its first execution.
  const again = await within(c.send(event(before, CHATBOT, "x.go")), "the duplicate's ack");
  assert.equal(again.duplicate, true);
  assert.deepEqual(again.executions, first.executions);
  await c.close();
  await handler; // the iterator ends with the client
}
