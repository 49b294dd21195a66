//! Data retention: finished executions (with their steps and commands), dead letters
//! and acked commands older than their chatbot's retention are deleted in small
//! batches, each its own short statement (no long transaction, no table rewrite, locks
//! held for one batch), skipping rows another pruner holds, and paced (at most
//! `max_rows_per_second`) so that the disk and the cores stay the traffic's. The per-minute rollups are
//! kept: they are small, and analytics over windows older than the retention read them.
//!
//! A deleted chatbot (`deletion`) is finished here: executions a daemon committed
//! before it heard of the deletion are cancelled, its history goes at once when the
//! operator asked to prune it (else as its retention says), and once none is left its
//! rollups and then its row (with workflows, limits and retention) are deleted.

use super::{Store, StoreResult};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// RetentionDays each kind of row is kept; 0 keeps it forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RetentionDays {
    pub executions: i32,
    pub dead_letters: i32,
    pub acked_commands: i32,
}

impl From<&crate::config::RetentionConfig> for RetentionDays {
    fn from(c: &crate::config::RetentionConfig) -> RetentionDays {
        RetentionDays { executions: c.executions_days, dead_letters: c.dead_letters_days, acked_commands: c.acked_commands_days }
    }
}

/// A chatbot's own retention; `None` keeps the daemon's default for that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionOverrides {
    pub executions_days: Option<i32>,
    pub dead_letters_days: Option<i32>,
    pub acked_commands_days: Option<i32>,
}

impl RetentionOverrides {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (field, v) in [
            ("executions_days", self.executions_days),
            ("dead_letters_days", self.dead_letters_days),
            ("acked_commands_days", self.acked_commands_days),
        ] {
            if let Some(v) = v {
                if !(0..=36_500).contains(&v) {
                    return Err((field, format!("must be within 0..36500 days (0: keep forever), got {v}")));
                }
            }
        }
        Ok(())
    }
}

/// Rows pruned (or, in a dry run, that would be).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    pub executions: u64,
    pub dead_letters: u64,
    pub acked_commands: u64,
    /// Deleted chatbots whose last rows went.
    pub chatbots: u64,
}

/// How fast a pruning pass goes: `batch` rows a statement, and at most
/// `max_rows_per_second` rows a second over the pass (0: as fast as PostgreSQL deletes).
/// A pass deletes as fast as PostgreSQL does otherwise (15,000 executions a second on
/// the bench machine), which an operator may not want beside the traffic
/// (docs/performance.md has what each costs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    pub batch: i64,
    pub max_rows_per_second: u64,
}

impl From<&crate::config::RetentionConfig> for Pacing {
    fn from(c: &crate::config::RetentionConfig) -> Pacing {
        Pacing { batch: c.batch_size, max_rows_per_second: c.max_rows_per_second }
    }
}

/// Where a pass stands against its pacing: a token bucket holding at most one batch,
/// so time spent on statements that deleted nothing is not saved up for a burst.
struct Pace {
    pacing: Pacing,
    /// Until when the rows deleted so far are paid for.
    paid_until: tokio::time::Instant,
}

impl Pace {
    fn new(pacing: Pacing) -> Pace {
        Pace { pacing, paid_until: tokio::time::Instant::now() }
    }

    /// After a batch of `n` rows: waits until the pass is back under its rate.
    async fn after(&mut self, n: u64) {
        let rate = self.pacing.max_rows_per_second;
        if rate == 0 || n == 0 {
            return;
        }
        let per_row = std::time::Duration::from_secs_f64(1.0 / rate as f64);
        let now = tokio::time::Instant::now();
        let floor = now.checked_sub(per_row * self.pacing.batch.max(1) as u32).unwrap_or(now);
        self.paid_until = self.paid_until.max(floor) + per_row * n as u32;
        if self.paid_until > now {
            tokio::time::sleep_until(self.paid_until).await;
        }
    }
}

/// Days that select every row of a kind whatever its age: `created_at < now() + 1 day`,
/// and for the dead-letter check, no dead letter is recent enough to keep its execution.
const ALL: i32 = -1;

/// A deleted chatbot's row goes this long after the deletion at the earliest, so that
/// an execution a daemon was committing as the deletion happened finds its workflow.
const ROW_GRACE: &str = "interval '1 minute'";

/// The kinds, their tables, which of the days they go by (0 executions, 1 dead letters,
/// 2 acked commands) and the rows of one chatbot past a number of days, as the subquery
/// that selects them (`$1` chatbot, `$2` days, `$3` dead-letter days). Children first:
/// an execution's dead letter and commands are gone before it is, so a batch of
/// executions cascades only to their step rows.
const KINDS: [(&str, &str, usize, &str); 3] = [
    (
        "dead_letters",
        "dead_letters",
        1,
        // `$3` typed only.
        "SELECT d.id FROM dead_letters d
          WHERE d.chatbot_id = $1 AND d.created_at < now() - make_interval(days => $2) AND $3::int IS NOT NULL",
    ),
    (
        "acked_commands",
        "outbox",
        2,
        // With `ALL` (a deleted chatbot's history) every command, acked or expired.
        "SELECT o.command_id FROM outbox o
          WHERE o.chatbot_id = $1 AND $3::int IS NOT NULL
            AND ((o.status = 'acked' AND o.acked_at < now() - make_interval(days => $2)) OR $2 = -1)",
    ),
    (
        "executions",
        "executions",
        0,
        // Finished ones only, and not while a dead letter of theirs is kept.
        "SELECT e.id FROM executions e
          WHERE e.chatbot_id = $1 AND e.created_at < now() - make_interval(days => $2)
            AND e.status IN ('succeeded', 'failed', 'dead', 'cancelled')
            AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.execution_id = e.id
                             AND ($3 = 0 OR d.created_at >= now() - make_interval(days => $3)))",
    ),
];

/// One pass over every chatbot: deletes (or with `dry_run` counts) what is past its
/// retention, paced as `pacing` says. `on_batch` hears each batch (table, rows).
pub async fn prune(store: &Store, defaults: RetentionDays, pacing: Pacing, dry_run: bool, mut on_batch: impl FnMut(&str, u64)) -> StoreResult<Pruned> {
    let batch = pacing.batch;
    let mut pace = Pace::new(pacing);
    let mut client = store.pool().get().await?;
    let bots = client
        .query(
            &format!(
                "SELECT c.id,
                        COALESCE(r.executions_days, $1), COALESCE(r.dead_letters_days, $2), COALESCE(r.acked_commands_days, $3),
                        c.deleted_at IS NOT NULL, c.purge_history, c.deleted_at < now() - {ROW_GRACE}
                   FROM chatbots c LEFT JOIN chatbot_retention r ON r.chatbot_id = c.id"
            ),
            &[&defaults.executions, &defaults.dead_letters, &defaults.acked_commands],
        )
        .await?;
    let mut pruned = Pruned::default();
    for row in bots {
        let chatbot: Uuid = row.get(0);
        let (deleted, purge, row_may_go): (bool, bool, Option<bool>) = (row.get(4), row.get(5), row.get(6));
        let days: [i32; 3] = if purge { [ALL; 3] } else { [row.get(1), row.get(2), row.get(3)] };
        let dead_letter_days = days[1];
        if deleted && !dry_run {
            // Executions a daemon committed before it heard of the deletion.
            let stmt = client.prepare(&super::deletion::cancel_sql(true)).await?;
            loop {
                let n = client.execute(&stmt, &[&chatbot, &batch]).await?;
                pace.after(n).await;
                if n < batch as u64 {
                    break;
                }
            }
        }
        let mut executions_pruned = 0;
        for (kind, table, which, rows) in KINDS {
            let days = days[which];
            if days == 0 {
                continue;
            }
            let key = if table == "outbox" { "command_id" } else { "id" };
            let n = if dry_run {
                let sql = format!("SELECT count(*) FROM ({rows}) x");
                client.query_one(&sql, &[&chatbot, &days, &dead_letter_days]).await?.get::<_, i64>(0) as u64
            } else {
                let sql = format!("DELETE FROM {table} WHERE {key} IN ({rows} LIMIT $4 FOR UPDATE SKIP LOCKED)");
                let stmt = client.prepare(&sql).await?;
                let mut total = 0;
                loop {
                    let n = delete_batch(&mut client, &stmt, &[&chatbot, &days, &dead_letter_days, &batch]).await?;
                    if n > 0 {
                        on_batch(kind, n);
                    }
                    pace.after(n).await;
                    total += n;
                    if n < batch as u64 {
                        break;
                    }
                }
                total
            };
            match kind {
                "executions" => {
                    executions_pruned = n;
                    pruned.executions += n
                }
                "dead_letters" => pruned.dead_letters += n,
                _ => pruned.acked_commands += n,
            }
        }
        if deleted && row_may_go == Some(true) {
            let left: i64 = client.query_one("SELECT count(*) FROM executions WHERE chatbot_id = $1", &[&chatbot]).await?.get(0);
            let gone = if dry_run { left as u64 == executions_pruned } else { left == 0 && drop_chatbot(&mut client, chatbot, &mut pace, &mut on_batch).await? };
            if gone {
                pruned.chatbots += 1;
            }
        }
    }
    Ok(pruned)
}

/// One batch, in a transaction of its own that does not wait for its commit to reach
/// the disk (`synchronous_commit` off for it alone): a batch lost to a crash is deleted
/// again by the next pass, and the traffic's commits do not queue behind the pruner's
/// flushes.
async fn delete_batch(
    client: &mut deadpool_postgres::Client,
    stmt: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> StoreResult<u64> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL synchronous_commit = off").await?;
    let n = tx.execute(stmt, params).await?;
    tx.commit().await?;
    Ok(n)
}

/// Deletes a deleted chatbot with no executions left: its rollups a batch at a time,
/// then its row (its workflows, limits and retention go with it). `false`: another
/// daemon did it first.
async fn drop_chatbot(client: &mut deadpool_postgres::Client, chatbot: Uuid, pace: &mut Pace, on_batch: &mut impl FnMut(&str, u64)) -> StoreResult<bool> {
    let batch = pace.pacing.batch;
    for table in ["execution_stats", "execution_durations"] {
        let sql = format!("DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} WHERE chatbot_id = $1 LIMIT $2)");
        let stmt = client.prepare(&sql).await?;
        loop {
            let n = delete_batch(client, &stmt, &[&chatbot, &batch]).await?;
            if n > 0 {
                on_batch("rollups", n);
            }
            pace.after(n).await;
            if n < batch as u64 {
                break;
            }
        }
    }
    let n = client.execute("DELETE FROM chatbots WHERE id = $1 AND deleted_at IS NOT NULL", &[&chatbot]).await?;
    if n > 0 {
        on_batch("chatbots", n);
        tracing::info!(%chatbot, "a deleted chatbot's last rows are gone");
    }
    Ok(n > 0)
}

/// A chatbot's own retention.
pub async fn get(store: &Store, chatbot: Uuid) -> StoreResult<RetentionOverrides> {
    let client = store.pool().get().await?;
    let row = client
        .query_opt(
            "SELECT executions_days, dead_letters_days, acked_commands_days FROM chatbot_retention WHERE chatbot_id = $1",
            &[&chatbot],
        )
        .await?;
    Ok(row.map_or_else(RetentionOverrides::default, |r| RetentionOverrides {
        executions_days: r.get(0),
        dead_letters_days: r.get(1),
        acked_commands_days: r.get(2),
    }))
}

/// Sets a chatbot's own retention (all `None`: back to the defaults), recording who.
pub async fn set(store: &Store, chatbot: Uuid, o: RetentionOverrides, by: &str) -> StoreResult<()> {
    o.validate().map_err(|(f, m)| super::StoreError::Invalid(format!("{f} {m}")))?;
    let client = store.pool().get().await?;
    client
        .execute(
            "INSERT INTO chatbot_retention (chatbot_id, executions_days, dead_letters_days, acked_commands_days, changed_by)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (chatbot_id) DO UPDATE SET executions_days = $2, dead_letters_days = $3,
                 acked_commands_days = $4, changed_at = now(), changed_by = $5",
            &[&chatbot, &o.executions_days, &o.dead_letters_days, &o.acked_commands_days, &by],
        )
        .await?;
    Ok(())
}

/// Prunes every `every`, and when `now` is notified (a chatbot was deleted), until
/// cancelled, counting rows in `botflow_pruned_rows_total`. Every daemon on a database
/// runs one: they skip each other's rows.
pub async fn keep_pruning(
    store: Store,
    defaults: RetentionDays,
    pacing: Pacing,
    every: std::time::Duration,
    now: std::sync::Arc<tokio::sync::Notify>,
    cancel: tokio_util::sync::CancellationToken,
) {
    use crate::telemetry::metrics as m;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = now.notified() => {}
        }
        let started = std::time::Instant::now();
        let count = |kind: &str, n: u64| metrics::counter!(m::PRUNED, "kind" => kind.to_string()).increment(n);
        // A pass waiting on its pacing ends with the daemon.
        let pass = tokio::select! {
            _ = cancel.cancelled() => return,
            pass = prune(&store, defaults, pacing, false, count) => pass,
        };
        match pass {
            Ok(p) if p != Pruned::default() => tracing::info!(
                executions = p.executions,
                dead_letters = p.dead_letters,
                acked_commands = p.acked_commands,
                chatbots = p.chatbots,
                ms = started.elapsed().as_millis() as u64,
                "pruned history past its retention"
            ),
            Ok(_) => {}
            Err(error) => {
                metrics::counter!(m::DB_ERRORS, "kind" => error.kind()).increment(1);
                tracing::warn!(%error, "pruning failed; trying again at the next interval");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Pace, Pacing};
    use std::time::Duration;

    fn pacing_of(max_rows_per_second: u64) -> Pacing {
        Pacing { batch: 100, max_rows_per_second }
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_pass_takes_as_long_as_its_rate_says_and_an_unpaced_one_does_not_wait() {
        let start = tokio::time::Instant::now();
        let mut pace = Pace::new(Pacing { batch: 100, max_rows_per_second: 1000 });
        for _ in 0..10 {
            pace.after(100).await;
        }
        // 1,000 rows at 1,000 a second: one second of (virtual) time.
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        let start = tokio::time::Instant::now();
        let mut unpaced = Pace::new(pacing_of(0));
        for _ in 0..10 {
            unpaced.after(100).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
