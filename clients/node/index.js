// botflow-client: a client for botflow's wire protocol v1 (see docs/design.md, "Wire
// protocol v1"). `Client` owns the connection (lib/client.js); lib/types.js the answers
// and commands; lib/errors.js the errors. Types are declared in index.d.ts.

export { Client, PERMANENT, RETRYABLE, PROTOCOL_VERSION } from "./lib/client.js";
export { BotflowError, ConnectionClosed, DaemonError, Nacked, TimeoutError } from "./lib/errors.js";
export { Command, ackFromLine } from "./lib/types.js";
