//! Small serde and syntax helpers for the fields users write, shared by the model,
//! the parser and the actions.

use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// `Option<Value>` would read an explicit `"value": null` as "no value"; a condition
/// like `{"op": "eq", "value": null}` (or a webhook body of `null`) must keep the null.
pub fn present_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// RFC 9110 `tchar`: what header names and mime type parts are made of.
pub fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// serde quotes names with backticks (`unknown field \`x\``); everything else users
/// see from botflow uses double quotes.
pub fn serde_message(message: &str) -> String {
    message.replace('`', "\"")
}

pub fn format_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => {
                out.push_str(&format!("[{index}]"));
            }
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    out
}

/// Deserialises `fields` as `T` alone: `None` when it reads, else the path of the field
/// at fault and serde's message.
pub fn variant_error<T: serde::de::DeserializeOwned>(fields: &Value) -> Option<(String, String)> {
    match serde_path_to_error::deserialize::<_, T>(fields) {
        Ok(_) => None,
        Err(err) => Some((
            format_path(err.path()),
            serde_message(&err.into_inner().to_string()),
        )),
    }
}
