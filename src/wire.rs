//! The wire vocabulary: what the daemon answers a client, shared by every layer that
//! answers one. A connection receives `EventOutcomes` (an ack or nack per event) from
//! the router, a supervisor or the journal, and `Command`s from the outbox; each of
//! those speaks in these types, so none of them needs to know the connection, and
//! this module knows none of them.
//!
//! A leaf: it imports nothing else of the crate and holds no actor (an actix
//! `Message` is only a type a `Recipient` can carry).

use actix::{Message, Recipient};
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use uuid::Uuid;

/// Codes of `error` lines (frames the daemon refuses outside an event's nack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidFrame,
    UnknownOp,
    FrameTooLarge,
    Unauthenticated,
    Forbidden,
    UnknownChatbot,
    UnsupportedVersion,
    HandshakeTimeout,
    IncompleteFrame,
    ProtocolError,
    Unavailable,
    Internal,
    TooManyConnections,
    Overloaded,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::InvalidFrame,
        ErrorCode::UnknownOp,
        ErrorCode::FrameTooLarge,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::UnknownChatbot,
        ErrorCode::UnsupportedVersion,
        ErrorCode::HandshakeTimeout,
        ErrorCode::IncompleteFrame,
        ErrorCode::ProtocolError,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::TooManyConnections,
        ErrorCode::Overloaded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidFrame => "invalid_frame",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UnknownChatbot => "unknown_chatbot",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::HandshakeTimeout => "handshake_timeout",
            ErrorCode::IncompleteFrame => "incomplete_frame",
            ErrorCode::ProtocolError => "protocol_error",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::Overloaded => "overloaded",
        }
    }
}

/// Nack codes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NackCode {
    InvalidEvent,
    UnknownChatbot,
    RateLimited,
    Overloaded,
    Unavailable,
    Internal,
}

impl NackCode {
    pub fn as_str(self) -> &'static str {
        match self {
            NackCode::InvalidEvent => "invalid_event",
            NackCode::UnknownChatbot => "unknown_chatbot",
            NackCode::RateLimited => "rate_limited",
            NackCode::Overloaded => "overloaded",
            NackCode::Unavailable => "unavailable",
            NackCode::Internal => "internal",
        }
    }

    pub const ALL: [NackCode; 6] = [
        NackCode::InvalidEvent,
        NackCode::UnknownChatbot,
        NackCode::RateLimited,
        NackCode::Overloaded,
        NackCode::Unavailable,
        NackCode::Internal,
    ];
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Nack {
    pub code: NackCode,
    pub message: String,
    pub field: Option<String>,
    pub retry_after_ms: Option<u64>,
}

impl Nack {
    pub fn new(code: NackCode, message: impl Into<String>) -> Nack {
        Nack { code, message: message.into(), field: None, retry_after_ms: None }
    }
}

/// One execution an event created (or had created before, for a duplicate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ExecutionRef {
    pub execution_id: Uuid,
    pub workflow_id: Uuid,
}

/// The answer to one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ack { executions: Vec<ExecutionRef>, duplicate: bool },
    Nack(Nack),
}

/// A command for the chat service (reply, tag, handoff).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Command {
    pub command_id: String,
    pub chatbot_id: Uuid,
    pub conversation_id: String,
    pub kind: CommandKind,
    pub payload: serde_json::Value,
    pub execution_id: Uuid,
}

/// What a command asks the chat service to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandKind {
    /// Send a message into the conversation: `{"text": …}`.
    Reply,
    /// Tag the conversation: `{"tags": […]}`.
    Tag,
    /// Hand the conversation to a human queue: `{"queue": …}`.
    Handoff,
}

impl CommandKind {
    pub const ALL: [CommandKind; 3] = [CommandKind::Reply, CommandKind::Tag, CommandKind::Handoff];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Reply => "reply",
            CommandKind::Tag => "tag",
            CommandKind::Handoff => "handoff",
        }
    }

    pub fn parse(s: &str) -> Option<CommandKind> {
        CommandKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A command's id: `<execution id>:<step id>`, the same on every attempt of the step,
/// so a client drops repeats. Built by the executor, read back where an ack arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandId<'a> {
    pub execution_id: Uuid,
    pub step_id: &'a str,
}

/// Longest step id a workflow may have (and so a command id may carry), in characters.
pub const MAX_STEP_ID_CHARS: usize = 64;

impl<'a> CommandId<'a> {
    pub fn new(execution_id: Uuid, step_id: &'a str) -> CommandId<'a> {
        CommandId { execution_id, step_id }
    }

    /// Reads an id of the command shape (a UUID, ':', a step id of at most
    /// `MAX_STEP_ID_CHARS` without control characters); anything else was never
    /// sent by a daemon and is not worth a query.
    pub fn parse(id: &'a str) -> Option<CommandId<'a>> {
        let (execution, step) = id.split_once(':')?;
        let execution_id = Uuid::parse_str(execution).ok()?;
        let fits = !step.is_empty() && step.chars().count() <= MAX_STEP_ID_CHARS && !step.chars().any(char::is_control);
        fits.then_some(CommandId { execution_id, step_id: step })
    }
}

impl std::fmt::Display for CommandId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.execution_id, self.step_id)
    }
}

/// One event's answer: its id, the outcome, and when its batch was read (for the ack
/// latency the connection measures).
pub type Answer = (Box<str>, Outcome, Instant);

/// Answers to events of one connection (or one HTTP ingest request), sent by the
/// router, a supervisor or the journal to the `Recipient` that routed the events.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EventOutcomes(pub Vec<Answer>);

impl EventOutcomes {
    /// Nacks events (id, time read) for one reason; answers how many.
    pub fn nack_all(to: &Recipient<EventOutcomes>, events: impl IntoIterator<Item = (Box<str>, Instant)>, nack: &Nack) -> usize {
        let list = nacks(events, nack);
        let n = list.len();
        to.do_send(EventOutcomes(list));
        n
    }
}

fn nacks(events: impl IntoIterator<Item = (Box<str>, Instant)>, nack: &Nack) -> Vec<Answer> {
    events.into_iter().map(|(id, at)| (id, Outcome::Nack(nack.clone()), at)).collect()
}

/// The immediate answers to one routed batch, gathered from every supervisor its
/// events went to and sent as one message when the last is done: a batch spread over
/// many chatbots costs one answer message, not one per chatbot. (Events whose
/// executions must be committed first are answered by the journal.)
pub struct BatchAnswers {
    remaining: AtomicUsize,
    answers: Mutex<Vec<Answer>>,
    reply_to: Recipient<EventOutcomes>,
}

impl BatchAnswers {
    /// Expects `parts` contributions (one per chatbot of the batch).
    pub fn new(reply_to: Recipient<EventOutcomes>, parts: usize) -> Arc<BatchAnswers> {
        Arc::new(BatchAnswers { remaining: AtomicUsize::new(parts.max(1)), answers: Mutex::new(Vec::new()), reply_to })
    }

    pub fn reply_to(&self) -> &Recipient<EventOutcomes> {
        &self.reply_to
    }

    /// One part's answers; the last part sends them all.
    pub fn add(&self, answers: Vec<Answer>) {
        if !answers.is_empty() {
            self.answers.lock().unwrap_or_else(|p| p.into_inner()).extend(answers);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let all = std::mem::take(&mut *self.answers.lock().unwrap_or_else(|p| p.into_inner()));
            if !all.is_empty() {
                self.reply_to.do_send(EventOutcomes(all));
            }
        }
    }

    /// One part's events, all refused for the same reason; answers how many.
    pub fn nack_all(&self, events: impl IntoIterator<Item = (Box<str>, Instant)>, nack: &Nack) -> usize {
        let list = nacks(events, nack);
        let n = list.len();
        self.add(list);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_ids_are_built_and_read_back_by_one_type() {
        let execution_id = Uuid::parse_str("0195f0c4-8a1e-7cc2-9a4b-1f2e3d4c5b6a").unwrap();
        let id = CommandId::new(execution_id, "say hi").to_string();
        assert_eq!(id, "0195f0c4-8a1e-7cc2-9a4b-1f2e3d4c5b6a:say hi");
        assert_eq!(CommandId::parse(&id), Some(CommandId { execution_id, step_id: "say hi" }));
    }

    #[test]
    fn only_ids_of_the_command_shape_are_read() {
        for bad in ["", "x:say", "0195f0c4-8a1e-7cc2-9a4b-1f2e3d4c5b6a", "0195f0c4-8a1e-7cc2-9a4b-1f2e3d4c5b6a:", "0195f0c4-8a1e-7cc2-9a4b-1f2e3d4c5b6a:a\u{0}b"] {
            assert!(CommandId::parse(bad).is_none(), "{bad:?}");
        }
        let long = format!("0195f0c4-8a1e-7cc2-9a4b-1f2e3d4c5b6a:{}", "s".repeat(MAX_STEP_ID_CHARS + 1));
        assert!(CommandId::parse(&long).is_none());
        let longest = format!("0195f0c4-8a1e-7cc2-9a4b-1f2e3d4c5b6a:{}", "s".repeat(MAX_STEP_ID_CHARS));
        assert!(CommandId::parse(&longest).is_some());
    }
}
