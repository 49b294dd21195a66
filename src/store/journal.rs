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

use super::outbox::COMMANDS_CHANNEL;
use super::{Store, StoreError};
use crate::event::Event;
use crate::telemetry::metrics as m;
use crate::wire::{Answer, Command, EventOutcomes, ExecutionRef, Nack, NackCode, Outcome};
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
    /// Inserted leased to this node (epoch 1), to run from memory; otherwise left
    /// free in PostgreSQL for a later claim.
    pub leased: bool,
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

/// Sent by a lane to the supervisor that asked: `committed` executions are in the
/// database; `dropped` ones were not written (duplicates of earlier executions, or the
/// database stayed away and their events were nacked).
#[derive(Message, Debug, Default)]
#[rtype(result = "()")]
pub struct ExecutionsCommitted {
    pub committed: Vec<Uuid>,
    pub dropped: Vec<Uuid>,
}

/// The status an update writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Running,
    /// A step failed; the next attempt is due at `run_after`.
    Retrying,
    /// A `delay` step; the execution goes on at `run_after`.
    Waiting,
    Succeeded,
    /// A step failed in a way a retry would not fix.
    Failed,
    /// The last attempt failed: a dead letter is written with it.
    Dead,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Retrying => "retrying",
            Status::Waiting => "waiting",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Dead => "dead",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Dead)
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

/// The state of an execution after something happened to it, written only while the
/// lease (this node, `epoch`) still holds.
#[derive(Debug, Clone)]
pub struct ExecutionUpdate {
    pub id: Uuid,
    pub epoch: i64,
    pub status: Status,
    pub attempt: i32,
    /// The next step to run.
    pub step_index: i32,
    /// The outputs of the steps before `step_index`; `None` leaves them as stored.
    pub outputs: Option<Arc<serde_json::Value>>,
    /// When a retrying or waiting execution goes on.
    pub run_after: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// Give the lease up: a waiting execution is claimed again when due.
    pub release: bool,
    pub steps: Vec<StepRecord>,
}

impl ExecutionUpdate {
    /// Only says the execution started: worth writing on its own only if it runs a while.
    fn is_start_mark(&self) -> bool {
        self.status == Status::Running && self.steps.is_empty() && self.outputs.is_none()
    }

    /// Folds a later update of the same execution into this one.
    fn merge(&mut self, later: ExecutionUpdate) {
        if later.epoch != self.epoch {
            // Claimed again since: the older state is void.
            *self = later;
            return;
        }
        let started_at = self.started_at.or(later.started_at);
        let outputs = later.outputs.clone().or_else(|| self.outputs.take());
        let mut steps = std::mem::take(&mut self.steps);
        steps.extend(later.steps.iter().cloned());
        *self = ExecutionUpdate { started_at, outputs, steps, ..later };
    }
}

/// A command for a chat service, kept in the outbox until a client acks it.
#[derive(Debug, Clone)]
pub struct CommandRow {
    pub command: Arc<Command>,
    /// Written only while the execution's lease holds.
    pub epoch: i64,
}

/// Sent by supervisors and the outbox: execution progress, commands to keep, and
/// commands clients acked. Written in order with the chatbot's other rows.
#[derive(Message, Default)]
#[rtype(result = "()")]
pub struct RecordProgress {
    pub updates: Vec<ExecutionUpdate>,
    pub commands: Vec<CommandRow>,
    pub acked_commands: Vec<String>,
    /// Told about updates refused because the lease moved on (another node claimed the
    /// execution meanwhile).
    pub lease_lost: Option<Recipient<LeaseLost>>,
    /// Resolved once the rows above are committed.
    pub committed: Option<oneshot::Sender<()>>,
}

/// Sent by a lane: these executions' updates (at these epochs) were refused; the lease
/// they were written under is gone.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct LeaseLost(pub Vec<(Uuid, i64)>);

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
    pub fn start(
        store: &Store,
        node: Uuid,
        arbiter: &actix::ArbiterHandle,
        lanes: usize,
        max_batch: usize,
        unavailable_after: Duration,
    ) -> Journal {
        let lanes = (0..lanes.max(1))
            .map(|i| {
                let store = store.clone();
                JournalLane::start_in_arbiter(arbiter, move |ctx| {
                    // Senders are bounded by connection windows and executor pools, so
                    // the mailbox itself need not be.
                    ctx.set_mailbox_capacity(0);
                    JournalLane::new(i, store, node, max_batch, unavailable_after)
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

/// An execution's latest unwritten state, and who to tell if its lease is gone.
struct PendingUpdate {
    update: ExecutionUpdate,
    first_seen: Instant,
    lease_lost: Option<Recipient<LeaseLost>>,
}

/// Progress waiting for the next write.
#[derive(Default)]
struct Progress {
    updates: HashMap<Uuid, PendingUpdate>,
    /// Arrival order of `updates` (ids may repeat or be gone).
    order: VecDeque<Uuid>,
    commands: Vec<CommandRow>,
    acked_commands: Vec<String>,
    committed: Vec<oneshot::Sender<()>>,
}

impl Progress {
    fn is_empty(&self) -> bool {
        self.updates.is_empty() && self.commands.is_empty() && self.acked_commands.is_empty() && self.committed.is_empty()
    }

    fn add(&mut self, msg: RecordProgress) {
        let now = Instant::now();
        for u in msg.updates {
            match self.updates.get_mut(&u.id) {
                Some(p) => {
                    p.update.merge(u);
                    if p.lease_lost.is_none() {
                        p.lease_lost = msg.lease_lost.clone();
                    }
                }
                None => {
                    self.order.push_back(u.id);
                    self.updates.insert(u.id, PendingUpdate { update: u, first_seen: now, lease_lost: msg.lease_lost.clone() });
                }
            }
        }
        self.commands.extend(msg.commands);
        self.acked_commands.extend(msg.acked_commands);
        self.committed.extend(msg.committed);
    }

    /// Whether anything is worth a write now; start marks only once they are due, or
    /// when `everything` (a flush is waited for).
    fn has_due(&self, everything: bool) -> bool {
        !self.commands.is_empty()
            || !self.acked_commands.is_empty()
            || !self.committed.is_empty()
            || self
                .updates
                .values()
                .any(|p| everything || !p.update.is_start_mark() || p.first_seen.elapsed() >= RUNNING_MARK_DELAY)
    }

    /// Takes what is due; start marks younger than `RUNNING_MARK_DELAY` stay.
    fn take(&mut self, everything: bool) -> Progress {
        let mut taken = Progress {
            commands: std::mem::take(&mut self.commands),
            acked_commands: std::mem::take(&mut self.acked_commands),
            committed: std::mem::take(&mut self.committed),
            ..Default::default()
        };
        let mut keep = VecDeque::new();
        let mut kept = HashSet::new();
        while let Some(id) = self.order.pop_front() {
            let Some(p) = self.updates.get(&id) else { continue };
            if taken.updates.contains_key(&id) || kept.contains(&id) {
                continue;
            }
            if everything || !p.update.is_start_mark() || p.first_seen.elapsed() >= RUNNING_MARK_DELAY {
                let p = self.updates.remove(&id).expect("present");
                taken.order.push_back(id);
                taken.updates.insert(id, p);
            } else {
                kept.insert(id);
                keep.push_back(id);
            }
        }
        self.order = keep;
        taken
    }

    /// Puts a batch's progress back in front of what arrived since.
    fn put_back(&mut self, mut older: Progress) {
        for (id, p) in std::mem::take(&mut self.updates) {
            match older.updates.get_mut(&id) {
                Some(o) => o.update.merge(p.update),
                None => {
                    older.order.push_back(id);
                    older.updates.insert(id, p);
                }
            }
        }
        older.order.extend(self.order.drain(..));
        older.commands.append(&mut self.commands);
        older.acked_commands.append(&mut self.acked_commands);
        older.committed.append(&mut self.committed);
        *self = older;
    }
}

pub struct JournalLane {
    index: usize,
    store: Store,
    node: Uuid,
    conn: Option<Arc<LaneConn>>,
    max_batch: usize,
    unavailable_after: Duration,
    waiting: VecDeque<WaitingBatch>,
    progress: Progress,
    flushing: bool,
    /// A wake-up is scheduled for start marks that become due.
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
    fn new(index: usize, store: Store, node: Uuid, max_batch: usize, unavailable_after: Duration) -> JournalLane {
        JournalLane {
            index,
            store,
            node,
            conn: None,
            max_batch,
            unavailable_after,
            waiting: VecDeque::new(),
            progress: Progress::default(),
            flushing: false,
            mark_timer: false,
            failures: 0,
            flush_waiters: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.progress.is_empty()
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
        let everything = !self.flush_waiters.is_empty();
        if self.waiting.is_empty() && !self.progress.has_due(everything) {
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
        let batch = self.take_batch(everything);
        let conn = self.conn.clone();
        let store = self.store.clone();
        let node = self.node;
        let fut = async move {
            let conn = match conn {
                Some(c) if !c.client.is_closed() => c,
                _ => match LaneConn::open(&store).await {
                    Ok(c) => Arc::new(c),
                    Err(e) => return (batch, None, Err(Failure::NotWritten(e))),
                },
            };
            let started = Instant::now();
            let res = match tokio::time::timeout(WRITE_TIMEOUT, write(&conn, node, &batch)).await {
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
    /// least one batch) and the due progress out of the queue.
    fn take_batch(&mut self, everything: bool) -> Batch {
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
        Batch { events, progress: self.progress.take(everything) }
    }

    /// Returns a failed batch to the front of the queue.
    fn put_back(&mut self, batch: Batch) {
        for w in batch.events.into_iter().rev() {
            self.waiting.push_front(w);
        }
        self.progress.put_back(batch.progress);
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
        let node = self.node;
        let fut = async move {
            let conn = match conn {
                Some(c) if !c.client.is_closed() => c,
                _ => match LaneConn::open(&store).await {
                    Ok(c) => Arc::new(c),
                    // Not the batch's fault: try it again later, whole.
                    Err(_) => return Err(batch),
                },
            };
            let mut done = Vec::new();
            let mut failed = Vec::new();
            let Progress { updates, commands, acked_commands, committed, .. } = batch.progress;
            // One write per execution, with its update, its commands and their acks, as
            // the whole batch would have written them (a command of an execution that
            // ended is stored expired, one acked in the batch acked, and neither is
            // announced); every ack again at the end, so one whose command's write failed
            // still reaches a row an earlier attempt left.
            let mut per_execution: HashMap<Uuid, Progress> = HashMap::new();
            for p in updates.into_values() {
                let one = per_execution.entry(p.update.id).or_default();
                one.order.push_back(p.update.id);
                one.updates.insert(p.update.id, p);
            }
            for c in commands {
                let one = per_execution.entry(c.command.execution_id).or_default();
                if acked_commands.contains(&c.command.command_id) {
                    one.acked_commands.push(c.command.command_id.clone());
                }
                one.commands.push(c);
            }
            let singles = per_execution
                .into_values()
                .chain(std::iter::once(Progress { acked_commands, committed, ..Default::default() }));
            for progress in singles {
                let single = Batch { events: Vec::new(), progress };
                match write(&conn, node, &single).await {
                    Ok(written) => done.push((single, written)),
                    Err(error) => {
                        tracing::error!(%error, "dropping execution progress that cannot be written");
                        // Its execution must not stay leased to this node for ever:
                        // free it, to be claimed (and retried) again.
                        for (id, p) in &single.progress.updates {
                            let _ = conn
                                .client
                                .execute(
                                    "UPDATE executions SET lease_owner = NULL WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3",
                                    &[id, &node, &p.update.epoch],
                                )
                                .await;
                        }
                    }
                }
            }
            for w in batch.events {
                for e in w.events {
                    let single = Batch {
                        events: vec![WaitingBatch { events: vec![e], supervisor: w.supervisor.clone(), in_doubt: false }],
                        progress: Progress::default(),
                    };
                    match write(&conn, node, &single).await {
                        Ok(written) => done.push((single, written)),
                        Err(error) => {
                            tracing::error!(%error, "an event's executions cannot be recorded");
                            let nack = match crate::store::error::rejected_value(&error) {
                                Some(reason) => Nack::new(
                                    NackCode::InvalidEvent,
                                    format!("the database refused a value of the event: {reason}"),
                                ),
                                None => Nack::new(
                                    NackCode::Internal,
                                    "the database refused the event's executions; the daemon's log says why",
                                ),
                            };
                            failed.extend(single.events.into_iter().map(|w| (w, nack.clone())));
                        }
                    }
                }
            }
            Ok((done, failed))
        };
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
            act.flushing = false;
            let (done, failed) = match res {
                Ok(r) => r,
                Err(batch) => {
                    act.put_back(batch);
                    act.flushing = true;
                    ctx.run_later(Duration::from_secs(1), |act, ctx| {
                        act.flushing = false;
                        act.kick(ctx);
                    });
                    return;
                }
            };
            for (batch, written) in done {
                act.answer(batch, written);
            }
            for (w, nack) in failed {
                reject(w, nack);
            }
            act.kick(ctx);
        }));
    }

    /// Acks the committed events, tells supervisors which executions may run and which
    /// leases are gone, and wakes whoever waited for the commit.
    fn answer(&mut self, batch: Batch, written: Written) {
        let mut outcomes: HashMap<Recipient<EventOutcomes>, Vec<Answer>> = HashMap::new();
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
                        if x.leased && !written.not_ours.contains(&x.execution_id) {
                            report.committed.push(x.execution_id);
                        } else {
                            report.dropped.push(x.execution_id);
                        }
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
        let mut lost: HashMap<Recipient<LeaseLost>, Vec<(Uuid, i64)>> = HashMap::new();
        for (id, p) in batch.progress.updates {
            if !written.updated.contains(&id) {
                if let Some(to) = p.lease_lost {
                    lost.entry(to).or_default().push((id, p.update.epoch));
                }
            } else if p.update.status.is_final() {
                metrics::counter!(m::EXECUTIONS, "status" => p.update.status.as_str()).increment(1);
            }
        }
        for (to, ids) in lost {
            tracing::info!(executions = ids.len(), "lease lost: another node took these executions over");
            to.do_send(LeaseLost(ids));
        }
        for c in batch.progress.committed {
            let _ = c.send(());
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
        let n = EventOutcomes::nack_all(&recipient, events, &nack);
        m::hot().rejected(nack.code).increment(n as u64);
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
        self.progress.add(msg);
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
    progress: Progress,
}

impl Batch {
    fn row_count(&self) -> usize {
        let p = &self.progress;
        self.events.iter().map(WaitingBatch::rows).sum::<usize>()
            + p.updates.values().map(|u| 1 + u.update.steps.len()).sum::<usize>()
            + p.commands.len()
            + p.acked_commands.len()
    }
}

/// What a write learned: the ids it inserted, for each planned execution whose
/// (workflow, event id) was taken the execution that holds it, and the executions whose
/// update passed the lease check.
#[derive(Default)]
struct Written {
    inserted: HashSet<Uuid>,
    existing: HashMap<Uuid, Uuid>,
    /// Inserted by an earlier try of this write, and no longer leased to this node.
    not_ours: HashSet<Uuid>,
    updated: HashSet<Uuid>,
}

/// The whole batch in one statement: writable CTEs run exactly once each, all or
/// nothing. Each event's text is sent once (`$7`) and its executions point at it by
/// position. Updates, step rows and commands are written only where the lease (`$10`,
/// this node, and the epoch the update carries) still holds.
pub(crate) static WRITE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| WRITE_SQL_TEMPLATE.replace("{COMMANDS_CHANNEL}", COMMANDS_CHANNEL));

const WRITE_SQL_TEMPLATE: &str = "
WITH ins AS (
    INSERT INTO executions
        (id, chatbot_id, workflow_id, workflow_version, event_id, event_type, conversation_id, event, status,
         lease_owner, lease_epoch)
    SELECT u.id, u.chatbot_id, u.workflow_id, u.workflow_version, u.event_id, u.event_type,
           u.conversation_id, (($7::text[])[u.doc])::jsonb - 'op', 'queued',
           CASE WHEN u.leased THEN $10::uuid END, CASE WHEN u.leased THEN 1 ELSE 0 END
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::text[], $6::text[], $8::text[], $9::int4[], $11::bool[])
         AS u(id, chatbot_id, workflow_id, workflow_version, event_id, event_type, conversation_id, doc, leased)
    ON CONFLICT (workflow_id, event_id) DO NOTHING
    RETURNING id, chatbot_id, workflow_id
), upd AS (
    UPDATE executions e
    SET status = u.status, attempt = u.attempt, step_index = u.step_index,
        outputs = coalesce(u.outputs::jsonb, e.outputs),
        run_after = coalesce(u.run_after, e.run_after),
        started_at = coalesce(e.started_at, u.started_at),
        finished_at = u.finished_at,
        duration_ms = CASE WHEN u.finished_at IS NULL THEN NULL
                           ELSE extract(epoch FROM u.finished_at - coalesce(e.started_at, u.started_at)) * 1000 END,
        error = u.error,
        lease_owner = CASE WHEN u.release THEN NULL ELSE e.lease_owner END
    FROM unnest($12::uuid[], $13::int8[], $14::text[], $15::int4[], $16::int4[], $17::text[], $18::timestamptz[],
                $19::timestamptz[], $20::timestamptz[], $21::text[], $22::bool[])
         AS u(id, epoch, status, attempt, step_index, outputs, run_after, started_at, finished_at, error, release),
         executions prev
    WHERE e.id = u.id AND e.lease_owner = $10 AND e.lease_epoch = u.epoch AND prev.id = e.id
    -- `prev` is the row as this statement found it: an outcome is counted in the rollups
    -- only when it is new (a retried write may apply the same final update twice).
    RETURNING e.id, e.chatbot_id, e.workflow_id, e.created_at, e.status, e.duration_ms, prev.status AS old_status
), ended AS (
    SELECT * FROM upd
    WHERE status IN ('succeeded', 'failed', 'dead') AND old_status NOT IN ('succeeded', 'failed', 'dead')
), stats AS (
    -- One upsert for both (one command may not update a row twice).
    INSERT INTO execution_stats (chatbot_id, workflow_id, minute, created, succeeded, failed, dead)
    SELECT chatbot_id, workflow_id, minute, sum(created), sum(succeeded), sum(failed), sum(dead)
    FROM (
        SELECT chatbot_id, workflow_id, date_trunc('minute', now()) AS minute, 1 AS created,
               0 AS succeeded, 0 AS failed, 0 AS dead
        FROM ins
        UNION ALL
        SELECT chatbot_id, workflow_id, date_trunc('minute', created_at), 0,
               (status = 'succeeded')::int, (status = 'failed')::int, (status = 'dead')::int
        FROM ended
    ) c
    GROUP BY 1, 2, 3
    ON CONFLICT (chatbot_id, workflow_id, minute) DO UPDATE
        SET created = execution_stats.created + EXCLUDED.created,
            succeeded = execution_stats.succeeded + EXCLUDED.succeeded,
            failed = execution_stats.failed + EXCLUDED.failed,
            dead = execution_stats.dead + EXCLUDED.dead
), stats_durations AS (
    INSERT INTO execution_durations (chatbot_id, workflow_id, minute, bucket, count)
    SELECT chatbot_id, workflow_id, date_trunc('minute', created_at),
           CASE WHEN duration_ms < 1 THEN 0
                ELSE least(191, floor(8 * log(duration_ms) / log(2.0::float8))::int + 1) END,
           count(*)
    FROM ended WHERE duration_ms IS NOT NULL GROUP BY 1, 2, 3, 4
    ON CONFLICT (chatbot_id, workflow_id, minute, bucket) DO UPDATE
        SET count = execution_durations.count + EXCLUDED.count
), steps AS (
    INSERT INTO execution_steps
        (execution_id, step_index, attempt, step_id, action, status, started_at, finished_at, output, error)
    SELECT s.execution_id, s.step_index, s.attempt, s.step_id, s.action, s.status, s.started_at,
           s.finished_at, s.output::jsonb, s.error
    FROM unnest($23::uuid[], $24::int8[], $25::int4[], $26::int4[], $27::text[], $28::text[], $29::text[],
                $30::timestamptz[], $31::timestamptz[], $32::text[], $33::text[])
         AS s(execution_id, epoch, step_index, attempt, step_id, action, status, started_at, finished_at, output, error)
    WHERE EXISTS (SELECT 1 FROM executions e
                  WHERE e.id = s.execution_id AND e.lease_owner = $10 AND e.lease_epoch = s.epoch)
    ON CONFLICT DO NOTHING
), cmds AS (
    -- A command acked (or whose execution ended) within this same batch is written
    -- as such: the updates below cannot see rows this statement inserts.
    INSERT INTO outbox (command_id, chatbot_id, conversation_id, kind, payload, execution_id, status, acked_at)
    SELECT c.command_id, c.chatbot_id, c.conversation_id, c.kind, c.payload::jsonb, c.execution_id, c.status,
           CASE WHEN c.status = 'acked' THEN now() END
    FROM unnest($34::text[], $35::uuid[], $36::text[], $37::text[], $38::text[], $39::uuid[], $40::int8[], $43::text[])
         AS c(command_id, chatbot_id, conversation_id, kind, payload, execution_id, epoch, status)
    WHERE EXISTS (SELECT 1 FROM executions e
                  WHERE e.id = c.execution_id AND e.lease_owner = $10 AND e.lease_epoch = c.epoch)
    ON CONFLICT (command_id) DO UPDATE
        SET status = EXCLUDED.status, payload = EXCLUDED.payload, acked_at = EXCLUDED.acked_at
        -- A retried step sends its command again; an ack already received stands.
        WHERE outbox.status <> 'acked'
    RETURNING command_id, chatbot_id, status
), acks AS (
    -- Rows `cmds` wrote already carry their ack: one statement may not change a row
    -- twice (ON CONFLICT DO UPDATE refuses a row another CTE changed).
    UPDATE outbox SET status = 'acked', acked_at = now()
    WHERE command_id = ANY($41::text[]) AND status <> 'acked'
      AND command_id NOT IN (SELECT command_id FROM cmds)
), expired AS (
    -- An execution that ended keeps no command waiting for a client. (Not the ones
    -- acked in this batch, nor the ones `cmds` wrote: those carry their status.)
    UPDATE outbox o SET status = 'expired'
    WHERE o.execution_id = ANY($42::uuid[]) AND o.status = 'pending'
      AND o.command_id <> ALL($41::text[])
      AND o.command_id NOT IN (SELECT command_id FROM cmds)
      AND o.execution_id IN (SELECT id FROM upd)
)
SELECT true, id FROM ins
UNION ALL
SELECT false, id FROM upd
UNION ALL
-- Other nodes hear of the pending commands written, at commit, and deliver them to
-- their own subscribers (`store::outbox::COMMANDS_CHANNEL`). One row each, without a flag.
SELECT NULL, NULL FROM cmds, pg_notify('{COMMANDS_CHANNEL}', 'cmd ' || $10::text || ' ' || cmds.chatbot_id::text || ' ' || cmds.command_id)
WHERE cmds.status = 'pending'";

const EXISTING_SQL: &str = "
SELECT e.id, u.planned, e.lease_owner IS NOT DISTINCT FROM $4 AND e.lease_epoch = 1
FROM unnest($1::uuid[], $2::text[], $3::uuid[]) AS u(workflow_id, event_id, planned)
JOIN executions e ON e.workflow_id = u.workflow_id AND e.event_id = u.event_id";

/// Dead executions keep their event, version, last error and every attempt.
const DEAD_LETTER_SQL: &str = "
INSERT INTO dead_letters
    (id, execution_id, chatbot_id, workflow_id, workflow_version, event, last_error, attempts, history)
SELECT gen_random_uuid(), e.id, e.chatbot_id, e.workflow_id, e.workflow_version, e.event, e.error, e.attempt,
       coalesce((SELECT jsonb_agg(jsonb_build_object(
                     'attempt', s.attempt, 'step_index', s.step_index, 'step_id', s.step_id, 'action', s.action,
                     'status', s.status, 'started_at', s.started_at, 'finished_at', s.finished_at,
                     'output', s.output, 'error', s.error) ORDER BY s.attempt, s.step_index)
                 FROM execution_steps s WHERE s.execution_id = e.id), '[]'::jsonb)
FROM executions e WHERE e.id = ANY($1) AND e.status = 'dead'
-- A retried write (its first try's outcome lost) must not add a second letter.
ON CONFLICT (execution_id) WHERE replayed_at IS NULL AND discarded_at IS NULL DO NOTHING";

/// A lane's own connection with its statements prepared.
struct LaneConn {
    client: tokio_postgres::Client,
    write: tokio_postgres::Statement,
    existing: tokio_postgres::Statement,
    dead_letter: tokio_postgres::Statement,
}

impl LaneConn {
    async fn open(store: &Store) -> Result<LaneConn, StoreError> {
        let client = store.dedicated().await?;
        // The server gives up on a write the lane has given up on too.
        // Plans are made for each write: a generic plan fixed while the tables were
        // small (a sequential scan of executions) would stay for the connection's life.
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}; SET plan_cache_mode = force_custom_plan",
                WRITE_TIMEOUT.as_millis()
            ))
            .await?;
        let write = client.prepare(&WRITE_SQL).await?;
        let existing = client.prepare(EXISTING_SQL).await?;
        let dead_letter = client.prepare(DEAD_LETTER_SQL).await?;
        Ok(LaneConn { client, write, existing, dead_letter })
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

pub(crate) fn storable_json(v: &serde_json::Value) -> String {
    fn clean(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s)
                if s.contains('\0') => {
                    *s = s.replace('\0', "\u{fffd}");
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

async fn write(conn: &LaneConn, node: Uuid, batch: &Batch) -> Result<Written, StoreError> {
    let n: usize = batch.events.iter().map(WaitingBatch::rows).sum();
    let mut ids = Vec::with_capacity(n);
    let mut chatbots = Vec::with_capacity(n);
    let mut workflows = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut event_ids: Vec<&str> = Vec::with_capacity(n);
    let mut types: Vec<&str> = Vec::with_capacity(n);
    let mut conversations: Vec<&str> = Vec::with_capacity(n);
    let mut doc_of: Vec<i32> = Vec::with_capacity(n);
    let mut leased: Vec<bool> = Vec::with_capacity(n);
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
            leased.push(x.leased);
        }
    }
    let ups: Vec<&ExecutionUpdate> = batch.progress.order.iter().filter_map(|id| batch.progress.updates.get(id)).map(|p| &p.update).collect();
    let u_id: Vec<Uuid> = ups.iter().map(|u| u.id).collect();
    let u_epoch: Vec<i64> = ups.iter().map(|u| u.epoch).collect();
    let u_status: Vec<&str> = ups.iter().map(|u| u.status.as_str()).collect();
    let u_attempt: Vec<i32> = ups.iter().map(|u| u.attempt).collect();
    let u_step: Vec<i32> = ups.iter().map(|u| u.step_index).collect();
    let u_outputs: Vec<Option<String>> = ups.iter().map(|u| u.outputs.as_deref().map(storable_json)).collect();
    let u_run_after: Vec<Option<DateTime<Utc>>> = ups.iter().map(|u| u.run_after).collect();
    let u_started: Vec<Option<DateTime<Utc>>> = ups.iter().map(|u| u.started_at).collect();
    let u_finished: Vec<Option<DateTime<Utc>>> = ups.iter().map(|u| u.finished_at).collect();
    let u_error: Vec<Option<std::borrow::Cow<'_, str>>> = ups.iter().map(|u| u.error.as_deref().map(storable)).collect();
    let u_release: Vec<bool> = ups.iter().map(|u| u.release).collect();
    let finals: Vec<Uuid> = ups.iter().filter(|u| u.status.is_final()).map(|u| u.id).collect();
    let dead: Vec<Uuid> = ups.iter().filter(|u| u.status == Status::Dead).map(|u| u.id).collect();

    let steps: Vec<(&ExecutionUpdate, &StepRecord)> = ups.iter().flat_map(|u| u.steps.iter().map(move |s| (*u, s))).collect();
    let s_exec: Vec<Uuid> = steps.iter().map(|s| s.0.id).collect();
    let s_epoch: Vec<i64> = steps.iter().map(|s| s.0.epoch).collect();
    let s_index: Vec<i32> = steps.iter().map(|s| s.1.index).collect();
    let s_attempt: Vec<i32> = steps.iter().map(|s| s.1.attempt).collect();
    let s_id: Vec<&str> = steps.iter().map(|s| s.1.step_id.as_str()).collect();
    let s_action: Vec<&str> = steps.iter().map(|s| s.1.action).collect();
    let s_status: Vec<&str> = steps.iter().map(|s| if s.1.succeeded { "succeeded" } else { "failed" }).collect();
    let s_started: Vec<DateTime<Utc>> = steps.iter().map(|s| s.1.started_at).collect();
    let s_finished: Vec<DateTime<Utc>> = steps.iter().map(|s| s.1.finished_at).collect();
    let s_output: Vec<Option<String>> = steps.iter().map(|s| s.1.output.as_ref().map(storable_json)).collect();
    let s_error: Vec<Option<std::borrow::Cow<'_, str>>> = steps.iter().map(|s| s.1.error.as_deref().map(storable)).collect();

    // A step retried before the journal wrote its first try sends the same command
    // again: one row per command id (the latest), or the upsert would hit it twice.
    let mut latest: HashMap<&str, usize> = HashMap::new();
    for (i, c) in batch.progress.commands.iter().enumerate() {
        latest.insert(c.command.command_id.as_str(), i);
    }
    let cmds: Vec<&CommandRow> =
        batch.progress.commands.iter().enumerate().filter(|(i, c)| latest[c.command.command_id.as_str()] == *i).map(|(_, c)| c).collect();
    let c_id: Vec<&str> = cmds.iter().map(|c| c.command.command_id.as_str()).collect();
    let c_chatbot: Vec<Uuid> = cmds.iter().map(|c| c.command.chatbot_id).collect();
    let c_conv: Vec<&str> = cmds.iter().map(|c| c.command.conversation_id.as_str()).collect();
    let c_kind: Vec<&str> = cmds.iter().map(|c| c.command.kind).collect();
    let c_payload: Vec<String> = cmds.iter().map(|c| storable_json(&c.command.payload)).collect();
    let c_exec: Vec<Uuid> = cmds.iter().map(|c| c.command.execution_id).collect();
    let c_epoch: Vec<i64> = cmds.iter().map(|c| c.epoch).collect();
    let acked: Vec<&str> = batch.progress.acked_commands.iter().map(String::as_str).collect();
    let acked_set: HashSet<&str> = acked.iter().copied().collect();
    let finals_set: HashSet<Uuid> = finals.iter().copied().collect();
    let c_status: Vec<&str> = cmds
        .iter()
        .map(|c| {
            if acked_set.contains(c.command.command_id.as_str()) {
                "acked"
            } else if finals_set.contains(&c.command.execution_id) {
                "expired"
            } else {
                "pending"
            }
        })
        .collect();

    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 43] = [
        &ids, &chatbots, &workflows, &versions, &event_ids, &types, &docs, &conversations, &doc_of, &node, &leased,
        &u_id, &u_epoch, &u_status, &u_attempt, &u_step, &u_outputs, &u_run_after, &u_started, &u_finished, &u_error,
        &u_release, &s_exec, &s_epoch, &s_index, &s_attempt, &s_id, &s_action, &s_status, &s_started, &s_finished,
        &s_output, &s_error, &c_id, &c_chatbot, &c_conv, &c_kind, &c_payload, &c_exec, &c_epoch, &acked, &finals,
        &c_status,
    ];
    let rows = if dead.is_empty() {
        conn.client.query(&conn.write, &params).await?
    } else {
        // Dead letters read the step rows this same write adds, so they follow it in
        // one transaction.
        conn.client.batch_execute("BEGIN").await?;
        let rows = match conn.client.query(&conn.write, &params).await {
            Ok(rows) => rows,
            Err(e) => {
                let _ = conn.client.batch_execute("ROLLBACK").await;
                return Err(e.into());
            }
        };
        let dead_written: Vec<Uuid> = rows
            .iter()
            .filter(|r| r.get::<_, Option<bool>>(0) == Some(false))
            .map(|r| r.get::<_, Uuid>(1))
            .filter(|id| dead.contains(id))
            .collect();
        if let Err(e) = conn.client.execute(&conn.dead_letter, &[&dead_written]).await {
            let _ = conn.client.batch_execute("ROLLBACK").await;
            return Err(e.into());
        }
        conn.client.batch_execute("COMMIT").await?;
        rows
    };
    let mut written = Written::default();
    for r in &rows {
        match r.get::<_, Option<bool>>(0) {
            Some(true) => written.inserted.insert(r.get(1)),
            Some(false) => written.updated.insert(r.get(1)),
            None => false, // a command's notification
        };
    }
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
        for r in conn.client.query(&conn.existing, &[&wf, &ev, &planned, &node]).await? {
            let (id, planned): (Uuid, Uuid) = (r.get(0), r.get(1));
            written.existing.insert(planned, id);
            // Ours from an earlier try, but claimed since by another node: not ours to run.
            if id == planned && !r.get::<_, bool>(2) {
                written.not_ours.insert(id);
            }
        }
    }
    Ok(written)
}
