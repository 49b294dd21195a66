//! botflow: a daemon that runs chatbot automation workflows.
//!
//! # The data path
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
//!                                   │ EventOutcomes after commit          chatbot::actions
//!                                   ▼                                        │ commands
//!                               Connection ◄──────────── outbox::Outbox ◄────┘
//! ```
//! Answers travel back up as `wire` types (`EventOutcomes`, `Command`) to a
//! `Recipient` the sender handed down, so no layer names the one above it.
//!
//! # Layers
//! Top to bottom; a module may use the ones below it, never one above
//! (`tests/layering.rs` checks every import, and that no files import each other in a
//! circle):
//! ```text
//! cli          the botflow command
//! app          starting and stopping the daemon
//! admin        the admin HTTP API (and HTTP ingest)
//! ingest       listeners, the codec, the protocol, connections and their shared budget
//! scheduler    due executions, dead nodes
//! router       chatbot id → supervisor
//! chatbot      supervisor, triggers, executor, actions (webhook, command, notify), limits
//! outbox       commands to chat services: subscribers and acks
//! notify       operator notifications
//! store        PostgreSQL: pool, migrations, queries, journal, LISTEN (persistence only)
//! postgres     the embedded PostgreSQL server's process manager
//! config       the TOML file and BOTFLOW_* overrides
//! egress       which addresses webhooks and notifications may reach
//! tls          TLS configuration (listener, clients, PostgreSQL)
//! telemetry    logs and metric names
//! workflow     the model users write: parse, validate, compile, templates, conditions (pure)
//! event        an event as it came in                       ┐
//! execution    an execution's states                        │ leaves: they use
//! wire         outcomes, nacks, commands, error codes       ┘ nothing of the crate
//! ```
//! Inside `chatbot`, the executor and the actions never name the supervisor (what they
//! share is `chatbot::deps`); inside `workflow`, model → validate → compiled.

pub mod admin;
pub mod app;
pub mod chatbot;
pub mod cli;
pub mod config;
pub mod egress;
pub mod event;
pub mod execution;
pub mod ingest;
pub mod notify;
pub mod outbox;
pub mod postgres;
pub mod router;
pub mod scheduler;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod wire;
pub mod workflow;
