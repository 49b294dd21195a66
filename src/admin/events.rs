//! `POST /v1/events`: HTTP ingest for senders that cannot hold a socket. The body is a
//! JSON array of events (or NDJSON, one per line), each shaped like the socket's event
//! frame (`op` may be left out). The events take the socket's path (router,
//! supervisors, journal), and the answer lists an ack or nack per event, in order,
//! after the same commit: an ack means the executions are in PostgreSQL.

use super::auth::Caller;
use super::error::{ApiError, Errors};
use super::AdminState;
use crate::event::Event;
use crate::ingest::protocol::{self, ClientFrame, Refusal};
use crate::router::RouteEvents;
use crate::store::accounts::Role;
use crate::telemetry::metrics as m;
use crate::wire::{EventOutcomes, ExecutionRef, Nack, NackCode, Outcome};
use actix::prelude::*;
use actix_web::{post, web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Largest body, and most events, one request may carry.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
pub const MAX_EVENTS: usize = 10_000;
/// Every event is answered by the pipeline (nacked `unavailable` when the database is
/// away); this only bounds a request if something is lost.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// The answer to one event: the socket's ack or nack line.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EventResult {
    /// ack or nack.
    pub op: &'static str,
    /// The event's id, when it could be read.
    pub id: Option<String>,
    /// Ack: the executions the event created (or had created, for a duplicate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executions: Option<Vec<ExecutionRef>>,
    /// Ack: the event had been received before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
    /// Nack: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<NackError>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NackError {
    /// invalid_event, unknown_chatbot (also for another account's chatbot), rate_limited, overloaded, unavailable or internal.
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IngestResponse {
    pub acked: usize,
    pub nacked: usize,
    /// One per event, in the order sent.
    pub results: Vec<EventResult>,
}

impl EventResult {
    fn of(id: Option<&str>, outcome: &Outcome) -> EventResult {
        match outcome {
            Outcome::Ack { executions, duplicate } => EventResult {
                op: "ack",
                id: id.map(str::to_string),
                executions: Some(executions.clone()),
                duplicate: Some(*duplicate),
                error: None,
            },
            Outcome::Nack(n) => EventResult::nack(id, n),
        }
    }

    fn nack(id: Option<&str>, n: &Nack) -> EventResult {
        EventResult {
            op: "nack",
            id: id.map(str::to_string),
            executions: None,
            duplicate: None,
            error: Some(NackError {
                code: n.code.as_str(),
                message: n.message.clone(),
                field: n.field.clone(),
                retry_after_ms: n.retry_after_ms,
            }),
        }
    }
}

fn invalid(field: Option<String>, message: String) -> Nack {
    Nack { code: NackCode::InvalidEvent, message, field, retry_after_ms: None }
}

/// Turns one item of the body into an event, or the nack it gets.
fn decode_item(item: &[u8], max_frame_bytes: usize) -> Result<Event, (Option<String>, Nack)> {
    if item.len() > max_frame_bytes {
        return Err((None, invalid(None, format!("the event is {} bytes, over the limit of {max_frame_bytes}", item.len()))));
    }
    let mut obj: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(item)
        .map_err(|e| (None, invalid(None, format!("the event is not a JSON object: {e}"))))?;
    match obj.get("op") {
        None => {
            obj.insert("op".into(), "event".into());
        }
        Some(serde_json::Value::String(op)) if op == "event" => {}
        Some(_) => {
            let id = obj.get("id").and_then(|v| v.as_str()).map(str::to_string);
            return Err((id, invalid(Some("op".into()), "field \"op\" must be \"event\" or left out".into())));
        }
    }
    let line = Bytes::from(serde_json::to_vec(&obj).unwrap_or_default());
    match protocol::decode(&line) {
        Ok(ClientFrame::Event(e)) => Ok(e),
        // The item is an object with op "event": only the event's own fields can be wrong.
        Err(e) => match e.refusal() {
            Refusal::Nack { id, nack } => Err((id, nack)),
            Refusal::Error(_, message) => Err((None, invalid(None, message))),
        },
        Ok(_) => Err((None, invalid(Some("op".into()), "not an event".into()))),
    }
}

/// Splits the body into items: a JSON array, or NDJSON (also a single object).
fn items(body: &Bytes, ndjson: bool) -> Result<Vec<Bytes>, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if !ndjson && first == Some(b'[') {
        let raw: Vec<&serde_json::value::RawValue> = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the body is not a JSON array of events: {e}")))?;
        return Ok(raw.into_iter().map(|r| Bytes::copy_from_slice(r.get().as_bytes())).collect());
    }
    Ok(body
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| l.iter().any(|b| !b.is_ascii_whitespace()))
        .map(|l| body.slice_ref(l))
        .collect())
}

/// Gathers the pipeline's answers for one request, by event id in order sent.
struct Collector {
    /// Event id → positions still waiting (one id may be sent twice).
    waiting: HashMap<Box<str>, VecDeque<usize>>,
    results: Vec<Option<EventResult>>,
    remaining: usize,
    done: Option<oneshot::Sender<Vec<Option<EventResult>>>>,
}

impl Actor for Collector {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_later(ANSWER_TIMEOUT, |act, ctx| {
            m::hot().in_flight.decrement(act.remaining as f64);
            act.remaining = 0;
            act.finish(ctx);
        });
    }
}

impl Collector {
    fn finish(&mut self, ctx: &mut Context<Self>) {
        if let Some(done) = self.done.take() {
            let _ = done.send(std::mem::take(&mut self.results));
        }
        ctx.stop();
    }
}

impl Handler<EventOutcomes> for Collector {
    type Result = ();
    fn handle(&mut self, msg: EventOutcomes, ctx: &mut Context<Self>) {
        let hot = m::hot();
        let now = Instant::now();
        let mut acked = 0u64;
        let mut answered = 0usize;
        for (id, outcome, received_at) in &msg.0 {
            let Some(pos) = self.waiting.get_mut(id).and_then(VecDeque::pop_front) else { continue };
            answered += 1;
            if matches!(outcome, Outcome::Ack { .. }) {
                acked += 1;
            }
            hot.ack_latency.record(now.duration_since(*received_at).as_secs_f64());
            self.results[pos] = Some(EventResult::of(Some(id), outcome));
        }
        hot.acked.increment(acked);
        hot.in_flight.decrement(answered as f64);
        self.remaining = self.remaining.saturating_sub(answered);
        if self.remaining == 0 {
            self.finish(ctx);
        }
    }
}

async fn read_body(mut payload: web::Payload) -> Result<Bytes, ApiError> {
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("the body cannot be read: {e}")))?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ApiError::too_large(format!("the body is over the limit of {MAX_BODY_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Counts the request as an open connection until dropped, so a drain waits for it.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[utoipa::path(
    operation_id = "ingest_events",
    summary = "Send events over HTTP",
    description = "Events as a JSON array or NDJSON; each result is sent after the same commit as on the socket (acks and nacks of the wire protocol).",
    tag = "events",
    request_body(
        content = Vec<Object>,
        description = "A JSON array of events, or NDJSON (Content-Type: application/x-ndjson), \
                       each like the socket's event frame: id, chatbot_id, type, conversation_id, data",
        content_type = "application/json"
    ),
    responses((status = 200, description = "An ack or nack per event, in order, after the commit", body = IngestResponse), Errors)
)]
#[post("/v1/events")]
pub async fn ingest(
    state: web::Data<AdminState>,
    caller: Caller,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    if caller.principal.role == Role::Admin {
        return Err(ApiError::forbidden("this key has the admin role; an ingest or operator key is needed"));
    }
    let scope = caller.principal.scope();
    let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let ndjson = content_type.starts_with("application/x-ndjson") || content_type.starts_with("application/jsonl");
    if !ndjson && !content_type.starts_with("application/json") {
        return Err(ApiError::new(
            actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send a JSON array (Content-Type: application/json) or NDJSON (application/x-ndjson)",
        ));
    }
    if state.shutdown.is_cancelled() {
        return Err(ApiError::unavailable("the daemon is shutting down; send to another node or retry"));
    }
    state.connections.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight(&state.connections);
    let body = read_body(payload).await?;
    let items = items(&body, ndjson)?;
    if items.is_empty() {
        return Err(ApiError::bad_request("the body holds no events"));
    }
    if items.len() > MAX_EVENTS {
        return Err(ApiError::too_large(format!("{} events in one request; at most {MAX_EVENTS}", items.len())));
    }
    let mut results: Vec<Option<EventResult>> = vec![None; items.len()];
    let mut waiting: HashMap<Box<str>, VecDeque<usize>> = HashMap::new();
    let mut events = Vec::with_capacity(items.len());
    for (pos, item) in items.iter().enumerate() {
        match decode_item(item, state.max_frame_bytes) {
            Ok(e) => {
                waiting.entry(e.id.clone()).or_default().push_back(pos);
                events.push(e);
            }
            Err((id, nack)) => {
                m::hot().rejected(NackCode::InvalidEvent).increment(1);
                results[pos] = Some(EventResult::nack(id.as_deref(), &nack));
            }
        }
    }
    if !events.is_empty() {
        let hot = m::hot();
        hot.count_received(&events);
        hot.in_flight.increment(events.len() as f64);
        let (tx, rx) = oneshot::channel();
        let collector = Collector { waiting, results, remaining: events.len(), done: Some(tx) }.start();
        state.router.do_send(RouteEvents {
            scope,
            // Each request is a source of its own: its events keep their order.
            source: rand::random(),
            events,
            received_at: Instant::now(),
            reply_to: collector.recipient(),
        });
        results = rx.await.map_err(|_| ApiError::unavailable("the events were not answered; retry them"))?;
    }
    let lost = Nack::new(NackCode::Unavailable, "no answer in time; retry the event");
    let results: Vec<EventResult> =
        results.into_iter().map(|r| r.unwrap_or_else(|| EventResult::nack(None, &lost))).collect();
    let acked = results.iter().filter(|r| r.op == "ack").count();
    Ok(HttpResponse::Ok().json(IngestResponse { acked, nacked: results.len() - acked, results }))
}
