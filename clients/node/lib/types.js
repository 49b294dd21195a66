// What the daemon answers, as JavaScript values: an event's ack with the executions it
// started, and a `Command` (reply, tag, handoff) to carry out and ack.

/**
 * The ack of an event: the daemon committed every execution the event started (none if
 * it matched no workflow). `duplicate` is true when all of them existed already (the
 * event had been sent before); `retries` counts how many times this client sent it
 * again after a retryable nack.
 */
export function ackFromLine(msg, retries = 0) {
  const executions = Array.isArray(msg.executions) ? msg.executions : [];
  return Object.freeze({
    eventId: typeof msg.id === "string" ? msg.id : "",
    executions: Object.freeze(executions.map((e) => Object.freeze({
      executionId: e?.execution_id ?? "",
      workflowId: e?.workflow_id ?? "",
    }))),
    duplicate: Boolean(msg.duplicate),
    retries,
  });
}

/**
 * A command for the chat service. Carry it out, then `await command.ack()`: until acked
 * it stays in the daemon's outbox and comes again (same `commandId`) on the next
 * connection, or when its step is retried.
 */
export class Command {
  #ack;

  constructor(msg, ack) {
    this.commandId = msg.command_id ?? "";
    this.chatbotId = msg.chatbot_id ?? "";
    this.conversationId = msg.conversation_id ?? "";
    this.kind = msg.kind ?? "";
    this.payload = msg.payload && typeof msg.payload === "object" ? msg.payload : {};
    this.executionId = msg.execution_id ?? "";
    this.raw = msg;
    this.#ack = ack;
  }

  /**
   * Tells the daemon the command was handled. The daemon does not answer an ack; if
   * the connection is down the ack is remembered and sent when the command is
   * redelivered after the reconnect.
   */
  async ack() {
    if (this.#ack) await this.#ack(this.commandId);
  }
}
