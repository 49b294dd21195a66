//! One chatbot's world: its supervisor actor, its trigger index and its executors.

pub mod executor;
pub mod limits;
pub mod retry;
pub mod supervisor;
pub mod triggers;
