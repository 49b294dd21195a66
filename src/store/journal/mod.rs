//! The Journal: batched writes of execution records.
//!
//! It is split into lanes (actors on one arbiter), each with its own connection and
//! strictly one transaction at a time. An execution always writes through the same
//! lane (its id says which), so its rows are written in order (its insert, then its
//! start, then its outcome), and two lanes never touch the same rows, which rules out
//! deadlocks between them: the per-minute rollups are kept per lane (`shard`). The
//! events one connection sends for one chatbot go through one lane, so their acks keep
//! their order; a busy chatbot's connections spread over the lanes. While a lane commits, the next batch gathers; a whole batch (new executions,
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

//!
//! The folder: this file holds the messages and the `Journal` handle; `queue` the
//! batching queue (what waits, what the next write takes, what expires); `lane` the
//! actor that owns a queue and a connection; `answers` who is told what once a write
//! commits or fails; `sql` the statements and the write itself.

mod answers;
mod lane;
mod queue;
mod sql;

pub use crate::execution::Status;
pub use lane::JournalLane;
#[cfg(test)]
pub(crate) use sql::WRITE_SQL;

use super::Store;
use crate::event::Event;
use crate::wire::{Command, EventOutcomes};
use actix::prelude::*;
use chrono::{DateTime, Utc};
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
    pub(super) fn is_start_mark(&self) -> bool {
        self.status == Status::Running && self.steps.is_empty() && self.outputs.is_none()
    }

    /// Folds a later update of the same execution into this one.
    pub(super) fn merge(&mut self, later: ExecutionUpdate) {
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

    /// The lane that writes this execution's rows. Every write of an execution goes
    /// through one lane, so they are written in order; the lane is read from the id's
    /// last byte, which `new_execution_id` chose when the execution was planned.
    pub fn lane_of(&self, execution_id: Uuid) -> Addr<JournalLane> {
        self.lanes[lane_index_of(execution_id, self.lanes.len())].clone()
    }

    /// The lane for the new executions of the events one source (a connection, a
    /// request) sends for one chatbot. Their acks then keep the order the source sent
    /// them in, while a busy chatbot's sources spread over the lanes.
    pub fn lane_for(&self, chatbot_id: Uuid, source: u64) -> usize {
        let (a, b) = chatbot_id.as_u64_pair();
        // A cheap mix, so that consecutive sources of one chatbot take different lanes.
        let h = (a ^ b ^ source.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        ((h >> 32) % self.lanes.len() as u64) as usize
    }

    pub fn lane(&self, index: usize) -> Addr<JournalLane> {
        self.lanes[index % self.lanes.len()].clone()
    }

    /// A new execution id (time-ordered, UUIDv7) that `lane_of` maps to lane `index`.
    /// Only the low bits of its random last byte are chosen.
    pub fn new_execution_id(&self, index: usize) -> Uuid {
        execution_id_on(Uuid::now_v7(), index, self.lanes.len())
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

fn lane_index_of(execution_id: Uuid, lanes: usize) -> usize {
    execution_id.as_bytes()[15] as usize % lanes
}

/// `id` with the low bits of its last byte set so that it maps to lane `index` of `lanes`.
fn execution_id_on(id: Uuid, index: usize, lanes: usize) -> Uuid {
    let mut bytes = *id.as_bytes();
    let mut last = bytes[15] as usize / lanes * lanes + index % lanes;
    if last > 255 {
        last -= lanes;
    }
    bytes[15] = last as u8;
    Uuid::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_execution_id_maps_to_the_lane_it_was_made_for_and_stays_a_uuid_v7() {
        for lanes in 1..=64 {
            for index in 0..lanes {
                for last in [0u8, 1, 127, 250, 254, 255] {
                    let mut bytes = *Uuid::now_v7().as_bytes();
                    bytes[15] = last;
                    let id = execution_id_on(Uuid::from_bytes(bytes), index, lanes);
                    assert_eq!(lane_index_of(id, lanes), index, "lanes {lanes}, index {index}, last byte {last}");
                    assert_eq!(id.get_version_num(), 7);
                    assert_eq!(id.as_bytes()[..15], bytes[..15], "only the last byte changes");
                }
            }
        }
    }
}
