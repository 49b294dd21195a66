//! One chatbot's world: its supervisor actor, its trigger index, its executors and
//! the actions they run (webhooks, commands through the outbox, notifications).

pub mod actions;
pub mod admission;
pub mod deps;
pub mod executor;
pub mod limits;
pub mod retry;
pub mod supervisor;
pub mod triggers;
