//! The workflow document users write (JSON over the admin API, YAML or JSON through
//! the CLI). `parse::parse_workflows` is the one entry point that turns bytes into
//! validated [`WorkflowSpec`]s.
//!
//! These types are plain data: they round-trip through serde unchanged, so what the
//! store keeps is exactly what the user sent. Everything derived from them (parsed
//! templates, compiled regexes, the trigger index) lives in `compiled.rs` and in
//! `chatbot::triggers`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
pub use super::actions::Step;
use super::fields::present_value;

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}


/// One workflow of one chatbot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSpec {
    pub name: String,
    #[serde(default = "default_true")]
    pub enabled: bool,
    pub trigger: Trigger,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    pub steps: Vec<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Longest one attempt of an execution may run (durable waits excluded); the
    /// daemon's `executor.execution_timeout_ms` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The event type a workflow listens to, plus at most one type-specific filter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keywords: Option<KeywordFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<IntentFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentiment: Option<SentimentFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageFilter>,
}

impl Trigger {
    /// The filters that are set, by their field name (validation allows at most one).
    pub fn filter_names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.keywords.is_some() {
            names.push("keywords");
        }
        if self.intent.is_some() {
            names.push("intent");
        }
        if self.sentiment.is_some() {
            names.push("sentiment");
        }
        if self.image.is_some() {
            names.push("image");
        }
        names
    }
}

/// `message.received`: any of the keywords appears as a whole word in `data.text`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeywordFilter {
    pub any: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub case_sensitive: bool,
}

/// `intent.detected`: `data.name` is one of `names` (empty = any intent) with
/// `data.confidence >= min_confidence`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IntentFilter {
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub min_confidence: f64,
}

/// `sentiment.analyzed`: `data.label` is one of `labels` (when given) and
/// `score_above < data.score < score_below` for the bounds that are given.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SentimentFilter {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_below: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_above: Option<f64>,
}

/// `image.uploaded`: one of `labels_any` is in `data.labels` (when given) and
/// `data.mime_type` is one of `mime_types` (when given).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageFilter {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels_any: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mime_types: Vec<String>,
}

/// A test on one field of the event document, e.g. `data.mime_type eq "image/png"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub path: String,
    pub op: ConditionOp,
    #[serde(
        default,
        deserialize_with = "present_value",
        skip_serializing_if = "Option::is_none"
    )]
    pub value: Option<Value>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConditionOp {
    Eq,
    Ne,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
    Contains,
    Matches,
    Exists,
}

impl ConditionOp {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionOp::Eq => "eq",
            ConditionOp::Ne => "ne",
            ConditionOp::Lt => "lt",
            ConditionOp::Lte => "lte",
            ConditionOp::Gt => "gt",
            ConditionOp::Gte => "gte",
            ConditionOp::In => "in",
            ConditionOp::Contains => "contains",
            ConditionOp::Matches => "matches",
            ConditionOp::Exists => "exists",
        }
    }
}

/// Per-workflow overrides of the daemon's retry defaults; unset fields fall back to
/// the configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_backoff_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff_ms: Option<u64>,
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub jitter: bool,
}
