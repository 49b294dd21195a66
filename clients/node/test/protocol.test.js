// The client against a scripted stand-in for the daemon, for what a real daemon does not
// do on demand: a nack's retry hint honoured, answers withheld, a connection dropped at
// a chosen moment, a reconnect refused for good, a command redelivered after its ack.
// Needs no daemon.

import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";

import { Client, ConnectionClosed, DaemonError, Nacked } from "../index.js";
import { DEADLINE, event, eventually, within } from "./support.js";

/**
 * A Unix socket server; each connection is handled by the next function of `script`
 * (called with a `Conn`), after the hello is read and answered.
 */
class FakeDaemon {
  constructor(script, { maxInFlight = 16, refuseAfter = null } = {}) {
    this.script = [...script];
    this.maxInFlight = maxInFlight;
    this.refuseAfter = refuseAfter;
    this.connections = 0;
    this.dir = mkdtempSync(join(tmpdir(), "botflow-node-fake-"));
    this.path = join(this.dir, "fake.sock");
    this.open = new Set();
  }

  async start() {
    this.server = net.createServer((socket) => this.serve(new Conn(socket)));
    await new Promise((resolve) => this.server.listen(this.path, resolve));
    return this;
  }

  async stop() {
    for (const conn of this.open) conn.socket.destroy();
    await new Promise((resolve) => this.server.close(resolve));
    rmSync(this.dir, { recursive: true, force: true });
  }

  async serve(conn) {
    this.open.add(conn);
    this.connections += 1;
    try {
      const hello = await conn.recv();
      assert.equal(hello.op, "hello");
      if (this.refuseAfter !== null && this.connections > this.refuseAfter) {
        conn.send({ op: "error", error: { code: "unauthenticated", message: "no" } });
        return;
      }
      conn.send({ op: "welcome", version: 1, max_in_flight: this.maxInFlight, max_frame_bytes: 1 << 20 });
      const step = this.script.shift();
      if (step) await step(conn);
    } catch {
      // The client went away, as some tests make it.
    } finally {
      conn.socket.end();
      this.open.delete(conn);
    }
  }
}

/** One connection of the stand-in: lines in as objects, objects out as lines. */
class Conn {
  constructor(socket) {
    this.socket = socket;
    this.lines = [];
    this.waiters = [];
    this.buffered = "";
    this.closed = new Promise((resolve) => socket.on("close", resolve));
    socket.on("error", () => {});
    socket.setEncoding("utf8");
    socket.on("data", (text) => {
      const parts = (this.buffered + text).split("\n");
      this.buffered = parts.pop();
      for (const line of parts) {
        const waiter = this.waiters.shift();
        if (waiter) waiter.resolve(JSON.parse(line));
        else this.lines.push(JSON.parse(line));
      }
    });
    socket.on("close", () => {
      for (const waiter of this.waiters.splice(0)) waiter.reject(new Error("client closed"));
    });
  }

  /** The next line, or a rejection after `ms` or when the client closes. */
  recv(ms = DEADLINE) {
    if (this.lines.length > 0) return Promise.resolve(this.lines.shift());
    if (this.socket.destroyed || this.socket.readableEnded) return Promise.reject(new Error("client closed"));
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve: (v) => { clearTimeout(timer); resolve(v); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(waiter), 1);
        reject(new Error("recv timed out"));
      }, ms);
      this.waiters.push(waiter);
    });
  }

  send(msg) {
    this.socket.write(JSON.stringify(msg) + "\n");
  }

  ack(eventId) {
    this.send({ op: "ack", id: eventId, executions: [], duplicate: false });
  }
}

const BOT = "00000000-0000-0000-0000-000000000001";

describe("against a stand-in daemon", () => {
  const cleanups = [];
  after(async () => {
    for (const cleanup of cleanups.reverse()) await cleanup();
  });

  async function fake(script, options) {
    const daemon = await new FakeDaemon(script, options).start();
    cleanups.push(() => daemon.stop());
    return daemon;
  }

  async function connect(daemon, options = {}) {
    const c = await Client.connectUnix(daemon.path, "key", { reconnectInitialDelayMs: 10, ...options });
    cleanups.push(() => c.close());
    return c;
  }

  test("a rate_limited nack is sent again after its hint", async () => {
    const seen = [];
    const daemon = await fake([async (conn) => {
      let e = await conn.recv();
      seen.push(performance.now());
      conn.send({ op: "nack", id: e.id, error: { code: "rate_limited", message: "slow down", retry_after_ms: 300 } });
      e = await conn.recv();
      seen.push(performance.now());
      conn.ack(e.id);
      await conn.closed;
    }]);
    const c = await connect(daemon);
    const ack = await within(c.send(event("e1", BOT)), "the ack");
    assert.equal(ack.retries, 1);
    assert.ok(seen[1] - seen[0] >= 290, `sent again ${seen[1] - seen[0]} ms after, before retry_after_ms`);
  });

  test("unavailable without a hint backs off and the retries are bounded", async () => {
    const daemon = await fake([async (conn) => {
      for (;;) {
        const e = await conn.recv();
        conn.send({ op: "nack", id: e.id, error: { code: "unavailable", message: "db" } });
      }
    }]);
    const c = await connect(daemon, { maxRetries: 3, retryDefaultMs: 10 });
    await assert.rejects(within(c.send(event("e1", BOT)), "the nack"),
      (e) => e instanceof Nacked && e.code === "unavailable");
    assert.equal(c.stats.retried, 3);
  });

  test("unanswered events are resent in order with their ids after a reconnect", async () => {
    const firstIds = [];
    const secondIds = [];
    const daemon = await fake([
      async (conn) => {
        // Closed without answering: the events are lost with the connection.
        for (let i = 0; i < 3; i++) firstIds.push((await conn.recv()).id);
      },
      async (conn) => {
        for (let i = 0; i < 3; i++) {
          const e = await conn.recv();
          secondIds.push(e.id);
          conn.ack(e.id);
        }
        await conn.closed;
      },
    ]);
    const c = await connect(daemon);
    const acks = await within(Promise.all([0, 1, 2].map((i) => c.send(event(`e${i}`, BOT)))), "3 acks");
    assert.deepEqual(acks.map((a) => a.eventId), ["e0", "e1", "e2"]);
    assert.deepEqual(firstIds, ["e0", "e1", "e2"]);
    assert.deepEqual(secondIds, firstIds);
    assert.equal(c.stats.resent, 3);
    assert.equal(c.stats.reconnects, 1);
  });

  test("the window is the welcome's max_in_flight", async () => {
    let most = 0;
    const daemon = await fake([async (conn) => {
      const unanswered = [];
      let answered = 0;
      while (answered < 6) {
        try {
          unanswered.push((await conn.recv(200)).id);
          most = Math.max(most, unanswered.length);
        } catch (e) {
          if (e.message !== "recv timed out") throw e;
          // Nothing more comes: the window is full (or all is sent); answer one.
          if (unanswered.length > 0) {
            conn.ack(unanswered.shift());
            answered += 1;
          }
        }
      }
      await conn.closed;
    }], { maxInFlight: 2 });
    const c = await connect(daemon);
    const acks = await within(Promise.all([0, 1, 2, 3, 4, 5].map((i) => c.send(event(`e${i}`, BOT)))), "6 acks");
    assert.equal(acks.length, 6);
    assert.equal(most, 2, "the client wrote more than max_in_flight unanswered events");
  });

  test("a command redelivered after its ack is acked again, not handed out", async () => {
    const command = {
      op: "command", command_id: "x:say", chatbot_id: BOT, conversation_id: "c",
      kind: "reply", payload: { text: "hi" }, execution_id: "x",
    };
    const acks = [];
    const daemon = await fake([
      async (conn) => {
        conn.send(command);
        acks.push((await conn.recv()).command_id);
      },
      async (conn) => {
        conn.send(command);
        acks.push((await conn.recv()).command_id);
        await conn.closed;
      },
    ]);
    const c = await connect(daemon);
    const got = [];
    const handler = (async () => {
      for await (const cmd of c.commands()) {
        got.push(cmd);
        await cmd.ack();
      }
    })();
    await eventually("both acks", () => acks.length === 2);
    await c.close();
    await handler; // the iterator ends with the client
    assert.deepEqual(acks, ["x:say", "x:say"]);
    assert.equal(got.length, 1, "a redelivery of an acked command was handed out again");
  });

  test("a reconnect refused for good fails the waiting sends", async () => {
    const daemon = await fake([async (conn) => {
      await conn.recv();
    }], { refuseAfter: 1 });
    const logged = [];
    const c = await connect(daemon, { logger: { error: (...args) => logged.push(args.join(" ")) } });
    await assert.rejects(within(c.send(event("e1", BOT)), "the refusal"),
      (e) => e instanceof DaemonError && e.code === "unauthenticated");
    assert.equal(logged.length, 1, "the refusal is logged as an error");
    await assert.rejects(c.send(event("e2", BOT)), DaemonError);
  });

  test("without reconnect a lost connection fails the waiting sends", async () => {
    const daemon = await fake([async (conn) => {
      await conn.recv();
    }]);
    const c = await connect(daemon, { reconnect: false });
    await assert.rejects(within(c.send(event("e1", BOT)), "the failure"), ConnectionClosed);
  });
});
