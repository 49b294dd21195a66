"""What the tests share: the daemon's coordinates from the environment (set by
tests/clients.rs), unique ids, and waiting on a condition with a deadline."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

# Generous for a slow, shared machine; nothing waits this long when things work.
DEADLINE = 30.0


def env(name: str) -> str | None:
    return os.environ.get(name) or None


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def event(event_id: str, chatbot: str, kind: str = "x.load", data: dict | None = None,
          conversation: str = "conv-py") -> dict:
    return {"id": event_id, "chatbot_id": chatbot, "type": kind,
            "conversation_id": conversation, "occurred_at": "2026-11-25T10:00:00Z",
            "data": data or {}}


async def eventually(what: str, cond, deadline: float = DEADLINE) -> None:
    """Polls `cond()` until it holds; fails the test naming `what` at the deadline."""
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)
