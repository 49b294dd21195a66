//! [`parse_workflows`]: bytes (JSON or YAML, one workflow or a list) to validated
//! [`WorkflowSpec`]s, with errors that name the field path users see in their
//! document. Reads the model, then validates it: model → parse/validate → compiled.

use serde_json::Value;

use super::error::ValidationError;
use super::fields::{format_path, serde_message};
use super::model::WorkflowSpec;
use super::validate::validate;

/// Parses one workflow or a list of workflows from JSON or YAML and validates each.
///
/// JSON is assumed when the first non-blank byte is `{` or `[`, YAML otherwise (YAML
/// is a superset of JSON, but serde_json's error positions are better for JSON).
/// Errors name the field path, prefixed by the index for a list: `[2].steps[0].url`.
pub fn parse_workflows(bytes: &[u8]) -> Result<Vec<WorkflowSpec>, ValidationError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let doc: Value = match first {
        None => return Err(ValidationError::new("document", "is empty")),
        Some(b'{') | Some(b'[') => serde_json::from_slice(bytes)
            .map_err(|e| ValidationError::new("document", format!("invalid json: {e}")))?,
        Some(_) => {
            let text = std::str::from_utf8(bytes)
                .map_err(|e| ValidationError::new("document", format!("is not utf-8: {e}")))?;
            serde_yaml_ng::from_str(text)
                .map_err(|e| ValidationError::new("document", format!("invalid yaml: {e}")))?
        }
    };
    match &doc {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ValidationError::new(
                    "document",
                    "the list of workflows is empty",
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    parse_one(item).map_err(|e| ValidationError {
                        field: if e.field.is_empty() {
                            format!("[{i}]")
                        } else if e.field.starts_with('[') {
                            format!("[{i}]{}", e.field)
                        } else {
                            format!("[{i}].{}", e.field)
                        },
                        message: e.message,
                    })
                })
                .collect()
        }
        Value::Object(_) => parse_one(&doc).map(|spec| vec![spec]).map_err(|e| {
            if e.field.is_empty() {
                ValidationError::new("workflow", e.message)
            } else {
                e
            }
        }),
        _ => Err(ValidationError::new(
            "document",
            "expected a workflow object or a list of workflows",
        )),
    }
}

/// Deserialises and validates one workflow; an empty `field` in the error means the
/// workflow object itself (the caller names it).
pub fn parse_one(doc: &Value) -> Result<WorkflowSpec, ValidationError> {
    let spec: WorkflowSpec = match serde_path_to_error::deserialize(doc) {
        Ok(spec) => spec,
        Err(err) => {
            let field = format_path(err.path());
            let inner = err.into_inner();
            // Internally tagged enums buffer their fields before picking a variant,
            // which hides the field path from serde_path_to_error: the error stops at
            // `steps[i]`. Re-reading that one step's variant by itself recovers it.
            if let Some(refined) = refine_step_error(doc, &field) {
                return Err(refined);
            }
            return Err(ValidationError::new(
                field,
                serde_message(&inner.to_string()),
            ));
        }
    };
    validate(&spec)?;
    Ok(spec)
}

/// For an error located at `steps[i]`, deserialises that step again as its variant
/// alone (without the tag) so the error names the field inside the step.
fn refine_step_error(doc: &Value, field: &str) -> Option<ValidationError> {
    let index: usize = field
        .strip_prefix("steps[")?
        .strip_suffix(']')?
        .parse()
        .ok()?;
    let step = doc.get("steps")?.get(index)?.as_object()?;
    let action = step.get("action")?.as_str()?;
    let mut fields = step.clone();
    fields.remove("action");
    let fields = Value::Object(fields);
    let result = super::actions::locate_error(action, &fields)?;
    let (inner_path, message) = result;
    let field = if inner_path.is_empty() {
        format!("steps[{index}]")
    } else {
        format!("steps[{index}].{inner_path}")
    };
    Some(ValidationError::new(field, message))
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::model::Step;
    use serde_json::json;

    fn full_spec() -> Value {
        json!({
            "name": "Escalate angry customers",
            "enabled": false,
            "trigger": {"event": "sentiment.analyzed", "sentiment": {"labels": ["negative"], "score_below": -0.6, "score_above": -0.99}},
            "conditions": [
                {"path": "data.message_id", "op": "exists"},
                {"path": "data.message_id", "op": "ne", "value": null},
                {"path": "data.score", "op": "lte", "value": -0.5}
            ],
            "steps": [
                {"id": "page", "action": "webhook", "url": "https://ops.example/hooks/escalate",
                 "body": {"conversation": "{{event.conversation_id}}", "n": [1, 2.5, null]},
                 "headers": {"X-Team": "support"}, "timeout_ms": 5000},
                {"id": "handoff", "action": "handoff", "queue": "tier-2"},
                {"id": "wait", "action": "delay", "duration": "10m"},
                {"id": "until", "action": "delay", "until": "2026-11-25T10:00:00Z"},
                {"id": "follow-up", "action": "reply", "text": "Sorry, {{event.data.user.name}}."},
                {"id": "tags", "action": "tag", "tags": ["angry", "escalated"]},
                {"id": "ops", "action": "notify", "message": "escalated {{steps.page.response.id}}"}
            ],
            "retry": {"max_attempts": 5, "initial_backoff_ms": 500, "max_backoff_ms": 60000, "jitter": false}
        })
    }

    fn parse_one_json(doc: &Value) -> Result<WorkflowSpec, ValidationError> {
        let mut specs = parse_workflows(doc.to_string().as_bytes())?;
        assert_eq!(specs.len(), 1);
        Ok(specs.remove(0))
    }

    #[test]
    fn json_round_trip_keeps_the_spec() {
        let spec = parse_one_json(&full_spec()).unwrap();
        assert!(!spec.enabled);
        assert_eq!(spec.conditions[1].value, Some(Value::Null));
        let text = serde_json::to_string(&spec).unwrap();
        let back: WorkflowSpec = serde_json::from_str(&text).unwrap();
        assert_eq!(back, spec);
        // What is written back is what was read, field for field.
        assert_eq!(serde_json::to_value(&spec).unwrap(), full_spec());
    }

    #[test]
    fn yaml_round_trip_keeps_the_spec() {
        let spec = parse_one_json(&full_spec()).unwrap();
        let yaml = serde_yaml_ng::to_string(&spec).unwrap();
        let back = parse_workflows(yaml.as_bytes()).unwrap();
        assert_eq!(back, vec![spec]);
    }

    #[test]
    fn defaults_apply_and_round_trip() {
        let spec = parse_one_json(&json!({
            "name": "n", "trigger": {"event": "x.custom"},
            "steps": [{"id": "a", "action": "reply", "text": "hi"}],
            "retry": {"max_attempts": 3}
        }))
        .unwrap();
        assert!(spec.enabled);
        assert!(spec.conditions.is_empty());
        assert!(spec.retry.as_ref().unwrap().jitter);
        let back: WorkflowSpec =
            serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn reads_yaml_and_json_single_and_lists() {
        let yaml_one = "
name: Greet
trigger:
  event: conversation.started
steps:
  - id: hello
    action: reply
    text: \"Hello {{event.data.user.name}}\"
";
        let one = parse_workflows(yaml_one.as_bytes()).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name, "Greet");
        assert_eq!(one[0].steps[0].action(), "reply");
        assert_eq!(one[0].steps[0].id(), "hello");

        let yaml_list = "
- name: A
  trigger: {event: message.received, keywords: {any: [cancel]}}
  steps: [{id: a, action: tag, tags: [churn]}]
- name: B
  trigger: {event: intent.detected, intent: {names: [refund], min_confidence: 0.7}}
  steps: [{id: b, action: handoff, queue: billing}]
";
        let list = parse_workflows(yaml_list.as_bytes()).unwrap();
        assert_eq!(
            list.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["A", "B"]
        );
        assert_eq!(list[1].trigger.intent.as_ref().unwrap().min_confidence, 0.7);

        let json_list = format!("  \n[{}, {}]", full_spec(), full_spec());
        assert_eq!(parse_workflows(json_list.as_bytes()).unwrap().len(), 2);
    }

    #[test]
    fn serde_errors_name_the_field_path() {
        let with_step = |step: Value| {
            let mut doc = full_spec();
            doc["steps"][1] = step;
            doc
        };
        let cases = [
            (
                with_step(json!({"id": "x", "action": "sms", "to": "1"})),
                "steps[1].action",
                "unknown variant \"sms\", expected one of \"webhook\", \"reply\", \"tag\", \"handoff\", \"delay\", \"notify\"",
            ),
            (
                with_step(json!({"id": "x", "action": "webhook", "url": "https://a.example/", "timeout_ms": "5s"})),
                "steps[1].timeout_ms",
                "invalid type: string \"5s\", expected u64",
            ),
            (
                with_step(json!({"id": "x", "action": "reply", "text": "hi", "txt": "typo"})),
                "steps[1].txt",
                "unknown field \"txt\", expected \"id\" or \"text\"",
            ),
            (
                with_step(json!({"id": "x", "action": "webhook"})),
                "steps[1]",
                "missing field \"url\"",
            ),
            (
                with_step(json!({"id": "x", "action": "webhook", "url": "https://a.example/", "headers": {"A": 1}})),
                "steps[1].headers.A",
                "invalid type: integer \"1\", expected a string",
            ),
            (with_step(json!({"id": "x"})), "steps[1]", "missing field \"action\""),
            (
                json!({"name": "n", "trigger": {"event": "intent.detected", "intent": {"min_confidence": "high"}}, "steps": []}),
                "trigger.intent.min_confidence",
                "invalid type: string \"high\", expected f64",
            ),
            (
                json!({"name": "n", "trigger": {"event": "x.a"}, "steps": [], "owner": "me"}),
                "owner",
                "unknown field \"owner\"",
            ),
            (
                json!({"trigger": {"event": "x.a"}, "steps": []}),
                "workflow",
                "missing field \"name\"",
            ),
            (
                json!({"name": "n", "trigger": {"event": "x.a"}, "steps": [],
                       "conditions": [{"path": "a", "op": "like", "value": 1}]}),
                "conditions[0].op",
                "unknown variant \"like\"",
            ),
        ];
        for (doc, field, message) in cases {
            let err = parse_workflows(doc.to_string().as_bytes()).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.message.starts_with(message), "{err}");
        }
    }

    #[test]
    fn list_errors_carry_the_index() {
        let mut bad = full_spec();
        bad["steps"][0]["url"] = json!("ftp://files.example/");
        let doc = json!([full_spec(), full_spec(), bad]);
        let err = parse_workflows(doc.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.field, "[2].steps[0].url");

        let doc = json!([full_spec(), {"name": "x"}]);
        let err = parse_workflows(doc.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.to_string(), "[1]: missing field \"trigger\"");

        let yaml = "- name: ok\n  trigger: {event: x.a}\n  steps: [{id: a, action: reply, text: hi}]\n- 7\n";
        let err = parse_workflows(yaml.as_bytes()).unwrap_err();
        assert_eq!(err.field, "[1]");
    }

    #[test]
    fn validation_runs_after_parsing() {
        let mut doc = full_spec();
        doc["steps"][4]["text"] = json!("{{steps.ops.x}}");
        let err = parse_one_json(&doc).unwrap_err();
        assert_eq!(
            err.to_string(),
            "steps[4].text: template refers to step \"ops\" which does not run before this step"
        );
    }

    #[test]
    fn bad_documents() {
        for (doc, message) in [
            ("", "is empty"),
            ("   \n", "is empty"),
            ("{\"name\": ", "invalid json"),
            ("[1, 2", "invalid json"),
            ("name: [unclosed", "invalid yaml"),
            ("42", "expected a workflow object"),
            ("[]", "empty"),
        ] {
            let err = parse_workflows(doc.as_bytes()).unwrap_err();
            assert_eq!(err.field, "document", "{doc:?}");
            assert!(err.message.contains(message), "{doc:?}: {err}");
        }
        let err = parse_workflows(b"\xff\xfe: x").unwrap_err();
        assert!(err.message.contains("utf-8"), "{err}");
    }

    /// Every action is found by its name when an error is located inside a step, and
    /// its spec alone accepts every field a valid step has (or errors would be blamed on
    /// valid fields).
    #[test]
    fn every_action_locates_errors_inside_its_steps() {
        let spec = parse_one_json(&full_spec()).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for step in &spec.steps {
            seen.insert(step.action());
            let mut fields = serde_json::to_value(step).unwrap();
            fields.as_object_mut().unwrap().remove("action");
            let refined = crate::workflow::actions::locate_error(step.action(), &fields);
            assert_eq!(refined, None, "{}", step.action());
        }
        assert_eq!(seen.len(), Step::ACTIONS.len());
    }
}
