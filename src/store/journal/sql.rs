//! The lane's statements and the write of one batch: new executions, progress, step
//! records, commands and acks in one statement (writable CTEs over UNNEST arrays),
//! dead letters after it in the same transaction, and what the write learned.

use super::queue::{Batch, WaitingBatch};
use super::{CommandRow, ExecutionUpdate, StepRecord};
use crate::execution::Status;
use crate::store::outbox::COMMANDS_CHANNEL;
use crate::store::{Store, StoreError};
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// A write that takes longer is abandoned (its connection closed) and retried.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a write learned: the ids it inserted, for each planned execution whose
/// (workflow, event id) was taken the execution that holds it, and the executions whose
/// update passed the lease check.
#[derive(Default)]
pub(super) struct Written {
    pub(super) inserted: HashSet<Uuid>,
    pub(super) existing: HashMap<Uuid, Uuid>,
    /// Inserted by an earlier try of this write, and no longer leased to this node.
    pub(super) not_ours: HashSet<Uuid>,
    pub(super) updated: HashSet<Uuid>,
}

/// Whether a failed statement may have been applied: the connection went away after
/// sending it, so no answer (and no SQLSTATE) came back.
pub(super) fn lost_in_flight(e: &StoreError) -> bool {
    matches!(e, StoreError::Db(e) if e.code().is_none())
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
    -- One upsert for both (one command may not update a row twice), into this lane's
    -- shard (`$43`), which no other lane writes.
    INSERT INTO execution_stats (chatbot_id, workflow_id, minute, shard, created, succeeded, failed, dead)
    SELECT chatbot_id, workflow_id, minute, $43, sum(created), sum(succeeded), sum(failed), sum(dead)
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
    ON CONFLICT (chatbot_id, workflow_id, minute, shard) DO UPDATE
        SET created = execution_stats.created + EXCLUDED.created,
            succeeded = execution_stats.succeeded + EXCLUDED.succeeded,
            failed = execution_stats.failed + EXCLUDED.failed,
            dead = execution_stats.dead + EXCLUDED.dead
), stats_durations AS (
    INSERT INTO execution_durations (chatbot_id, workflow_id, minute, bucket, shard, count)
    SELECT chatbot_id, workflow_id, date_trunc('minute', created_at),
           CASE WHEN duration_ms < 1 THEN 0
                ELSE least(191, floor(8 * log(duration_ms) / log(2.0::float8))::int + 1) END,
           $43, count(*)
    FROM ended WHERE duration_ms IS NOT NULL GROUP BY 1, 2, 3, 4
    ON CONFLICT (chatbot_id, workflow_id, minute, bucket, shard) DO UPDATE
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
    FROM unnest($34::text[], $35::uuid[], $36::text[], $37::text[], $38::text[], $39::uuid[], $40::int8[], $42::text[])
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
    -- One look-up per ended execution in the small index of pending commands.
    UPDATE outbox o SET status = 'expired'
    FROM upd
    WHERE upd.status IN ('succeeded', 'failed', 'dead') AND o.execution_id = upd.id AND o.status = 'pending'
      AND o.command_id <> ALL($41::text[])
      AND o.command_id NOT IN (SELECT command_id FROM cmds)
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
///
/// Each statement keeps one plan for the connection's life, made once and pinned to
/// the shape every write wants whatever the tables' sizes: nested loops over the
/// batch's arrays with an index look-up per row (`enable_seqscan`, `enable_hashjoin`
/// and `enable_mergejoin` off for this connection, so a plan made while the tables
/// were small cannot be a scan of `executions` that stays as they grow). Planning each
/// write instead (custom plans) cost a few milliseconds a write, most of a small
/// write's time, and with `plan_cache_mode = force_custom_plan` on the connection the
/// foreign-key checks were planned again for every row.
pub(super) struct LaneConn {
    pub(super) client: tokio_postgres::Client,
    write: tokio_postgres::Statement,
    existing: tokio_postgres::Statement,
    dead_letter: tokio_postgres::Statement,
}

impl LaneConn {
    /// The lane's connection while it is open, else a new one.
    pub(super) async fn reuse_or_open(conn: Option<Arc<LaneConn>>, store: &Store) -> Result<Arc<LaneConn>, StoreError> {
        match conn {
            Some(c) if !c.client.is_closed() => Ok(c),
            _ => LaneConn::open(store).await.map(Arc::new),
        }
    }

    pub(super) async fn open(store: &Store) -> Result<LaneConn, StoreError> {
        let client = store.dedicated().await?;
        // The server gives up on a write the lane has given up on too.
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}; SET plan_cache_mode = force_generic_plan;
                 SET enable_seqscan = off; SET enable_hashjoin = off; SET enable_mergejoin = off",
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

fn storable_json(v: &serde_json::Value) -> String {
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

pub(super) async fn write(conn: &LaneConn, node: Uuid, shard: i16, batch: &Batch) -> Result<Written, StoreError> {
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
    let c_kind: Vec<&str> = cmds.iter().map(|c| c.command.kind.as_str()).collect();
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
        &s_output, &s_error, &c_id, &c_chatbot, &c_conv, &c_kind, &c_payload, &c_exec, &c_epoch, &acked, &c_status, &shard,
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
