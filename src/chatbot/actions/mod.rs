//! The side effects of steps, beside the executor that runs them, one file per kind: `webhook` (HTTP POST, signed),
//! `command` (reply, tag and handoff to the chat service through the outbox) and
//! `notify` (the operator channel). Each takes already-rendered inputs and returns the
//! step's output as JSON, or a `StepError` saying what went wrong.

pub mod command;
pub mod notify;
pub mod webhook;

use crate::workflow::template::TemplateError;

/// A failed step: the message recorded in `execution_steps.error`, and any output
/// worth keeping (a webhook's error response, say).
#[derive(Debug, Clone)]
pub struct StepError {
    pub message: String,
    pub output: Option<serde_json::Value>,
    /// Worth retrying (5xx, timeouts, connection errors) or not (4xx, bad templates).
    pub retryable: bool,
    /// The receiver asked for this wait before the next attempt (`Retry-After`).
    pub retry_after: Option<std::time::Duration>,
}

impl StepError {
    pub fn new(message: impl Into<String>) -> StepError {
        StepError { message: message.into(), output: None, retryable: false, retry_after: None }
    }

    pub fn retryable(message: impl Into<String>) -> StepError {
        StepError { message: message.into(), output: None, retryable: true, retry_after: None }
    }
}

impl From<TemplateError> for StepError {
    fn from(e: TemplateError) -> StepError {
        StepError::new(e.to_string())
    }
}
