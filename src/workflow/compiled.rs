//! A workflow ready to run: validated once, templates parsed, regexes compiled.
//!
//! The chatbot supervisor holds `Arc<CompiledWorkflow>`s in its trigger index and
//! hands them to executors. This module also defines what each trigger filter means
//! on an event document, one workflow at a time ([`filter_mismatch`]): `explain` uses
//! it for dry runs, and the trigger index (`chatbot::triggers`) is a faster route to
//! the same answers, tested against it.

use serde_json::Value;
use uuid::Uuid;

use super::condition::CompiledCondition;
use super::model::{
    ImageFilter, IntentFilter, KeywordFilter, SentimentFilter, Trigger, WorkflowSpec,
};
use super::actions::CompiledStep;
use super::validate::{check, ValidationError};

#[derive(Debug, Clone)]
pub struct CompiledWorkflow {
    pub id: Uuid,
    pub version: i32,
    pub spec: WorkflowSpec,
    pub conditions: Vec<CompiledCondition>,
    pub steps: Vec<CompiledStep>,
}

impl CompiledWorkflow {
    /// Validates `spec` and compiles it; the error is the first validation problem.
    pub fn compile(id: Uuid, version: i32, spec: WorkflowSpec) -> Result<Self, ValidationError> {
        let checked = check(&spec)?;
        Ok(CompiledWorkflow {
            id,
            version,
            spec,
            conditions: checked.conditions,
            steps: checked.steps,
        })
    }

    /// Whether every condition holds on the event document (true when there are none).
    pub fn conditions_match(&self, doc: &Value) -> bool {
        self.conditions.iter().all(|c| c.eval(doc))
    }

    /// Why this workflow does not match the event: `None` when it matches. Checks the
    /// event type, then the trigger filter, then the conditions, and reports the first
    /// thing that fails as `<workflow field>: <why>` (the dry run splits the two).
    pub fn explain(&self, doc: &Value) -> Option<String> {
        let wanted = self.spec.trigger.event.as_str();
        match doc.get("type").and_then(Value::as_str) {
            Some(actual) if actual == wanted => {}
            Some(actual) => {
                return Some(format!(
                "trigger.event: event type is \"{actual}\", the workflow listens to \"{wanted}\""
            ))
            }
            None => return Some("trigger.event: the event has no type".to_string()),
        }
        if let Some(reason) = filter_mismatch(&self.spec.trigger, doc) {
            return Some(reason);
        }
        self.conditions
            .iter()
            .find(|c| !c.eval(doc))
            .map(|c| c.describe_failure(doc))
    }
}

/// Why the trigger's filter rejects the event document, or `None` when it accepts it
/// (or has no filter). The event type is not checked here.
pub fn filter_mismatch(trigger: &Trigger, doc: &Value) -> Option<String> {
    if let Some(filter) = &trigger.keywords {
        return keyword_mismatch(filter, doc);
    }
    if let Some(filter) = &trigger.intent {
        return intent_mismatch(filter, doc);
    }
    if let Some(filter) = &trigger.sentiment {
        return sentiment_mismatch(filter, doc);
    }
    if let Some(filter) = &trigger.image {
        return image_mismatch(filter, doc);
    }
    None
}

fn data<'d>(doc: &'d Value, key: &str) -> Option<&'d Value> {
    doc.get("data")?.get(key)
}

pub(crate) fn data_str<'d>(doc: &'d Value, key: &str) -> Option<&'d str> {
    data(doc, key)?.as_str()
}

pub(crate) fn data_f64(doc: &Value, key: &str) -> Option<f64> {
    data(doc, key)?.as_f64()
}

/// The string elements of `data.<key>` when it is an array; other elements are skipped.
pub(crate) fn data_strings<'d>(doc: &'d Value, key: &str) -> Option<impl Iterator<Item = &'d str>> {
    Some(data(doc, key)?.as_array()?.iter().filter_map(Value::as_str))
}

/// `data.confidence` of an intent event: missing means 0, anything but a number means
/// the event cannot match an intent filter.
pub(crate) fn intent_confidence(doc: &Value) -> Option<f64> {
    match data(doc, "confidence") {
        None => Some(0.0),
        Some(value) => value.as_f64(),
    }
}

/// Letters, digits (in any script) and `_` make up words for keyword matching.
pub fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether `text[start..end]` is a whole word: no word character touches either end.
pub fn whole_word_at(text: &str, start: usize, end: usize) -> bool {
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char)
}

/// Whether `needle` occurs in `text` as a whole word. Occurrences may overlap, and a
/// later one can be a whole word where an earlier one is not, so every start counts.
pub fn contains_whole_word(text: &str, needle: &str) -> bool {
    if needle.is_empty() {
        return false;
    }
    let mut from = 0;
    while let Some(found) = text[from..].find(needle) {
        let start = from + found;
        if whole_word_at(text, start, start + needle.len()) {
            return true;
        }
        // Step one character past the start to allow an overlapping occurrence.
        from = start + text[start..].chars().next().map_or(1, char::len_utf8);
    }
    false
}

/// Keyword semantics: one keyword appears as a whole word in the lower-cased text,
/// and for `case_sensitive` filters also exactly as written.
pub(crate) fn keyword_matches(filter: &KeywordFilter, text: &str, lower_text: &str) -> bool {
    filter.any.iter().any(|keyword| {
        contains_whole_word(lower_text, &keyword.to_lowercase())
            && (!filter.case_sensitive || contains_whole_word(text, keyword))
    })
}

fn keyword_mismatch(filter: &KeywordFilter, doc: &Value) -> Option<String> {
    let Some(text) = data_str(doc, "text") else {
        return Some("trigger.keywords: data.text is missing or not a string".into());
    };
    if keyword_matches(filter, text, &text.to_lowercase()) {
        return None;
    }
    let how = if filter.case_sensitive {
        "with the same case"
    } else {
        "in any case"
    };
    Some(format!(
        "trigger.keywords.any: none of {} appears as a whole word {how} in data.text",
        Value::from(filter.any.clone())
    ))
}

fn intent_mismatch(filter: &IntentFilter, doc: &Value) -> Option<String> {
    let Some(name) = data_str(doc, "name") else {
        return Some("trigger.intent: data.name is missing or not a string".into());
    };
    if !filter.names.is_empty() && !filter.names.iter().any(|n| n == name) {
        return Some(format!(
            "trigger.intent.names: intent \"{name}\" is not one of {}",
            Value::from(filter.names.clone())
        ));
    }
    let Some(confidence) = intent_confidence(doc) else {
        return Some("trigger.intent.min_confidence: data.confidence is not a number".into());
    };
    if confidence < filter.min_confidence {
        return Some(format!(
            "trigger.intent.min_confidence: confidence {confidence} is below {}",
            filter.min_confidence
        ));
    }
    None
}

fn sentiment_mismatch(filter: &SentimentFilter, doc: &Value) -> Option<String> {
    if !filter.labels.is_empty() {
        let Some(label) = data_str(doc, "label") else {
            return Some("trigger.sentiment.labels: data.label is missing or not a string".into());
        };
        if !filter.labels.iter().any(|l| l == label) {
            return Some(format!(
                "trigger.sentiment.labels: label \"{label}\" is not one of {}",
                Value::from(filter.labels.clone())
            ));
        }
    }
    if filter.score_below.is_none() && filter.score_above.is_none() {
        return None;
    }
    let Some(score) = data_f64(doc, "score") else {
        return Some("trigger.sentiment: data.score is missing or not a number".into());
    };
    if let Some(below) = filter.score_below {
        if score >= below {
            return Some(format!(
                "trigger.sentiment.score_below: score {score} is not below {below}"
            ));
        }
    }
    if let Some(above) = filter.score_above {
        if score <= above {
            return Some(format!(
                "trigger.sentiment.score_above: score {score} is not above {above}"
            ));
        }
    }
    None
}

fn image_mismatch(filter: &ImageFilter, doc: &Value) -> Option<String> {
    if !filter.labels_any.is_empty() {
        let Some(mut labels) = data_strings(doc, "labels") else {
            return Some("trigger.image.labels_any: data.labels is missing or not an array".into());
        };
        if !labels.any(|label| filter.labels_any.iter().any(|l| l == label)) {
            return Some(format!(
                "trigger.image.labels_any: none of {} is in data.labels",
                Value::from(filter.labels_any.clone())
            ));
        }
    }
    if !filter.mime_types.is_empty() {
        let Some(mime) = data_str(doc, "mime_type") else {
            return Some(
                "trigger.image.mime_types: data.mime_type is missing or not a string".into(),
            );
        };
        if !filter
            .mime_types
            .iter()
            .any(|m| m.eq_ignore_ascii_case(mime))
        {
            return Some(format!(
                "trigger.image.mime_types: mime type \"{mime}\" is not one of {}",
                Value::from(filter.mime_types.clone())
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::actions::delay::DelaySpec;
    use crate::workflow::actions::webhook::DEFAULT_TIMEOUT as DEFAULT_WEBHOOK_TIMEOUT;
    use crate::workflow::actions::CompiledAction;
    use std::time::Duration;
    use serde_json::json;

    fn compile(spec: Value) -> CompiledWorkflow {
        let spec: WorkflowSpec = serde_json::from_value(spec).unwrap();
        CompiledWorkflow::compile(Uuid::nil(), 1, spec).unwrap()
    }

    fn reply() -> Value {
        json!([{"id": "r", "action": "reply", "text": "hi"}])
    }

    #[test]
    fn compiles_every_action() {
        let wf = compile(json!({
            "name": "all",
            "trigger": {"event": "message.received"},
            "steps": [
                {"id": "page", "action": "webhook", "url": "https://ops.example/hooks/{{event.conversation_id}}",
                 "body": {"c": "{{event.conversation_id}}", "n": 1}, "headers": {"X-Kind": "{{event.type}}"}},
                {"id": "fast", "action": "webhook", "url": "http://127.0.0.1:8080/", "timeout_ms": 250},
                {"id": "say", "action": "reply", "text": "ticket {{steps.page.response.ticket}}"},
                {"id": "label", "action": "tag", "tags": ["vip", "{{event.data.language}}"]},
                {"id": "human", "action": "handoff", "queue": "tier-2"},
                {"id": "wait", "action": "delay", "duration": "1h30m"},
                {"id": "later", "action": "delay", "until": "2026-11-25T11:00:00+01:00"},
                {"id": "ops", "action": "notify", "message": "done"}
            ]
        }));
        let names: Vec<&str> = wf.steps.iter().map(|s| s.action.name()).collect();
        assert_eq!(
            names,
            ["webhook", "webhook", "reply", "tag", "handoff", "delay", "delay", "notify"]
        );
        match &wf.steps[0].action {
            CompiledAction::Webhook(w) => {
                assert_eq!(w.timeout, DEFAULT_WEBHOOK_TIMEOUT);
                assert_eq!(w.headers[0].0, "X-Kind");
                assert!(!w.body.as_ref().unwrap().is_literal());
            }
            other => panic!("unexpected {other:?}"),
        }
        match &wf.steps[1].action {
            CompiledAction::Webhook(w) => {
                assert_eq!(w.timeout, Duration::from_millis(250));
                assert!(w.body.is_none());
            }
            other => panic!("unexpected {other:?}"),
        }
        match &wf.steps[5].action {
            CompiledAction::Delay(d) => assert_eq!(d.until, DelaySpec::For(Duration::from_secs(5400))),
            other => panic!("unexpected {other:?}"),
        }
        match &wf.steps[6].action {
            CompiledAction::Delay(d) => assert_eq!(d.until, DelaySpec::Until("2026-11-25T10:00:00Z".parse().unwrap())),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(wf.steps[2].id, "say");
    }

    #[test]
    fn compile_rejects_invalid_specs() {
        let spec: WorkflowSpec = serde_json::from_value(json!({
            "name": "x", "trigger": {"event": "bogus"}, "steps": reply()
        }))
        .unwrap();
        let err = CompiledWorkflow::compile(Uuid::nil(), 1, spec).unwrap_err();
        assert_eq!(err.field, "trigger.event");
    }

    #[test]
    fn explain_reports_type_filter_then_conditions() {
        let wf = compile(json!({
            "name": "refunds",
            "trigger": {"event": "intent.detected", "intent": {"names": ["refund"], "min_confidence": 0.7}},
            "conditions": [{"path": "data.entities.order", "op": "exists"}],
            "steps": reply()
        }));
        let doc = |v: Value| {
            let mut d = json!({"id": "e", "type": "intent.detected", "conversation_id": "c"});
            d["data"] = v;
            d
        };
        assert_eq!(
            wf.explain(&json!({"type": "message.received", "data": {}})).unwrap(),
            "trigger.event: event type is \"message.received\", the workflow listens to \"intent.detected\""
        );
        assert_eq!(
            wf.explain(&doc(json!({"name": "refund", "confidence": 0.42})))
                .unwrap(),
            "trigger.intent.min_confidence: confidence 0.42 is below 0.7"
        );
        assert_eq!(
            wf.explain(&doc(json!({"name": "billing", "confidence": 0.9})))
                .unwrap(),
            "trigger.intent.names: intent \"billing\" is not one of [\"refund\"]"
        );
        assert_eq!(
            wf.explain(&doc(json!({"name": "refund", "confidence": 0.9})))
                .unwrap(),
            "conditions[0]: condition (data.entities.order exists) failed, field is missing"
        );
        let matching =
            doc(json!({"name": "refund", "confidence": 0.7, "entities": {"order": "o-1"}}));
        assert_eq!(wf.explain(&matching), None);
        assert!(wf.conditions_match(&matching));
        assert!(!wf.conditions_match(&doc(json!({"name": "refund"}))));
    }

    #[test]
    fn explain_covers_each_filter_kind() {
        let keywords = compile(json!({
            "name": "k", "trigger": {"event": "message.received", "keywords": {"any": ["cancel"]}}, "steps": reply()
        }));
        let msg = |text: Value| json!({"type": "message.received", "data": {"text": text}});
        assert_eq!(keywords.explain(&msg(json!("please CANCEL it"))), None);
        assert!(keywords
            .explain(&msg(json!("cancellation")))
            .unwrap()
            .starts_with("trigger.keywords.any"));
        assert!(keywords
            .explain(&msg(json!(5)))
            .unwrap()
            .contains("data.text is missing"));

        let sentiment = compile(json!({
            "name": "s", "trigger": {"event": "sentiment.analyzed",
              "sentiment": {"labels": ["negative"], "score_below": -0.6, "score_above": -0.95}}, "steps": reply()
        }));
        let sent = |label: &str, score: f64| json!({"type": "sentiment.analyzed", "data": {"label": label, "score": score}});
        assert_eq!(sentiment.explain(&sent("negative", -0.7)), None);
        assert_eq!(
            sentiment.explain(&sent("negative", -0.6)).unwrap(),
            "trigger.sentiment.score_below: score -0.6 is not below -0.6"
        );
        assert!(sentiment
            .explain(&sent("negative", -0.95))
            .unwrap()
            .starts_with("trigger.sentiment.score_above"));
        assert!(sentiment
            .explain(&sent("neutral", -0.7))
            .unwrap()
            .starts_with("trigger.sentiment.labels"));

        let image = compile(json!({
            "name": "i", "trigger": {"event": "image.uploaded",
              "image": {"labels_any": ["receipt"], "mime_types": ["image/png"]}}, "steps": reply()
        }));
        let img = |labels: Value, mime: &str| json!({"type": "image.uploaded", "data": {"labels": labels, "mime_type": mime}});
        assert_eq!(
            image.explain(&img(json!(["cat", "receipt"]), "IMAGE/PNG")),
            None
        );
        assert!(image
            .explain(&img(json!(["cat"]), "image/png"))
            .unwrap()
            .starts_with("trigger.image.labels_any"));
        assert_eq!(
            image
                .explain(&img(json!(["receipt"]), "image/gif"))
                .unwrap(),
            "trigger.image.mime_types: mime type \"image/gif\" is not one of [\"image/png\"]"
        );
    }

    #[test]
    fn whole_words() {
        assert!(contains_whole_word("please cancel now", "cancel"));
        assert!(contains_whole_word("cancel", "cancel"));
        assert!(contains_whole_word("(cancel!)", "cancel"));
        assert!(!contains_whole_word("cancelled", "cancel"));
        assert!(!contains_whole_word("precancel", "cancel"));
        assert!(!contains_whole_word("cancel_it", "cancel"));
        assert!(!contains_whole_word("cancel2", "cancel"));
        assert!(contains_whole_word("xcancel cancel", "cancel"));
        // The whole-word occurrence overlaps a rejected one.
        assert!(contains_whole_word("xa a a", "a a"));
        assert!(!contains_whole_word("échecs", "échec"));
        assert!(contains_whole_word("un échec.", "échec"));
        assert!(!contains_whole_word("anything", ""));
    }
}
