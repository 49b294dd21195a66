//! botflow: a daemon that runs chatbot automation workflows.
//!
//! # Layout
//! The tree follows the actor graph:
//! ```text
//! chat service ─NDJSON─► ingest::listener ─► ingest::connection::Connection (one actor per client)
//!                                                  │ RouteEvents (a batch)
//!                                                  ▼
//!                                          router::Router ── chatbot id → supervisor
//!                                                  │ SupervisorEvents
//!                                                  ▼
//!                            chatbot::supervisor::ChatbotSupervisor (one per chatbot)
//!                              owns chatbot::triggers::TriggerIndex and the executor pool
//!                                   │ RecordExecutions / RecordProgress      │ steps
//!                                   ▼                                        ▼
//!                          store::journal::JournalLane (batched writes)   chatbot::executor
//!                                   │ acks after commit                   workflow::actions
//!                                   ▼                                        │ commands
//!                               Connection ◄──────────── outbox::Outbox ◄────┘
//! ```
//! - `config`: the TOML file and `BOTFLOW_*` overrides; `app`: start and shutdown.
//! - `event`, `ingest::protocol`, `ingest::codec`: what travels on the wire.
//! - `workflow`: the model users write, validation, templates, conditions, actions.
//! - `store`: PostgreSQL (pool, migrations, embedded server, queries, journal, LISTEN).
//! - `telemetry`: logs and metrics; `cli`: the `botflow` command.

pub mod admin;
pub mod app;
pub mod chatbot;
pub mod cli;
pub mod config;
pub mod event;
pub mod ingest;
pub mod notify;
pub mod outbox;
pub mod router;
pub mod scheduler;
pub mod store;
pub mod telemetry;
pub mod workflow;
