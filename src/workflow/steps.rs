//! A step ready to run: its action with templates parsed, durations read and
//! defaults applied. Built by validation (`validate::check`), kept by the compiled
//! workflow, run by the executor.

use chrono::{DateTime, Utc};
use std::time::Duration;

use super::template::{JsonTemplate, Template};

/// Used when a webhook step does not set `timeout_ms`.
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct CompiledStep {
    pub id: String,
    pub action: CompiledAction,
}

#[derive(Debug, Clone)]
pub enum CompiledAction {
    Webhook {
        url: Template,
        body: Option<JsonTemplate>,
        headers: Vec<(String, Template)>,
        timeout: Duration,
    },
    Reply {
        text: Template,
    },
    Tag {
        tags: Vec<Template>,
    },
    Handoff {
        queue: Template,
    },
    Delay {
        until: DelaySpec,
    },
    Notify {
        message: Template,
    },
}

impl CompiledAction {
    /// The `action` name as written in the workflow.
    pub fn name(&self) -> &'static str {
        match self {
            CompiledAction::Webhook { .. } => "webhook",
            CompiledAction::Reply { .. } => "reply",
            CompiledAction::Tag { .. } => "tag",
            CompiledAction::Handoff { .. } => "handoff",
            CompiledAction::Delay { .. } => "delay",
            CompiledAction::Notify { .. } => "notify",
        }
    }
}

/// When a delay step ends: relative to when the step starts, or at a fixed instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelaySpec {
    For(Duration),
    Until(DateTime<Utc>),
}
