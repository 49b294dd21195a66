//! botflow: runs chatbot automation workflows.
pub mod event;
pub mod workflow;
pub mod chatbot;
pub mod store;
