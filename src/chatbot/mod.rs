//! One chatbot's world: its supervisor actor, trigger index and executors.
pub mod triggers;
