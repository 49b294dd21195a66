// Type declarations of botflow-client (index.js): the client of botflow's wire protocol
// v1, its options, the ack and command values, and its errors.

/// <reference types="node" />

import type { ConnectionOptions } from "node:tls";

export declare const PROTOCOL_VERSION: 1;
/** Nack codes retried by default: "not now" rather than "never". */
export declare const RETRYABLE: readonly string[];
/** Handshake error codes that end the client instead of reconnecting. */
export declare const PERMANENT: readonly string[];

/** An event as sent: `id` is required; `op` is added by the client. */
export interface BotflowEvent {
  id: string;
  chatbot_id: string;
  type: string;
  conversation_id: string;
  occurred_at?: string;
  data?: Record<string, unknown>;
  [field: string]: unknown;
}

export interface Execution {
  readonly executionId: string;
  readonly workflowId: string;
}

/** The daemon committed every execution the event started (none if it matched no workflow). */
export interface Ack {
  readonly eventId: string;
  readonly executions: readonly Execution[];
  /** True when all of the executions existed already (the event had been sent before). */
  readonly duplicate: boolean;
  /** How many times the client sent the event again after a retryable nack. */
  readonly retries: number;
}

/** Builds an `Ack` from an `ack` line of the wire protocol. */
export declare function ackFromLine(msg: Record<string, unknown>, retries?: number): Ack;

/** A command for the chat service (reply, tag, handoff): carry it out, then `ack()`. */
export declare class Command {
  constructor(msg: Record<string, unknown>, ack?: (commandId: string) => Promise<void>);
  readonly commandId: string;
  readonly chatbotId: string;
  readonly conversationId: string;
  readonly kind: string;
  readonly payload: Record<string, unknown>;
  readonly executionId: string;
  /** The command line as received. */
  readonly raw: Record<string, unknown>;
  /** Tells the daemon the command was handled (remembered while disconnected). */
  ack(): Promise<void>;
}

export interface Logger {
  info(...args: unknown[]): void;
  warn(...args: unknown[]): void;
  error(...args: unknown[]): void;
}

export interface ClientOptions {
  /** Chatbot ids whose commands this connection receives. */
  subscribe?: readonly string[];
  /** Sent in the hello (default "botflow-node"). */
  clientName?: string;
  /** Reconnect after a lost connection and resend unanswered events (default true). */
  reconnect?: boolean;
  /** First reconnect delay, doubled up to `reconnectMaxDelayMs`, jittered (default 100). */
  reconnectInitialDelayMs?: number;
  /** Longest reconnect delay (default 5000). */
  reconnectMaxDelayMs?: number;
  /** Nack codes sent again after a wait (default `RETRYABLE`). */
  retryCodes?: Iterable<string>;
  /** Retries per event before its send rejects with `Nacked` (default 20). */
  maxRetries?: number;
  /** First wait when a retryable nack has no `retry_after_ms`, doubled per retry (default 100). */
  retryDefaultMs?: number;
  /** Cap of every retry wait (default 30000). */
  retryMaxMs?: number;
  /** Limit on connecting and on the hello's welcome (default 10000). */
  connectTimeoutMs?: number;
  /** Pings this often and reconnects when no pong comes within it (default: off). */
  pingIntervalMs?: number | null;
  /** Receives every command instead of `commands()`; may return a promise. */
  onCommand?: ((command: Command) => unknown) | null;
  /** Receives `error` lines after the welcome (default: a warning through the logger). */
  onError?: ((error: DaemonError) => unknown) | null;
  /** Where the client logs; missing methods keep their defaults (info: NODE_DEBUG=botflow). */
  logger?: Partial<Logger>;
}

export interface TcpOptions extends ClientOptions {
  /** `true` for the system's roots, or tls.connect options (e.g. `{ ca }`); off by default. */
  tls?: boolean | ConnectionOptions;
  /** Name the certificate must carry (default: the host). */
  servername?: string;
}

export interface ClientStats {
  sent: number;
  resent: number;
  retried: number;
  reconnects: number;
  peakInFlight: number;
}

export declare class Client {
  /** Connects over the daemon's Unix socket; resolves once welcomed. */
  static connectUnix(path: string, token: string, options?: ClientOptions): Promise<Client>;
  /** Connects over TCP, optionally TLS; resolves once welcomed. */
  static connectTcp(host: string, port: number, token: string, options?: TcpOptions): Promise<Client>;

  /** The last welcome's window. */
  maxInFlight: number;
  /** The last welcome's largest frame. */
  maxFrameBytes: number;
  /** `error` lines received after the welcome, newest last (at most 100). */
  errors: DaemonError[];
  stats: ClientStats;
  /** Events sent and not finally answered yet (retries waiting included). */
  readonly inFlight: number;
  readonly connected: boolean;

  /**
   * Sends one event and resolves with its ack once its executions are committed;
   * rejects with `Nacked`, `ConnectionClosed` or (refused for good) `DaemonError`.
   * Throws `TypeError`/`RangeError` for an id or a size the daemon would not accept.
   */
  send(event: BotflowEvent): Promise<Ack>;
  /** Sends events concurrently; each answer is an `Ack` or the error its send rejected with. */
  sendMany(events: readonly BotflowEvent[]): Promise<Array<Ack | Error>>;
  /** The commands of the subscribed chatbots (without `onCommand`); ends when the client closes. */
  commands(): AsyncGenerator<Command, void, undefined>;
  /** Round trip to the daemon; rejects with `TimeoutError` or `ConnectionClosed`. */
  ping(timeoutMs?: number): Promise<void>;
  /** Resolves once a connection is up and welcomed. */
  waitConnected(timeoutMs?: number | null): Promise<void>;
  /** Closes; unanswered sends reject with `ConnectionClosed`. */
  close(): Promise<void>;
}

export declare class BotflowError extends Error {}

/** A refused event; `message` is the daemon's own text. */
export declare class Nacked extends BotflowError {
  constructor(eventId: string, code: string, message?: string, field?: string | null, retryAfterMs?: number | null);
  readonly eventId: string;
  readonly code: string;
  readonly field: string | null;
  readonly retryAfterMs: number | null;
}

/** An `error` line from the daemon; `message` is the daemon's own text. */
export declare class DaemonError extends BotflowError {
  constructor(code: string, message?: string);
  readonly code: string;
}

export declare class ConnectionClosed extends BotflowError {}

export declare class TimeoutError extends BotflowError {}
