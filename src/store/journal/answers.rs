//! Who is told what once a write is settled: each event's ack (its executions, or the
//! earlier ones it duplicates), each supervisor's committed and dropped executions,
//! each lost lease, and every waiter of the commit; or, for events that cannot be
//! written, their nack. `event_outcome` is the decision, the rest sends it.

use super::queue::{Batch, WaitingBatch};
use super::sql::Written;
use super::{ExecutionsCommitted, LeaseLost, PlannedExecution};
use crate::telemetry::metrics as m;
use crate::wire::{Answer, EventOutcomes, ExecutionRef, Nack, Outcome};
use actix::Recipient;
use std::collections::HashMap;
use std::time::Instant;
use uuid::Uuid;

/// The ack of one event whose write committed, and what it tells the supervisor: an
/// execution is new when the row holding its (workflow, event id) is the one planned
/// (inserted now, or by an earlier try whose outcome was lost); it may run here when it
/// was planned leased and no other node has claimed it since. Answers the outcome and
/// how many executions are new.
pub(super) fn event_outcome(planned: &[PlannedExecution], written: &Written, report: &mut ExecutionsCommitted) -> (Outcome, u64) {
    let mut refs = Vec::with_capacity(planned.len());
    let mut created = 0u64;
    for x in planned {
        // The row holding this (workflow, event id): ours, or an earlier event's.
        let holder = if written.inserted.contains(&x.execution_id) {
            Some(x.execution_id)
        } else {
            written.existing.get(&x.execution_id).copied()
        };
        if holder == Some(x.execution_id) {
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
    (Outcome::Ack { executions: refs, duplicate: created == 0 }, created)
}

/// Acks the committed events, tells supervisors which executions may run and which
/// leases are gone, and wakes whoever waited for the commit.
pub(super) fn answer(batch: Batch, written: Written) {
    let mut outcomes: HashMap<Recipient<EventOutcomes>, Vec<Answer>> = HashMap::new();
    let mut created = 0u64;
    for w in batch.events {
        let mut report = ExecutionsCommitted::default();
        for pe in w.events {
            let (outcome, new) = event_outcome(&pe.executions, &written, &mut report);
            created += new;
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

/// Nacks every event of a batch and tells its supervisor the executions are gone.
pub(super) fn reject(w: WaitingBatch, nack: Nack) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(leased: bool) -> PlannedExecution {
        PlannedExecution { execution_id: Uuid::now_v7(), workflow_id: Uuid::now_v7(), workflow_version: 1, leased }
    }

    fn refs(outcome: &Outcome) -> (Vec<Uuid>, bool) {
        match outcome {
            Outcome::Ack { executions, duplicate } => (executions.iter().map(|r| r.execution_id).collect(), *duplicate),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn inserted_executions_are_acked_and_run_here_when_leased() {
        let (a, b) = (planned(true), planned(false));
        let mut written = Written::default();
        written.inserted.extend([a.execution_id, b.execution_id]);
        let mut report = ExecutionsCommitted::default();
        let (outcome, created) = event_outcome(&[a, b], &written, &mut report);
        assert_eq!(refs(&outcome), (vec![a.execution_id, b.execution_id], false));
        assert_eq!(created, 2);
        // The unleased one waits in PostgreSQL for a claim.
        assert_eq!((report.committed, report.dropped), (vec![a.execution_id], vec![b.execution_id]));
    }

    #[test]
    fn a_resent_event_is_acked_with_the_earlier_executions_as_a_duplicate() {
        let a = planned(true);
        let earlier = Uuid::now_v7();
        let mut written = Written::default();
        written.existing.insert(a.execution_id, earlier);
        let mut report = ExecutionsCommitted::default();
        let (outcome, created) = event_outcome(&[a], &written, &mut report);
        assert_eq!(refs(&outcome), (vec![earlier], true));
        assert_eq!(created, 0);
        assert_eq!((report.committed, report.dropped), (vec![], vec![a.execution_id]));
    }

    #[test]
    fn a_row_an_earlier_try_inserted_is_ours_unless_another_node_claimed_it() {
        let (a, b) = (planned(true), planned(true));
        let mut written = Written::default();
        // Both found by the retry of a write whose first outcome was lost.
        written.existing.insert(a.execution_id, a.execution_id);
        written.existing.insert(b.execution_id, b.execution_id);
        written.not_ours.insert(b.execution_id);
        let mut report = ExecutionsCommitted::default();
        let (outcome, created) = event_outcome(&[a, b], &written, &mut report);
        assert_eq!(refs(&outcome), (vec![a.execution_id, b.execution_id], false));
        assert_eq!(created, 2);
        assert_eq!((report.committed, report.dropped), (vec![a.execution_id], vec![b.execution_id]));
    }
}
