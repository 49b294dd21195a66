//! Workflow conditions compiled for evaluation: paths parsed and regexes built once
//! when the workflow is compiled, so evaluating a condition against an event never
//! allocates or fails.
//!
//! The trigger index (`chatbot::triggers`) narrows workflows down to candidates; these
//! conditions then run on the candidates only. `explain` (dry runs) uses
//! [`CompiledCondition::describe_failure`] to say which condition failed and why.

use regex::{Regex, RegexBuilder};
use serde_json::{Number, Value};
use std::cmp::Ordering;

use super::model::{Condition, ConditionOp};
use super::template::{lookup, FieldPath};
use super::error::ValidationError;

/// Compiled size limit for `matches` regexes: large enough for any sensible pattern,
/// small enough that one workflow cannot take a chatbot's memory.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Longest rendering of a JSON value inside a description, so explanations of events
/// with large fields stay readable.
const DESCRIBE_MAX_CHARS: usize = 120;

#[derive(Debug, Clone)]
enum Test {
    /// eq, ne, lt, lte, gt, gte and contains: compared against one value.
    Value(Value),
    In(Vec<Value>),
    Matches(Regex),
    Exists(bool),
}

/// A [`Condition`] ready to evaluate against event documents.
#[derive(Debug, Clone)]
pub struct CompiledCondition {
    index: usize,
    path: FieldPath,
    op: ConditionOp,
    test: Test,
}

impl CompiledCondition {
    /// Checks and compiles `conditions[index]`; errors name the offending field.
    pub fn compile(
        index: usize,
        condition: &Condition,
    ) -> Result<CompiledCondition, ValidationError> {
        let field = |name: &str| format!("conditions[{index}].{name}");
        let path = FieldPath::parse(&condition.path)
            .map_err(|message| ValidationError::new(field("path"), message))?;
        let op = condition.op;
        let value = condition.value.as_ref();
        let required = || {
            value.ok_or_else(|| {
                ValidationError::new(
                    field("value"),
                    format!("is required for op \"{}\"", op.as_str()),
                )
            })
        };
        let test = match op {
            ConditionOp::Exists => match value {
                None => Test::Exists(true),
                Some(Value::Bool(b)) => Test::Exists(*b),
                Some(_) => {
                    return Err(ValidationError::new(
                        field("value"),
                        "must be true or false for op \"exists\"",
                    ))
                }
            },
            ConditionOp::In => match required()? {
                Value::Array(items) if items.is_empty() => {
                    return Err(ValidationError::new(
                        field("value"),
                        "must not be an empty array for op \"in\"",
                    ))
                }
                Value::Array(items) => Test::In(items.clone()),
                _ => {
                    return Err(ValidationError::new(
                        field("value"),
                        "must be an array for op \"in\"",
                    ))
                }
            },
            ConditionOp::Matches => match required()? {
                Value::String(pattern) => Test::Matches(
                    RegexBuilder::new(pattern)
                        .size_limit(REGEX_SIZE_LIMIT)
                        .build()
                        .map_err(|e| {
                            ValidationError::new(field("value"), format!("invalid regex: {e}"))
                        })?,
                ),
                _ => {
                    return Err(ValidationError::new(
                        field("value"),
                        "must be a string (a regex) for op \"matches\"",
                    ))
                }
            },
            ConditionOp::Lt | ConditionOp::Lte | ConditionOp::Gt | ConditionOp::Gte => {
                match required()? {
                    v @ (Value::Number(_) | Value::String(_)) => Test::Value(v.clone()),
                    _ => {
                        return Err(ValidationError::new(
                            field("value"),
                            format!("must be a number or a string for op \"{}\"", op.as_str()),
                        ))
                    }
                }
            }
            ConditionOp::Eq | ConditionOp::Ne | ConditionOp::Contains => {
                Test::Value(required()?.clone())
            }
        };
        Ok(CompiledCondition {
            index,
            path,
            op,
            test,
        })
    }

    /// Position of the condition in the workflow's `conditions` list.
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn op(&self) -> ConditionOp {
        self.op
    }

    /// Evaluates against the whole event document (`data.mime_type`, `conversation_id`).
    ///
    /// A missing field fails every op except `ne` (a missing field is not equal to
    /// anything) and `exists: false`. `exists` treats an explicit `null` as absent,
    /// since senders use both to mean "not set".
    pub fn eval(&self, doc: &Value) -> bool {
        let field = lookup(doc, self.path.segments());
        match (&self.test, field) {
            (Test::Exists(expected), field) => field.is_some_and(|v| !v.is_null()) == *expected,
            (Test::Value(_), None) => self.op == ConditionOp::Ne,
            (_, None) => false,
            (Test::Value(expected), Some(actual)) => match self.op {
                ConditionOp::Eq => json_eq(actual, expected),
                ConditionOp::Ne => !json_eq(actual, expected),
                ConditionOp::Lt => order(actual, expected) == Some(Ordering::Less),
                ConditionOp::Lte => matches!(
                    order(actual, expected),
                    Some(Ordering::Less | Ordering::Equal)
                ),
                ConditionOp::Gt => order(actual, expected) == Some(Ordering::Greater),
                ConditionOp::Gte => matches!(
                    order(actual, expected),
                    Some(Ordering::Greater | Ordering::Equal)
                ),
                ConditionOp::Contains => match (actual, expected) {
                    (Value::String(haystack), Value::String(needle)) => {
                        haystack.contains(needle.as_str())
                    }
                    (Value::Array(items), needle) => items.iter().any(|i| json_eq(i, needle)),
                    _ => false,
                },
                // Compiled into their own tests.
                ConditionOp::In | ConditionOp::Matches | ConditionOp::Exists => false,
            },
            (Test::In(options), Some(actual)) => options.iter().any(|o| json_eq(actual, o)),
            (Test::Matches(regex), Some(actual)) => {
                actual.as_str().is_some_and(|s| regex.is_match(s))
            }
        }
    }

    /// The condition as a user would read it: `data.mime_type eq "image/png"`.
    pub fn describe(&self) -> String {
        let op = self.op.as_str();
        match &self.test {
            Test::Exists(true) => format!("{} exists", self.path),
            Test::Exists(false) => format!("{} exists false", self.path),
            Test::Value(v) => format!("{} {op} {}", self.path, short_json(v)),
            Test::In(items) => {
                format!(
                    "{} {op} {}",
                    self.path,
                    short_json(&Value::Array(items.clone()))
                )
            }
            Test::Matches(regex) => format!(
                "{} {op} {}",
                self.path,
                short_json(&Value::String(regex.as_str().to_string()))
            ),
        }
    }

    /// Why the condition fails on `doc`, for dry-run explanations:
    /// `conditions[0]: condition (data.mime_type eq "image/png") failed, field is "image/jpeg"`.
    pub fn describe_failure(&self, doc: &Value) -> String {
        let actual = match lookup(doc, self.path.segments()) {
            None => "field is missing".to_string(),
            Some(value) => format!("field is {}", short_json(value)),
        };
        format!(
            "conditions[{}]: condition ({}) failed, {actual}",
            self.index,
            self.describe()
        )
    }
}

/// JSON equality, except that numbers compare by value (`1 == 1.0`), also inside
/// arrays and objects.
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_cmp(x, y) == Some(Ordering::Equal),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|other| json_eq(v, other)))
        }
        _ => a == b,
    }
}

/// Numbers numerically, strings lexicographically (by code point), nothing else.
fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_cmp(x, y),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Integers compare exactly (an f64 cannot tell 2^53 from 2^53 + 1); anything with a
/// fraction compares as f64.
fn number_cmp(a: &Number, b: &Number) -> Option<Ordering> {
    fn int(n: &Number) -> Option<i128> {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    }
    match (int(a), int(b)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

fn short_json(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= DESCRIBE_MAX_CHARS {
        return text;
    }
    let mut cut: String = text.chars().take(DESCRIBE_MAX_CHARS).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cond(path: &str, op: &str, value: Option<Value>) -> CompiledCondition {
        let mut c = json!({"path": path, "op": op});
        if let Some(v) = value {
            c["value"] = v;
        }
        let c: Condition = serde_json::from_value(c).unwrap();
        CompiledCondition::compile(0, &c).unwrap()
    }

    fn doc() -> Value {
        json!({
            "id": "evt-1",
            "type": "image.uploaded",
            "conversation_id": "c-9",
            "data": {
                "mime_type": "image/png",
                "size": 1024,
                "ratio": 0.75,
                "labels": ["receipt", "paper", 3],
                "caption": "A Receipt from the shop",
                "nothing": null,
                "big": 9007199254740993u64,
                "nested": {"a": 1, "b": [1, 2]}
            }
        })
    }

    fn check(path: &str, op: &str, value: Value, expected: bool) {
        let c = cond(path, op, Some(value.clone()));
        assert_eq!(c.eval(&doc()), expected, "{path} {op} {value}");
    }

    #[test]
    fn eq_and_ne() {
        check("data.mime_type", "eq", json!("image/png"), true);
        check("data.mime_type", "eq", json!("image/jpeg"), false);
        check("data.size", "eq", json!(1024.0), true);
        check("data.size", "eq", json!("1024"), false);
        check("data.nested", "eq", json!({"b": [1.0, 2], "a": 1}), true);
        check("data.nested", "eq", json!({"a": 1}), false);
        check("data.nothing", "eq", json!(null), true);
        check("data.labels.1", "eq", json!("paper"), true);
        check("conversation_id", "eq", json!("c-9"), true);
        check("data.big", "eq", json!(9007199254740992u64), false);
        check("data.missing", "eq", json!(null), false);
        check("data.mime_type", "ne", json!("image/jpeg"), true);
        check("data.mime_type", "ne", json!("image/png"), false);
        check("data.size", "ne", json!(1024.0), false);
        check("data.missing", "ne", json!("x"), true);
    }

    #[test]
    fn ordering_ops() {
        check("data.size", "lt", json!(2000), true);
        check("data.size", "lt", json!(1024), false);
        check("data.size", "lte", json!(1024), true);
        check("data.size", "lte", json!(1023.5), false);
        check("data.size", "gt", json!(1023.9), true);
        check("data.size", "gt", json!(1024), false);
        check("data.size", "gte", json!(1024.0), true);
        check("data.size", "gte", json!(1025), false);
        check("data.ratio", "lt", json!(1), true);
        check("data.big", "gt", json!(9007199254740992u64), true);
        // Strings compare lexicographically.
        check("data.mime_type", "gt", json!("image/jpeg"), true);
        check("data.mime_type", "lt", json!("image/jpeg"), false);
        check("occurred", "lt", json!("2030"), false);
        // Mixed types never order.
        check("data.size", "lt", json!("5000"), false);
        check("data.size", "gte", json!("0"), false);
        check("data.mime_type", "gt", json!(1), false);
        check("data.missing", "lt", json!(1), false);
        check("data.missing", "gte", json!(1), false);
    }

    #[test]
    fn in_contains_matches() {
        check(
            "data.mime_type",
            "in",
            json!(["image/jpeg", "image/png"]),
            true,
        );
        check("data.mime_type", "in", json!(["image/jpeg"]), false);
        check("data.size", "in", json!([1, 1024.0]), true);
        check("data.missing", "in", json!([null]), false);
        check("data.caption", "contains", json!("Receipt"), true);
        check("data.caption", "contains", json!("receipt"), false);
        check("data.labels", "contains", json!("paper"), true);
        check("data.labels", "contains", json!(3.0), true);
        check("data.labels", "contains", json!("pape"), false);
        check("data.size", "contains", json!(1), false);
        check("data.missing", "contains", json!("x"), false);
        check("data.caption", "matches", json!("^A [A-Z]\\w+ from"), true);
        check("data.caption", "matches", json!("^receipt"), false);
        check("data.caption", "matches", json!("(?i)^a receipt"), true);
        check("data.size", "matches", json!("1024"), false);
        check("data.missing", "matches", json!(".*"), false);
    }

    #[test]
    fn exists() {
        assert!(cond("data.mime_type", "exists", None).eval(&doc()));
        assert!(!cond("data.missing", "exists", None).eval(&doc()));
        assert!(!cond("data.nothing", "exists", None).eval(&doc()));
        assert!(cond("data.labels.2", "exists", Some(json!(true))).eval(&doc()));
        assert!(!cond("data.labels.3", "exists", Some(json!(true))).eval(&doc()));
        assert!(cond("data.missing", "exists", Some(json!(false))).eval(&doc()));
        assert!(!cond("data.size", "exists", Some(json!(false))).eval(&doc()));
    }

    #[test]
    fn compile_errors_name_the_field() {
        let cases = [
            (
                json!({"path": "", "op": "exists"}),
                "conditions[3].path",
                "must not be empty",
            ),
            (
                json!({"path": "data..x", "op": "exists"}),
                "conditions[3].path",
                "empty segment",
            ),
            (
                json!({"path": "data.a b", "op": "exists"}),
                "conditions[3].path",
                "invalid character",
            ),
            (
                json!({"path": "data.x", "op": "eq"}),
                "conditions[3].value",
                "is required for op \"eq\"",
            ),
            (
                json!({"path": "data.x", "op": "exists", "value": "yes"}),
                "conditions[3].value",
                "true or false",
            ),
            (
                json!({"path": "data.x", "op": "in", "value": "a"}),
                "conditions[3].value",
                "must be an array",
            ),
            (
                json!({"path": "data.x", "op": "in", "value": []}),
                "conditions[3].value",
                "empty array",
            ),
            (
                json!({"path": "data.x", "op": "matches", "value": "("}),
                "conditions[3].value",
                "invalid regex",
            ),
            (
                json!({"path": "data.x", "op": "matches", "value": 1}),
                "conditions[3].value",
                "must be a string",
            ),
            (
                json!({"path": "data.x", "op": "matches", "value": "\\w{1000}{1000}"}),
                "conditions[3].value",
                "invalid regex",
            ),
            (
                json!({"path": "data.x", "op": "lt", "value": [1]}),
                "conditions[3].value",
                "number or a string",
            ),
            (
                json!({"path": "data.x", "op": "gte", "value": null}),
                "conditions[3].value",
                "number or a string",
            ),
        ];
        for (c, field, message) in cases {
            let parsed: Condition = serde_json::from_value(c.clone()).unwrap();
            let err = CompiledCondition::compile(3, &parsed).unwrap_err();
            assert_eq!(err.field, field, "{c}");
            assert!(err.message.contains(message), "{c}: {}", err.message);
        }
    }

    #[test]
    fn explicit_null_is_a_value() {
        let c: Condition =
            serde_json::from_value(json!({"path": "data.nothing", "op": "eq", "value": null}))
                .unwrap();
        assert_eq!(c.value, Some(Value::Null));
        assert!(CompiledCondition::compile(0, &c).unwrap().eval(&doc()));
    }

    #[test]
    fn failures_are_described() {
        let c = cond("data.mime_type", "eq", Some(json!("image/jpeg")));
        assert_eq!(
            c.describe_failure(&doc()),
            "conditions[0]: condition (data.mime_type eq \"image/jpeg\") failed, field is \"image/png\""
        );
        let c = cond("data.user", "exists", None);
        assert_eq!(
            c.describe_failure(&doc()),
            "conditions[0]: condition (data.user exists) failed, field is missing"
        );
        let c = cond("data.caption", "eq", Some(json!("x".repeat(500))));
        assert!(c.describe().chars().count() < 200);
    }
}
