"""The exceptions of the client: a refused event, an `error` line from the daemon, and
a client that is closed or cannot reach the daemon any more."""

from __future__ import annotations


class BotflowError(Exception):
    """Base of every exception this package raises."""


class Nacked(BotflowError):
    """The daemon refused an event (a `nack`), and the client did not (or no longer
    would) retry it: `invalid_event`, `unknown_chatbot`, `internal`, or a retryable code
    whose retries ran out."""

    def __init__(self, event_id: str, code: str, message: str = "",
                 field: str | None = None, retry_after_ms: int | None = None):
        super().__init__(f"event {event_id!r} nacked: {code}: {message}"
                         + (f" (field {field})" if field else ""))
        self.event_id = event_id
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_ms = retry_after_ms


class DaemonError(BotflowError):
    """An `error` line from the daemon (a refused hello, a refused subscription, a
    frame it could not read)."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionClosed(BotflowError):
    """The client was closed, or lost its connection with reconnecting turned off,
    before the daemon answered."""
