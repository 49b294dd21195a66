//! The rules a workflow must follow before it is saved or run, and
//! [`ValidationError`], which names the exact field that breaks one.
//!
//! Checking yields the parsed pieces (`check`): conditions and step templates are
//! parsed here once into the runnable step forms (each action checks and compiles its
//! own fields, in `actions`), and
//! [`super::CompiledWorkflow::compile`] keeps the result, so the rules that accept a
//! workflow and the code that runs it cannot drift apart. Validation never calls into
//! the compiled workflow; the compiled workflow is built from what it returns.

use std::collections::HashSet;

use super::condition::CompiledCondition;
pub use super::error::ValidationError;
use super::model::{
    ImageFilter, IntentFilter, KeywordFilter, RetryPolicy, SentimentFilter, Step, Trigger,
    WorkflowSpec,
};
use super::actions::{CompiledStep, Scope, StepField};
use super::fields::is_token_char;
use super::template::is_name_char;
use crate::event::EventType;

pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_EVENT_TYPE_CHARS: usize = 100;
pub const MAX_KEYWORD_CHARS: usize = 100;
pub const MAX_STEPS: usize = 50;
/// A step's id becomes part of its commands' ids, which bound it the same way.
pub const MAX_STEP_ID_CHARS: usize = crate::wire::MAX_STEP_ID_CHARS;
pub const MAX_RETRY_ATTEMPTS: u32 = 100;
pub const MAX_INITIAL_BACKOFF_MS: u64 = 3_600_000;
pub const MAX_BACKOFF_MS: u64 = 86_400_000;
pub const SENTIMENT_LABELS: [&str; 3] = ["positive", "neutral", "negative"];

/// Checks every rule and reports the first problem, in document order.
pub fn validate(spec: &WorkflowSpec) -> Result<(), ValidationError> {
    check(spec).map(|_| ())
}

/// What checking produced along the way, kept by the compiled workflow.
pub(crate) struct Checked {
    pub conditions: Vec<CompiledCondition>,
    pub steps: Vec<CompiledStep>,
}

pub(crate) fn check(spec: &WorkflowSpec) -> Result<Checked, ValidationError> {
    check_name(&spec.name)?;
    check_trigger(&spec.trigger)?;
    let conditions = spec
        .conditions
        .iter()
        .enumerate()
        .map(|(i, c)| CompiledCondition::compile(i, c))
        .collect::<Result<Vec<_>, _>>()?;
    let steps = check_steps(&spec.steps)?;
    if let Some(retry) = &spec.retry {
        check_retry(retry)?;
    }
    if let Some(ms) = spec.timeout_ms {
        if !(1..=MAX_EXECUTION_TIMEOUT_MS).contains(&ms) {
            return Err(err("timeout_ms", format!("must be within 1..{MAX_EXECUTION_TIMEOUT_MS}")));
        }
    }
    Ok(Checked { conditions, steps })
}

/// A day: longer runs should be split by a `delay` step.
pub const MAX_EXECUTION_TIMEOUT_MS: u64 = 86_400_000;

fn err(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError::new(field, message)
}

fn check_name(name: &str) -> Result<(), ValidationError> {
    if name.trim().is_empty() {
        return Err(err("name", "must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(err(
            "name",
            format!("must be at most {MAX_NAME_CHARS} characters"),
        ));
    }
    Ok(())
}

/// The event type each filter reads its fields from.
fn filter_event_type(filter: &str) -> EventType {
    match filter {
        "keywords" => EventType::MessageReceived,
        "intent" => EventType::IntentDetected,
        "sentiment" => EventType::SentimentAnalyzed,
        _ => EventType::ImageUploaded,
    }
}

fn check_trigger(trigger: &Trigger) -> Result<(), ValidationError> {
    let event = trigger.event.as_str();
    let field = "trigger.event";
    if event.is_empty() {
        return Err(err(field, "must not be empty"));
    }
    if event.chars().count() > MAX_EVENT_TYPE_CHARS {
        return Err(err(
            field,
            format!("must be at most {MAX_EVENT_TYPE_CHARS} characters"),
        ));
    }
    if let Some(bad) = event
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-')))
    {
        return Err(err(
            field,
            format!("invalid character {bad:?} (event types use a-z, 0-9, '_', '.' and '-')"),
        ));
    }
    let kind = EventType::parse(event);
    let is_custom = event.starts_with("x.") && event.len() > 2;
    if !(kind.is_native() || is_custom) {
        let natives: Vec<&str> = EventType::NATIVE.iter().map(EventType::as_str).collect();
        return Err(err(
            field,
            format!(
                "unknown event type \"{event}\" (expected one of {} or a custom type starting with \"x.\")",
                natives.join(", ")
            ),
        ));
    }

    let filters = trigger.filter_names();
    if filters.len() > 1 {
        return Err(err(
            format!("trigger.{}", filters[1]),
            format!(
                "only one filter is allowed beside event (found {})",
                filters.join(" and ")
            ),
        ));
    }
    if let Some(filter) = filters.first() {
        let needed = filter_event_type(filter);
        if kind != needed {
            return Err(err(
                format!("trigger.{filter}"),
                format!("impossible trigger: {filter} filters only apply to {needed} events, not {event}"),
            ));
        }
    }
    if let Some(keywords) = &trigger.keywords {
        check_keywords(keywords)?;
    }
    if let Some(intent) = &trigger.intent {
        check_intent(intent)?;
    }
    if let Some(sentiment) = &trigger.sentiment {
        check_sentiment(sentiment)?;
    }
    if let Some(image) = &trigger.image {
        check_image(image)?;
    }
    Ok(())
}

fn check_keywords(filter: &KeywordFilter) -> Result<(), ValidationError> {
    if filter.any.is_empty() {
        return Err(err(
            "trigger.keywords.any",
            "must list at least one keyword",
        ));
    }
    for (i, keyword) in filter.any.iter().enumerate() {
        let field = format!("trigger.keywords.any[{i}]");
        if keyword.trim().is_empty() {
            return Err(err(field, "must not be blank"));
        }
        if keyword.chars().count() > MAX_KEYWORD_CHARS {
            return Err(err(
                field,
                format!("must be at most {MAX_KEYWORD_CHARS} characters"),
            ));
        }
        // Surrounding spaces would silently change what "whole word" means.
        if keyword.trim() != keyword {
            return Err(err(field, "must not start or end with whitespace"));
        }
    }
    Ok(())
}

fn check_intent(filter: &IntentFilter) -> Result<(), ValidationError> {
    if !(0.0..=1.0).contains(&filter.min_confidence) {
        return Err(err("trigger.intent.min_confidence", "must be within 0..1"));
    }
    for (i, name) in filter.names.iter().enumerate() {
        if name.trim().is_empty() {
            return Err(err(
                format!("trigger.intent.names[{i}]"),
                "must not be blank",
            ));
        }
    }
    Ok(())
}

fn check_sentiment(filter: &SentimentFilter) -> Result<(), ValidationError> {
    for (i, label) in filter.labels.iter().enumerate() {
        if !SENTIMENT_LABELS.contains(&label.as_str()) {
            return Err(err(
                format!("trigger.sentiment.labels[{i}]"),
                format!("unknown label \"{label}\" (expected positive, neutral or negative)"),
            ));
        }
    }
    for (name, bound) in [
        ("score_below", filter.score_below),
        ("score_above", filter.score_above),
    ] {
        if let Some(bound) = bound {
            if !(-1.0..=1.0).contains(&bound) {
                return Err(err(
                    format!("trigger.sentiment.{name}"),
                    "must be within -1..1",
                ));
            }
        }
    }
    if let (Some(above), Some(below)) = (filter.score_above, filter.score_below) {
        if above >= below {
            return Err(err(
                "trigger.sentiment.score_above",
                format!("must be less than score_below ({above} >= {below}): no score can match"),
            ));
        }
    }
    if filter.labels.is_empty() && filter.score_below.is_none() && filter.score_above.is_none() {
        return Err(err(
            "trigger.sentiment",
            "needs labels, score_below or score_above",
        ));
    }
    Ok(())
}

fn check_image(filter: &ImageFilter) -> Result<(), ValidationError> {
    if filter.labels_any.is_empty() && filter.mime_types.is_empty() {
        return Err(err("trigger.image", "needs labels_any or mime_types"));
    }
    for (i, label) in filter.labels_any.iter().enumerate() {
        if label.trim().is_empty() {
            return Err(err(
                format!("trigger.image.labels_any[{i}]"),
                "must not be blank",
            ));
        }
    }
    for (i, mime) in filter.mime_types.iter().enumerate() {
        let valid = match mime.split_once('/') {
            Some((kind, sub)) => {
                !kind.is_empty()
                    && !sub.is_empty()
                    && kind.chars().all(is_token_char)
                    && sub.chars().all(is_token_char)
            }
            None => false,
        };
        if !valid {
            return Err(err(
                format!("trigger.image.mime_types[{i}]"),
                format!("\"{mime}\" is not a mime type (expected type/subtype, e.g. image/png)"),
            ));
        }
    }
    Ok(())
}

fn check_steps(steps: &[Step]) -> Result<Vec<CompiledStep>, ValidationError> {
    if steps.is_empty() {
        return Err(err("steps", "must have at least one step"));
    }
    if steps.len() > MAX_STEPS {
        return Err(err(
            "steps",
            format!(
                "must have at most {MAX_STEPS} steps (found {})",
                steps.len()
            ),
        ));
    }
    let all: HashSet<&str> = steps.iter().map(Step::id).collect();
    let mut earlier: HashSet<&str> = HashSet::with_capacity(steps.len());
    let mut compiled = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        let id = step.id();
        check_step_id(i, id, &earlier)?;
        let scope = Scope {
            earlier: &earlier,
            all: &all,
        };
        let action = step.compile(&StepField(i), &scope)?;
        compiled.push(CompiledStep {
            id: id.to_string(),
            action,
        });
        earlier.insert(id);
    }
    Ok(compiled)
}

fn check_step_id(i: usize, id: &str, earlier: &HashSet<&str>) -> Result<(), ValidationError> {
    let field = format!("steps[{i}].id");
    if id.is_empty() {
        return Err(err(field, "must not be empty"));
    }
    if id.chars().count() > MAX_STEP_ID_CHARS {
        return Err(err(
            field,
            format!("must be at most {MAX_STEP_ID_CHARS} characters"),
        ));
    }
    if let Some(bad) = id.chars().find(|c| !is_name_char(*c)) {
        return Err(err(
            field,
            format!("invalid character {bad:?} (step ids use letters, digits, '_' and '-')"),
        ));
    }
    if earlier.contains(id) {
        return Err(err(field, format!("duplicate step id \"{id}\"")));
    }
    Ok(())
}

fn check_retry(retry: &RetryPolicy) -> Result<(), ValidationError> {
    if let Some(attempts) = retry.max_attempts {
        if !(1..=MAX_RETRY_ATTEMPTS).contains(&attempts) {
            return Err(err(
                "retry.max_attempts",
                format!("must be within 1..{MAX_RETRY_ATTEMPTS}"),
            ));
        }
    }
    if let Some(initial) = retry.initial_backoff_ms {
        if !(1..=MAX_INITIAL_BACKOFF_MS).contains(&initial) {
            return Err(err(
                "retry.initial_backoff_ms",
                format!("must be within 1..{MAX_INITIAL_BACKOFF_MS}"),
            ));
        }
    }
    if let Some(max) = retry.max_backoff_ms {
        if !(1..=MAX_BACKOFF_MS).contains(&max) {
            return Err(err(
                "retry.max_backoff_ms",
                format!("must be within 1..{MAX_BACKOFF_MS}"),
            ));
        }
        if let Some(initial) = retry.initial_backoff_ms {
            if max < initial {
                return Err(err(
                    "retry.max_backoff_ms",
                    format!("must be at least initial_backoff_ms ({initial})"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn base() -> Value {
        json!({
            "name": "base",
            "trigger": {"event": "message.received"},
            "steps": [{"id": "a", "action": "reply", "text": "hi"}]
        })
    }

    fn with(overrides: Value) -> Value {
        let mut doc = base();
        for (key, value) in overrides.as_object().unwrap() {
            doc[key] = value.clone();
        }
        doc
    }

    fn run(doc: &Value) -> Result<(), ValidationError> {
        let spec: WorkflowSpec = serde_json::from_value(doc.clone())
            .unwrap_or_else(|e| panic!("test document does not deserialise: {e}: {doc}"));
        validate(&spec)
    }

    fn reply(id: &str, text: &str) -> Value {
        json!({"id": id, "action": "reply", "text": text})
    }

    fn webhook(extra: Value) -> Value {
        let mut step = json!({"id": "w", "action": "webhook", "url": "https://hooks.example/x"});
        for (key, value) in extra.as_object().unwrap() {
            step[key] = value.clone();
        }
        step
    }

    #[test]
    fn valid_workflows_pass() {
        let docs = [
            base(),
            with(json!({"trigger": {"event": "x.billing.paid"}})),
            with(
                json!({"trigger": {"event": "message.received", "keywords": {"any": ["cancel", "stop it"], "case_sensitive": true}}}),
            ),
            with(
                json!({"trigger": {"event": "intent.detected", "intent": {"names": [], "min_confidence": 1.0}}}),
            ),
            with(
                json!({"trigger": {"event": "sentiment.analyzed", "sentiment": {"score_above": -1.0, "score_below": 1.0}}}),
            ),
            with(
                json!({"trigger": {"event": "sentiment.analyzed", "sentiment": {"labels": ["neutral"]}}}),
            ),
            with(
                json!({"trigger": {"event": "image.uploaded", "image": {"mime_types": ["image/svg+xml"]}}}),
            ),
            with(json!({"conditions": [
                {"path": "data.labels.0", "op": "eq", "value": "x"},
                {"path": "conversation_id", "op": "exists", "value": false},
                {"path": "data.n", "op": "gte", "value": "a"},
                {"path": "data.t", "op": "matches", "value": "^(?i)refund"}
            ]})),
            with(json!({"steps": [
                webhook(json!({"url": "https://hooks.example/c/{{event.conversation_id}}?q={{event.id}}",
                               "headers": {"X-Conversation": "{{event.conversation_id}}"}, "timeout_ms": 300000,
                               "body": {"a": ["{{event.data.text}}"]}})),
                reply("r", "ticket {{steps.w.response.ticket}}"),
                {"id": "d", "action": "delay", "duration": "30d"},
                {"id": "t", "action": "tag", "tags": ["{{steps.w.status}}"]}
            ]})),
            with(
                json!({"retry": {"max_attempts": 100, "initial_backoff_ms": 3600000, "max_backoff_ms": 86400000}}),
            ),
            with(json!({"retry": {"max_backoff_ms": 10}})),
        ];
        for doc in docs {
            assert_eq!(run(&doc), Ok(()), "{doc}");
        }
    }

    #[test]
    fn each_rule_names_its_field() {
        let many_steps: Vec<Value> = (0..51).map(|i| reply(&format!("s{i}"), "x")).collect();
        let many_tags: Vec<String> = (0..21).map(|i| format!("t{i}")).collect();
        let cases: Vec<(Value, &str, &str)> = vec![
            // name
            (with(json!({"name": ""})), "name", "must not be empty"),
            (with(json!({"name": "   "})), "name", "must not be empty"),
            (
                with(json!({"name": "n".repeat(201)})),
                "name",
                "at most 200",
            ),
            // trigger.event
            (
                with(json!({"trigger": {"event": ""}})),
                "trigger.event",
                "must not be empty",
            ),
            (
                with(json!({"trigger": {"event": format!("x.{}", "a".repeat(99))}})),
                "trigger.event",
                "at most 100",
            ),
            (
                with(json!({"trigger": {"event": "Message.Received"}})),
                "trigger.event",
                "invalid character 'M'",
            ),
            (
                with(json!({"trigger": {"event": "x.a b"}})),
                "trigger.event",
                "invalid character ' '",
            ),
            (
                with(json!({"trigger": {"event": "message.sent"}})),
                "trigger.event",
                "unknown event type \"message.sent\"",
            ),
            (
                with(json!({"trigger": {"event": "x."}})),
                "trigger.event",
                "unknown event type",
            ),
            // filters
            (
                with(
                    json!({"trigger": {"event": "message.received", "keywords": {"any": ["a"]}, "intent": {"names": []}}}),
                ),
                "trigger.intent",
                "only one filter",
            ),
            (
                with(json!({"trigger": {"event": "intent.detected", "keywords": {"any": ["a"]}}})),
                "trigger.keywords",
                "impossible trigger: keywords filters only apply to message.received events",
            ),
            (
                with(json!({"trigger": {"event": "message.received", "intent": {"names": ["a"]}}})),
                "trigger.intent",
                "impossible trigger",
            ),
            (
                with(
                    json!({"trigger": {"event": "x.custom", "sentiment": {"labels": ["negative"]}}}),
                ),
                "trigger.sentiment",
                "impossible trigger",
            ),
            (
                with(
                    json!({"trigger": {"event": "conversation.started", "image": {"labels_any": ["a"]}}}),
                ),
                "trigger.image",
                "impossible trigger",
            ),
            // keywords
            (
                with(json!({"trigger": {"event": "message.received", "keywords": {"any": []}}})),
                "trigger.keywords.any",
                "at least one",
            ),
            (
                with(
                    json!({"trigger": {"event": "message.received", "keywords": {"any": ["ok", " "]}}}),
                ),
                "trigger.keywords.any[1]",
                "must not be blank",
            ),
            (
                with(
                    json!({"trigger": {"event": "message.received", "keywords": {"any": ["k".repeat(101)]}}}),
                ),
                "trigger.keywords.any[0]",
                "at most 100",
            ),
            (
                with(
                    json!({"trigger": {"event": "message.received", "keywords": {"any": [" cancel"]}}}),
                ),
                "trigger.keywords.any[0]",
                "whitespace",
            ),
            // intent
            (
                with(
                    json!({"trigger": {"event": "intent.detected", "intent": {"names": ["a"], "min_confidence": 1.5}}}),
                ),
                "trigger.intent.min_confidence",
                "must be within 0..1",
            ),
            (
                with(
                    json!({"trigger": {"event": "intent.detected", "intent": {"names": ["a"], "min_confidence": -0.1}}}),
                ),
                "trigger.intent.min_confidence",
                "must be within 0..1",
            ),
            (
                with(
                    json!({"trigger": {"event": "intent.detected", "intent": {"names": ["a", ""]}}}),
                ),
                "trigger.intent.names[1]",
                "must not be blank",
            ),
            // sentiment
            (
                with(
                    json!({"trigger": {"event": "sentiment.analyzed", "sentiment": {"labels": ["angry"]}}}),
                ),
                "trigger.sentiment.labels[0]",
                "unknown label \"angry\"",
            ),
            (
                with(
                    json!({"trigger": {"event": "sentiment.analyzed", "sentiment": {"score_below": -1.5}}}),
                ),
                "trigger.sentiment.score_below",
                "must be within -1..1",
            ),
            (
                with(
                    json!({"trigger": {"event": "sentiment.analyzed", "sentiment": {"score_above": 2}}}),
                ),
                "trigger.sentiment.score_above",
                "must be within -1..1",
            ),
            (
                with(
                    json!({"trigger": {"event": "sentiment.analyzed", "sentiment": {"score_above": 0.2, "score_below": -0.5}}}),
                ),
                "trigger.sentiment.score_above",
                "must be less than score_below",
            ),
            (
                with(
                    json!({"trigger": {"event": "sentiment.analyzed", "sentiment": {"score_above": 0.2, "score_below": 0.2}}}),
                ),
                "trigger.sentiment.score_above",
                "must be less than score_below",
            ),
            (
                with(json!({"trigger": {"event": "sentiment.analyzed", "sentiment": {}}})),
                "trigger.sentiment",
                "needs labels, score_below or score_above",
            ),
            // image
            (
                with(json!({"trigger": {"event": "image.uploaded", "image": {}}})),
                "trigger.image",
                "needs labels_any or mime_types",
            ),
            (
                with(
                    json!({"trigger": {"event": "image.uploaded", "image": {"labels_any": [""]}}}),
                ),
                "trigger.image.labels_any[0]",
                "must not be blank",
            ),
            (
                with(
                    json!({"trigger": {"event": "image.uploaded", "image": {"mime_types": ["image/png", "png"]}}}),
                ),
                "trigger.image.mime_types[1]",
                "not a mime type",
            ),
            (
                with(
                    json!({"trigger": {"event": "image.uploaded", "image": {"mime_types": ["image/"]}}}),
                ),
                "trigger.image.mime_types[0]",
                "not a mime type",
            ),
            (
                with(
                    json!({"trigger": {"event": "image.uploaded", "image": {"mime_types": ["image/png jpeg"]}}}),
                ),
                "trigger.image.mime_types[0]",
                "not a mime type",
            ),
            // conditions
            (
                with(
                    json!({"conditions": [{"path": "data.a", "op": "exists"}, {"path": "", "op": "exists"}]}),
                ),
                "conditions[1].path",
                "must not be empty",
            ),
            (
                with(json!({"conditions": [{"path": "data/a", "op": "exists"}]})),
                "conditions[0].path",
                "invalid character '/'",
            ),
            (
                with(json!({"conditions": [{"path": "data.a", "op": "eq"}]})),
                "conditions[0].value",
                "is required",
            ),
            (
                with(json!({"conditions": [{"path": "data.a", "op": "in", "value": {"a": 1}}]})),
                "conditions[0].value",
                "must be an array",
            ),
            (
                with(json!({"conditions": [{"path": "data.a", "op": "matches", "value": "[a-"}]})),
                "conditions[0].value",
                "invalid regex",
            ),
            (
                with(json!({"conditions": [{"path": "data.a", "op": "lt", "value": true}]})),
                "conditions[0].value",
                "number or a string",
            ),
            (
                with(json!({"conditions": [{"path": "data.a", "op": "exists", "value": 1}]})),
                "conditions[0].value",
                "true or false",
            ),
            // steps
            (with(json!({"steps": []})), "steps", "at least one step"),
            (
                with(json!({"steps": many_steps})),
                "steps",
                "at most 50 steps",
            ),
            (
                with(json!({"steps": [reply("", "x")]})),
                "steps[0].id",
                "must not be empty",
            ),
            (
                with(json!({"steps": [reply(&"i".repeat(65), "x")]})),
                "steps[0].id",
                "at most 64",
            ),
            (
                with(json!({"steps": [reply("a.b", "x")]})),
                "steps[0].id",
                "invalid character '.'",
            ),
            (
                with(json!({"steps": [reply("page", "x"), reply("b", "x"), reply("page", "y")]})),
                "steps[2].id",
                "duplicate step id \"page\"",
            ),
            // webhook
            (
                with(json!({"steps": [webhook(json!({"url": "not a url"}))]})),
                "steps[0].url",
                "absolute http or https url",
            ),
            (
                with(json!({"steps": [webhook(json!({"url": "/relative/path"}))]})),
                "steps[0].url",
                "absolute http or https url",
            ),
            (
                with(json!({"steps": [webhook(json!({"url": "ftp://files.example/x"}))]})),
                "steps[0].url",
                "scheme \"ftp\"",
            ),
            (
                with(json!({"steps": [webhook(json!({"url": "mailto:ops@example.com"}))]})),
                "steps[0].url",
                "scheme \"mailto\"",
            ),
            (
                with(json!({"steps": [webhook(json!({"url": "{{event.data.url}}"}))]})),
                "steps[0].url",
                "not its scheme or host",
            ),
            (
                with(json!({"steps": [webhook(json!({"url": "https://{{event.data.host}}/x"}))]})),
                "steps[0].url",
                "not its scheme or host",
            ),
            (
                with(
                    json!({"steps": [webhook(json!({"url": "https://hooks.example:{{event.id}}/x"}))]}),
                ),
                "steps[0].url",
                "not its scheme or host",
            ),
            (
                with(
                    json!({"steps": [webhook(json!({"url": "https://hooks.example/{{event.id"}))]}),
                ),
                "steps[0].url",
                "invalid template",
            ),
            (
                with(json!({"steps": [webhook(json!({"timeout_ms": 0}))]})),
                "steps[0].timeout_ms",
                "must be within 1..300000",
            ),
            (
                with(json!({"steps": [webhook(json!({"timeout_ms": 300001}))]})),
                "steps[0].timeout_ms",
                "must be within 1..300000",
            ),
            (
                with(json!({"steps": [webhook(json!({"headers": {"X Bad": "v"}}))]})),
                "steps[0].headers[\"X Bad\"]",
                "invalid header name",
            ),
            (
                with(json!({"steps": [webhook(json!({"headers": {"X-Ok": "v", "X:Bad": "v"}}))]})),
                "steps[0].headers[\"X:Bad\"]",
                "invalid header name",
            ),
            (
                with(json!({"steps": [webhook(json!({"headers": {"Host": "evil.example"}}))]})),
                "steps[0].headers.Host",
                "cannot be overridden",
            ),
            (
                with(json!({"steps": [webhook(json!({"headers": {"X-A": "a\r\nX-B: b"}}))]})),
                "steps[0].headers.X-A",
                "control characters",
            ),
            (
                with(json!({"steps": [webhook(json!({"headers": {"X-A": "{{nope.x}}"}}))]})),
                "steps[0].headers.X-A",
                "invalid template",
            ),
            (
                with(json!({"steps": [webhook(json!({"body": {"a": [1, "{{event}}"]}}))]})),
                "steps[0].body.a[1]",
                "invalid template",
            ),
            (
                with(json!({"steps": [webhook(json!({"body": "{{steps.w.status}}"}))]})),
                "steps[0].body",
                "does not run before this step",
            ),
            // reply, tag, handoff, notify
            (
                with(json!({"steps": [reply("r", "")]})),
                "steps[0].text",
                "must not be empty",
            ),
            (
                with(json!({"steps": [reply("r", &"x".repeat(4097))]})),
                "steps[0].text",
                "at most 4096",
            ),
            (
                with(json!({"steps": [reply("r", "Hi {{event.data.user.name")]})),
                "steps[0].text",
                "invalid template",
            ),
            (
                with(json!({"steps": [{"id": "t", "action": "tag", "tags": []}]})),
                "steps[0].tags",
                "at least one tag",
            ),
            (
                with(json!({"steps": [{"id": "t", "action": "tag", "tags": many_tags}]})),
                "steps[0].tags",
                "at most 20",
            ),
            (
                with(json!({"steps": [{"id": "t", "action": "tag", "tags": ["a", " "]}]})),
                "steps[0].tags[1]",
                "must not be blank",
            ),
            (
                with(json!({"steps": [{"id": "t", "action": "tag", "tags": ["{{ }}"]}]})),
                "steps[0].tags[0]",
                "invalid template: empty expression",
            ),
            (
                with(json!({"steps": [{"id": "h", "action": "handoff", "queue": ""}]})),
                "steps[0].queue",
                "must not be empty",
            ),
            (
                with(json!({"steps": [{"id": "h", "action": "handoff", "queue": "{{foo.bar}}"}]})),
                "steps[0].queue",
                "unknown root",
            ),
            (
                with(json!({"steps": [{"id": "n", "action": "notify", "message": " "}]})),
                "steps[0].message",
                "must not be empty",
            ),
            (
                with(
                    json!({"steps": [{"id": "n", "action": "notify", "message": "{{steps.n.x}}"}]}),
                ),
                "steps[0].message",
                "does not run before this step",
            ),
            // template references
            (
                with(
                    json!({"steps": [reply("first", "x"), reply("second", "{{steps.later.id}}"), reply("later", "x")]}),
                ),
                "steps[1].text",
                "template refers to step \"later\" which does not run before this step",
            ),
            (
                with(json!({"steps": [reply("first", "{{steps.ghost.id}}")]})),
                "steps[0].text",
                "template refers to unknown step \"ghost\"",
            ),
            // delay
            (
                with(json!({"steps": [{"id": "d", "action": "delay"}]})),
                "steps[0]",
                "needs duration or until",
            ),
            (
                with(
                    json!({"steps": [{"id": "d", "action": "delay", "duration": "1m", "until": "2026-11-25T10:00:00Z"}]}),
                ),
                "steps[0].until",
                "either duration or until",
            ),
            (
                with(json!({"steps": [{"id": "d", "action": "delay", "duration": "10 minutes"}]})),
                "steps[0].duration",
                "invalid duration",
            ),
            (
                with(json!({"steps": [{"id": "d", "action": "delay", "duration": "30d1ms"}]})),
                "steps[0].duration",
                "at most 30 days",
            ),
            (
                with(json!({"steps": [{"id": "d", "action": "delay", "until": "tomorrow"}]})),
                "steps[0].until",
                "RFC 3339",
            ),
            (
                with(
                    json!({"steps": [{"id": "d", "action": "delay", "until": "2026-11-25 10:00"}]}),
                ),
                "steps[0].until",
                "RFC 3339",
            ),
            // retry
            (
                with(json!({"retry": {"max_attempts": 0}})),
                "retry.max_attempts",
                "must be within 1..100",
            ),
            (
                with(json!({"retry": {"max_attempts": 101}})),
                "retry.max_attempts",
                "must be within 1..100",
            ),
            (
                with(json!({"retry": {"initial_backoff_ms": 0}})),
                "retry.initial_backoff_ms",
                "must be within 1..3600000",
            ),
            (
                with(json!({"retry": {"initial_backoff_ms": 3600001}})),
                "retry.initial_backoff_ms",
                "must be within 1..3600000",
            ),
            (
                with(json!({"retry": {"initial_backoff_ms": 500, "max_backoff_ms": 499}})),
                "retry.max_backoff_ms",
                "at least initial_backoff_ms (500)",
            ),
            (
                with(json!({"retry": {"max_backoff_ms": 86400001}})),
                "retry.max_backoff_ms",
                "must be within 1..86400000",
            ),
        ];
        for (doc, field, message) in cases {
            let err = run(&doc).expect_err(&format!("should be rejected: {doc}"));
            assert_eq!(err.field, field, "{doc}\n{err}");
            assert!(err.message.contains(message), "{doc}\n{err}");
            assert!(
                err.message.starts_with(|c: char| !c.is_uppercase()),
                "messages start lowercase: {err}"
            );
        }
    }

    #[test]
    fn the_first_problem_in_document_order_is_reported() {
        let doc = with(json!({
            "name": "",
            "trigger": {"event": "nope"},
            "steps": []
        }));
        assert_eq!(run(&doc).unwrap_err().field, "name");
        let doc = with(json!({"trigger": {"event": "nope"}, "steps": []}));
        assert_eq!(run(&doc).unwrap_err().field, "trigger.event");
    }
}
