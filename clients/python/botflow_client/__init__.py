"""botflow_client: an asyncio client for botflow's wire protocol v1 (see
docs/design.md, "Wire protocol v1"). `Client` owns the connection; `types` the answers
and commands; `errors` the exceptions."""

from .client import PERMANENT, RETRYABLE, Client
from .errors import BotflowError, ConnectionClosed, DaemonError, Nacked
from .types import Ack, Command, Execution

__all__ = [
    "Ack", "BotflowError", "Client", "Command", "ConnectionClosed", "DaemonError",
    "Execution", "Nacked", "PERMANENT", "RETRYABLE",
]
