// The client of wire protocol v1: one connection at a time to the daemon (Unix socket,
// or TCP with optional TLS), the hello, the in-flight window, answers matched to the
// events they are for, retries of retryable nacks, reconnecting with the resend of every
// event not answered yet, commands and their acks, ping and pong.
//
// Every event the caller hands to `send` stays in `#pending` until its final answer (an
// ack, or a nack the client does not retry). That table is the whole delivery state: a
// lost connection only turns its written entries back into queued ones, and the next
// connection writes them again in the order they were first sent (a Map keeps insertion
// order). The daemon's deduplication by (chatbot, event id) makes the second copy of an
// event that was in fact committed harmless: it is acked as a duplicate with the first
// executions.

import net from "node:net";
import tls from "node:tls";
import { debuglog } from "node:util";
import { ConnectionClosed, DaemonError, Nacked, TimeoutError } from "./errors.js";
import { Command, ackFromLine } from "./types.js";

export const PROTOCOL_VERSION = 1;
// Nack codes that say "not now" rather than "never": the same event may succeed later.
export const RETRYABLE = Object.freeze(["rate_limited", "overloaded", "unavailable"]);
// Handshake errors that the same hello will get again: reconnecting cannot help.
export const PERMANENT = Object.freeze(["unauthenticated", "forbidden", "unsupported_version"]);
// A line longer than this without a newline is not a frame of the daemon's (they are at
// most max_frame_bytes, 1 MiB by default, but a command carries a payload rendered by a
// workflow, so leave room); the connection is dropped rather than buffering forever.
const READ_LIMIT = 64 * 1024 * 1024;
// How many acked command ids are remembered to ack their redeliveries without handing
// them out again.
const ACKED_MEMORY = 10_000;
const MAX_ID_BYTES = 256;
const ERRORS_KEPT = 100;
// Longest wait in close() for the daemon to close its side after ours, so that acks
// just written are flushed but a silent peer cannot hold close() up.
const CLOSE_GRACE_MS = 1000;

const info = debuglog("botflow");
const defaultLogger = {
  info: (...args) => info(...args),
  warn: (...args) => console.warn("botflow-client:", ...args),
  error: (...args) => console.error("botflow-client:", ...args),
};

function encode(msg) {
  // JSON.stringify escapes a lone surrogate as \ud800, which the daemon nacks naming the
  // field, instead of writing bytes that are not UTF-8.
  return JSON.stringify(msg) + "\n";
}

function checkId(eventId) {
  // An id the daemon cannot read is nacked without the id, and such a nack could not be
  // matched to its event: refuse it here.
  if (typeof eventId !== "string" || eventId.length === 0) {
    throw new TypeError('an event needs an "id" (a non-empty string)');
  }
  if (Buffer.byteLength(eventId, "utf8") > MAX_ID_BYTES) {
    throw new RangeError(`event id ${JSON.stringify(eventId.slice(0, 40))}... is longer than ${MAX_ID_BYTES} bytes`);
  }
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f-\u009f]/.test(eventId)) {
    throw new RangeError(`event id ${JSON.stringify(eventId)} contains a control character`);
  }
  return eventId;
}

function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject, settled: false };
}

/**
 * The in-flight window: at most `limit` events unanswered. The limit follows each
 * welcome's max_in_flight; when it shrinks, the surplus is taken back as slots free up.
 */
class Window {
  limit;
  used = 0;
  #waiters = [];

  constructor(limit) {
    this.limit = limit;
  }

  acquire() {
    if (this.used < this.limit && this.#waiters.length === 0) {
      this.used += 1;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  release() {
    this.used -= 1;
    this.#wake();
  }

  resize(limit) {
    this.limit = limit;
    this.#wake();
  }

  #wake() {
    while (this.used < this.limit && this.#waiters.length > 0) {
      this.used += 1;
      this.#waiters.shift()();
    }
  }
}

/** Commands waiting for `commands()`; closing it ends every iterator. */
class CommandQueue {
  #items = [];
  #waiters = [];
  #closed = false;

  put(cmd) {
    if (this.#closed) return;
    const waiter = this.#waiters.shift();
    if (waiter) waiter(cmd);
    else this.#items.push(cmd);
  }

  get() {
    if (this.#items.length > 0) return Promise.resolve(this.#items.shift());
    if (this.#closed) return Promise.resolve(null);
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  close() {
    this.#closed = true;
    for (const waiter of this.#waiters.splice(0)) waiter(null);
  }
}

/**
 * Splits a socket's bytes into lines and hands each parsed JSON object to `onMessage`.
 * Lines are cut on the byte 0x0A, never inside a UTF-8 sequence (no byte of a multibyte
 * sequence is 0x0A), and decoded whole.
 */
function readLines(socket, onMessage, logger) {
  let parts = [];
  let size = 0;
  socket.on("data", (chunk) => {
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(10, start);
      if (nl === -1) break;
      parts.push(chunk.subarray(start, nl));
      const line = parts.length === 1 ? parts[0] : Buffer.concat(parts);
      parts = [];
      size = 0;
      start = nl + 1;
      let msg;
      try {
        msg = JSON.parse(line.toString("utf8"));
      } catch {
        logger.warn("botflow sent a line that is not JSON:", line.subarray(0, 200).toString("utf8"));
        continue;
      }
      if (msg && typeof msg === "object") onMessage(msg);
      // The handler may have ended this connection (a refused hello).
      if (socket.destroyed) return;
    }
    if (start < chunk.length) {
      parts.push(chunk.subarray(start));
      size += chunk.length - start;
      if (size > READ_LIMIT) {
        logger.warn(`botflow sent a line longer than ${READ_LIMIT} bytes; dropping the connection`);
        socket.destroy();
      }
    }
  });
}

class Pending {
  constructor(eventId, line) {
    this.eventId = eventId;
    this.line = line;
    this.answer = deferred();
    // "queued": to be written on the next (or current) connection;
    // "written": written on the current connection, answer awaited;
    // "waiting": nacked with a retryable code, written again when its timer fires.
    this.state = "queued";
    this.retries = 0;
    this.timer = null;
  }
}

/**
 * A connection to botflow that survives the daemon's restarts. Create one with
 * `await Client.connectUnix(...)` or `await Client.connectTcp(...)`; it is connected
 * and welcomed when they resolve. Call `close()` when done.
 */
export class Client {
  #opener;
  #token;
  #subscribe;
  #clientName;
  #reconnect;
  #reconnectInitialMs;
  #reconnectMaxMs;
  #retryCodes;
  #maxRetries;
  #retryDefaultMs;
  #retryMaxMs;
  #connectTimeoutMs;
  #pingIntervalMs;
  #onCommand;
  #onError;
  #logger;

  #pending = new Map();
  #socket = null;
  // The socket of a connection between its opening and its welcome.
  #opening = null;
  #window = null;
  #closed = false;
  #fatal = null;
  #reconnectTimer = null;
  #wakeReconnect = null;
  #pingTimer = null;
  #pongs = [];
  #acked = new Map();
  #commands = new CommandQueue();
  #connectedWaiters = [];

  /**
   * @param {() => Promise<net.Socket>} opener opens one connected socket
   * @param {string} token an ingest (or operator) key
   * @param {object} [options] see index.d.ts, ClientOptions
   */
  constructor(opener, token, options = {}) {
    this.#opener = opener;
    this.#token = token;
    this.#subscribe = (options.subscribe ?? []).map(String);
    this.#clientName = options.clientName ?? "botflow-node";
    this.#reconnect = options.reconnect ?? true;
    this.#reconnectInitialMs = options.reconnectInitialDelayMs ?? 100;
    this.#reconnectMaxMs = options.reconnectMaxDelayMs ?? 5000;
    this.#retryCodes = new Set(options.retryCodes ?? RETRYABLE);
    this.#maxRetries = options.maxRetries ?? 20;
    this.#retryDefaultMs = options.retryDefaultMs ?? 100;
    this.#retryMaxMs = options.retryMaxMs ?? 30_000;
    this.#connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    this.#pingIntervalMs = options.pingIntervalMs ?? null;
    this.#onCommand = options.onCommand ?? null;
    this.#onError = options.onError ?? null;
    this.#logger = { ...defaultLogger, ...(options.logger ?? {}) };

    this.maxInFlight = 0;
    this.maxFrameBytes = 0;
    // Error lines received after the handshake, newest last (bounded).
    this.errors = [];
    this.stats = { sent: 0, resent: 0, retried: 0, reconnects: 0, peakInFlight: 0 };
  }

  // ------------------------------------------------------------------ connecting

  /** Connects over the daemon's Unix socket (`ingest.unix_socket`). */
  static async connectUnix(path, token, options = {}) {
    const opener = () => openSocket(() => net.createConnection({ path: String(path) }), "connect");
    const client = new Client(opener, token, options);
    await client.#start();
    return client;
  }

  /**
   * Connects over TCP (`ingest.tcp`); with `tls` (`true` for the system's roots, or
   * tls.connect options such as `{ ca }`) over TLS, checking the certificate against
   * `servername` (default: `host`).
   */
  static async connectTcp(host, port, token, options = {}) {
    const { tls: tlsOptions, servername, ...rest } = options;
    let opener;
    if (tlsOptions) {
      const extra = tlsOptions === true ? {} : tlsOptions;
      // SNI may not carry an IP address (RFC 6066); the certificate is checked against
      // the host all the same.
      const sni = servername ?? (net.isIP(host) ? undefined : host);
      opener = () => openSocket(() => tls.connect({
        ...extra,
        host,
        port,
        servername: sni,
        // Checked against `servername` when given, else against the host (an IP SAN).
        checkServerIdentity: (_name, cert) => tls.checkServerIdentity(servername ?? host, cert),
      }), "secureConnect");
    } else {
      opener = () => openSocket(() => net.createConnection({ host, port }), "connect");
    }
    const client = new Client(opener, token, rest);
    await client.#start();
    return client;
  }

  async #start() {
    // The first connection's failure is the caller's to see, never retried here.
    await this.#open();
    if (this.#pingIntervalMs) this.#schedulePing();
  }

  /**
   * One connection: open, hello, welcome; then its lines are dispatched and every
   * queued event is written.
   */
  async #open() {
    const socket = await withTimeout(this.#opener(), this.#connectTimeoutMs,
      "connecting to botflow timed out", (s) => s.destroy());
    if (socket.setNoDelay) socket.setNoDelay(true);
    this.#opening = socket;
    try {
      await this.#handshake(socket);
    } finally {
      this.#opening = null;
    }
  }

  #handshake(socket) {
    return new Promise((resolve, reject) => {
      let welcomed = false;
      const fail = (err) => {
        clearTimeout(timer);
        socket.destroy();
        reject(err);
      };
      const timer = setTimeout(() => fail(new TimeoutError("botflow did not welcome the hello in time")),
        this.#connectTimeoutMs);
      readLines(socket, (msg) => {
        if (welcomed) {
          this.#dispatch(msg);
          return;
        }
        if (msg.op === "welcome") {
          welcomed = true;
          clearTimeout(timer);
          if (this.#closed) {
            // close() ran while this reconnect was under way.
            fail(new ConnectionClosed("the client is closed"));
            return;
          }
          this.#attach(socket, msg);
          resolve();
        } else if (msg.op === "error") {
          // Our hello is well formed, so an error before the welcome refuses the
          // connection (the daemon closes it).
          const err = msg.error ?? {};
          fail(new DaemonError(err.code ?? "unknown", err.message ?? ""));
        }
      }, this.#logger);
      socket.on("close", () => {
        if (welcomed) this.#connectionLost(socket);
        else fail(new ConnectionClosed("the daemon closed the connection during the handshake"));
      });
      socket.write(encode({
        op: "hello",
        version: PROTOCOL_VERSION,
        token: this.#token,
        client: this.#clientName,
        subscribe: this.#subscribe,
      }));
    });
  }

  #attach(socket, welcome) {
    this.maxInFlight = Number(welcome.max_in_flight) || 1;
    this.maxFrameBytes = Number(welcome.max_frame_bytes) || 1 << 20;
    if (this.#window === null) this.#window = new Window(this.maxInFlight);
    else this.#window.resize(this.maxInFlight);
    this.#socket = socket;
    for (const wake of this.#connectedWaiters.splice(0)) wake();
    this.#flush();
  }

  // ------------------------------------------------------------------ sending

  /** Events sent and not finally answered yet (retries waiting included). */
  get inFlight() {
    return this.#pending.size;
  }

  get connected() {
    return this.#socket !== null;
  }

  /**
   * Sends one event; resolves with its ack once its executions are committed.
   *
   * Waits while `maxInFlight` events are already unanswered. Nacks with a retryable
   * code are sent again after the daemon's `retry_after_ms` (at most `maxRetries`
   * times); other nacks reject with `Nacked`. While the connection is down the event
   * waits for the next one.
   */
  async send(event) {
    this.#checkOpen();
    const msg = { ...event, op: "event" };
    const eventId = checkId(msg.id);
    const line = encode(msg);
    const bytes = Buffer.byteLength(line, "utf8") - 1;
    if (this.maxFrameBytes && bytes > this.maxFrameBytes) {
      throw new RangeError(`event ${JSON.stringify(eventId)} is ${bytes} bytes, over the daemon's ` +
        `max_frame_bytes of ${this.maxFrameBytes}`);
    }
    if (this.#pending.has(eventId)) {
      throw new Error(`event ${JSON.stringify(eventId)} is already in flight on this client`);
    }
    await this.#window.acquire();
    if (this.#pending.has(eventId) || this.#closed) {
      this.#window.release();
      this.#checkOpen();
      throw new Error(`event ${JSON.stringify(eventId)} is already in flight on this client`);
    }
    const p = new Pending(eventId, line);
    this.#pending.set(eventId, p);
    this.stats.sent += 1;
    this.stats.peakInFlight = Math.max(this.stats.peakInFlight, this.#pending.size);
    this.#write(p);
    return p.answer.promise;
  }

  /**
   * Sends events concurrently (within the window); resolves with their answers in the
   * same order, each an ack or the error its send rejected with.
   */
  sendMany(events) {
    return Promise.all(events.map((e) => this.send(e).catch((err) => err)));
  }

  #checkOpen() {
    if (this.#fatal !== null) throw this.#fatal;
    if (this.#closed) throw new ConnectionClosed("the client is closed");
  }

  #write(p) {
    const socket = this.#socket;
    if (socket === null || socket.destroyed || p.state !== "queued") return;
    // Buffered by the socket when the kernel's is full; the window bounds how much.
    socket.write(p.line);
    p.state = "written";
  }

  /** Writes every queued event, in the order they were first sent. */
  #flush() {
    for (const p of this.#pending.values()) this.#write(p);
  }

  #finish(p) {
    if (this.#pending.get(p.eventId) === p) {
      this.#pending.delete(p.eventId);
      this.#window.release();
    }
    if (p.timer !== null) {
      clearTimeout(p.timer);
      p.timer = null;
    }
  }

  #settle(p, outcome, isError) {
    if (p.answer.settled) return;
    p.answer.settled = true;
    if (isError) p.answer.reject(outcome);
    else p.answer.resolve(outcome);
  }

  // ------------------------------------------------------------------ reading

  #dispatch(msg) {
    switch (msg.op) {
      case "ack": {
        const p = this.#pending.get(msg.id);
        if (p !== undefined && p.state === "written") {
          this.#finish(p);
          this.#settle(p, ackFromLine(msg, p.retries), false);
        }
        break;
      }
      case "nack": {
        const p = this.#pending.get(msg.id);
        if (p !== undefined && p.state === "written") this.#nacked(p, msg.error ?? {});
        break;
      }
      case "command":
        this.#command(msg);
        break;
      case "error": {
        const err = msg.error ?? {};
        this.#error(new DaemonError(err.code ?? "unknown", err.message ?? ""));
        break;
      }
      case "pong": {
        while (this.#pongs.length > 0) {
          const pong = this.#pongs.shift();
          if (!pong.settled) {
            pong.settled = true;
            pong.resolve();
            break;
          }
        }
        break;
      }
      default:
        break;
    }
  }

  #nacked(p, error) {
    const code = error.code ?? "unknown";
    const hint = error.retry_after_ms;
    if (this.#retryCodes.has(code) && p.retries < this.#maxRetries) {
      p.retries += 1;
      this.stats.retried += 1;
      let waitMs = typeof hint === "number" && hint >= 0
        ? hint
        : this.#retryDefaultMs * 2 ** Math.min(p.retries - 1, 16);
      waitMs = Math.min(waitMs, this.#retryMaxMs);
      p.state = "waiting";
      p.timer = setTimeout(() => this.#retryDue(p), waitMs);
      return;
    }
    this.#finish(p);
    this.#settle(p, new Nacked(p.eventId, code, error.message ?? "", error.field ?? null, hint ?? null), true);
  }

  #retryDue(p) {
    p.timer = null;
    if (this.#pending.get(p.eventId) !== p || p.state !== "waiting") return;
    p.state = "queued";
    this.#write(p);
  }

  #error(err) {
    this.errors.push(err);
    if (this.errors.length > ERRORS_KEPT) this.errors.shift();
    if (this.#onError === null) {
      this.#logger.warn(`error line: ${err.code}: ${err.message}`);
      return;
    }
    try {
      const result = this.#onError(err);
      if (result && typeof result.then === "function") {
        result.then(undefined, (e) => this.#logger.error("onError rejected:", e));
      }
    } catch (e) {
      this.#logger.error("onError threw:", e);
    }
  }

  #connectionLost(socket) {
    if (this.#socket !== socket) return;
    this.#socket = null;
    let resend = 0;
    for (const p of this.#pending.values()) {
      if (p.state === "written") {
        p.state = "queued";
        resend += 1;
      }
    }
    this.stats.resent += resend;
    for (const pong of this.#pongs.splice(0)) {
      if (!pong.settled) {
        pong.settled = true;
        pong.reject(new ConnectionClosed("the connection was lost before the pong"));
      }
    }
    if (this.#closed) return;
    if (this.#reconnect) {
      this.#logger.info("botflow connection lost; reconnecting");
      this.#reconnectLoop();
    } else {
      this.#shut(new ConnectionClosed("the connection to botflow was lost"));
    }
  }

  async #reconnectLoop() {
    let delay = this.#reconnectInitialMs;
    while (!this.#closed) {
      // Full jitter, so that clients of a restarted daemon do not come back at once.
      await new Promise((resolve) => {
        this.#wakeReconnect = resolve;
        this.#reconnectTimer = setTimeout(resolve, delay / 2 + Math.random() * (delay / 2));
      });
      this.#wakeReconnect = null;
      this.#reconnectTimer = null;
      if (this.#closed) return;
      try {
        await this.#open();
        this.stats.reconnects += 1;
        return;
      } catch (e) {
        if (e instanceof DaemonError && PERMANENT.includes(e.code)) {
          this.#logger.error(`botflow refused the reconnect: ${e.code}: ${e.message}`);
          this.#shut(e);
          return;
        }
        if (e instanceof ConnectionClosed && this.#closed) return;
        this.#logger.info("botflow reconnect failed:", e?.message ?? e);
      }
      delay = Math.min(delay * 2, this.#reconnectMaxMs);
    }
  }

  // ------------------------------------------------------------------ commands

  #command(msg) {
    const commandId = msg.command_id;
    if (typeof commandId !== "string") return;
    if (this.#acked.has(commandId)) {
      // A redelivery of a command already handled (the ack was lost with a connection,
      // or written before the daemon's restart): ack it again.
      this.#sendAck(commandId);
      return;
    }
    const cmd = new Command(msg, (id) => this.#ackCommand(id));
    if (this.#onCommand === null) {
      this.#commands.put(cmd);
      return;
    }
    try {
      const result = this.#onCommand(cmd);
      if (result && typeof result.then === "function") {
        result.then(undefined, (e) => this.#logger.error(`onCommand rejected for ${commandId}:`, e));
      }
    } catch (e) {
      this.#logger.error(`onCommand threw for ${commandId}:`, e);
    }
  }

  async #ackCommand(commandId) {
    this.#acked.delete(commandId);
    this.#acked.set(commandId, true);
    if (this.#acked.size > ACKED_MEMORY) this.#acked.delete(this.#acked.keys().next().value);
    this.#sendAck(commandId);
  }

  #sendAck(commandId) {
    const socket = this.#socket;
    // When down, the ack is remembered in #acked; the redelivery is acked on the next
    // connection.
    if (socket === null || socket.destroyed) return;
    socket.write(encode({ op: "ack", command_id: commandId }));
  }

  /**
   * The commands for the subscribed chatbots, as they arrive (when no `onCommand`
   * callback was given); ends when the client closes.
   */
  async *commands() {
    for (;;) {
      const cmd = await this.#commands.get();
      if (cmd === null) return;
      yield cmd;
    }
  }

  // ------------------------------------------------------------------ ping, close

  /** Round trip to the daemon; rejects on timeout or a lost connection. */
  async ping(timeoutMs = 10_000) {
    const socket = this.#socket;
    if (socket === null) throw new ConnectionClosed("not connected");
    const pong = deferred();
    this.#pongs.push(pong);
    socket.write(encode({ op: "ping" }));
    const timer = setTimeout(() => {
      if (!pong.settled) {
        pong.settled = true;
        pong.reject(new TimeoutError(`no pong within ${timeoutMs} ms`));
      }
    }, timeoutMs);
    try {
      await pong.promise;
    } finally {
      clearTimeout(timer);
    }
  }

  #schedulePing() {
    // A silent peer (a half-open TCP connection) is only noticed by asking it.
    this.#pingTimer = setTimeout(async () => {
      const socket = this.#socket;
      if (socket !== null) {
        try {
          await this.ping(this.#pingIntervalMs);
        } catch (e) {
          if (e instanceof TimeoutError) {
            this.#logger.warn("botflow did not answer a ping; reconnecting");
            socket.destroy();
          }
        }
      }
      if (!this.#closed) this.#schedulePing();
    }, this.#pingIntervalMs);
    // Pings alone do not keep the process alive.
    this.#pingTimer.unref();
  }

  /** Waits until a connection is up and welcomed. */
  waitConnected(timeoutMs = null) {
    if (this.#socket !== null) return Promise.resolve();
    const up = new Promise((resolve) => this.#connectedWaiters.push(resolve));
    return timeoutMs === null ? up : withTimeout(up, timeoutMs, "not reconnected in time");
  }

  /** Ends the client: no reconnect, every unanswered send rejects with `reason`. */
  #shut(reason) {
    this.#closed = true;
    if (reason instanceof DaemonError) this.#fatal = reason;
    for (const p of [...this.#pending.values()]) {
      this.#finish(p);
      this.#settle(p, reason, true);
    }
    this.#commands.close();
  }

  /**
   * Closes the connection; sends still waiting for an answer reject with
   * `ConnectionClosed` (their events may or may not have been committed).
   */
  async close() {
    if (this.#closed && this.#socket === null) return;
    this.#shut(new ConnectionClosed("the client is closed"));
    clearTimeout(this.#pingTimer);
    clearTimeout(this.#reconnectTimer);
    if (this.#wakeReconnect) this.#wakeReconnect();
    // A reconnect under way ends with its handshake (its welcome finds the client closed).
    this.#opening?.destroy();
    const socket = this.#socket;
    this.#socket = null;
    if (socket !== null && !socket.destroyed) {
      // end() flushes what was written (command acks) before the FIN.
      await new Promise((resolve) => {
        const timer = setTimeout(() => socket.destroy(), CLOSE_GRACE_MS);
        socket.once("close", () => {
          clearTimeout(timer);
          resolve();
        });
        socket.end();
      });
    }
  }
}

/**
 * Opens a socket and resolves once it is connected (`ready` is "connect", or
 * "secureConnect" for TLS); rejects with its error. An error listener stays on for the
 * socket's life: a lost connection is noticed by its "close".
 */
function openSocket(create, ready) {
  return new Promise((resolve, reject) => {
    const socket = create();
    const onError = (err) => {
      socket.destroy();
      reject(err);
    };
    socket.once("error", onError);
    socket.on("error", () => {});
    socket.once(ready, () => {
      socket.off("error", onError);
      resolve(socket);
    });
  });
}

/** `promise`, or a TimeoutError after `ms`; `cleanup` gets a value that came too late. */
function withTimeout(promise, ms, what, cleanup = null) {
  return new Promise((resolve, reject) => {
    let done = false;
    const timer = setTimeout(() => {
      done = true;
      reject(new TimeoutError(what));
    }, ms);
    promise.then((value) => {
      clearTimeout(timer);
      if (done) cleanup?.(value);
      else resolve(value);
    }, (err) => {
      clearTimeout(timer);
      if (!done) reject(err);
    });
  });
}
