//! Ingest: the listeners (Unix socket, TCP with optional TLS), the NDJSON codec, wire
//! protocol v1 and the Connection actor that speaks it.

pub mod budget;
pub mod codec;
pub mod connection;
pub mod listener;
pub mod protocol;
