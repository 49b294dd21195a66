//! Events as the rest of the daemon sees them once the wire codec has accepted them.
//!
//! An [`Event`] keeps the exact line the client sent (`raw`, a zero-copy slice of the
//! connection's read buffer) next to the few fields routing needs. The full JSON
//! document is parsed only by a supervisor whose trigger index has candidates for the
//! event's type, so events nobody listens to never pay for a `serde_json::Value`.

use bytes::Bytes;
use std::fmt;
use uuid::Uuid;

/// The event types the trigger index understands natively; anything else is `Custom`
/// (by convention `x.*`) and matches by type and conditions only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventType {
    ConversationStarted,
    MessageReceived,
    SentimentAnalyzed,
    ImageUploaded,
    IntentDetected,
    ConversationEnded,
    Custom(Box<str>),
}

impl EventType {
    /// Every native type, in a fixed order (used for metric labels and tables).
    pub const NATIVE: [EventType; 6] = [
        EventType::ConversationStarted,
        EventType::MessageReceived,
        EventType::SentimentAnalyzed,
        EventType::ImageUploaded,
        EventType::IntentDetected,
        EventType::ConversationEnded,
    ];

    /// A native type's name; `None` for a custom type. The one place the names are.
    fn native_name(&self) -> Option<&'static str> {
        Some(match self {
            EventType::ConversationStarted => "conversation.started",
            EventType::MessageReceived => "message.received",
            EventType::SentimentAnalyzed => "sentiment.analyzed",
            EventType::ImageUploaded => "image.uploaded",
            EventType::IntentDetected => "intent.detected",
            EventType::ConversationEnded => "conversation.ended",
            EventType::Custom(_) => return None,
        })
    }

    pub fn parse(s: &str) -> EventType {
        EventType::NATIVE
            .into_iter()
            .find(|t| t.native_name() == Some(s))
            .unwrap_or_else(|| EventType::Custom(s.into()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            EventType::Custom(s) => s,
            native => native.native_name().unwrap_or_default(),
        }
    }

    /// A bounded label for metrics: custom types collapse into one series.
    pub fn metric_label(&self) -> &'static str {
        self.native_name().unwrap_or("custom")
    }

    pub fn is_native(&self) -> bool {
        !matches!(self, EventType::Custom(_))
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated event on its way from a connection to the supervisor of its chatbot.
#[derive(Debug, Clone)]
pub struct Event {
    /// The sender's id, unique per chatbot.
    pub id: Box<str>,
    pub chatbot_id: Uuid,
    pub kind: EventType,
    pub conversation_id: Box<str>,
    /// The event line exactly as received (a JSON object with `op`, `id`, `type`, `data`, …).
    pub raw: Bytes,
}

impl Event {
    /// Parses the full event document. Cannot fail for an event the codec accepted
    /// (it was parsed once already), but returns an error rather than panicking.
    pub fn document(&self) -> Result<serde_json::Value, serde_json::Error> {
        let mut doc: serde_json::Value = serde_json::from_slice(&self.raw)?;
        if let Some(obj) = doc.as_object_mut() {
            // `op` is framing, not part of the event a workflow sees.
            obj.remove("op");
            obj.entry("data").or_insert_with(|| serde_json::Value::Object(Default::default()));
        }
        Ok(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_names_read_back_and_custom_types_keep_theirs() {
        for t in EventType::NATIVE {
            assert_eq!(EventType::parse(t.as_str()), t);
            assert_eq!(t.metric_label(), t.as_str());
            assert!(t.is_native());
        }
        let custom = EventType::parse("x.order_paid");
        assert_eq!(custom, EventType::Custom("x.order_paid".into()));
        assert_eq!(custom.as_str(), "x.order_paid");
        assert_eq!(custom.metric_label(), "custom");
    }
}
