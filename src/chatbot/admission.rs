//! What each event of a batch gets from its chatbot, decided before anything is
//! written: an answer at once (over the rate limit, no workflow listens to its type,
//! none matched), or executions planned for the workflows that matched. The supervisor
//! owns the limiters, the index and the executor pool and does the sending; these are
//! the decisions.

use super::executor::Job;
use super::limits::Limits;
use super::triggers::TriggerIndex;
use crate::event::Event;
use crate::store::journal::PlannedExecution;
use crate::wire::{Nack, NackCode, Outcome};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// The answer to an event no workflow takes.
pub fn nothing_matched() -> Outcome {
    Outcome::Ack { executions: Vec::new(), duplicate: false }
}

/// The nack of an event over its chatbot's event rate; `wait` is when the limiter
/// lets the next one through.
pub fn rate_limited(chatbot_id: Uuid, limits: &Limits, wait: Duration) -> Nack {
    let mut nack = Nack::new(
        NackCode::RateLimited,
        format!("chatbot {chatbot_id} is over its limit of {} events/s (burst {})", limits.events_per_second, limits.burst),
    );
    nack.retry_after_ms = Some((wait.as_micros() as u64).div_ceil(1000).max(1));
    nack
}

/// Matches an event against the index. `Ok(doc)`: the workflows at the indexes left
/// in `matched` take it (its document parsed once, here); `Err`: the answer now. An
/// event whose type no workflow listens to is answered without parsing its JSON.
pub fn admit(index: &TriggerIndex, event: &Event, matched: &mut Vec<u32>) -> Result<Value, Outcome> {
    matched.clear();
    if !index.has_candidates(&event.kind) {
        return Err(nothing_matched());
    }
    let doc = match event.document() {
        Ok(d) => d,
        // The framing read the line without looking inside `data`: what only a full
        // parse finds (nesting past serde_json's limit, a lone UTF-16 surrogate) is the
        // sender's error. Counted with the other nacks; logged rarely, as the sender
        // can repeat it at any rate.
        Err(error) => {
            let mut nack = Nack::new(NackCode::InvalidEvent, unreadable_data(&error));
            nack.field = Some("data".into());
            warn_rarely(&event.id, &nack.message);
            return Err(Outcome::Nack(nack));
        }
    };
    index.match_event(&event.kind, &doc, matched);
    if matched.is_empty() {
        return Err(nothing_matched());
    }
    Ok(doc)
}

/// What is wrong with an event whose JSON does not parse whole.
fn unreadable_data(error: &serde_json::Error) -> String {
    let text = error.to_string();
    if text.contains("recursion limit") {
        "field \"data\" is nested more than 128 levels deep".into()
    } else if text.contains("surrogate") || text.contains("hex escape") {
        format!("field \"data\" holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair): {text}")
    } else {
        format!("field \"data\" cannot be read: {text}")
    }
}

/// A warning at most every ten seconds, with how many were not logged meanwhile.
fn warn_rarely(event_id: &str, message: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    static SKIPPED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let last = LAST.load(Ordering::Relaxed);
    if now >= last + 10 && LAST.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        let skipped = SKIPPED.swap(0, Ordering::Relaxed);
        tracing::warn!(event_id, message, not_logged_since = skipped, "nacked an event whose data cannot be read");
    } else {
        SKIPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// The executions of one admitted event, one per matched workflow, each with a new id.
/// While `room` lasts an execution is leased to this node and runs from memory once
/// committed (its job is returned); past it, it is written free and waits in
/// PostgreSQL for a claim, so memory stays bounded.
pub fn plan(
    index: &TriggerIndex,
    matched: &[u32],
    doc: Value,
    conversation_id: &str,
    room: &mut usize,
    generation: u64,
    new_id: impl Fn() -> Uuid,
) -> (Vec<PlannedExecution>, Vec<Job>) {
    let doc = Arc::new(doc);
    let conversation_id: Arc<str> = Arc::from(conversation_id);
    let outputs = Arc::new(Value::Object(Default::default()));
    let mut planned = Vec::with_capacity(matched.len());
    let mut jobs = Vec::with_capacity(matched.len());
    for &i in matched {
        let workflow = index.workflow(i).clone();
        let execution_id = new_id();
        let leased = *room > 0;
        planned.push(PlannedExecution { execution_id, workflow_id: workflow.id, workflow_version: workflow.version, leased });
        if leased {
            *room -= 1;
            jobs.push(Job {
                generation,
                interrupted: false,
                ran_before: false,
                execution_id,
                epoch: 1,
                attempt: 1,
                workflow,
                event: doc.clone(),
                conversation_id: conversation_id.clone(),
                step_index: 0,
                outputs: outputs.clone(),
            });
        }
    }
    (planned, jobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;
    use crate::workflow::CompiledWorkflow;
    use serde_json::json;

    fn index() -> TriggerIndex {
        let workflow = |name: &str, keyword: &str| {
            let spec = serde_json::from_value(json!({
                "name": name,
                "trigger": {"event": "message.received", "keywords": {"any": [keyword]}},
                "steps": [{"id": "r", "action": "reply", "text": "hi"}]
            }))
            .unwrap();
            Arc::new(CompiledWorkflow::compile(Uuid::now_v7(), 1, spec).unwrap())
        };
        TriggerIndex::build(vec![workflow("refund", "refund"), workflow("money", "money")])
    }

    fn event(kind: &str, text: &str) -> Event {
        let line = json!({"op": "event", "id": "e1", "chatbot_id": Uuid::nil(), "type": kind,
                          "conversation_id": "c-9", "data": {"text": text}});
        Event {
            id: "e1".into(),
            chatbot_id: Uuid::nil(),
            kind: EventType::parse(kind),
            conversation_id: "c-9".into(),
            raw: bytes::Bytes::from(line.to_string()),
        }
    }

    #[test]
    fn events_nobody_takes_are_acked_with_no_executions() {
        let index = index();
        let mut matched = Vec::new();
        assert_eq!(admit(&index, &event("intent.detected", "refund"), &mut matched), Err(nothing_matched()));
        assert_eq!(admit(&index, &event("message.received", "hello"), &mut matched), Err(nothing_matched()));
        assert!(matched.is_empty());
    }

    #[test]
    fn matched_events_plan_leased_executions_while_there_is_room() {
        let index = index();
        let mut matched = Vec::new();
        let doc = admit(&index, &event("message.received", "my money back, a refund"), &mut matched).unwrap();
        assert_eq!(matched.len(), 2);
        assert_eq!(doc["data"]["text"], "my money back, a refund");
        assert!(doc.get("op").is_none());
        let mut room = 1;
        let (planned, jobs) = plan(&index, &matched, doc, "c-9", &mut room, 7, Uuid::now_v7);
        assert_eq!(room, 0);
        assert_eq!(planned.iter().map(|p| p.leased).collect::<Vec<_>>(), [true, false]);
        assert_eq!(jobs.len(), 1);
        let job = &jobs[0];
        assert_eq!((job.execution_id, job.workflow.id), (planned[0].execution_id, planned[0].workflow_id));
        assert_eq!((job.epoch, job.attempt, job.step_index, job.generation), (1, 1, 0, 7));
        assert_eq!(&*job.conversation_id, "c-9");
        assert_ne!(planned[0].execution_id, planned[1].execution_id);
    }

    #[test]
    fn the_rate_limit_nack_says_when_to_retry() {
        let limits = Limits { events_per_second: 5, burst: 10, executions_per_second: 1, max_concurrent: 1 };
        let nack = rate_limited(Uuid::nil(), &limits, Duration::from_micros(1_500));
        assert_eq!(nack.code, NackCode::RateLimited);
        assert_eq!(nack.retry_after_ms, Some(2));
        assert!(nack.message.contains("5 events/s (burst 10)"), "{}", nack.message);
        assert_eq!(rate_limited(Uuid::nil(), &limits, Duration::ZERO).retry_after_ms, Some(1));
    }
}
