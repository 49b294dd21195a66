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
//! runs their steps. While the database is away the lane retries; an event still
//! uncommitted after `unavailable_after` is nacked `unavailable` (never acked).

use super::{Store, StoreError};
use crate::event::Event;
use crate::ingest::connection::EventOutcomes;
use crate::ingest::protocol::{ExecutionRef, Nack, NackCode, Outcome};
use crate::telemetry::metrics as m;
use actix::prelude::*;
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use uuid::Uuid;

/// How long an execution runs before its `running` status is written on its own.
pub const RUNNING_MARK_DELAY: Duration = Duration::from_millis(100);

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
}

pub struct JournalLane {
    index: usize,
    store: Store,
    conn: Option<Arc<LaneConn>>,
    max_batch: usize,
    unavailable_after: Duration,
    waiting: Vec<WaitingBatch>,
    waiting_rows: usize,
    /// Starts not written yet, with when they were reported.
    started: HashMap<Uuid, (DateTime<Utc>, Instant)>,
    finished: Vec<ExecutionResult>,
    flushing: bool,
    /// A wake-up is scheduled for starts that become due.
    mark_timer: bool,
    failures: u32,
    flush_waiters: Vec<oneshot::Sender<()>>,
}

impl Actor for JournalLane {
    type Context = Context<Self>;
}

impl JournalLane {
    fn new(index: usize, store: Store, max_batch: usize, unavailable_after: Duration) -> JournalLane {
        JournalLane {
            index,
            store,
            conn: None,
            max_batch,
            unavailable_after,
            waiting: Vec::new(),
            waiting_rows: 0,
            started: HashMap::new(),
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

    /// Whether a write is worth starting now: starts count once they are due, or when
    /// someone waits for a flush.
    fn has_due_work(&self) -> bool {
        !self.waiting.is_empty()
            || !self.finished.is_empty()
            || (!self.started.is_empty()
                && (!self.flush_waiters.is_empty()
                    || self.started.values().any(|(_, seen)| seen.elapsed() >= RUNNING_MARK_DELAY)))
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
            let client = match conn {
                Some(c) if !c.client.is_closed() => c,
                _ => match LaneConn::open(&store).await {
                    Ok(c) => Arc::new(c),
                    Err(e) => return (batch, None, Err(e)),
                },
            };
            let started = Instant::now();
            let res = write(&client, &batch).await;
            if res.is_ok() {
                let h = m::hot();
                h.journal_commit.record(started.elapsed().as_secs_f64());
                h.journal_batch.record(batch.row_count() as f64);
            }
            (batch, Some(client), res)
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
                Err(error) => act.on_failure(batch, error, ctx),
            }
        }));
    }

    /// Moves up to `max_batch` new executions and every pending progress row out of the queue.
    fn take_batch(&mut self) -> Batch {
        let mut events = Vec::new();
        let mut rows = 0;
        while !self.waiting.is_empty() && (rows == 0 || rows < self.max_batch) {
            let w = self.waiting.remove(0);
            rows += w.events.iter().map(|e| e.executions.len()).sum::<usize>();
            events.push(w);
        }
        self.waiting_rows -= rows;
        let finished = std::mem::take(&mut self.finished);
        // A start that is already finished needs no write of its own.
        for f in &finished {
            self.started.remove(&f.id);
        }
        let everything = !self.flush_waiters.is_empty();
        let mut started = Vec::new();
        self.started.retain(|id, (at, seen)| {
            let due = everything || seen.elapsed() >= RUNNING_MARK_DELAY;
            if due {
                started.push((*id, *at));
            }
            !due
        });
        Batch { events, started, finished }
    }

    /// Returns a failed batch to the front of the queue.
    fn put_back(&mut self, batch: Batch) {
        let rows: usize = batch.events.iter().flat_map(|w| &w.events).map(|e| e.executions.len()).sum();
        self.waiting_rows += rows;
        let mut events = batch.events;
        events.append(&mut self.waiting);
        self.waiting = events;
        for (id, at) in batch.started {
            self.started.entry(id).or_insert((at, Instant::now() - RUNNING_MARK_DELAY));
        }
        let mut finished = batch.finished;
        finished.append(&mut self.finished);
        self.finished = finished;
    }

    fn on_failure(&mut self, mut batch: Batch, error: StoreError, ctx: &mut Context<Self>) {
        metrics::counter!(m::DB_ERRORS, "kind" => error.kind()).increment(1);
        if !error.is_transient() {
            tracing::error!(%error, lane = self.index, "journal write failed permanently; writing event by event");
            self.isolate(batch, ctx);
            return;
        }
        self.failures += 1;
        if self.failures == 1 || self.failures % 20 == 0 {
            tracing::warn!(%error, lane = self.index, failures = self.failures, "journal write failed; retrying");
        }
        self.conn = None;
        // Events that waited too long are nacked; their rows may or may not have been
        // written (a commit can fail after the server applied it), which is safe: a
        // resend finds them and is acked as a duplicate.
        let deadline = self.unavailable_after;
        let mut expired = Vec::new();
        for w in &mut batch.events {
            let (old, keep): (Vec<_>, Vec<_>) = w.events.drain(..).partition(|e| e.received_at.elapsed() >= deadline);
            w.events = keep;
            if !old.is_empty() {
                expired.push(WaitingBatch { events: old, supervisor: w.supervisor.clone() });
            }
        }
        batch.events.retain(|w| !w.events.is_empty());
        for w in expired {
            let nack = Nack::new(NackCode::Unavailable, "the database is unreachable; the event was not recorded, send it again");
            reject(w, nack);
        }
        self.put_back(batch);
        let delay = Duration::from_millis((100u64 << self.failures.min(4)).min(1_000));
        self.flushing = true;
        ctx.run_later(delay, |act, ctx| {
            act.flushing = false;
            act.kick(ctx);
        });
        // Also re-check queued events against their deadline while the database is away.
        self.expire_waiting();
    }

    fn expire_waiting(&mut self) {
        let deadline = self.unavailable_after;
        let mut rows = 0;
        for w in &mut self.waiting {
            let (old, keep): (Vec<_>, Vec<_>) = w.events.drain(..).partition(|e| e.received_at.elapsed() >= deadline);
            w.events = keep;
            if !old.is_empty() {
                rows += old.iter().map(|e| e.executions.len()).sum::<usize>();
                let nack = Nack::new(NackCode::Unavailable, "the database is unreachable; the event was not recorded, send it again");
                reject(WaitingBatch { events: old, supervisor: w.supervisor.clone() }, nack);
            }
        }
        self.waiting_rows -= rows;
        self.waiting.retain(|w| !w.events.is_empty());
    }

    /// A permanent error fails one statement for everyone in it; retry each event on
    /// its own so only the event at fault is nacked.
    fn isolate(&mut self, batch: Batch, ctx: &mut Context<Self>) {
        self.flushing = true;
        let conn = self.conn.clone();
        let fut = async move {
            let Some(client) = conn else { return (Vec::new(), batch.events) };
            let mut done = Vec::new();
            let mut failed = Vec::new();
            let progress = Batch { events: Vec::new(), started: batch.started, finished: batch.finished };
            if let Err(error) = write(&client, &progress).await {
                tracing::error!(%error, "dropping execution progress that cannot be written");
            }
            for w in batch.events {
                for e in w.events {
                    let single = Batch {
                        events: vec![WaitingBatch { events: vec![e], supervisor: w.supervisor.clone() }],
                        started: Vec::new(),
                        finished: Vec::new(),
                    };
                    match write(&client, &single).await {
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
        let hot = m::hot();
        let mut created = 0u64;
        for w in batch.events {
            let mut report = ExecutionsCommitted::default();
            for pe in w.events {
                let mut refs = Vec::with_capacity(pe.executions.len());
                let mut any_new = false;
                for x in &pe.executions {
                    // Inserted now, or by an earlier attempt of this same batch whose
                    // commit we did not hear about: either way it is ours.
                    let ours = written.inserted.contains(&x.execution_id)
                        || written.existing.get(&(x.workflow_id, pe.event.id.to_string())) == Some(&x.execution_id);
                    if ours {
                        any_new = true;
                        created += 1;
                        report.committed.push(x.execution_id);
                        refs.push(ExecutionRef { execution_id: x.execution_id, workflow_id: x.workflow_id });
                    } else {
                        report.dropped.push(x.execution_id);
                        if let Some(existing) = written.existing.get(&(x.workflow_id, pe.event.id.to_string())) {
                            refs.push(ExecutionRef { execution_id: *existing, workflow_id: x.workflow_id });
                        }
                    }
                }
                let outcome = Outcome::Ack { executions: refs, duplicate: !any_new };
                outcomes.entry(pe.reply_to).or_default().push((pe.event.id, outcome, pe.received_at));
            }
            w.supervisor.do_send(report);
        }
        hot.executions_created.increment(created);
        for (recipient, list) in outcomes {
            recipient.do_send(EventOutcomes(list));
        }
        for f in &batch.finished {
            metrics::counter!(m::EXECUTIONS, "status" => f.status.as_str()).increment(1);
        }
    }
}

/// Nacks every event of a batch and tells its supervisor the executions are gone.
fn reject(w: WaitingBatch, nack: Nack) {
    let mut outcomes: HashMap<Recipient<EventOutcomes>, Vec<(Box<str>, Outcome, Instant)>> = HashMap::new();
    let mut report = ExecutionsCommitted::default();
    for pe in w.events {
        report.dropped.extend(pe.executions.iter().map(|x| x.execution_id));
        outcomes.entry(pe.reply_to).or_default().push((pe.event.id, Outcome::Nack(nack.clone()), pe.received_at));
    }
    w.supervisor.do_send(report);
    for (recipient, list) in outcomes {
        recipient.do_send(EventOutcomes(list));
    }
}

impl Handler<RecordExecutions> for JournalLane {
    type Result = ();
    fn handle(&mut self, msg: RecordExecutions, ctx: &mut Context<Self>) {
        self.waiting_rows += msg.events.iter().map(|e| e.executions.len()).sum::<usize>();
        self.waiting.push(WaitingBatch { events: msg.events, supervisor: msg.supervisor });
        self.kick(ctx);
    }
}

impl Handler<RecordProgress> for JournalLane {
    type Result = ();
    fn handle(&mut self, msg: RecordProgress, ctx: &mut Context<Self>) {
        let now = Instant::now();
        for (id, at) in msg.started {
            self.started.insert(id, (at, now));
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
        let new: usize = self.events.iter().flat_map(|w| &w.events).map(|e| e.executions.len()).sum();
        new + self.started.len() + self.finished.len()
    }
}

/// What a write learned: the ids it inserted, and for conflicts the execution that
/// already held each (workflow, event id).
#[derive(Default)]
struct Written {
    inserted: HashSet<Uuid>,
    existing: HashMap<(Uuid, String), Uuid>,
}

/// The whole batch in one statement: writable CTEs run exactly once each, all or
/// nothing, and only the insert's RETURNING comes back.
const WRITE_SQL: &str = "
WITH ins AS (
    INSERT INTO executions
        (id, chatbot_id, workflow_id, workflow_version, event_id, event_type, conversation_id, event, status)
    SELECT u.id, u.chatbot_id, u.workflow_id, u.workflow_version, u.event_id, u.event_type,
           u.conversation_id, u.event::jsonb - 'op', 'queued'
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::text[], $6::text[], $7::text[], $8::text[])
         AS u(id, chatbot_id, workflow_id, workflow_version, event_id, event_type, conversation_id, event)
    ON CONFLICT (workflow_id, event_id) DO NOTHING
    RETURNING id
), started AS (
    UPDATE executions e SET status = 'running', started_at = s.at
    FROM unnest($9::uuid[], $10::timestamptz[]) AS s(id, at)
    WHERE e.id = s.id AND e.status = 'queued'
), finished AS (
    UPDATE executions e
    SET status = f.status, started_at = coalesce(e.started_at, f.started_at), finished_at = f.finished_at,
        duration_ms = f.duration_ms, error = f.error
    FROM unnest($11::uuid[], $12::text[], $13::timestamptz[], $14::timestamptz[], $15::float8[], $16::text[])
         AS f(id, status, started_at, finished_at, duration_ms, error)
    WHERE e.id = f.id
), steps AS (
    INSERT INTO execution_steps
        (execution_id, step_index, attempt, step_id, action, status, started_at, finished_at, output, error)
    SELECT s.execution_id, s.step_index, s.attempt, s.step_id, s.action, s.status, s.started_at,
           s.finished_at, s.output::jsonb, s.error
    FROM unnest($17::uuid[], $18::int4[], $19::int4[], $20::text[], $21::text[], $22::text[],
                $23::timestamptz[], $24::timestamptz[], $25::text[], $26::text[])
         AS s(execution_id, step_index, attempt, step_id, action, status, started_at, finished_at, output, error)
    ON CONFLICT DO NOTHING
)
SELECT id FROM ins";

const EXISTING_SQL: &str = "
SELECT e.id, e.workflow_id, e.event_id
FROM executions e
JOIN unnest($1::uuid[], $2::text[]) AS u(workflow_id, event_id)
  ON e.workflow_id = u.workflow_id AND e.event_id = u.event_id";

/// A lane's own connection with its two statements prepared.
struct LaneConn {
    client: tokio_postgres::Client,
    write: tokio_postgres::Statement,
    existing: tokio_postgres::Statement,
}

impl LaneConn {
    async fn open(store: &Store) -> Result<LaneConn, StoreError> {
        let client = store.dedicated().await?;
        let write = client.prepare(WRITE_SQL).await?;
        let existing = client.prepare(EXISTING_SQL).await?;
        Ok(LaneConn { client, write, existing })
    }
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
    let mut docs: Vec<&str> = Vec::with_capacity(n);
    for pe in batch.events.iter().flat_map(|w| &w.events) {
        // The codec parsed this line as JSON, so it is UTF-8.
        let doc = std::str::from_utf8(&pe.event.raw).unwrap_or("{}");
        for x in &pe.executions {
            ids.push(x.execution_id);
            chatbots.push(pe.event.chatbot_id);
            workflows.push(x.workflow_id);
            versions.push(x.workflow_version);
            event_ids.push(&pe.event.id);
            types.push(pe.event.kind.as_str());
            conversations.push(&pe.event.conversation_id);
            docs.push(doc);
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
    let f_error: Vec<Option<&str>> = f.iter().map(|r| r.error.as_deref()).collect();
    let steps: Vec<(Uuid, &StepRecord)> = f.iter().flat_map(|r| r.steps.iter().map(move |s| (r.id, s))).collect();
    let s_exec: Vec<Uuid> = steps.iter().map(|s| s.0).collect();
    let s_index: Vec<i32> = steps.iter().map(|s| s.1.index).collect();
    let s_attempt: Vec<i32> = steps.iter().map(|s| s.1.attempt).collect();
    let s_id: Vec<&str> = steps.iter().map(|s| s.1.step_id.as_str()).collect();
    let s_action: Vec<&str> = steps.iter().map(|s| s.1.action).collect();
    let s_status: Vec<&str> = steps.iter().map(|s| if s.1.succeeded { "succeeded" } else { "failed" }).collect();
    let s_started: Vec<DateTime<Utc>> = steps.iter().map(|s| s.1.started_at).collect();
    let s_finished: Vec<DateTime<Utc>> = steps.iter().map(|s| s.1.finished_at).collect();
    let s_output: Vec<Option<String>> = steps.iter().map(|s| s.1.output.as_ref().map(|v| v.to_string())).collect();
    let s_error: Vec<Option<&str>> = steps.iter().map(|s| s.1.error.as_deref()).collect();

    let rows = conn
        .client
        .query(
            &conn.write,
            &[
                &ids, &chatbots, &workflows, &versions, &event_ids, &types, &conversations, &docs, &started_ids,
                &started_at, &f_ids, &f_status, &f_started, &f_finished, &f_duration, &f_error, &s_exec, &s_index,
                &s_attempt, &s_id, &s_action, &s_status, &s_started, &s_finished, &s_output, &s_error,
            ],
        )
        .await?;
    let mut written = Written { inserted: rows.iter().map(|r| r.get::<_, Uuid>(0)).collect(), ..Default::default() };
    if written.inserted.len() < ids.len() {
        // Some (workflow, event id) pairs existed already: find whose they are.
        let mut wf = Vec::new();
        let mut ev = Vec::new();
        for i in 0..ids.len() {
            if !written.inserted.contains(&ids[i]) {
                wf.push(workflows[i]);
                ev.push(event_ids[i]);
            }
        }
        for r in conn.client.query(&conn.existing, &[&wf, &ev]).await? {
            written.existing.insert((r.get(1), r.get(2)), r.get(0));
        }
    }
    Ok(written)
}
