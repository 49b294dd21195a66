//! Ingest: the listeners (Unix socket, TCP with optional TLS), the NDJSON codec, wire
//! protocol v1, the Connection actor that speaks it, and `sessions` (which connections
//! each key opened, closed when the key is withdrawn).

pub mod budget;
pub mod codec;
pub mod connection;
pub mod listener;
pub mod protocol;
pub mod sessions;
