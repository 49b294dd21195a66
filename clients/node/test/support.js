// What the tests share: the daemon's coordinates from the environment (set by
// tests/clients.rs), unique ids, and waiting on a condition or a promise with a
// deadline instead of sleeping.

import { randomUUID } from "node:crypto";

// Generous for a slow, shared machine; nothing waits this long when things work.
export const DEADLINE = 30_000;

export function env(name) {
  return process.env[name] || null;
}

export function unique(prefix) {
  return `${prefix}-${randomUUID().replaceAll("-", "").slice(0, 12)}`;
}

export function event(eventId, chatbot, kind = "x.load", data = {}, conversation = "conv-node") {
  return {
    id: eventId,
    chatbot_id: chatbot,
    type: kind,
    conversation_id: conversation,
    occurred_at: "2026-11-25T10:00:00Z",
    data,
  };
}

/** Polls `cond()` until it holds; fails naming `what` at the deadline. */
export async function eventually(what, cond, deadline = DEADLINE) {
  const end = Date.now() + deadline;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** `promise`, or a failure naming `what` after `ms`; the timer never outlives it. */
export function within(promise, what, ms = DEADLINE) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
