//! The Journal: batched writes of execution records.
//!
//! It is split into lanes (actors on one arbiter), each with its own connection and
//! strictly one transaction at a time. A chatbot always writes through the same lane,
//! so its rows are written in order (an execution's insert, then its start, then its
//! outcome) and two lanes never touch the same rows, which rules out deadlocks between
//! them. While a lane commits, the next batch gathers; a whole batch (new executions,
//! starts, outcomes and step records) is one statement with writable CTEs over UNNEST
//! arrays: one round trip for hundreds of rows.
//!
//! An execution's start (`running`) is written only once it has run for
//! `RUNNING_MARK_DELAY`: most finish sooner, and their start is then carried by the
//! final update instead of costing an update of its own (status is indexed, so every
//! status change rewrites the row and its index entries).
//!
//! A waiting event is answered once its rows are committed: the lane sends the acks to
//! the connections and the committed execution ids to the supervisor, which only then
//! runs their steps. While the database is away the lane retries. An event that was
//! never sent, or whose write the server refused, is nacked `unavailable` once it has
//! waited `unavailable_after`. An event whose write was sent but whose outcome was lost
//! with the connection is *in doubt*: its rows may be committed, so it is neither acked
//! nor nacked until a retry settles it (the retry finds its own execution ids).

use super::{Store, StoreError};
use crate::event::Event;
use crate::ingest::connection::EventOutcomes;
use crate::ingest::protocol::{ExecutionRef, Nack, NackCode, Outcome};
use crate::telemetry::metrics as m;
use actix::prelude::*;
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use uuid::Uuid;

/// How long an execution runs before its `running` status is written on its own.
pub const RUNNING_MARK_DELAY: Duration = Duration::from_millis(100);
/// A write that takes longer is abandoned (its connection closed) and retried.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The event text a batch carries at most (an event is never split).
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// One execution a supervisor planned for an event.
#[derive(Debug, Clone, Copy)]
pub struct PlannedExecution {
    pub execution_id: Uuid,
    pub workflow_id: Uuid,
    pub workflow_version: i32,
}

/// An event waiting for its executions to be committed before it is acked.
pub struct PendingEvent {
    pub event: Event,
    pub received_at: Instant,
    pub executions: Vec<PlannedExecution>,
    pub reply_to: Recipient<EventOutcomes>,
}

/// Sent by a chatbot supervisor: insert these executions, then ack their events and
/// report back with `ExecutionsCommitted`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RecordExecutions {
    pub events: Vec<PendingEvent>,
    pub supervisor: Recipient<ExecutionsCommitted>,
}

/// Sent by a lane to the supervisor that asked: `committed` executions may run now;
/// `dropped` ones were not written (duplicates of earlier executions, or the database
/// stayed away and their events were nacked).
#[derive(Message, Debug, Default)]
#[rtype(result = "()")]
pub struct ExecutionsCommitted {
    pub committed: Vec<Uuid>,
    pub dropped: Vec<Uuid>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalStatus {
    Succeeded,
    Failed,
}

impl FinalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FinalStatus::Succeeded => "succeeded",
            FinalStatus::Failed => "failed",
        }
    }
}

/// One attempt of one step, as it will be stored.
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub index: i32,
    pub attempt: i32,
    pub step_id: String,
    pub action: &'static str,
    pub succeeded: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub output: Option<serde_json::Value>,
    pub error: Option<String>,
}

/// The end of an execution.
#[derive(Debug, Clone)]
pub struct ExecutionResult {
    pub id: Uuid,
    pub status: FinalStatus,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub error: Option<String>,
    pub steps: Vec<StepRecord>,
}

/// Sent by a supervisor: executions that started (`running`) and finished. Written in
/// order with the chatbot's other rows; nobody waits for it.
#[derive(Message, Default)]
#[rtype(result = "()")]
pub struct RecordProgress {
    pub started: Vec<(Uuid, DateTime<Utc>)>,
    pub finished: Vec<ExecutionResult>,
}

/// Resolves once everything received before it is committed (or given up on).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Flush(pub oneshot::Sender<()>);

/// The lanes, addressed by chatbot.
#[derive(Clone)]
pub struct Journal {
    lanes: Arc<Vec<Addr<JournalLane>>>,
}

impl Journal {
    /// Starts `lanes` lane actors on `arbiter`.
    pub fn start(store: &Store, arbiter: &actix::ArbiterHandle, lanes: usize, max_batch: usize, unavailable_after: Duration) -> Journal {
        let lanes = (0..lanes.max(1))
            .map(|i| {
                let store = store.clone();
                JournalLane::start_in_arbiter(arbiter, move |ctx| {
                    // Senders are bounded by connection windows and executor pools, so
                    // the mailbox itself need not be.
                    ctx.set_mailbox_capacity(0);
                    JournalLane::new(i, store, max_batch, unavailable_after)
                })
            })
            .collect();
        Journal { lanes: Arc::new(lanes) }
    }

    /// The lane that writes this chatbot's rows.
    pub fn lane_for(&self, chatbot_id: Uuid) -> Addr<JournalLane> {
        let h = chatbot_id.as_u64_pair();
        let idx = ((h.0 ^ h.1) % self.lanes.len() as u64) as usize;
        self.lanes[idx].clone()
    }

    /// Waits until every lane has written what it holds.
    pub async fn flush(&self) {
        let waits: Vec<_> = self
            .lanes
            .iter()
            .map(|lane| {
                let (tx, rx) = oneshot::channel();
                lane.do_send(Flush(tx));
                rx
            })
            .collect();
        for w in waits {
            let _ = w.await;
        }
    }
}

struct WaitingBatch {
    events: Vec<PendingEvent>,
    supervisor: Recipient<ExecutionsCommitted>,
    /// Sent in a write whose outcome is unknown: not to be nacked until settled.
    in_doubt: bool,
}

impl WaitingBatch {
    fn rows(&self) -> usize {
        self.events.iter().map(|e| e.executions.len()).sum()
    }

    fn bytes(&self) -> usize {
        self.events.iter().map(|e| e.event.raw.len()).sum()
    }
}

pub struct JournalLane {
    index: usize,
    store: Store,
    conn: Option<Arc<LaneConn>>,
    max_batch: usize,
    unavailable_after: Duration,
    waiting: VecDeque<WaitingBatch>,
    /// Starts not written yet, and the order they were reported in (for due checks).
    started: HashMap<Uuid, DateTime<Utc>>,
    started_order: VecDeque<(Instant, Uuid)>,
    finished: Vec<ExecutionResult>,
    flushing: bool,
    /// A wake-up is scheduled for starts that become due.
    mark_timer: bool,
    failures: u32,
    flush_waiters: Vec<oneshot::Sender<()>>,
}

impl Actor for JournalLane {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // While a write hangs, events queued behind it must still be nacked on time.
        ctx.run_interval(Duration::from_millis(250), |act, _| {
            if act.flushing {
                act.expire_waiting();
            }
        });
    }
}

/// Why a write failed, which decides what may be told to the events in it.
enum Failure {
    /// Nothing was sent, or the server refused the statement (it rolled back).
    NotWritten(StoreError),
    /// Sent, then the connection was lost or the write timed out: maybe committed.
    InDoubt(StoreError),
}

impl JournalLane {
    fn new(index: usize, store: Store, max_batch: usize, unavailable_after: Duration) -> JournalLane {
        JournalLane {
            index,
            store,
            conn: None,
            max_batch,
            unavailable_after,
            waiting: VecDeque::new(),
            started: HashMap::new(),
            started_order: VecDeque::new(),
            finished: Vec::new(),
            flushing: false,
            mark_timer: false,
            failures: 0,
            flush_waiters: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.started.is_empty() && self.finished.is_empty()
    }

    /// The report time of the oldest start still unwritten.
    fn oldest_start(&mut self) -> Option<Instant> {
        while let Some((at, id)) = self.started_order.front() {
            if self.started.contains_key(id) {
                return Some(*at);
            }
            self.started_order.pop_front();
        }
        None
    }

    /// Whether a write is worth starting now: starts count once they are due, or when
    /// someone waits for a flush.
    fn has_due_work(&mut self) -> bool {
        !self.waiting.is_empty()
            || !self.finished.is_empty()
            || (!self.flush_waiters.is_empty() && !self.started.is_empty())
            || self.oldest_start().is_some_and(|at| at.elapsed() >= RUNNING_MARK_DELAY)
    }

    /// Starts a write unless one is running; called after every change to the queue.
    fn kick(&mut self, ctx: &mut Context<Self>) {
        if self.flushing {
            return;
        }
        if self.is_empty() {
            for w in self.flush_waiters.drain(..) {
                let _ = w.send(());
            }
            return;
        }
        if !self.has_due_work() {
            if !self.mark_timer {
                self.mark_timer = true;
                ctx.run_later(RUNNING_MARK_DELAY, |act, ctx| {
                    act.mark_timer = false;
                    act.kick(ctx);
                });
            }
            return;
        }
        self.flushing = true;
        let batch = self.take_batch();
        let conn = self.conn.clone();
        let store = self.store.clone();
        let fut = async move {
            let conn = match conn {
                Some(c) if !c.client.is_closed() => c,
                _ => match LaneConn::open(&store).await {
                    Ok(c) => Arc::new(c),
                    Err(e) => return (batch, None, Err(Failure::NotWritten(e))),
                },
            };
            let started = Instant::now();
            let res = match tokio::time::timeout(WRITE_TIMEOUT, write(&conn, &batch)).await {
                Ok(Ok(written)) => Ok(written),
                Ok(Err(e)) if lost_in_flight(&e) => Err(Failure::InDoubt(e)),
                Ok(Err(e)) => Err(Failure::NotWritten(e)),
                Err(_) => Err(Failure::InDoubt(StoreError::Connect(format!(
                    "the write took longer than {} s",
                    WRITE_TIMEOUT.as_secs()
                )))),
            };
            if res.is_ok() {
                let h = m::hot();
                h.journal_commit.record(started.elapsed().as_secs_f64());
                h.journal_batch.record(batch.row_count() as f64);
            }
            // A connection that failed mid-write is not reused: its state is unknown.
            let keep = res.is_ok() || matches!(&res, Err(Failure::NotWritten(StoreError::Db(e))) if e.code().is_some());
            (batch, keep.then_some(conn), res)
        };
        ctx.spawn(fut.into_actor(self).map(|(batch, conn, res), act, ctx| {
            act.flushing = false;
            act.conn = conn;
            match res {
                Ok(written) => {
                    act.failures = 0;
                    act.answer(batch, written);
                    act.kick(ctx);
                }
                Err(failure) => act.on_failure(batch, failure, ctx),
            }
        }));
    }

    /// Moves new executions (up to `max_batch` rows and `MAX_BATCH_BYTES` of events, at
    /// least one batch) and the pending progress out of the queue.
    fn take_batch(&mut self) -> Batch {
        let mut events = Vec::new();
        let (mut rows, mut bytes) = (0, 0);
        while let Some(w) = self.waiting.front() {
            if !events.is_empty() && (rows + w.rows() > self.max_batch || bytes + w.bytes() > MAX_BATCH_BYTES) {
                break;
            }
            rows += w.rows();
            bytes += w.bytes();
            events.extend(self.waiting.pop_front());
        }
        let finished = std::mem::take(&mut self.finished);
        // A start that is already finished needs no write of its own.
        for f in &finished {
            self.started.remove(&f.id);
        }
        let everything = !self.flush_waiters.is_empty();
        let mut started = Vec::new();
        while let Some(&(at, id)) = self.started_order.front() {
            if !everything && at.elapsed() < RUNNING_MARK_DELAY {
                break;
            }
            self.started_order.pop_front();
            if let Some(when) = self.started.remove(&id) {
                started.push((id, when));
            }
        }
        Batch { events, started, finished }
    }

    /// Returns a failed batch to the front of the queue.
    fn put_back(&mut self, batch: Batch) {
        for w in batch.events.into_iter().rev() {
            self.waiting.push_front(w);
        }
        let now = Instant::now() - RUNNING_MARK_DELAY;
        for (id, at) in batch.started {
            if self.started.insert(id, at).is_none() {
                self.started_order.push_front((now, id));
            }
        }
        let mut finished = batch.finished;
        finished.append(&mut self.finished);
        self.finished = finished;
    }

    fn on_failure(&mut self, mut batch: Batch, failure: Failure, ctx: &mut Context<Self>) {
        let (error, in_doubt) = match failure {
            Failure::NotWritten(e) => (e, false),
            Failure::InDoubt(e) => (e, true),
        };
        metrics::counter!(m::DB_ERRORS, "kind" => error.kind()).increment(1);
        if !error.is_transient() && !in_doubt {
            tracing::error!(%error, lane = self.index, "journal write failed permanently; writing row by row");
            self.isolate(batch, ctx);
            return;
        }
        self.failures += 1;
        if self.failures == 1 || self.failures % 20 == 0 {
            tracing::warn!(%error, lane = self.index, failures = self.failures, in_doubt, "journal write failed; retrying");
        }
        if in_doubt {
            for w in &mut batch.events {
                w.in_doubt = true;
            }
        }
        self.put_back(batch);
        self.expire_waiting();
        let delay = Duration::from_millis((100u64 << self.failures.min(4)).min(1_000));
        self.flushing = true;
        ctx.run_later(delay, |act, ctx| {
            act.flushing = false;
            act.kick(ctx);
        });
    }

    /// Nacks `unavailable` the queued events that waited too long, unless in doubt.
    fn expire_waiting(&mut self) {
        let deadline = self.unavailable_after;
        for w in self.waiting.iter_mut().filter(|w| !w.in_doubt) {
            if w.events.iter().all(|e| e.received_at.elapsed() < deadline) {
                continue;
            }
            let (old, keep): (Vec<_>, Vec<_>) = w.events.drain(..).partition(|e| e.received_at.elapsed() >= deadline);
            w.events = keep;
            let nack = Nack::new(NackCode::Unavailable, "the database is unreachable; the event was not recorded, send it again");
            reject(WaitingBatch { events: old, supervisor: w.supervisor.clone(), in_doubt: false }, nack);
        }
        self.waiting.retain(|w| !w.events.is_empty());
    }

    /// A permanent error fails one statement for everyone in it; retry each event and
    /// each execution's progress on its own so only the row at fault is lost.
    fn isolate(&mut self, batch: Batch, ctx: &mut Context<Self>) {
        self.flushing = true;
        let conn = self.conn.clone();
        let store = self.store.clone();
        let fut = async move {
            let conn = match conn {
                Some(c) => c,
                None => match LaneConn::open(&store).await {
                    Ok(c) => Arc::new(c),
                    Err(_) => return (Vec::new(), batch.events),
                },
            };
            let mut done = Vec::new();
            let mut failed = Vec::new();
            let singles = batch
                .started
                .into_iter()
                .map(|s| Batch { events: Vec::new(), started: vec![s], finished: Vec::new() })
                .chain(batch.finished.into_iter().map(|f| Batch { events: Vec::new(), started: Vec::new(), finished: vec![f] }));
            for single in singles {
                if let Err(error) = write(&conn, &single).await {
                    let id = single.started.first().map(|s| s.0).or(single.finished.first().map(|f| f.id));
                    tracing::error!(%error, execution_id = ?id, "dropping execution progress that cannot be written");
                }
            }
            for w in batch.events {
                for e in w.events {
                    let single = Batch {
                        events: vec![WaitingBatch { events: vec![e], supervisor: w.supervisor.clone(), in_doubt: false }],
                        started: Vec::new(),
                        finished: Vec::new(),
                    };
                    match write(&conn, &single).await {
                        Ok(written) => done.push((single, written)),
                        Err(error) => {
                            tracing::error!(%error, "an event's executions cannot be recorded");
                            failed.extend(single.events);
                        }
                    }
                }
            }
            (done, failed)
        };
        ctx.spawn(fut.into_actor(self).map(|(done, failed), act, ctx| {
            act.flushing = false;
            for (batch, written) in done {
                act.answer(batch, written);
            }
            for w in failed {
                reject(w, Nack::new(NackCode::Internal, "the event's executions could not be recorded"));
            }
            act.kick(ctx);
        }));
    }

    /// Acks the committed events and tells supervisors which executions may run.
    fn answer(&mut self, batch: Batch, written: Written) {
        let mut outcomes: HashMap<Recipient<EventOutcomes>, Vec<(Box<str>, Outcome, Instant)>> = HashMap::new();
        let mut created = 0u64;
        for w in batch.events {
            let mut report = ExecutionsCommitted::default();
            for pe in w.events {
                let mut refs = Vec::with_capacity(pe.executions.len());
                let mut any_new = false;
                for x in &pe.executions {
                    // The row holding this (workflow, event id): ours (inserted now, or by
                    // an earlier attempt whose outcome was lost), or an earlier event's.
                    let holder = if written.inserted.contains(&x.execution_id) {
                        Some(x.execution_id)
                    } else {
                        written.existing.get(&x.execution_id).copied()
                    };
                    if holder == Some(x.execution_id) {
                        any_new = true;
                        created += 1;
                        report.committed.push(x.execution_id);
                    } else {
                        report.dropped.push(x.execution_id);
                    }
                    if let Some(id) = holder {
                        refs.push(ExecutionRef { execution_id: id, workflow_id: x.workflow_id });
                    }
                }
                let outcome = Outcome::Ack { executions: refs, duplicate: !any_new };
                outcomes.entry(pe.reply_to).or_default().push((pe.event.id, outcome, pe.received_at));
            }
            w.supervisor.do_send(report);
        }
        m::hot().executions_created.increment(created);
        for (recipient, list) in outcomes {
            recipient.do_send(EventOutcomes(list));
        }
        for f in &batch.finished {
            metrics::counter!(m::EXECUTIONS, "status" => f.status.as_str()).increment(1);
        }
    }
}

/// Whether a failed statement may have been applied: the connection went away after
/// sending it, so no answer (and no SQLSTATE) came back.
fn lost_in_flight(e: &StoreError) -> bool {
    matches!(e, StoreError::Db(e) if e.code().is_none())
}

/// Nacks every event of a batch and tells its supervisor the executions are gone.
fn reject(w: WaitingBatch, nack: Nack) {
    let mut by_connection: HashMap<Recipient<EventOutcomes>, Vec<(Box<str>, Instant)>> = HashMap::new();
    let mut report = ExecutionsCommitted::default();
    for pe in w.events {
        report.dropped.extend(pe.executions.iter().map(|x| x.execution_id));
        by_connection.entry(pe.reply_to).or_default().push((pe.event.id, pe.received_at));
    }
    w.supervisor.do_send(report);
    for (recipient, events) in by_connection {
        EventOutcomes::nack_all(&recipient, events, &nack);
    }
}

impl Handler<RecordExecutions> for JournalLane {
    type Result = ();
    fn handle(&mut self, msg: RecordExecutions, ctx: &mut Context<Self>) {
        self.waiting.push_back(WaitingBatch { events: msg.events, supervisor: msg.supervisor, in_doubt: false });
        self.kick(ctx);
    }
}

impl Handler<RecordProgress> for JournalLane {
    type Result = ();
    fn handle(&mut self, msg: RecordProgress, ctx: &mut Context<Self>) {
        let now = Instant::now();
        for (id, at) in msg.started {
            if self.started.insert(id, at).is_none() {
                self.started_order.push_back((now, id));
            }
        }
        self.finished.extend(msg.finished);
        self.kick(ctx);
    }
}

impl Handler<Flush> for JournalLane {
    type Result = ();
    fn handle(&mut self, msg: Flush, ctx: &mut Context<Self>) {
        self.flush_waiters.push(msg.0);
        self.kick(ctx);
    }
}

/// Rows of one transaction.
struct Batch {
    events: Vec<WaitingBatch>,
    started: Vec<(Uuid, DateTime<Utc>)>,
    finished: Vec<ExecutionResult>,
}

impl Batch {
    fn row_count(&self) -> usize {
        self.events.iter().map(WaitingBatch::rows).sum::<usize>() + self.started.len() + self.finished.len()
    }
}

/// What a write learned: the ids it inserted, and for each planned execution whose
/// (workflow, event id) was taken, the execution that holds it.
#[derive(Default)]
struct Written {
    inserted: HashSet<Uuid>,
    existing: HashMap<Uuid, Uuid>,
}

/// The whole batch in one statement: writable CTEs run exactly once each, all or
/// nothing, and only the insert's RETURNING comes back. Each event's text is sent once
/// (`$7`) and its executions point at it by position.
const WRITE_SQL: &str = "
WITH ins AS (
    INSERT INTO executions
        (id, chatbot_id, workflow_id, workflow_version, event_id, event_type, conversation_id, event, status)
    SELECT u.id, u.chatbot_id, u.workflow_id, u.workflow_version, u.event_id, u.event_type,
           u.conversation_id, (($7::text[])[u.doc])::jsonb - 'op', 'queued'
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::text[], $6::text[], $8::text[], $9::int4[])
         AS u(id, chatbot_id, workflow_id, workflow_version, event_id, event_type, conversation_id, doc)
    ON CONFLICT (workflow_id, event_id) DO NOTHING
    RETURNING id
), started AS (
    UPDATE executions e SET status = 'running', started_at = s.at
    FROM unnest($10::uuid[], $11::timestamptz[]) AS s(id, at)
    WHERE e.id = s.id AND e.status = 'queued'
), finished AS (
    UPDATE executions e
    SET status = f.status, started_at = coalesce(e.started_at, f.started_at), finished_at = f.finished_at,
        duration_ms = f.duration_ms, error = f.error
    FROM unnest($12::uuid[], $13::text[], $14::timestamptz[], $15::timestamptz[], $16::float8[], $17::text[])
         AS f(id, status, started_at, finished_at, duration_ms, error)
    WHERE e.id = f.id
), steps AS (
    INSERT INTO execution_steps
        (execution_id, step_index, attempt, step_id, action, status, started_at, finished_at, output, error)
    SELECT s.execution_id, s.step_index, s.attempt, s.step_id, s.action, s.status, s.started_at,
           s.finished_at, s.output::jsonb, s.error
    FROM unnest($18::uuid[], $19::int4[], $20::int4[], $21::text[], $22::text[], $23::text[],
                $24::timestamptz[], $25::timestamptz[], $26::text[], $27::text[])
         AS s(execution_id, step_index, attempt, step_id, action, status, started_at, finished_at, output, error)
    ON CONFLICT DO NOTHING
)
SELECT id FROM ins";

const EXISTING_SQL: &str = "
SELECT e.id, u.planned
FROM unnest($1::uuid[], $2::text[], $3::uuid[]) AS u(workflow_id, event_id, planned)
JOIN executions e ON e.workflow_id = u.workflow_id AND e.event_id = u.event_id";

/// A lane's own connection with its two statements prepared.
struct LaneConn {
    client: tokio_postgres::Client,
    write: tokio_postgres::Statement,
    existing: tokio_postgres::Statement,
}

impl LaneConn {
    async fn open(store: &Store) -> Result<LaneConn, StoreError> {
        let client = store.dedicated().await?;
        // The server gives up on a write the lane has given up on too.
        client.batch_execute(&format!("SET statement_timeout = {}", WRITE_TIMEOUT.as_millis())).await?;
        let write = client.prepare(WRITE_SQL).await?;
        let existing = client.prepare(EXISTING_SQL).await?;
        Ok(LaneConn { client, write, existing })
    }
}

/// PostgreSQL text cannot hold NUL: a webhook's answer or an error message that
/// carries one gets U+FFFD instead, rather than failing the whole batch.
fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

fn storable_json(v: &serde_json::Value) -> String {
    fn clean(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => {
                if s.contains('\0') {
                    *s = s.replace('\0', "\u{fffd}");
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(clean),
            serde_json::Value::Object(o) => {
                let keys: Vec<String> = o.keys().filter(|k| k.contains('\0')).cloned().collect();
                for k in keys {
                    if let Some(x) = o.remove(&k) {
                        o.insert(k.replace('\0', "\u{fffd}"), x);
                    }
                }
                o.values_mut().for_each(clean);
            }
            _ => {}
        }
    }
    let text = v.to_string();
    if !text.contains("\\u0000") {
        return text;
    }
    let mut v = v.clone();
    clean(&mut v);
    v.to_string()
}

async fn write(conn: &LaneConn, batch: &Batch) -> Result<Written, StoreError> {
    let n = batch.row_count();
    let mut ids = Vec::with_capacity(n);
    let mut chatbots = Vec::with_capacity(n);
    let mut workflows = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut event_ids: Vec<&str> = Vec::with_capacity(n);
    let mut types: Vec<&str> = Vec::with_capacity(n);
    let mut conversations: Vec<&str> = Vec::with_capacity(n);
    let mut doc_of: Vec<i32> = Vec::with_capacity(n);
    let mut docs: Vec<&str> = Vec::new();
    for pe in batch.events.iter().flat_map(|w| &w.events) {
        // The codec parsed this line as JSON, so it is UTF-8.
        docs.push(std::str::from_utf8(&pe.event.raw).unwrap_or("{}"));
        for x in &pe.executions {
            ids.push(x.execution_id);
            chatbots.push(pe.event.chatbot_id);
            workflows.push(x.workflow_id);
            versions.push(x.workflow_version);
            event_ids.push(&pe.event.id);
            types.push(pe.event.kind.as_str());
            conversations.push(&pe.event.conversation_id);
            doc_of.push(docs.len() as i32); // SQL arrays count from 1
        }
    }
    let started_ids: Vec<Uuid> = batch.started.iter().map(|s| s.0).collect();
    let started_at: Vec<DateTime<Utc>> = batch.started.iter().map(|s| s.1).collect();
    let f = &batch.finished;
    let f_ids: Vec<Uuid> = f.iter().map(|r| r.id).collect();
    let f_status: Vec<&str> = f.iter().map(|r| r.status.as_str()).collect();
    let f_started: Vec<DateTime<Utc>> = f.iter().map(|r| r.started_at).collect();
    let f_finished: Vec<DateTime<Utc>> = f.iter().map(|r| r.finished_at).collect();
    let f_duration: Vec<f64> =
        f.iter().map(|r| (r.finished_at - r.started_at).num_microseconds().unwrap_or(0) as f64 / 1000.0).collect();
    let f_error: Vec<Option<std::borrow::Cow<'_, str>>> = f.iter().map(|r| r.error.as_deref().map(storable)).collect();
    let steps: Vec<(Uuid, &StepRecord)> = f.iter().flat_map(|r| r.steps.iter().map(move |s| (r.id, s))).collect();
    let s_exec: Vec<Uuid> = steps.iter().map(|s| s.0).collect();
    let s_index: Vec<i32> = steps.iter().map(|s| s.1.index).collect();
    let s_attempt: Vec<i32> = steps.iter().map(|s| s.1.attempt).collect();
    let s_id: Vec<&str> = steps.iter().map(|s| s.1.step_id.as_str()).collect();
    let s_action: Vec<&str> = steps.iter().map(|s| s.1.action).collect();
    let s_status: Vec<&str> = steps.iter().map(|s| if s.1.succeeded { "succeeded" } else { "failed" }).collect();
    let s_started: Vec<DateTime<Utc>> = steps.iter().map(|s| s.1.started_at).collect();
    let s_finished: Vec<DateTime<Utc>> = steps.iter().map(|s| s.1.finished_at).collect();
    let s_output: Vec<Option<String>> = steps.iter().map(|s| s.1.output.as_ref().map(storable_json)).collect();
    let s_error: Vec<Option<std::borrow::Cow<'_, str>>> = steps.iter().map(|s| s.1.error.as_deref().map(storable)).collect();

    let rows = conn
        .client
        .query(
            &conn.write,
            &[
                &ids, &chatbots, &workflows, &versions, &event_ids, &types, &docs, &conversations, &doc_of,
                &started_ids, &started_at, &f_ids, &f_status, &f_started, &f_finished, &f_duration, &f_error,
                &s_exec, &s_index, &s_attempt, &s_id, &s_action, &s_status, &s_started, &s_finished, &s_output,
                &s_error,
            ],
        )
        .await?;
    let mut written = Written { inserted: rows.iter().map(|r| r.get::<_, Uuid>(0)).collect(), ..Default::default() };
    if written.inserted.len() < ids.len() {
        // Some (workflow, event id) pairs were taken: find by whom.
        let (mut wf, mut ev, mut planned) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..ids.len() {
            if !written.inserted.contains(&ids[i]) {
                wf.push(workflows[i]);
                ev.push(event_ids[i]);
                planned.push(ids[i]);
            }
        }
        for r in conn.client.query(&conn.existing, &[&wf, &ev, &planned]).await? {
            written.existing.insert(r.get(1), r.get(0));
        }
    }
    Ok(written)
}
