//! Wire protocol v1: decoding client frames and encoding daemon frames.
//!
//! Decoding borrows from the line: every field is first taken as a `&RawValue`, then
//! the fields a frame needs are read one by one, so a wrong type names the field
//! (`data.score`) instead of failing the whole frame with serde's first error. An
//! accepted event keeps the line itself (`Event::raw`); nothing else is copied but its
//! id and conversation id.
//!
//! Encoding writes straight into the connection's output buffer. The vocabulary of
//! answers (outcomes, nacks, commands, error codes) is `crate::wire`'s.

use crate::event::{Event, EventType};
pub use crate::wire::{Command, ErrorCode, ExecutionRef, Nack, NackCode, Outcome};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use uuid::Uuid;

/// The protocol version this daemon speaks.
pub const PROTOCOL_VERSION: u64 = 1;
/// Longest event id, conversation id or client name accepted, in bytes.
const MAX_ID_LEN: usize = 256;

/// An id the daemon can store, log and put in a header: 1 to 256 bytes, no control
/// characters (PostgreSQL text cannot hold NUL; HTTP headers cannot hold the others).
fn check_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        Err("must be 1 to 256 bytes")
    } else if id.chars().any(char::is_control) {
        Err("must not contain control characters")
    } else {
        Ok(())
    }
}

/// Whether the JSON text holds a `\u0000` escape (a NUL character, which PostgreSQL's
/// jsonb cannot store). An escaped backslash followed by `u0000` is not one.
fn has_nul_escape(line: &[u8]) -> bool {
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\\u0000"));
    FINDER.find_iter(line).any(|at| {
        let backslashes = line[..at].iter().rev().take_while(|&&b| b == b'\\').count();
        backslashes % 2 == 0
    })
}

/// A decoded client frame.
#[derive(Debug)]
pub enum ClientFrame {
    Hello(Hello),
    Event(Event),
    /// The client confirms a command was handled.
    CommandAck { command_id: String },
    Ping,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub version: u64,
    pub token: String,
    pub client: Option<String>,
    pub subscribe: Vec<Uuid>,
}

/// Why a frame was refused. Events get a `nack` naming the field; anything else gets
/// an `error` line.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameError {
    /// Not a JSON object, or not UTF-8.
    Malformed(String),
    /// `op` missing, not a string, or not one we know.
    UnknownOp(String),
    /// An event with a missing or wrong field; `id` is echoed when it could be read.
    InvalidEvent { id: Option<String>, field: String, message: String },
    /// A hello, ack or other control frame with a bad field.
    InvalidFrame { op: &'static str, field: String, message: String },
}

impl FrameError {
    fn event(id: Option<&str>, field: &str, message: impl Into<String>) -> FrameError {
        FrameError::InvalidEvent { id: id.map(str::to_string), field: field.to_string(), message: message.into() }
    }

    /// What the client is told: an event's problem is its nack (echoing its id when it
    /// could be read), anything else an `error` line.
    pub fn refusal(self) -> Refusal {
        match self {
            FrameError::Malformed(m) => Refusal::Error(ErrorCode::InvalidFrame, m),
            FrameError::UnknownOp(m) => Refusal::Error(ErrorCode::UnknownOp, m),
            FrameError::InvalidFrame { op, field, message } => {
                Refusal::Error(ErrorCode::InvalidFrame, format!("{op}: field {field:?} {message}"))
            }
            FrameError::InvalidEvent { id, field, message } => {
                let nack = Nack {
                    code: NackCode::InvalidEvent,
                    message: format!("field {field:?} {message}"),
                    field: Some(field),
                    retry_after_ms: None,
                };
                Refusal::Nack { id, nack }
            }
        }
    }
}

/// The answer to a refused frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// An `error` line.
    Error(ErrorCode, String),
    /// The event's nack, with its id when it could be read.
    Nack { id: Option<String>, nack: Nack },
}

/// Every field any client frame may carry. Unknown fields are ignored (forward
/// compatibility); each known one is checked by the frame that uses it.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(borrow)]
    op: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    chatbot_id: Option<&'a RawValue>,
    #[serde(borrow, rename = "type")]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    conversation_id: Option<&'a RawValue>,
    #[serde(borrow)]
    occurred_at: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    version: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<&'a RawValue>,
    #[serde(borrow)]
    client: Option<&'a RawValue>,
    #[serde(borrow)]
    subscribe: Option<&'a RawValue>,
    #[serde(borrow)]
    command_id: Option<&'a RawValue>,
}

/// The `data` fields the native event types define; others pass through unchecked.
#[derive(Deserialize, Default)]
struct RawData<'a> {
    #[serde(borrow)]
    text: Option<&'a RawValue>,
    #[serde(borrow)]
    sender: Option<&'a RawValue>,
    #[serde(borrow)]
    language: Option<&'a RawValue>,
    #[serde(borrow)]
    label: Option<&'a RawValue>,
    #[serde(borrow)]
    score: Option<&'a RawValue>,
    #[serde(borrow)]
    message_id: Option<&'a RawValue>,
    #[serde(borrow)]
    url: Option<&'a RawValue>,
    #[serde(borrow)]
    mime_type: Option<&'a RawValue>,
    #[serde(borrow)]
    labels: Option<&'a RawValue>,
    #[serde(borrow)]
    caption: Option<&'a RawValue>,
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(borrow)]
    confidence: Option<&'a RawValue>,
    #[serde(borrow)]
    entities: Option<&'a RawValue>,
    #[serde(borrow)]
    channel: Option<&'a RawValue>,
    #[serde(borrow)]
    user: Option<&'a RawValue>,
    #[serde(borrow)]
    reason: Option<&'a RawValue>,
}

fn is_null(v: Option<&RawValue>) -> bool {
    v.is_none_or(|v| v.get() == "null")
}

fn json_kind(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

fn read_str<'a>(raw: Option<&'a RawValue>) -> Result<Option<Cow<'a, str>>, String> {
    match raw {
        None => Ok(None),
        Some(r) if r.get() == "null" => Ok(None),
        Some(r) => serde_json::from_str::<Cow<'a, str>>(r.get()).map(Some).map_err(|e| match json_kind(r) {
            // A string whose escapes are not text (a lone UTF-16 surrogate, say).
            "a string" => format!("is not valid text (a lone UTF-16 surrogate escape such as \\ud800?): {e}"),
            kind => format!("must be a string, not {kind}"),
        }),
    }
}

fn read_f64(raw: Option<&RawValue>) -> Result<Option<f64>, String> {
    match raw {
        None => Ok(None),
        Some(r) if r.get() == "null" => Ok(None),
        Some(r) => serde_json::from_str::<f64>(r.get())
            .map(Some)
            .map_err(|_| format!("must be a number, not {}", json_kind(r))),
    }
}

/// Decodes one line. Never panics, whatever the bytes.
pub fn decode(line: &Bytes) -> Result<ClientFrame, FrameError> {
    let frame: RawFrame<'_> = serde_json::from_slice(line).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() { "not valid JSON" } else { "not a JSON object" };
        FrameError::Malformed(format!("{what}: {e}"))
    })?;
    let op = match read_str(frame.op) {
        Ok(Some(op)) => op,
        Ok(None) => return Err(FrameError::UnknownOp("the frame has no \"op\"".into())),
        Err(m) => return Err(FrameError::UnknownOp(format!("\"op\" {m}"))),
    };
    match op.as_ref() {
        "event" => decode_event(line, &frame).map(ClientFrame::Event),
        "hello" => decode_hello(&frame).map(ClientFrame::Hello),
        "ack" => match read_str(frame.command_id) {
            Ok(Some(id)) if check_id(&id).is_ok() => Ok(ClientFrame::CommandAck { command_id: id.into_owned() }),
            Ok(_) => Err(FrameError::InvalidFrame {
                op: "ack",
                field: "command_id".into(),
                message: "is required (1 to 256 bytes, no control characters)".into(),
            }),
            Err(m) => Err(FrameError::InvalidFrame { op: "ack", field: "command_id".into(), message: m }),
        },
        "ping" => Ok(ClientFrame::Ping),
        other => {
            let shown: String = other.chars().take(64).collect();
            Err(FrameError::UnknownOp(format!(
                "unknown op {shown:?} (expected hello, event, ack or ping)"
            )))
        }
    }
}

fn decode_hello(frame: &RawFrame<'_>) -> Result<Hello, FrameError> {
    let bad = |field: &str, message: String| FrameError::InvalidFrame { op: "hello", field: field.into(), message };
    let version = match frame.version {
        None => return Err(bad("version", "is required (this daemon speaks version 1)".into())),
        Some(v) => serde_json::from_str::<u64>(v.get()).map_err(|_| bad("version", "must be a positive integer".into()))?,
    };
    let token = match read_str(frame.token) {
        Ok(Some(t)) if !t.is_empty() => t.into_owned(),
        Ok(_) => return Err(bad("token", "is required".into())),
        Err(m) => return Err(bad("token", m)),
    };
    let client = match read_str(frame.client) {
        Ok(c) if c.as_ref().is_none_or(|c| check_id(c).is_ok()) => c.map(Cow::into_owned),
        Ok(_) => return Err(bad("client", "must be 1 to 256 bytes without control characters".into())),
        Err(m) => return Err(bad("client", m)),
    };
    let subscribe = match frame.subscribe {
        None => Vec::new(),
        Some(raw) if raw.get() == "null" => Vec::new(),
        Some(raw) => {
            let items: Vec<Cow<'_, str>> = serde_json::from_str(raw.get())
                .map_err(|_| bad("subscribe", "must be an array of chatbot ids".into()))?;
            if items.len() > 10_000 {
                return Err(bad("subscribe", "lists more than 10000 chatbots".into()));
            }
            let mut ids = Vec::with_capacity(items.len());
            for (i, s) in items.iter().enumerate() {
                let id = Uuid::parse_str(s)
                    .map_err(|_| bad(&format!("subscribe[{i}]"), format!("{s:?} is not a chatbot id (a UUID)")))?;
                ids.push(id);
            }
            ids
        }
    };
    Ok(Hello { version, token, client, subscribe })
}

fn valid_type_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 100
        && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-')
}

fn decode_event(line: &Bytes, f: &RawFrame<'_>) -> Result<Event, FrameError> {
    // The id first, so every later nack can echo it.
    let id = match read_str(f.id) {
        Ok(Some(id)) => match check_id(&id) {
            Ok(()) => id,
            Err(m) => return Err(FrameError::event(None, "id", m)),
        },
        Ok(None) => return Err(FrameError::event(None, "id", "is required")),
        Err(m) => return Err(FrameError::event(None, "id", m)),
    };
    let idr = Some(id.as_ref());
    let chatbot_id = match read_str(f.chatbot_id) {
        Ok(Some(s)) => Uuid::parse_str(&s)
            .map_err(|_| FrameError::event(idr, "chatbot_id", format!("{s:?} is not a chatbot id (a UUID)")))?,
        Ok(None) => return Err(FrameError::event(idr, "chatbot_id", "is required")),
        Err(m) => return Err(FrameError::event(idr, "chatbot_id", m)),
    };
    let kind = match read_str(f.kind) {
        Ok(Some(t)) if valid_type_name(&t) => EventType::parse(&t),
        Ok(Some(t)) => {
            let shown: String = t.chars().take(64).collect();
            return Err(FrameError::event(
                idr,
                "type",
                format!("{shown:?} is not an event type (lowercase letters, digits, '.', '_', '-'; at most 100)"),
            ));
        }
        Ok(None) => return Err(FrameError::event(idr, "type", "is required")),
        Err(m) => return Err(FrameError::event(idr, "type", m)),
    };
    let conversation_id = match read_str(f.conversation_id) {
        Ok(Some(c)) => match check_id(&c) {
            Ok(()) => c,
            Err(m) => return Err(FrameError::event(idr, "conversation_id", m)),
        },
        Ok(None) => return Err(FrameError::event(idr, "conversation_id", "is required")),
        Err(m) => return Err(FrameError::event(idr, "conversation_id", m)),
    };
    match read_str(f.occurred_at) {
        Ok(Some(t)) => {
            if chrono::DateTime::parse_from_rfc3339(&t).is_err() {
                return Err(FrameError::event(idr, "occurred_at", format!("{t:?} is not an RFC 3339 time")));
            }
        }
        Ok(None) => {}
        Err(m) => return Err(FrameError::event(idr, "occurred_at", m)),
    }
    let data: RawData<'_> = match f.data {
        None => RawData::default(),
        Some(raw) if raw.get() == "null" => RawData::default(),
        Some(raw) => {
            if !raw.get().starts_with('{') {
                return Err(FrameError::event(idr, "data", format!("must be an object, not {}", json_kind(raw))));
            }
            serde_json::from_str(raw.get())
                .map_err(|e| FrameError::event(idr, "data", format!("cannot be read: {e}")))?
        }
    };
    check_data(&kind, &data).map_err(|(field, message)| FrameError::event(idr, field, message))?;
    if has_nul_escape(line) {
        let field = if f.data.is_some_and(|d| has_nul_escape(d.get().as_bytes())) { "data" } else { "event" };
        return Err(FrameError::event(idr, field, "must not contain the NUL character (\\u0000)"));
    }
    Ok(Event {
        id: id.into_owned().into_boxed_str(),
        chatbot_id,
        kind,
        conversation_id: conversation_id.into_owned().into_boxed_str(),
        raw: line.clone(),
    })
}

type DataError = (&'static str, String);

fn need_str<'a>(field: &'static str, v: Option<&'a RawValue>) -> Result<Cow<'a, str>, DataError> {
    match read_str(v) {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err((field, "is required".into())),
        Err(m) => Err((field, m)),
    }
}

fn opt_str<'a>(field: &'static str, v: Option<&'a RawValue>) -> Result<Option<Cow<'a, str>>, DataError> {
    read_str(v).map_err(|m| (field, m))
}

fn need_num(field: &'static str, v: Option<&RawValue>, lo: f64, hi: f64) -> Result<f64, DataError> {
    match read_f64(v) {
        Ok(Some(x)) if (lo..=hi).contains(&x) => Ok(x),
        Ok(Some(x)) => Err((field, format!("must be within {lo}..{hi}, got {x}"))),
        Ok(None) => Err((field, "is required".into())),
        Err(m) => Err((field, m)),
    }
}

fn opt_kind(field: &'static str, v: Option<&RawValue>, first: u8, what: &str) -> Result<(), DataError> {
    match v {
        Some(r) if r.get() != "null" && r.get().as_bytes().first() != Some(&first) => {
            Err((field, format!("must be {what}, not {}", json_kind(r))))
        }
        _ => Ok(()),
    }
}

/// The fields each native type defines (DESIGN.md "Events"). Triggers rely on them, so
/// a wrong one is refused at the door with its name rather than never matching.
fn check_data(kind: &EventType, d: &RawData<'_>) -> Result<(), DataError> {
    match kind {
        EventType::MessageReceived => {
            need_str("data.text", d.text)?;
            if let Some(s) = opt_str("data.sender", d.sender)? {
                if !matches!(s.as_ref(), "user" | "bot" | "agent") {
                    return Err(("data.sender", format!("must be user, bot or agent, got {s:?}")));
                }
            }
            opt_str("data.language", d.language)?;
        }
        EventType::SentimentAnalyzed => {
            let label = need_str("data.label", d.label)?;
            if !matches!(label.as_ref(), "positive" | "neutral" | "negative") {
                return Err(("data.label", format!("must be positive, neutral or negative, got {label:?}")));
            }
            need_num("data.score", d.score, -1.0, 1.0)?;
            opt_str("data.message_id", d.message_id)?;
        }
        EventType::ImageUploaded => {
            need_str("data.url", d.url)?;
            opt_str("data.mime_type", d.mime_type)?;
            opt_str("data.caption", d.caption)?;
            if !is_null(d.labels) {
                let raw = d.labels.map(RawValue::get).unwrap_or("[]");
                serde_json::from_str::<Vec<Cow<'_, str>>>(raw)
                    .map_err(|_| ("data.labels", "must be an array of strings".to_string()))?;
            }
        }
        EventType::IntentDetected => {
            need_str("data.name", d.name)?;
            need_num("data.confidence", d.confidence, 0.0, 1.0)?;
            opt_kind("data.entities", d.entities, b'{', "an object")?;
        }
        EventType::ConversationStarted => {
            opt_str("data.channel", d.channel)?;
            opt_kind("data.user", d.user, b'{', "an object")?;
        }
        EventType::ConversationEnded => {
            opt_str("data.reason", d.reason)?;
        }
        EventType::Custom(_) => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Daemon → client

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

#[derive(Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Out<'a> {
    Welcome { version: u64, max_in_flight: usize, max_frame_bytes: usize },
    Ack { id: &'a str, executions: &'a [ExecutionRef], duplicate: bool },
    Nack { id: Option<&'a str>, error: ErrorBody<'a> },
    Command(&'a Command),
    Error { error: ErrorBody<'a> },
    Pong,
}

fn put(buf: &mut BytesMut, frame: &Out<'_>) {
    // Serialising these types cannot fail: they hold no maps with non-string keys.
    let _ = serde_json::to_writer(buf.writer(), frame);
    buf.put_u8(b'\n');
}

pub fn write_welcome(buf: &mut BytesMut, max_in_flight: usize, max_frame_bytes: usize) {
    put(buf, &Out::Welcome { version: PROTOCOL_VERSION, max_in_flight, max_frame_bytes });
}

pub fn write_outcome(buf: &mut BytesMut, event_id: &str, outcome: &Outcome) {
    match outcome {
        Outcome::Ack { executions, duplicate } => {
            put(buf, &Out::Ack { id: event_id, executions, duplicate: *duplicate })
        }
        Outcome::Nack(n) => write_nack(buf, Some(event_id), n),
    }
}

pub fn write_nack(buf: &mut BytesMut, event_id: Option<&str>, n: &Nack) {
    put(
        buf,
        &Out::Nack {
            id: event_id,
            error: ErrorBody {
                code: n.code.as_str(),
                message: &n.message,
                field: n.field.as_deref(),
                retry_after_ms: n.retry_after_ms,
            },
        },
    );
}

pub fn write_error(buf: &mut BytesMut, code: ErrorCode, message: &str) {
    put(buf, &Out::Error { error: ErrorBody { code: code.as_str(), message, field: None, retry_after_ms: None } });
}

pub fn write_command(buf: &mut BytesMut, command: &Command) {
    put(buf, &Out::Command(command));
}

pub fn write_pong(buf: &mut BytesMut) {
    put(buf, &Out::Pong);
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOT: &str = "6f1c1f8e-3c39-4b7e-9d3c-4a4c3c1e2f10";

    fn dec(s: &str) -> Result<ClientFrame, FrameError> {
        decode(&Bytes::copy_from_slice(s.as_bytes()))
    }

    fn event_err(s: &str) -> (Option<String>, String, String) {
        match dec(s) {
            Err(FrameError::InvalidEvent { id, field, message }) => (id, field, message),
            other => panic!("expected an invalid event, got {other:?}"),
        }
    }

    #[test]
    fn decodes_a_valid_event_and_keeps_the_line() {
        let line = format!(
            r#"{{"op":"event","id":"evt-81","chatbot_id":"{BOT}","type":"message.received","conversation_id":"c-9","occurred_at":"2026-11-25T10:00:00Z","data":{{"text":"I want a refund"}}}}"#
        );
        match dec(&line).unwrap() {
            ClientFrame::Event(e) => {
                assert_eq!(&*e.id, "evt-81");
                assert_eq!(e.chatbot_id.to_string(), BOT);
                assert_eq!(e.kind, EventType::MessageReceived);
                assert_eq!(&*e.conversation_id, "c-9");
                assert_eq!(e.raw.as_ref(), line.as_bytes());
                let doc = e.document().unwrap();
                assert_eq!(doc["data"]["text"], "I want a refund");
                assert!(doc.get("op").is_none());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn escaped_ids_are_unescaped() {
        let line = format!(r#"{{"op":"event","id":"a\"b","chatbot_id":"{BOT}","type":"x.custom","conversation_id":"c\u0041"}}"#);
        match dec(&line).unwrap() {
            ClientFrame::Event(e) => {
                assert_eq!(&*e.id, "a\"b");
                assert_eq!(&*e.conversation_id, "cA");
                assert_eq!(e.kind, EventType::Custom("x.custom".into()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_event_fields_are_named() {
        let base = |extra: &str| {
            format!(r#"{{"op":"event","id":"e1","chatbot_id":"{BOT}","conversation_id":"c",{extra}}}"#)
        };
        let cases = [
            (r#"{"op":"event","chatbot_id":"x"}"#.to_string(), "id"),
            (r#"{"op":"event","id":5}"#.to_string(), "id"),
            (r#"{"op":"event","id":"e1","type":"x.a","conversation_id":"c"}"#.to_string(), "chatbot_id"),
            (r#"{"op":"event","id":"e1","chatbot_id":"nope","type":"x.a","conversation_id":"c"}"#.to_string(), "chatbot_id"),
            (format!(r#"{{"op":"event","id":"e1","chatbot_id":"{BOT}","conversation_id":"c"}}"#), "type"),
            (base(r#""type":"Message Received""#), "type"),
            (format!(r#"{{"op":"event","id":"e1","chatbot_id":"{BOT}","type":"x.a"}}"#), "conversation_id"),
            (base(r#""type":"x.a","occurred_at":"yesterday""#), "occurred_at"),
            (base(r#""type":"x.a","data":[1]"#), "data"),
            (base(r#""type":"message.received","data":{}"#), "data.text"),
            (base(r#""type":"message.received","data":{"text":3}"#), "data.text"),
            (base(r#""type":"message.received","data":{"text":"hi","sender":"cat"}"#), "data.sender"),
            (base(r#""type":"sentiment.analyzed","data":{"label":"angry","score":0}"#), "data.label"),
            (base(r#""type":"sentiment.analyzed","data":{"label":"negative","score":"low"}"#), "data.score"),
            (base(r#""type":"sentiment.analyzed","data":{"label":"negative","score":-3}"#), "data.score"),
            (base(r#""type":"intent.detected","data":{"name":"refund","confidence":2}"#), "data.confidence"),
            (base(r#""type":"intent.detected","data":{"confidence":0.5}"#), "data.name"),
            (base(r#""type":"image.uploaded","data":{"url":"u","labels":"receipt"}"#), "data.labels"),
            (base(r#""type":"image.uploaded","data":{"mime_type":"image/png"}"#), "data.url"),
            (base(r#""type":"conversation.started","data":{"user":"bob"}"#), "data.user"),
        ];
        for (line, field) in cases {
            let (_, got, message) = event_err(&line);
            assert_eq!(got, field, "{line}: {message}");
            assert!(!message.is_empty());
        }
    }

    #[test]
    fn ids_with_control_characters_and_nul_escapes_are_refused() {
        let line = |id: &str, data: &str| {
            format!(r#"{{"op":"event","id":"{id}","chatbot_id":"{BOT}","type":"x.a","conversation_id":"c","data":{data}}}"#)
        };
        assert_eq!(event_err(&line(r"a\u0000b", "{}")).1, "id");
        assert_eq!(event_err(&line(r"a\nb", "{}")).1, "id");
        assert_eq!(event_err(&line(&"x".repeat(257), "{}")).1, "id");
        assert_eq!(event_err(&line("ok", r#"{"t":"a\u0000"}"#)).1, "data");
        // An escaped backslash before "u0000" is text, not a NUL.
        assert!(dec(&line("ok", r#"{"t":"a\\u0000"}"#)).is_ok());
        assert!(!has_nul_escape(br#""\\u0000""#));
        assert!(has_nul_escape(br#""\\\u0000""#));
    }

    #[test]
    fn the_nack_echoes_the_event_id_when_it_can() {
        let (id, field, _) = event_err(r#"{"op":"event","id":"e-7","chatbot_id":"bad"}"#);
        assert_eq!(id.as_deref(), Some("e-7"));
        assert_eq!(field, "chatbot_id");
    }

    #[test]
    fn malformed_frames_and_unknown_ops() {
        assert!(matches!(dec("not json"), Err(FrameError::Malformed(_))));
        assert!(matches!(dec("[1,2]"), Err(FrameError::Malformed(_))));
        assert!(matches!(dec(r#"{"op":"event""#), Err(FrameError::Malformed(_))));
        assert!(matches!(dec(r#"{"id":"x"}"#), Err(FrameError::UnknownOp(_))));
        assert!(matches!(dec(r#"{"op":7}"#), Err(FrameError::UnknownOp(_))));
        match dec(r#"{"op":"subscribe"}"#) {
            Err(FrameError::UnknownOp(m)) => assert!(m.contains("subscribe"), "{m}"),
            other => panic!("{other:?}"),
        }
        let invalid_utf8 = Bytes::from_static(b"{\"op\":\"\xff\"}");
        assert!(matches!(decode(&invalid_utf8), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn hello_frames() {
        let h = dec(&format!(r#"{{"op":"hello","version":1,"token":"t","client":"c1","subscribe":["{BOT}"]}}"#)).unwrap();
        match h {
            ClientFrame::Hello(h) => {
                assert_eq!(h.token, "t");
                assert_eq!(h.subscribe.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        for (line, field) in [
            (r#"{"op":"hello","token":"t"}"#, "version"),
            (r#"{"op":"hello","version":1}"#, "token"),
            (r#"{"op":"hello","version":1,"token":"t","subscribe":"x"}"#, "subscribe"),
            (r#"{"op":"hello","version":1,"token":"t","subscribe":["x"]}"#, "subscribe[0]"),
        ] {
            match dec(line) {
                Err(FrameError::InvalidFrame { field: f, .. }) => assert_eq!(f, field, "{line}"),
                other => panic!("{line}: {other:?}"),
            }
        }
    }

    #[test]
    fn encodes_frames_as_single_json_lines() {
        let mut buf = BytesMut::new();
        write_outcome(&mut buf, "e\"1", &Outcome::Ack { executions: vec![], duplicate: true });
        write_nack(
            &mut buf,
            None,
            &Nack { code: NackCode::InvalidEvent, message: "m".into(), field: Some("data.text".into()), retry_after_ms: None },
        );
        write_pong(&mut buf);
        let text = std::str::from_utf8(&buf).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0], serde_json::json!({"op":"ack","id":"e\"1","executions":[],"duplicate":true}));
        assert_eq!(
            lines[1],
            serde_json::json!({"op":"nack","id":null,"error":{"code":"invalid_event","message":"m","field":"data.text"}})
        );
        assert_eq!(lines[2], serde_json::json!({"op":"pong"}));
    }

    #[test]
    fn refused_frames_become_an_error_line_or_the_events_nack() {
        match dec(r#"{"op":"event","id":"e-7","chatbot_id":"bad"}"#).unwrap_err().refusal() {
            Refusal::Nack { id, nack } => {
                assert_eq!(id.as_deref(), Some("e-7"));
                assert_eq!((nack.code, nack.field.as_deref()), (NackCode::InvalidEvent, Some("chatbot_id")));
                assert!(nack.message.starts_with("field \"chatbot_id\" "), "{}", nack.message);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(dec("not json").unwrap_err().refusal(), Refusal::Error(ErrorCode::InvalidFrame, _)));
        assert!(matches!(dec(r#"{"op":"nope"}"#).unwrap_err().refusal(), Refusal::Error(ErrorCode::UnknownOp, _)));
        match dec(r#"{"op":"hello","token":"t"}"#).unwrap_err().refusal() {
            Refusal::Error(ErrorCode::InvalidFrame, m) => assert_eq!(m, "hello: field \"version\" is required (this daemon speaks version 1)"),
            other => panic!("{other:?}"),
        }
    }
}
