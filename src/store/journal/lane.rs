//! A journal lane: an actor on the journal's arbiter with its own connection and its
//! queue, writing strictly one transaction at a time. While a write runs the next batch
//! gathers; a failed write goes back to the front of the queue and is retried, a
//! permanent failure is retried row by row so only the row at fault is lost.

use super::answers;
use super::queue::{Batch, Progress, Queue, WaitingBatch};
use super::sql::{lost_in_flight, write, LaneConn, WRITE_TIMEOUT};
use super::{Flush, RecordExecutions, RecordProgress, RUNNING_MARK_DELAY};
use crate::store::{Store, StoreError};
use crate::telemetry::metrics as m;
use crate::wire::{Nack, NackCode};
use actix::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use uuid::Uuid;

pub struct JournalLane {
    index: usize,
    store: Store,
    node: Uuid,
    conn: Option<Arc<LaneConn>>,
    max_batch: usize,
    unavailable_after: Duration,
    queue: Queue,
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
    pub(super) fn new(index: usize, store: Store, node: Uuid, max_batch: usize, unavailable_after: Duration) -> JournalLane {
        JournalLane {
            index,
            store,
            node,
            conn: None,
            max_batch,
            unavailable_after,
            queue: Queue::default(),
            flushing: false,
            mark_timer: false,
            failures: 0,
            flush_waiters: Vec::new(),
        }
    }

    /// Starts a write unless one is running; called after every change to the queue.
    fn kick(&mut self, ctx: &mut Context<Self>) {
        if self.flushing {
            return;
        }
        if self.queue.is_empty() {
            for w in self.flush_waiters.drain(..) {
                let _ = w.send(());
            }
            return;
        }
        let everything = !self.flush_waiters.is_empty();
        if !self.queue.has_due(everything) {
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
        let batch = self.queue.take_batch(self.max_batch, everything);
        let conn = self.conn.clone();
        let store = self.store.clone();
        let node = self.node;
        let shard = self.index as i16;
        let fut = async move {
            let conn = match LaneConn::reuse_or_open(conn, &store).await {
                Ok(c) => c,
                Err(e) => return (batch, None, Err(Failure::NotWritten(e))),
            };
            let started = Instant::now();
            let res = match tokio::time::timeout(WRITE_TIMEOUT, write(&conn, node, shard, &batch)).await {
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
                    answers::answer(batch, written);
                    act.kick(ctx);
                }
                Err(failure) => act.on_failure(batch, failure, ctx),
            }
        }));
    }

    /// Nacks `unavailable` the queued events that waited too long, unless in doubt.
    fn expire_waiting(&mut self) {
        for w in self.queue.expire(self.unavailable_after) {
            let nack = Nack::new(NackCode::Unavailable, "the database is unreachable; the event was not recorded, send it again");
            answers::reject(w, nack);
        }
    }

    fn on_failure(&mut self, batch: Batch, failure: Failure, ctx: &mut Context<Self>) {
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
        self.queue.put_back(batch, in_doubt);
        self.expire_waiting();
        let delay = Duration::from_millis((100u64 << self.failures.min(4)).min(1_000));
        self.flushing = true;
        ctx.run_later(delay, |act, ctx| {
            act.flushing = false;
            act.kick(ctx);
        });
    }

    /// A permanent error fails one statement for everyone in it; retry each event and
    /// each execution's progress on its own so only the row at fault is lost.
    fn isolate(&mut self, batch: Batch, ctx: &mut Context<Self>) {
        self.flushing = true;
        let conn = self.conn.clone();
        let store = self.store.clone();
        let node = self.node;
        let shard = self.index as i16;
        let fut = async move {
            let Ok(conn) = LaneConn::reuse_or_open(conn, &store).await else {
                // Not the batch's fault: try it again later, whole.
                return Err(batch);
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
                match write(&conn, node, shard, &single).await {
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
                    match write(&conn, node, shard, &single).await {
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
                    act.queue.put_back(batch, false);
                    act.flushing = true;
                    ctx.run_later(Duration::from_secs(1), |act, ctx| {
                        act.flushing = false;
                        act.kick(ctx);
                    });
                    return;
                }
            };
            for (batch, written) in done {
                answers::answer(batch, written);
            }
            for (w, nack) in failed {
                answers::reject(w, nack);
            }
            act.kick(ctx);
        }));
    }
}

impl Handler<RecordExecutions> for JournalLane {
    type Result = ();
    fn handle(&mut self, msg: RecordExecutions, ctx: &mut Context<Self>) {
        self.queue.push_events(msg.events, msg.supervisor);
        self.kick(ctx);
    }
}

impl Handler<RecordProgress> for JournalLane {
    type Result = ();
    fn handle(&mut self, msg: RecordProgress, ctx: &mut Context<Self>) {
        self.queue.add_progress(msg);
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
