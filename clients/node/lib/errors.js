// The errors of the client: a refused event (`Nacked`), an `error` line from the daemon
// (`DaemonError`), a client that is closed or cannot reach the daemon any more
// (`ConnectionClosed`), and a wait that ran out (`TimeoutError`).

/** Base of every error this package raises on its own account. */
export class BotflowError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/**
 * The daemon refused an event (a `nack`) and the client did not (or no longer would)
 * retry it: `invalid_event`, `unknown_chatbot`, `internal`, or a retryable code whose
 * retries ran out. `message` is the daemon's own text, as on the wire; `code`, `field`
 * and `retryAfterMs` are the other fields of the nack's `error`.
 */
export class Nacked extends BotflowError {
  constructor(eventId, code, message = "", field = null, retryAfterMs = null) {
    super(message);
    this.eventId = eventId;
    this.code = code;
    this.field = field ?? null;
    this.retryAfterMs = retryAfterMs ?? null;
  }

  toString() {
    return `Nacked: event ${JSON.stringify(this.eventId)} nacked: ${this.code}: ${this.message}` +
      (this.field ? ` (field ${this.field})` : "");
  }
}

/**
 * An `error` line from the daemon (a refused hello, a refused subscription, a frame it
 * could not read). `message` is the daemon's own text.
 */
export class DaemonError extends BotflowError {
  constructor(code, message = "") {
    super(message);
    this.code = code;
  }

  toString() {
    return `DaemonError: ${this.code}: ${this.message}`;
  }
}

/**
 * The client was closed, or lost its connection with reconnecting turned off, before
 * the daemon answered.
 */
export class ConnectionClosed extends BotflowError {}

/** A connect, handshake or ping that took longer than allowed. */
export class TimeoutError extends BotflowError {}
