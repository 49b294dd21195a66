// The client against a running daemon: acks with executions, nacks rejected with their
// code, the in-flight window, retried rate limits, commands and their acks, TLS, ping,
// and the daemon's error lines.
//
// Needs BOTFLOW_SOCKET, BOTFLOW_TCP (host:port, TLS), BOTFLOW_CA_FILE, BOTFLOW_TOKEN,
// BOTFLOW_CHATBOT (workflows `load` on x.load and `echo`, a reply, on messages with
// "echo"), BOTFLOW_LIMITED_CHATBOT (2 events per second) and BOTFLOW_MAX_IN_FLIGHT;
// skipped without them.

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { afterEach, describe, test } from "node:test";

import { Client, DaemonError, Nacked } from "../index.js";
import { env, event, eventually, unique, within } from "./support.js";

const SOCKET = env("BOTFLOW_SOCKET");
const TCP = env("BOTFLOW_TCP");
const CA_FILE = env("BOTFLOW_CA_FILE");
const TOKEN = env("BOTFLOW_TOKEN");
const CHATBOT = env("BOTFLOW_CHATBOT");
const LIMITED = env("BOTFLOW_LIMITED_CHATBOT");
const MAX_IN_FLIGHT = Number(env("BOTFLOW_MAX_IN_FLIGHT") ?? 0);

const ready = SOCKET && TCP && CA_FILE && TOKEN && CHATBOT && LIMITED;

function tcpAddress() {
  const at = TCP.lastIndexOf(":");
  return [TCP.slice(0, at), Number(TCP.slice(at + 1))];
}

describe("against the daemon", { skip: !ready && "needs a daemon (run by tests/clients.rs)" }, () => {
  let clients = [];

  afterEach(async () => {
    await Promise.all(clients.map((c) => c.close()));
    clients = [];
  });

  async function unix(options = {}) {
    const c = await Client.connectUnix(SOCKET, TOKEN, options);
    clients.push(c);
    return c;
  }

  async function overTls(options = {}) {
    const [host, port] = tcpAddress();
    const c = await Client.connectTcp(host, port, TOKEN, { tls: { ca: readFileSync(CA_FILE) }, ...options });
    clients.push(c);
    return c;
  }

  test("an event is acked with its executions, and again as a duplicate", async () => {
    const c = await unix();
    assert.equal(c.maxInFlight, MAX_IN_FLIGHT);
    const eid = unique("ack");
    const ack = await within(c.send(event(eid, CHATBOT)), "the ack");
    assert.equal(ack.eventId, eid);
    assert.equal(ack.duplicate, false);
    assert.equal(ack.executions.length, 1, JSON.stringify(ack));
    assert.match(ack.executions[0].executionId, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    const again = await within(c.send(event(eid, CHATBOT)), "the duplicate's ack");
    assert.equal(again.duplicate, true);
    assert.deepEqual(again.executions, ack.executions);
    // An event no workflow matches is acked with none.
    const none = await within(c.send(event(unique("none"), CHATBOT, "x.nothing")), "the ack of nothing");
    assert.deepEqual(none.executions, []);
  });

  test("nacks reject with their code and field", async () => {
    const c = await unix();
    await assert.rejects(within(c.send(event(unique("nobody"), randomUUID())), "the nack"),
      (e) => e instanceof Nacked && e.code === "unknown_chatbot");
    await assert.rejects(
      within(c.send(event(unique("bad"), CHATBOT, "message.received", { sender: "user" })), "the nack"),
      (e) => e instanceof Nacked && e.code === "invalid_event" && e.field === "data.text");
    assert.equal(c.stats.retried, 0, "these codes are not retried");
    // The connection goes on after nacks.
    const ack = await within(c.send(event(unique("after"), CHATBOT)), "the ack after nacks");
    assert.equal(ack.executions.length, 1);
    // An id the daemon could not echo back is refused before it is sent.
    await assert.rejects(c.send(event("x".repeat(300), CHATBOT)), RangeError);
  });

  test("many concurrent sends stay within max_in_flight and are all acked", async () => {
    const c = await unix();
    const window = c.maxInFlight;
    assert.equal(window, MAX_IN_FLIGHT);
    let peak = 0;
    const one = async (i) => {
      const ack = await c.send(event(unique(`many${i}`), CHATBOT));
      peak = Math.max(peak, c.inFlight);
      return ack;
    };
    const acks = await within(Promise.all(Array.from({ length: 200 }, (_, i) => one(i))), "200 acks");
    assert.equal(acks.length, 200);
    assert.ok(acks.every((a) => a.executions.length === 1));
    assert.equal(c.stats.peakInFlight, window, "the window was filled, never passed");
    assert.ok(peak <= window);
    assert.equal(c.inFlight, 0);
  });

  test("rate limited events are retried after the hint and acked", async () => {
    const c = await unix();
    const ids = Array.from({ length: 6 }, (_, i) => unique(`limited${i}`));
    const acks = await within(Promise.all(ids.map((i) => c.send(event(i, LIMITED)))), "6 acks");
    assert.deepEqual(acks.map((a) => a.eventId), ids);
    const retries = acks.reduce((n, a) => n + a.retries, 0);
    assert.ok(retries > 0, "a burst of 6 over a limit of 2 was limited");
    assert.equal(c.stats.retried, retries);
  });

  test("rate limited past maxRetries rejects with the hint", async () => {
    const c = await unix({ maxRetries: 0 });
    const results = await within(
      c.sendMany(Array.from({ length: 6 }, (_, i) => event(unique(`nolimit${i}`), LIMITED))), "6 answers");
    const refused = results.filter((r) => r instanceof Nacked);
    assert.ok(refused.length > 0, String(results));
    for (const r of refused) {
      assert.equal(r.code, "rate_limited");
      assert.ok(r.retryAfterMs > 0);
    }
  });

  test("a reply command arrives and is acked", async () => {
    const c = await unix({ subscribe: [CHATBOT] });
    const conversation = unique("conv-cmd");
    const ack = await within(c.send(event(unique("echo"), CHATBOT, "message.received",
      { text: "please echo this" }, conversation)), "the ack");
    assert.equal(ack.executions.length, 1);
    const firstOfConversation = async () => {
      for await (const cmd of c.commands()) {
        await cmd.ack(); // every command of the chatbot: none is left pending
        if (cmd.conversationId === conversation) return cmd;
      }
      throw new Error("the commands ended");
    };
    const cmd = await within(firstOfConversation(), "the reply command");
    assert.equal(cmd.kind, "reply");
    assert.equal(cmd.chatbotId, CHATBOT);
    assert.equal(cmd.executionId, ack.executions[0].executionId);
    assert.deepEqual(cmd.payload, { text: "echo: please echo this" });
    assert.ok(cmd.commandId.startsWith(`${cmd.executionId}:`), cmd.commandId);
  });

  test("over TLS with a command callback and ping", async () => {
    const got = [];
    const c = await overTls({
      subscribe: [CHATBOT],
      onCommand: async (cmd) => {
        await cmd.ack();
        got.push(cmd);
      },
    });
    await within(c.ping(), "the pong");
    const conversation = unique("conv-tls");
    const ack = await within(c.send(event(unique("tls"), CHATBOT, "message.received",
      { text: "echo over tls" }, conversation)), "the ack");
    assert.equal(ack.executions.length, 1);
    await eventually("the reply over TLS", () => got.some((cmd) => cmd.conversationId === conversation));
    const cmd = got.find((x) => x.conversationId === conversation);
    assert.deepEqual(cmd.payload, { text: "echo: echo over tls" });
  });

  test("a TLS client that does not trust the certificate cannot connect", async () => {
    const [host, port] = tcpAddress();
    await assert.rejects(Client.connectTcp(host, port, TOKEN, { tls: true }),
      (e) => /CERT|VERIFY|SIGNATURE|ISSUER/.test(e.code ?? ""));
  });

  test("a wrong token is refused with its code", async () => {
    await assert.rejects(Client.connectUnix(SOCKET, "not-a-key"),
      (e) => e instanceof DaemonError && e.code === "unauthenticated");
  });

  test("a refused subscription surfaces as an error with its code", async () => {
    const seen = [];
    const c = await unix({ subscribe: [randomUUID()], onError: (e) => seen.push(e) });
    await eventually("the subscription's error line", () => seen.length > 0);
    assert.equal(seen[0].code, "unknown_chatbot");
    assert.deepEqual(c.errors, seen);
    // The connection goes on.
    const ack = await within(c.send(event(unique("kept"), CHATBOT)), "the ack");
    assert.equal(ack.executions.length, 1);
  });
});
