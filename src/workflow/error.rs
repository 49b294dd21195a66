//! [`ValidationError`]: the first problem found in a workflow, naming the field.

use serde::Serialize;

/// The first problem found in a workflow: `field` is the path users see in their
/// document (`steps[1].text`, `[2].trigger.event` inside a list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}
