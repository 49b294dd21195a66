//! The batching queue of a lane: events waiting for their executions to be written
//! (in arrival order, never split), and execution progress merged per execution. Plain
//! data and decisions: which rows the next write takes, what goes back after a failed
//! write, which events have waited past the unavailable deadline. The lane owns one
//! and does the I/O.

use super::{CommandRow, ExecutionUpdate, ExecutionsCommitted, LeaseLost, PendingEvent, RecordProgress, RUNNING_MARK_DELAY};
use actix::Recipient;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use uuid::Uuid;

/// The event text a batch carries at most (an event is never split).
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// What waits for the next write.
#[derive(Default)]
pub(super) struct Queue {
    waiting: VecDeque<WaitingBatch>,
    progress: Progress,
}

impl Queue {
    pub(super) fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.progress.is_empty()
    }

    pub(super) fn push_events(&mut self, events: Vec<PendingEvent>, supervisor: Recipient<ExecutionsCommitted>) {
        self.waiting.push_back(WaitingBatch { events, supervisor, in_doubt: false });
    }

    pub(super) fn add_progress(&mut self, msg: RecordProgress) {
        self.progress.add(msg);
    }

    /// Whether a write is worth starting now: events wait, or progress is due (start
    /// marks only once they are `RUNNING_MARK_DELAY` old, unless `everything`).
    pub(super) fn has_due(&self, everything: bool) -> bool {
        !self.waiting.is_empty() || self.progress.has_due(everything)
    }

    /// Moves new executions (up to `max_batch` rows and `MAX_BATCH_BYTES` of events, at
    /// least one waiting batch) and the due progress out of the queue.
    pub(super) fn take_batch(&mut self, max_batch: usize, everything: bool) -> Batch {
        let mut events = Vec::new();
        let (mut rows, mut bytes) = (0, 0);
        while let Some(w) = self.waiting.front() {
            if !events.is_empty() && (rows + w.rows() > max_batch || bytes + w.bytes() > MAX_BATCH_BYTES) {
                break;
            }
            rows += w.rows();
            bytes += w.bytes();
            events.extend(self.waiting.pop_front());
        }
        Batch { events, progress: self.progress.take(everything) }
    }

    /// Returns a failed batch to the front of the queue; `in_doubt` marks its events as
    /// sent in a write whose outcome is unknown (not to be nacked until settled).
    pub(super) fn put_back(&mut self, batch: Batch, in_doubt: bool) {
        for mut w in batch.events.into_iter().rev() {
            w.in_doubt |= in_doubt;
            self.waiting.push_front(w);
        }
        self.progress.put_back(batch.progress);
    }

    /// Takes out the events that have waited `deadline` or longer (unless in doubt),
    /// each part with its supervisor, to be nacked.
    pub(super) fn expire(&mut self, deadline: Duration) -> Vec<WaitingBatch> {
        let mut expired = Vec::new();
        for w in self.waiting.iter_mut().filter(|w| !w.in_doubt) {
            if w.events.iter().all(|e| e.received_at.elapsed() < deadline) {
                continue;
            }
            let (old, keep): (Vec<_>, Vec<_>) = w.events.drain(..).partition(|e| e.received_at.elapsed() >= deadline);
            w.events = keep;
            expired.push(WaitingBatch { events: old, supervisor: w.supervisor.clone(), in_doubt: false });
        }
        self.waiting.retain(|w| !w.events.is_empty());
        expired
    }
}

pub(super) struct WaitingBatch {
    pub(super) events: Vec<PendingEvent>,
    pub(super) supervisor: Recipient<ExecutionsCommitted>,
    /// Sent in a write whose outcome is unknown: not to be nacked until settled.
    pub(super) in_doubt: bool,
}

impl WaitingBatch {
    pub(super) fn rows(&self) -> usize {
        self.events.iter().map(|e| e.executions.len()).sum()
    }

    pub(super) fn bytes(&self) -> usize {
        self.events.iter().map(|e| e.event.raw.len()).sum()
    }
}

/// An execution's latest unwritten state, and who to tell if its lease is gone.
pub(super) struct PendingUpdate {
    pub(super) update: ExecutionUpdate,
    pub(super) first_seen: Instant,
    pub(super) lease_lost: Option<Recipient<LeaseLost>>,
}

/// Progress waiting for the next write.
#[derive(Default)]
pub(super) struct Progress {
    pub(super) updates: HashMap<Uuid, PendingUpdate>,
    /// Arrival order of `updates` (ids may repeat or be gone).
    pub(super) order: VecDeque<Uuid>,
    pub(super) commands: Vec<CommandRow>,
    pub(super) acked_commands: Vec<String>,
    pub(super) committed: Vec<oneshot::Sender<()>>,
}

impl Progress {
    pub(super) fn is_empty(&self) -> bool {
        self.updates.is_empty() && self.commands.is_empty() && self.acked_commands.is_empty() && self.committed.is_empty()
    }

    pub(super) fn add(&mut self, msg: RecordProgress) {
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
    pub(super) fn has_due(&self, everything: bool) -> bool {
        !self.commands.is_empty()
            || !self.acked_commands.is_empty()
            || !self.committed.is_empty()
            || self
                .updates
                .values()
                .any(|p| everything || !p.update.is_start_mark() || p.first_seen.elapsed() >= RUNNING_MARK_DELAY)
    }

    /// Takes what is due; start marks younger than `RUNNING_MARK_DELAY` stay.
    pub(super) fn take(&mut self, everything: bool) -> Progress {
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
    pub(super) fn put_back(&mut self, mut older: Progress) {
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

/// Rows of one transaction.
pub(super) struct Batch {
    pub(super) events: Vec<WaitingBatch>,
    pub(super) progress: Progress,
}

impl Batch {
    pub(super) fn row_count(&self) -> usize {
        let p = &self.progress;
        self.events.iter().map(WaitingBatch::rows).sum::<usize>()
            + p.updates.values().map(|u| 1 + u.update.steps.len()).sum::<usize>()
            + p.commands.len()
            + p.acked_commands.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{PlannedExecution, Status};
    use super::*;
    use crate::event::{Event, EventType};
    use crate::wire::EventOutcomes;
    use actix::prelude::*;

    /// Takes every message it is sent.
    struct Sink;
    impl Actor for Sink {
        type Context = Context<Self>;
    }
    impl Handler<EventOutcomes> for Sink {
        type Result = ();
        fn handle(&mut self, _: EventOutcomes, _: &mut Context<Self>) {}
    }
    impl Handler<ExecutionsCommitted> for Sink {
        type Result = ();
        fn handle(&mut self, _: ExecutionsCommitted, _: &mut Context<Self>) {}
    }

    fn event(id: &str, executions: usize, received_at: Instant, sink: &Addr<Sink>) -> PendingEvent {
        PendingEvent {
            event: Event {
                id: id.into(),
                chatbot_id: Uuid::nil(),
                kind: EventType::MessageReceived,
                conversation_id: "c".into(),
                raw: bytes::Bytes::from_static(b"{}"),
            },
            received_at,
            executions: (0..executions)
                .map(|_| PlannedExecution { execution_id: Uuid::now_v7(), workflow_id: Uuid::nil(), workflow_version: 1, leased: true })
                .collect(),
            reply_to: sink.clone().recipient(),
        }
    }

    fn ids(batch: &Batch) -> Vec<String> {
        batch.events.iter().flat_map(|w| w.events.iter().map(|e| e.event.id.to_string())).collect()
    }

    fn update(id: Uuid, epoch: i64, status: Status) -> ExecutionUpdate {
        ExecutionUpdate {
            id,
            epoch,
            status,
            attempt: 1,
            step_index: 0,
            outputs: None,
            run_after: None,
            started_at: None,
            finished_at: None,
            error: None,
            release: false,
            steps: Vec::new(),
        }
    }

    #[actix_rt::test]
    async fn a_batch_takes_whole_waiting_parts_up_to_the_row_limit_and_at_least_one() {
        let sink = Sink.start();
        let now = Instant::now();
        let mut q = Queue::default();
        q.push_events(vec![event("a", 3, now, &sink), event("b", 2, now, &sink)], sink.clone().recipient());
        q.push_events(vec![event("c", 4, now, &sink)], sink.clone().recipient());
        q.push_events(vec![event("d", 1, now, &sink)], sink.clone().recipient());
        // The first part alone is over the limit: it still goes, whole.
        let first = q.take_batch(4, false);
        assert_eq!(ids(&first), ["a", "b"]);
        assert_eq!(first.row_count(), 5);
        let second = q.take_batch(5, false);
        assert_eq!(ids(&second), ["c", "d"]);
        assert!(q.is_empty());
        // A failed batch goes back in front of what came since, in its order.
        q.push_events(vec![event("e", 1, now, &sink)], sink.clone().recipient());
        q.put_back(second, false);
        q.put_back(first, false);
        assert_eq!(ids(&q.take_batch(100, false)), ["a", "b", "c", "d", "e"]);
    }

    #[actix_rt::test]
    async fn events_that_waited_too_long_expire_unless_their_write_is_in_doubt() {
        let sink = Sink.start();
        let old = Instant::now() - Duration::from_secs(10);
        let mut q = Queue::default();
        q.push_events(vec![event("old", 1, old, &sink), event("new", 1, Instant::now(), &sink)], sink.clone().recipient());
        let expired = q.expire(Duration::from_secs(5));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].events.iter().map(|e| &*e.event.id).collect::<Vec<_>>(), ["old"]);
        assert_eq!(ids(&q.take_batch(100, false)), ["new"]);

        // Sent in a write whose outcome was lost: it may be committed, so it waits.
        q.push_events(vec![event("doubt", 1, old, &sink)], sink.clone().recipient());
        let batch = q.take_batch(100, false);
        q.put_back(batch, true);
        assert!(q.expire(Duration::from_secs(5)).is_empty());
        assert_eq!(ids(&q.take_batch(100, false)), ["doubt"]);
    }

    #[test]
    fn progress_merges_per_execution_and_keeps_young_start_marks() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut q = Queue::default();
        q.add_progress(RecordProgress { updates: vec![update(a, 1, Status::Running)], ..Default::default() });
        // A start mark alone is not worth a write until it is RUNNING_MARK_DELAY old.
        assert!(!q.has_due(false));
        assert!(q.has_due(true), "a flush takes everything");
        q.add_progress(RecordProgress { updates: vec![update(b, 1, Status::Running)], ..Default::default() });
        let mut done = update(a, 1, Status::Succeeded);
        done.finished_at = Some(chrono::Utc::now());
        q.add_progress(RecordProgress { updates: vec![done], ..Default::default() });
        assert!(q.has_due(false));
        let batch = q.take_batch(100, false);
        // `a` ended: its start is carried by the final update; `b` stays, still young.
        assert_eq!(batch.progress.updates.len(), 1);
        assert_eq!(batch.progress.updates[&a].update.status, Status::Succeeded);
        assert!(!q.is_empty());
        assert_eq!(q.take_batch(100, true).progress.updates.len(), 1);
    }

    #[test]
    fn an_update_from_a_later_claim_voids_the_older_state() {
        let a = Uuid::now_v7();
        let mut first = update(a, 1, Status::Running);
        first.steps.push(super::super::StepRecord {
            index: 0,
            attempt: 1,
            step_id: "s".into(),
            action: "reply",
            succeeded: true,
            started_at: chrono::Utc::now(),
            finished_at: chrono::Utc::now(),
            output: None,
            error: None,
        });
        let mut same_claim = first.clone();
        same_claim.merge(update(a, 1, Status::Succeeded));
        assert_eq!((same_claim.status, same_claim.steps.len()), (Status::Succeeded, 1), "steps of one claim add up");
        first.merge(update(a, 2, Status::Running));
        assert_eq!((first.epoch, first.steps.len()), (2, 0));
    }
}
