//! Templates: `{{event.<path>}}` and `{{steps.<id>.<path>}}` inside workflow strings,
//! and [`JsonTemplate`] for whole JSON values (webhook bodies).
//!
//! Templates are parsed once when a workflow is compiled; executors only render them.
//! The syntax is deliberately tiny (a reference, nothing else): there is no logic to
//! sandbox, and validation can see every reference a step makes, so a workflow that
//! reads the output of a step that has not run yet is rejected when it is saved.
//!
//! Field paths and [`lookup`] also serve conditions (`condition.rs`), so a path means
//! the same thing in both places.

use serde_json::{Map, Value};
use std::fmt::{self, Write as _};

/// One dot-separated segment of a field path. A numeric segment indexes arrays and
/// still works as an object key (`"0"`), since both happen in real event data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathSegment {
    key: Box<str>,
    index: Option<usize>,
}

impl PathSegment {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn index(&self) -> Option<usize> {
        self.index
    }
}

/// A parsed field path such as `data.labels.0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    segments: Vec<PathSegment>,
}

impl FieldPath {
    /// Parses dot-separated segments of `[A-Za-z0-9_-]`; the message on error is
    /// lowercase and meant to follow a field name.
    pub fn parse(text: &str) -> Result<FieldPath, String> {
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        let segments = text
            .split('.')
            .map(|segment| {
                if segment.is_empty() {
                    return Err(format!("empty segment in path \"{text}\""));
                }
                if let Some(bad) = segment.chars().find(|c| !is_name_char(*c)) {
                    return Err(format!(
                        "invalid character {bad:?} in path \"{text}\" (segments use letters, digits, '_' and '-')"
                    ));
                }
                let index = if segment.bytes().all(|b| b.is_ascii_digit()) {
                    segment.parse().ok()
                } else {
                    None
                };
                Ok(PathSegment {
                    key: segment.into(),
                    index,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FieldPath { segments })
    }

    pub fn segments(&self) -> &[PathSegment] {
        &self.segments
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_char('.')?;
            }
            f.write_str(&segment.key)?;
        }
        Ok(())
    }
}

/// The characters of step ids and field path segments.
pub(crate) fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Follows `path` from `root`: object keys by name, array elements by numeric segment.
pub fn lookup<'v>(root: &'v Value, path: &[PathSegment]) -> Option<&'v Value> {
    let mut current = root;
    for segment in path {
        current = match current {
            Value::Object(map) => map.get(segment.key())?,
            Value::Array(items) => items.get(segment.index()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// What a `{{…}}` expression reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// A field of the event document (`id`, `type`, `conversation_id`, `data`, …).
    Event(FieldPath),
    /// A field of the output of an earlier step.
    Step { id: String, path: FieldPath },
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Event(path) => write!(f, "event.{path}"),
            Reference::Step { id, path } => write!(f, "steps.{id}.{path}"),
        }
    }
}

impl Reference {
    fn parse(expr: &str) -> Result<Reference, TemplateError> {
        let invalid = |reason: String| TemplateError::Invalid {
            expr: expr.to_string(),
            reason,
        };
        let (root, rest) = match expr.split_once('.') {
            Some((root, rest)) => (root, Some(rest)),
            None => (expr, None),
        };
        match root {
            "event" => {
                let rest = rest
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| invalid("expected a field after \"event.\"".into()))?;
                FieldPath::parse(rest)
                    .map(Reference::Event)
                    .map_err(invalid)
            }
            "steps" => {
                let rest = rest
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| invalid("expected a step id after \"steps.\"".into()))?;
                let (id, path) = match rest.split_once('.') {
                    Some((id, path)) if !path.is_empty() => (id, path),
                    Some((id, _)) => (id, ""),
                    None => (rest, ""),
                };
                if path.is_empty() {
                    return Err(invalid(format!("expected a field after \"steps.{id}.\"")));
                }
                if id.is_empty() || !id.chars().all(is_name_char) {
                    return Err(invalid(format!("invalid step id \"{id}\"")));
                }
                let path = FieldPath::parse(path).map_err(invalid)?;
                Ok(Reference::Step {
                    id: id.to_string(),
                    path,
                })
            }
            other => Err(invalid(format!(
                "unknown root \"{other}\" (expected event.<field> or steps.<id>.<field>)"
            ))),
        }
    }
}

/// Why a template did not parse or render. Parse errors say what is wrong with the
/// text; render errors name the whole reference and the missing field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateError {
    #[error("\"{{{{\" at character {position} has no closing \"}}}}\"")]
    Unclosed { position: usize },
    #[error("empty expression \"{{{{}}}}\" at character {position}")]
    Empty { position: usize },
    #[error("invalid expression \"{expr}\": {reason}")]
    Invalid { expr: String, reason: String },
    #[error("template {{{{{reference}}}}}: field \"{path}\" is missing from the event")]
    MissingEventField { reference: String, path: String },
    #[error("template {{{{{reference}}}}}: field \"{path}\" is missing from the output of step \"{step}\"")]
    MissingStepField {
        reference: String,
        step: String,
        path: String,
    },
    #[error("template {{{{{reference}}}}}: step \"{step}\" has no output")]
    MissingStepOutput { reference: String, step: String },
    #[error("template {{{{{reference}}}}}: its value makes the url path segment \"{segment}\", which would move along the path")]
    DotSegment { reference: String, segment: String },
    #[error("template {{{{{reference}}}}}: a template may not fill a url's scheme or host")]
    InAuthority { reference: String },
}

/// What templates render against: the event document and the outputs of the steps
/// that have run, by step id.
#[derive(Debug, Clone, Copy)]
pub struct TemplateContext<'a> {
    pub event: &'a Value,
    pub steps: &'a Map<String, Value>,
}

impl<'a> TemplateContext<'a> {
    fn resolve(&self, reference: &Reference) -> Result<&'a Value, TemplateError> {
        match reference {
            Reference::Event(path) => lookup(self.event, path.segments()).ok_or_else(|| {
                TemplateError::MissingEventField {
                    reference: reference.to_string(),
                    path: path.to_string(),
                }
            }),
            Reference::Step { id, path } => {
                let output =
                    self.steps
                        .get(id)
                        .ok_or_else(|| TemplateError::MissingStepOutput {
                            reference: reference.to_string(),
                            step: id.clone(),
                        })?;
                lookup(output, path.segments()).ok_or_else(|| TemplateError::MissingStepField {
                    reference: reference.to_string(),
                    step: id.clone(),
                    path: path.to_string(),
                })
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Expr(Reference),
}

/// A parsed template string.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest_start = 0;
        while let Some(found) = source[rest_start..].find("{{") {
            let open = rest_start + found;
            let inner_start = open + 2;
            let position = source[..open].chars().count() + 1;
            let close = source[inner_start..]
                .find("}}")
                .map(|i| inner_start + i)
                .ok_or(TemplateError::Unclosed { position })?;
            if open > rest_start {
                parts.push(Part::Literal(source[rest_start..open].to_string()));
            }
            let expr = source[inner_start..close].trim();
            if expr.is_empty() {
                return Err(TemplateError::Empty { position });
            }
            parts.push(Part::Expr(Reference::parse(expr)?));
            rest_start = close + 2;
        }
        if rest_start < source.len() {
            parts.push(Part::Literal(source[rest_start..].to_string()));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    /// The text as written in the workflow.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// True when the template has no `{{…}}` expression.
    pub fn is_literal(&self) -> bool {
        self.references().next().is_none()
    }

    pub fn references(&self) -> impl Iterator<Item = &Reference> {
        self.parts.iter().filter_map(|part| match part {
            Part::Expr(reference) => Some(reference),
            Part::Literal(_) => None,
        })
    }

    /// The literal text before the first expression (the whole text when literal).
    pub fn literal_prefix(&self) -> &str {
        match self.parts.first() {
            Some(Part::Literal(text)) => text,
            _ => "",
        }
    }

    /// The text with every expression replaced by `placeholder`, to check the shape
    /// of a templated value (a URL, say) before any event exists.
    pub fn with_placeholders(&self, placeholder: &str) -> String {
        let mut out = String::with_capacity(self.source.len());
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Expr(_) => out.push_str(placeholder),
            }
        }
        out
    }

    /// Renders to text: strings are inserted as they are, other JSON values as
    /// compact JSON.
    pub fn render_string(&self, ctx: &TemplateContext<'_>) -> Result<String, TemplateError> {
        let mut out = String::with_capacity(self.source.len());
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Expr(reference) => out.push_str(&value_text(ctx.resolve(reference)?)),
            }
        }
        Ok(out)
    }

    /// Renders a URL: each value is percent-encoded for where it lands (a path
    /// segment, a query or a fragment), so that event data fills one segment or one
    /// query value and cannot add segments, a query, a fragment or a different path
    /// (`../`). A value that makes a whole segment `.` or `..` is refused: URL parsers
    /// resolve those (even encoded) before the request is sent.
    pub fn render_url(&self, ctx: &TemplateContext<'_>) -> Result<String, TemplateError> {
        let mut url = UrlWriter::default();
        for part in &self.parts {
            match part {
                Part::Literal(text) => text.chars().try_for_each(|c| url.literal(c))?,
                Part::Expr(reference) => url.value(reference, &value_text(ctx.resolve(reference)?))?,
            }
        }
        url.finish()
    }

    /// Renders to a JSON value: a template that is exactly one `{{expr}}` keeps the
    /// type of what it refers to (number, object, …); anything else is a string.
    pub fn render_value(&self, ctx: &TemplateContext<'_>) -> Result<Value, TemplateError> {
        match self.parts.as_slice() {
            [Part::Expr(reference)] => ctx.resolve(reference).cloned(),
            _ => self.render_string(ctx).map(Value::String),
        }
    }
}

/// A value as template text: strings as they are, other JSON values as compact JSON.
fn value_text(value: &Value) -> std::borrow::Cow<'_, str> {
    match value {
        Value::String(s) => std::borrow::Cow::Borrowed(s),
        other => std::borrow::Cow::Owned(other.to_string()),
    }
}

/// What a value placed in a URL keeps as it is: RFC 3986's unreserved characters.
/// Everything else (`/ ? # & = + %`, spaces, non-ASCII) is percent-encoded.
const URL_VALUE: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

#[derive(Default, Clone, Copy, PartialEq)]
enum UrlPart {
    /// The scheme and host, up to the first `/`, `?` or `#` after `://`.
    #[default]
    Authority,
    Path,
    Query,
    Fragment,
}

/// Builds a rendered URL, knowing where each character lands.
#[derive(Default)]
struct UrlWriter {
    out: String,
    part: UrlPart,
    /// `://` has been written: the next `/`, `?` or `#` ends the host.
    host_started: bool,
    /// Where the current path segment starts in `out`, and the last value in it.
    segment_start: usize,
    segment_value: Option<String>,
}

impl UrlWriter {
    fn literal(&mut self, c: char) -> Result<(), TemplateError> {
        let next = match c {
            '/' => UrlPart::Path,
            '?' => UrlPart::Query,
            '#' => UrlPart::Fragment,
            _ => self.part,
        };
        match self.part {
            UrlPart::Authority if self.host_started => self.part = next,
            UrlPart::Authority => self.host_started = c == '/' && self.out.ends_with(":/"),
            UrlPart::Path if next != UrlPart::Path || c == '/' => {
                self.end_segment()?;
                self.part = next;
            }
            UrlPart::Query if c == '#' => self.part = UrlPart::Fragment,
            _ => {}
        }
        self.out.push(c);
        if self.part == UrlPart::Path && c == '/' {
            self.segment_start = self.out.len();
        }
        Ok(())
    }

    fn value(&mut self, reference: &Reference, text: &str) -> Result<(), TemplateError> {
        if self.part == UrlPart::Authority {
            return Err(TemplateError::InAuthority { reference: reference.to_string() });
        }
        self.out.extend(percent_encoding::utf8_percent_encode(text, URL_VALUE));
        if self.part == UrlPart::Path {
            self.segment_value = Some(reference.to_string());
        }
        Ok(())
    }

    /// A segment a value helped make may not be a dot segment (`.`, `..`, or those
    /// with `%2e` for a dot: URL parsers read them all alike).
    fn end_segment(&mut self) -> Result<(), TemplateError> {
        if let Some(reference) = self.segment_value.take() {
            let segment = &self.out[self.segment_start..];
            if matches!(segment.to_ascii_lowercase().replace("%2e", ".").as_str(), "." | "..") {
                return Err(TemplateError::DotSegment { reference, segment: segment.to_string() });
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<String, TemplateError> {
        if self.part == UrlPart::Path {
            self.end_segment()?;
        }
        Ok(self.out)
    }
}

/// A template error inside a JSON value, with the path to the string that holds it
/// relative to the value (`""` for the value itself, `.a[0]` below it).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {error}")]
pub struct JsonTemplateError {
    pub path: String,
    pub error: TemplateError,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// A subtree without any expression: rendering is a clone.
    Literal(Value),
    Template {
        path: String,
        template: Template,
    },
    Array(Vec<Node>),
    Object(Vec<(String, Node)>),
}

/// A JSON value whose string leaves are templates; object keys stay literal.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonTemplate {
    root: Node,
}

impl JsonTemplate {
    pub fn compile(value: &Value) -> Result<JsonTemplate, JsonTemplateError> {
        let mut path = String::new();
        Ok(JsonTemplate {
            root: compile_node(value, &mut path)?,
        })
    }

    pub fn is_literal(&self) -> bool {
        matches!(self.root, Node::Literal(_))
    }

    /// Every templated string leaf with its path relative to the value.
    pub fn templates(&self) -> Vec<(&str, &Template)> {
        fn walk<'t>(node: &'t Node, out: &mut Vec<(&'t str, &'t Template)>) {
            match node {
                Node::Literal(_) => {}
                Node::Template { path, template } => out.push((path, template)),
                Node::Array(items) => items.iter().for_each(|item| walk(item, out)),
                Node::Object(fields) => fields.iter().for_each(|(_, node)| walk(node, out)),
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }

    pub fn render(&self, ctx: &TemplateContext<'_>) -> Result<Value, TemplateError> {
        render_node(&self.root, ctx)
    }
}

fn compile_node(value: &Value, path: &mut String) -> Result<Node, JsonTemplateError> {
    match value {
        Value::String(text) => {
            let template = Template::parse(text).map_err(|error| JsonTemplateError {
                path: path.clone(),
                error,
            })?;
            if template.is_literal() {
                Ok(Node::Literal(value.clone()))
            } else {
                Ok(Node::Template {
                    path: path.clone(),
                    template,
                })
            }
        }
        Value::Array(items) => {
            let mut nodes = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                let _ = write!(path, "[{i}]");
                nodes.push(compile_node(item, path)?);
                path.truncate(len);
            }
            if nodes.iter().all(|n| matches!(n, Node::Literal(_))) {
                Ok(Node::Literal(value.clone()))
            } else {
                Ok(Node::Array(nodes))
            }
        }
        Value::Object(map) => {
            let mut fields = Vec::with_capacity(map.len());
            for (key, item) in map {
                let len = path.len();
                push_key(path, key);
                fields.push((key.clone(), compile_node(item, path)?));
                path.truncate(len);
            }
            if fields.iter().all(|(_, n)| matches!(n, Node::Literal(_))) {
                Ok(Node::Literal(value.clone()))
            } else {
                Ok(Node::Object(fields))
            }
        }
        _ => Ok(Node::Literal(value.clone())),
    }
}

fn render_node(node: &Node, ctx: &TemplateContext<'_>) -> Result<Value, TemplateError> {
    Ok(match node {
        Node::Literal(value) => value.clone(),
        Node::Template { template, .. } => template.render_value(ctx)?,
        Node::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| render_node(item, ctx))
                .collect::<Result<_, _>>()?,
        ),
        Node::Object(fields) => {
            let mut map = Map::new();
            for (key, node) in fields {
                map.insert(key.clone(), render_node(node, ctx)?);
            }
            Value::Object(map)
        }
    })
}

/// Appends an object key to a field path for error messages: `.key` for plain names,
/// `["odd key"]` for anything else, so the path stays unambiguous.
pub(crate) fn push_key(path: &mut String, key: &str) {
    if !key.is_empty() && key.chars().all(is_name_char) {
        path.push('.');
        path.push_str(key);
    } else {
        path.push('[');
        path.push_str(&Value::String(key.to_string()).to_string());
        path.push(']');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> Value {
        json!({
            "id": "evt-1",
            "type": "image.uploaded",
            "conversation_id": "c-9",
            "data": {
                "count": 3,
                "ratio": 0.5,
                "user": {"name": "Ada", "id": "u-1"},
                "labels": ["receipt", "paper"],
                "nothing": null,
                "0": "zero-key"
            }
        })
    }

    fn steps() -> Map<String, Value> {
        let mut steps = Map::new();
        steps.insert(
            "page".into(),
            json!({"status": 200, "response": {"ticket": "T-7", "ids": [4, 5]}}),
        );
        steps
    }

    fn render(text: &str) -> Result<Value, TemplateError> {
        let (event, steps) = (event(), steps());
        let ctx = TemplateContext {
            event: &event,
            steps: &steps,
        };
        Template::parse(text).unwrap().render_value(&ctx)
    }

    fn render_s(text: &str) -> Result<String, TemplateError> {
        let (event, steps) = (event(), steps());
        let ctx = TemplateContext {
            event: &event,
            steps: &steps,
        };
        Template::parse(text).unwrap().render_string(&ctx)
    }

    #[test]
    fn a_single_expression_keeps_the_json_type() {
        assert_eq!(render("{{event.data.count}}").unwrap(), json!(3));
        assert_eq!(render("{{ event.data.ratio }}").unwrap(), json!(0.5));
        assert_eq!(
            render("{{event.data.user}}").unwrap(),
            json!({"name": "Ada", "id": "u-1"})
        );
        assert_eq!(render("{{event.data.nothing}}").unwrap(), Value::Null);
        assert_eq!(render("{{event.conversation_id}}").unwrap(), json!("c-9"));
    }

    #[test]
    fn mixed_text_becomes_a_string() {
        assert_eq!(
            render("Hi {{event.data.user.name}}, {{event.data.count}} items").unwrap(),
            json!("Hi Ada, 3 items")
        );
        assert_eq!(render(" {{event.data.count}}").unwrap(), json!(" 3"));
        assert_eq!(
            render_s("user={{event.data.user}}").unwrap(),
            r#"user={"id":"u-1","name":"Ada"}"#
        );
        assert_eq!(render_s("{{event.data.count}}").unwrap(), "3");
        assert_eq!(
            render("plain text }} here").unwrap(),
            json!("plain text }} here")
        );
    }

    #[test]
    fn numeric_segments_index_arrays_and_still_work_as_keys() {
        assert_eq!(render("{{event.data.labels.1}}").unwrap(), json!("paper"));
        assert_eq!(render("{{event.data.0}}").unwrap(), json!("zero-key"));
        assert!(matches!(
            render("{{event.data.labels.2}}"),
            Err(TemplateError::MissingEventField { .. })
        ));
    }

    #[test]
    fn step_outputs_are_reachable() {
        assert_eq!(
            render("{{steps.page.response.ticket}}").unwrap(),
            json!("T-7")
        );
        assert_eq!(render("{{steps.page.response.ids.0}}").unwrap(), json!(4));
        assert_eq!(render("#{{steps.page.status}}").unwrap(), json!("#200"));
    }

    #[test]
    fn missing_fields_are_errors_naming_the_reference() {
        let err = render("Hello {{event.data.user.nick}}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "template {{event.data.user.nick}}: field \"data.user.nick\" is missing from the event"
        );
        let err = render_s("{{event.data.count.deeper}}").unwrap_err();
        assert!(matches!(err, TemplateError::MissingEventField { .. }));
        let err = render("{{steps.page.response.missing}}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "template {{steps.page.response.missing}}: field \"response.missing\" is missing from the output of step \"page\""
        );
        let err = render("{{steps.other.status}}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "template {{steps.other.status}}: step \"other\" has no output"
        );
    }

    #[test]
    fn parse_errors() {
        let cases = [
            (
                "Hello {{event.data.x",
                "\"{{\" at character 7 has no closing \"}}\"",
            ),
            ("a {{ }} b", "empty expression \"{{}}\" at character 3"),
            ("{{user.name}}", "unknown root \"user\""),
            ("{{event}}", "expected a field after \"event.\""),
            ("{{event.}}", "expected a field after \"event.\""),
            ("{{event.data..x}}", "empty segment"),
            ("{{steps.page.}}", "expected a field after \"steps.page.\""),
            ("{{steps}}", "expected a step id after \"steps.\""),
            ("{{steps.page}}", "expected a field after \"steps.page.\""),
            ("{{steps..x}}", "invalid step id \"\""),
            ("{{event.data.a b}}", "invalid character ' '"),
            ("{{event.data | upper}}", "invalid character ' '"),
            ("{{ {{event.x}} }}", "invalid expression"),
        ];
        for (text, expected) in cases {
            let err = Template::parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn literal_templates_and_references() {
        let t = Template::parse("no templates here").unwrap();
        assert!(t.is_literal());
        assert_eq!(
            render("no templates here").unwrap(),
            json!("no templates here")
        );
        assert_eq!(render("").unwrap(), json!(""));
        let t = Template::parse("{{event.id}}-{{steps.a.b.0}}").unwrap();
        assert!(!t.is_literal());
        let refs: Vec<String> = t.references().map(|r| r.to_string()).collect();
        assert_eq!(refs, ["event.id", "steps.a.b.0"]);
        assert_eq!(t.with_placeholders("x"), "x-x");
        let t = Template::parse("https://h.example/{{event.id}}").unwrap();
        assert_eq!(t.literal_prefix(), "https://h.example/");
    }

    #[test]
    fn lookup_follows_objects_and_arrays() {
        let doc = event();
        let path = FieldPath::parse("data.labels.0").unwrap();
        assert_eq!(lookup(&doc, path.segments()), Some(&json!("receipt")));
        let path = FieldPath::parse("data.user.name.x").unwrap();
        assert_eq!(lookup(&doc, path.segments()), None);
        let path = FieldPath::parse("data.labels.first").unwrap();
        assert_eq!(lookup(&doc, path.segments()), None);
        assert!(FieldPath::parse("").is_err());
        assert!(FieldPath::parse("a..b").is_err());
        assert!(FieldPath::parse("a.b$").is_err());
    }

    #[test]
    fn json_templates_render_typed_leaves_and_keep_literals() {
        let body = json!({
            "conversation": "{{event.conversation_id}}",
            "count": "{{event.data.count}}",
            "static": {"a": [1, "two", {"three": 3}]},
            "list": ["x", "{{steps.page.response.ticket}}", 7],
            "{{not a template key}}": true
        });
        let template = JsonTemplate::compile(&body).unwrap();
        assert!(!template.is_literal());
        let paths: Vec<&str> = template.templates().into_iter().map(|(p, _)| p).collect();
        assert_eq!(paths, [".conversation", ".count", ".list[1]"]);
        let (event, steps) = (event(), steps());
        let ctx = TemplateContext {
            event: &event,
            steps: &steps,
        };
        assert_eq!(
            template.render(&ctx).unwrap(),
            json!({
                "conversation": "c-9",
                "count": 3,
                "static": {"a": [1, "two", {"three": 3}]},
                "list": ["x", "T-7", 7],
                "{{not a template key}}": true
            })
        );
        let literal = JsonTemplate::compile(&json!({"a": ["b", 1, null]})).unwrap();
        assert!(literal.is_literal());
        assert_eq!(literal.render(&ctx).unwrap(), json!({"a": ["b", 1, null]}));
        let missing = JsonTemplate::compile(&json!({"a": "{{event.data.nope}}"})).unwrap();
        assert!(matches!(
            missing.render(&ctx),
            Err(TemplateError::MissingEventField { .. })
        ));
    }

    #[test]
    fn json_template_errors_name_the_leaf() {
        let err = JsonTemplate::compile(&json!({"a": [1, {"b c": "{{oops}}"}]})).unwrap_err();
        assert_eq!(err.path, ".a[1][\"b c\"]");
        assert!(matches!(err.error, TemplateError::Invalid { .. }));
        let err = JsonTemplate::compile(&json!("{{")).unwrap_err();
        assert_eq!(err.path, "");
    }

    fn render_url(text: &str, data: Value) -> Result<String, TemplateError> {
        let event = json!({"id": "e", "data": data});
        let steps = Map::new();
        Template::parse(text).unwrap().render_url(&TemplateContext { event: &event, steps: &steps })
    }

    #[test]
    fn url_values_fill_one_path_segment_or_one_query_value() {
        let p = "../../v1/chatbots?x=#frag";
        assert_eq!(
            render_url("http://h:8/tpl/{{event.data.p}}?q={{event.data.p}}&r=1#{{event.data.p}}", json!({"p": p})).unwrap(),
            "http://h:8/tpl/..%2F..%2Fv1%2Fchatbots%3Fx%3D%23frag?q=..%2F..%2Fv1%2Fchatbots%3Fx%3D%23frag&r=1#..%2F..%2Fv1%2Fchatbots%3Fx%3D%23frag"
        );
        let url = render_url("https://h/a/{{event.data.p}}/b?k={{event.data.p}}", json!({"p": "%2F a+b&c=d é"})).unwrap();
        assert_eq!(url, "https://h/a/%252F%20a%2Bb%26c%3Dd%20%C3%A9/b?k=%252F%20a%2Bb%26c%3Dd%20%C3%A9");
        // What a URL parser (and so the HTTP client) makes of it: the same path and query.
        let parsed = url::Url::parse(&url).unwrap();
        assert_eq!(parsed.path(), "/a/%252F%20a%2Bb%26c%3Dd%20%C3%A9/b");
        assert_eq!(parsed.query_pairs().collect::<Vec<_>>(), vec![("k".into(), "%2F a+b&c=d é".into())]);
        // Unreserved characters and numbers stay readable.
        assert_eq!(render_url("http://h/f/{{event.data.f}}.{{event.data.n}}", json!({"f": "report_v1-a~b", "n": 7})).unwrap(), "http://h/f/report_v1-a~b.7");
    }

    #[test]
    fn a_url_value_that_makes_a_dot_segment_is_refused() {
        for (template, data, segment) in [
            ("http://h/a/{{event.data.p}}/b", json!({"p": ".."}), ".."),
            ("http://h/a/{{event.data.p}}", json!({"p": "."}), "."),
            ("http://h/a/{{event.data.p}}{{event.data.p}}?x", json!({"p": "."}), ".."),
            ("http://h/a/%2E{{event.data.p}}#f", json!({"p": "."}), "%2E."),
        ] {
            let err = render_url(template, data).unwrap_err();
            assert_eq!(err, TemplateError::DotSegment { reference: "event.data.p".into(), segment: segment.into() }, "{template}");
            assert!(err.to_string().contains(&format!("path segment \"{segment}\"")), "{err}");
        }
        // Dots inside a longer segment, or in the query, are plain text.
        assert_eq!(render_url("http://h/a/{{event.data.p}}x?q={{event.data.p}}", json!({"p": ".."})).unwrap(), "http://h/a/..x?q=..");
        assert!(matches!(render_url("http://{{event.data.p}}/", json!({"p": "evil"})), Err(TemplateError::InAuthority { .. })));
    }
}
