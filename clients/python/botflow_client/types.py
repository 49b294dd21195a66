"""What the daemon answers, as Python values: an event's `Ack` with the executions it
started, and a `Command` (reply, tag, handoff) to carry out and ack."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable


@dataclass(frozen=True)
class Execution:
    execution_id: str
    workflow_id: str


@dataclass(frozen=True)
class Ack:
    """The daemon committed every execution the event started (none if it matched no
    workflow). `duplicate` is true when all of them existed already: the event had been
    sent before, by this client's resend after a reconnect or by anyone else."""

    event_id: str
    executions: tuple[Execution, ...]
    duplicate: bool
    # How many times the client sent the event again after a retryable nack.
    retries: int = 0

    @classmethod
    def from_line(cls, msg: dict[str, Any], retries: int = 0) -> "Ack":
        return cls(
            event_id=msg.get("id", ""),
            executions=tuple(Execution(e.get("execution_id", ""), e.get("workflow_id", ""))
                             for e in msg.get("executions") or ()),
            duplicate=bool(msg.get("duplicate", False)),
            retries=retries,
        )


@dataclass
class Command:
    """A command for the chat service. Carry it out, then `await command.ack()`: until
    acked it stays in the daemon's outbox and comes again (same `command_id`) on the
    next connection, or when the step is retried."""

    command_id: str
    chatbot_id: str
    conversation_id: str
    kind: str
    payload: dict[str, Any]
    execution_id: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    _ack: Callable[[str], Awaitable[None]] | None = field(repr=False, default=None)

    @classmethod
    def from_line(cls, msg: dict[str, Any], ack: Callable[[str], Awaitable[None]]) -> "Command":
        return cls(
            command_id=msg.get("command_id", ""),
            chatbot_id=msg.get("chatbot_id", ""),
            conversation_id=msg.get("conversation_id", ""),
            kind=msg.get("kind", ""),
            payload=msg.get("payload") or {},
            execution_id=msg.get("execution_id", ""),
            raw=msg,
            _ack=ack,
        )

    async def ack(self) -> None:
        """Tells the daemon the command was handled. The daemon does not answer an ack;
        if the connection is down the ack is remembered and sent when the command is
        redelivered after the reconnect."""
        if self._ack is not None:
            await self._ack(self.command_id)
