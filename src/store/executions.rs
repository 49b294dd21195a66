//! Reading execution history for the admin API: filtered pages (keyset on
//! `(created_at, id)`, newest first, each filter served by its own index), one
//! execution with every step attempt, and per-workflow analytics.
//!
//! Analytics are exact (a scan with `percentile_cont`) for windows holding up to
//! `EXACT_LIMIT` executions. Larger windows read the per-minute rollups the journal
//! keeps (`execution_stats`, `execution_durations`) for the whole minutes inside the
//! window and scan only the partial minutes at its edges: counts stay exact, and
//! percentiles come from a histogram whose buckets are 2^(1/8) apart (within 9%).

use super::{Store, StoreResult};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// Windows holding more executions than this use the rollups (unless told otherwise).
pub const EXACT_LIMIT: i64 = 50_000;

const FINAL: &str = "('succeeded', 'failed', 'dead')";

/// Which executions a history page shows. Every field narrows the list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub workflow_id: Option<Uuid>,
    pub status: Option<String>,
    pub conversation_id: Option<String>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
    /// Text in the error message (case-insensitive, taken literally).
    pub q: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ExecutionSummary {
    pub id: Uuid,
    pub chatbot_id: Uuid,
    pub workflow_id: Uuid,
    /// The workflow's name now (`null` if it cannot be read).
    pub workflow_name: Option<String>,
    pub workflow_version: i32,
    pub event_id: String,
    pub event_type: String,
    pub conversation_id: String,
    /// queued, running, retrying, waiting, succeeded, failed, dead or cancelled.
    pub status: String,
    pub attempt: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<f64>,
    pub error: Option<String>,
}

/// One attempt of one step.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StepAttempt {
    pub step_index: i32,
    pub attempt: i32,
    pub step_id: String,
    pub action: String,
    /// succeeded or failed.
    pub status: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub output: Option<serde_json::Value>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ExecutionDetail {
    #[serde(flatten)]
    pub summary: ExecutionSummary,
    /// The event as received.
    pub event: serde_json::Value,
    /// Outputs of the steps done so far, by step id.
    pub outputs: serde_json::Value,
    /// Every attempt of every step, in order.
    pub steps: Vec<StepAttempt>,
    /// The open or past dead letter of this execution, if it died.
    pub dead_letter_id: Option<Uuid>,
}

/// The columns of a summary. The workflow's name is its current one (`workflow_id`
/// inside the subquery is the outer row's: `workflows` has no such column).
const SUMMARY: &str = "id, chatbot_id, workflow_id, workflow_version, event_id, event_type, conversation_id, status,
                       attempt, created_at, started_at, finished_at, duration_ms, error,
                       (SELECT w.name FROM workflows w WHERE w.id = workflow_id) AS workflow_name";

fn summary(r: &tokio_postgres::Row) -> ExecutionSummary {
    ExecutionSummary {
        id: r.get(0),
        chatbot_id: r.get(1),
        workflow_id: r.get(2),
        workflow_version: r.get(3),
        event_id: r.get(4),
        event_type: r.get(5),
        conversation_id: r.get(6),
        status: r.get(7),
        attempt: r.get(8),
        created_at: r.get(9),
        started_at: r.get(10),
        finished_at: r.get(11),
        duration_ms: r.get(12),
        error: r.get(13),
        workflow_name: r.get(14),
    }
}

/// `%` and `_` in user text match themselves, not any character.
pub(crate) fn like_literal(q: &str) -> String {
    let mut out = String::with_capacity(q.len() + 2);
    out.push('%');
    for c in q.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// A page of a chatbot's executions, newest first, strictly after (older than) the
/// `(created_at, id)` given. Only the filters given become SQL, so each query can
/// use the index made for it; values are always parameters.
pub async fn list(
    store: &Store,
    chatbot_id: Uuid,
    filter: &Filter,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> StoreResult<Vec<ExecutionSummary>> {
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(chatbot_id)];
    let mut sql = format!("SELECT {SUMMARY} FROM executions WHERE chatbot_id = $1");
    // Appends a clause whose `$?` is the next parameter.
    let mut and = |clause: &str, value: Box<dyn ToSql + Sync + Send>| {
        params.push(value);
        sql.push_str(&clause.replace("$?", &format!("${}", params.len())));
    };
    if let Some(w) = filter.workflow_id {
        and(" AND workflow_id = $?", Box::new(w));
    }
    if let Some(s) = &filter.status {
        and(" AND status = $?", Box::new(s.clone()));
    }
    if let Some(c) = &filter.conversation_id {
        and(" AND conversation_id = $?", Box::new(c.clone()));
    }
    if let Some(t) = filter.since {
        and(" AND created_at >= $?", Box::new(t));
    }
    if let Some(t) = filter.until {
        and(" AND created_at < $?", Box::new(t));
    }
    if let Some(q) = &filter.q {
        and(" AND error IS NOT NULL AND error ILIKE $? ESCAPE '\\'", Box::new(like_literal(q)));
    }
    if let Some((at, id)) = after {
        and(" AND (created_at, id) < ($?", Box::new(at));
        and(", $?)", Box::new(id));
    }
    and(" ORDER BY created_at DESC, id DESC LIMIT $?", Box::new(limit));
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
    let client = store.pool().get().await?;
    let rows = client.query(&sql, &refs).await?;
    Ok(rows.iter().map(summary).collect())
}

/// One execution with its steps, or `None`.
pub async fn get(store: &Store, id: Uuid) -> StoreResult<Option<ExecutionDetail>> {
    let client = store.pool().get().await?;
    let Some(row) = client
        .query_opt(
            &format!(
                "SELECT {SUMMARY}, event, outputs,
                        (SELECT d.id FROM dead_letters d WHERE d.execution_id = e.id ORDER BY d.created_at DESC LIMIT 1) AS dead_letter_id
                 FROM executions e WHERE id = $1"
            ),
            &[&id],
        )
        .await?
    else {
        return Ok(None);
    };
    let steps = client
        .query(
            "SELECT step_index, attempt, step_id, action, status, started_at, finished_at, output, error
             FROM execution_steps WHERE execution_id = $1 ORDER BY attempt, step_index",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| StepAttempt {
            step_index: r.get(0),
            attempt: r.get(1),
            step_id: r.get(2),
            action: r.get(3),
            status: r.get(4),
            started_at: r.get(5),
            finished_at: r.get(6),
            output: r.get(7),
            error: r.get(8),
        })
        .collect();
    Ok(Some(ExecutionDetail {
        summary: summary(&row),
        event: row.get("event"),
        outputs: row.get("outputs"),
        steps,
        dead_letter_id: row.get("dead_letter_id"),
    }))
}

/// The chatbot an execution belongs to (for the ownership check), or `None`.
pub async fn chatbot_of(store: &Store, id: Uuid) -> StoreResult<Option<Uuid>> {
    let client = store.pool().get().await?;
    Ok(client.query_opt("SELECT chatbot_id FROM executions WHERE id = $1", &[&id]).await?.map(|r| r.get(0)))
}

/// How analytics are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Exact for small windows, rollups for large ones.
    Auto,
    Exact,
    Rollup,
}

/// One workflow's figures over a window.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WorkflowStats {
    pub workflow_id: Uuid,
    /// The workflow's current name (it may have been renamed or deleted since).
    pub workflow_name: Option<String>,
    /// Executions created in the window.
    pub count: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub dead: i64,
    /// Not finished yet (queued, running, retrying, waiting) or cancelled.
    pub other: i64,
    /// succeeded / (succeeded + failed + dead); null when none finished.
    pub success_rate: Option<f64>,
    /// Durations of the finished ones, seconds.
    pub p50_seconds: Option<f64>,
    pub p95_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Analytics {
    pub chatbot_id: Uuid,
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// True when percentiles were computed from every duration; false when they come
    /// from the per-minute histograms (within 9%). Counts are exact either way.
    pub exact: bool,
    pub workflows: Vec<WorkflowStats>,
}

/// Histogram bucket of a duration: 0 below 1 ms, then 8 per doubling, capped at 191
/// (about 15 days). The SQL twin is in the journal's write and in `bucket_sql`.
pub fn bucket_of(ms: f64) -> i16 {
    if ms < 1.0 {
        0
    } else {
        ((8.0 * ms.log2()).floor() as i64 + 1).min(191) as i16
    }
}

/// `bucket_of` in SQL, for a column or expression `x` in milliseconds.
fn bucket_sql(x: &str) -> String {
    format!("CASE WHEN {x} < 1 THEN 0 ELSE least(191, floor(8 * log({x}) / log(2.0::float8))::int + 1) END")
}

/// The bounds of bucket `b`, milliseconds.
fn bucket_bounds(b: i16) -> (f64, f64) {
    if b <= 0 {
        (0.0, 1.0)
    } else {
        (2f64.powf((b - 1) as f64 / 8.0), 2f64.powf(b as f64 / 8.0))
    }
}

/// The `q` quantile of a histogram (bucket → count), with the semantics of PostgreSQL's
/// `percentile_cont`: the samples at ranks ⌊q(n−1)⌋ and ⌈q(n−1)⌉, interpolated. Each
/// sample is placed evenly inside its bucket, so an estimate is off by at most one
/// bucket's width (2^(1/8), about 9%) however few samples there are.
pub fn histogram_quantile(hist: &BTreeMap<i16, i64>, q: f64) -> Option<f64> {
    let total: i64 = hist.values().filter(|&&n| n > 0).sum();
    if total == 0 {
        return None;
    }
    // The estimated value of the sample of rank k (0-based, ascending).
    let sample = |k: i64| -> f64 {
        let mut seen = 0i64;
        for (&b, &n) in hist.iter().filter(|(_, &n)| n > 0) {
            if seen + n > k {
                let (lo, hi) = bucket_bounds(b);
                return lo + (hi - lo) * ((k - seen) as f64 + 0.5) / n as f64;
            }
            seen += n;
        }
        hist.keys().next_back().map_or(0.0, |&b| bucket_bounds(b).1)
    };
    let rank = q.clamp(0.0, 1.0) * (total - 1) as f64;
    let (below, above) = (rank.floor() as i64, rank.ceil() as i64);
    let low = sample(below);
    Some(if above == below { low } else { low + (sample(above) - low) * (rank - below as f64) })
}

#[derive(Default)]
struct Acc {
    count: i64,
    succeeded: i64,
    failed: i64,
    dead: i64,
    hist: BTreeMap<i16, i64>,
    exact: Option<(Option<f64>, Option<f64>)>,
}

/// Per-workflow figures for executions created in `[since, until)`.
pub async fn analytics(
    store: &Store,
    chatbot_id: Uuid,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    method: Method,
) -> StoreResult<Analytics> {
    let client = store.pool().get().await?;
    let minute = TimeDelta::minutes(1);
    // Whole minutes inside the window come from the rollups.
    let first = since.duration_trunc(minute).unwrap_or(since);
    let first = if first < since { first + minute } else { first };
    let last = until.duration_trunc(minute).unwrap_or(until);
    let exact = match method {
        Method::Exact => true,
        Method::Rollup => false,
        Method::Auto => {
            let row = client
                .query_one(
                    "SELECT coalesce(sum(created), 0)::int8 FROM execution_stats
                     WHERE chatbot_id = $1 AND minute >= $2 AND minute < $3",
                    &[&chatbot_id, &since.duration_trunc(minute).unwrap_or(since), &until],
                )
                .await?;
            row.get::<_, i64>(0) <= EXACT_LIMIT
        }
    };
    let mut acc: BTreeMap<Uuid, Acc> = BTreeMap::new();
    let count_sql = "SELECT workflow_id, count(*), count(*) FILTER (WHERE status = 'succeeded'),
                count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'dead')".to_string();
    if exact || first >= last {
        let rows = client
            .query(
                &format!(
                    "{count_sql},
                     percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) FILTER (WHERE status IN {FINAL}),
                     percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) FILTER (WHERE status IN {FINAL})
                     FROM executions WHERE chatbot_id = $1 AND created_at >= $2 AND created_at < $3
                     GROUP BY workflow_id"
                ),
                &[&chatbot_id, &since, &until],
            )
            .await?;
        for r in &rows {
            let a = acc.entry(r.get(0)).or_default();
            a.count = r.get(1);
            a.succeeded = r.get(2);
            a.failed = r.get(3);
            a.dead = r.get(4);
            let p50: Option<f64> = r.get(5);
            let p95: Option<f64> = r.get(6);
            a.exact = Some((p50.map(|ms| ms / 1000.0), p95.map(|ms| ms / 1000.0)));
        }
    } else {
        let rows = client
            .query(
                "SELECT workflow_id, sum(created)::int8, sum(succeeded)::int8, sum(failed)::int8, sum(dead)::int8
                 FROM execution_stats WHERE chatbot_id = $1 AND minute >= $2 AND minute < $3 GROUP BY workflow_id",
                &[&chatbot_id, &first, &last],
            )
            .await?;
        for r in &rows {
            let a = acc.entry(r.get(0)).or_default();
            a.count += r.get::<_, i64>(1);
            a.succeeded += r.get::<_, i64>(2);
            a.failed += r.get::<_, i64>(3);
            a.dead += r.get::<_, i64>(4);
        }
        let rows = client
            .query(
                "SELECT workflow_id, bucket, sum(count)::int8 FROM execution_durations
                 WHERE chatbot_id = $1 AND minute >= $2 AND minute < $3 GROUP BY workflow_id, bucket",
                &[&chatbot_id, &first, &last],
            )
            .await?;
        for r in &rows {
            *acc.entry(r.get(0)).or_default().hist.entry(r.get(1)).or_default() += r.get::<_, i64>(2);
        }
        // The partial minutes at the edges, from the executions themselves.
        let edges = "chatbot_id = $1 AND ((created_at >= $2 AND created_at < $3) OR (created_at >= $4 AND created_at < $5))";
        let params: [&(dyn ToSql + Sync); 5] = [&chatbot_id, &since, &first, &last, &until];
        let rows = client
            .query(&format!("{count_sql} FROM executions WHERE {edges} GROUP BY workflow_id"), &params)
            .await?;
        for r in &rows {
            let a = acc.entry(r.get(0)).or_default();
            a.count += r.get::<_, i64>(1);
            a.succeeded += r.get::<_, i64>(2);
            a.failed += r.get::<_, i64>(3);
            a.dead += r.get::<_, i64>(4);
        }
        let rows = client
            .query(
                &format!(
                    "SELECT workflow_id, {}::int2, count(*) FROM executions
                     WHERE {edges} AND status IN {FINAL} AND duration_ms IS NOT NULL GROUP BY 1, 2",
                    bucket_sql("duration_ms")
                ),
                &params,
            )
            .await?;
        for r in &rows {
            *acc.entry(r.get(0)).or_default().hist.entry(r.get(1)).or_default() += r.get::<_, i64>(2);
        }
    }
    let ids: Vec<Uuid> = acc.keys().copied().collect();
    let names: BTreeMap<Uuid, String> = client
        .query("SELECT id, name FROM workflows WHERE id = ANY($1)", &[&ids])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let workflows = acc
        .into_iter()
        .filter(|(_, a)| a.count > 0)
        .map(|(id, a)| {
            let finished = a.succeeded + a.failed + a.dead;
            let (p50, p95) = match a.exact {
                Some(p) => p,
                None => (
                    histogram_quantile(&a.hist, 0.5).map(|ms| ms / 1000.0),
                    histogram_quantile(&a.hist, 0.95).map(|ms| ms / 1000.0),
                ),
            };
            WorkflowStats {
                workflow_id: id,
                workflow_name: names.get(&id).cloned(),
                count: a.count,
                succeeded: a.succeeded,
                failed: a.failed,
                dead: a.dead,
                other: a.count - finished,
                success_rate: (finished > 0).then(|| a.succeeded as f64 / finished as f64),
                p50_seconds: p50,
                p95_seconds: p95,
            }
        })
        .collect();
    Ok(Analytics { chatbot_id, since, until, exact: exact || first >= last, workflows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_an_eighth_of_a_doubling_wide() {
        assert_eq!(bucket_of(0.2), 0);
        assert_eq!(bucket_of(1.0), 1);
        assert_eq!(bucket_of(2.0), 9);
        assert_eq!(bucket_of(1000.0), 80);
        assert_eq!(bucket_of(1e12), 191);
        for ms in [1.5, 7.0, 120.0, 999.0, 45_000.0] {
            let (lo, hi) = bucket_bounds(bucket_of(ms));
            assert!(lo <= ms && ms < hi, "{ms} not in [{lo}, {hi})");
        }
    }

    #[test]
    fn quantiles_of_a_histogram_stay_within_a_bucket() {
        let mut hist = BTreeMap::new();
        for ms in (1..=100).map(|i| i as f64 * 10.0) {
            *hist.entry(bucket_of(ms)).or_insert(0) += 1;
        }
        let p50 = histogram_quantile(&hist, 0.5).unwrap();
        let p95 = histogram_quantile(&hist, 0.95).unwrap();
        assert!((p50 - 505.0).abs() / 505.0 < 0.1, "p50 {p50}");
        assert!((p95 - 950.0).abs() / 950.0 < 0.1, "p95 {p95}");
        assert_eq!(histogram_quantile(&BTreeMap::new(), 0.5), None);
    }

    #[test]
    fn quantiles_of_few_samples_interpolate_between_samples_like_percentile_cont() {
        // Five fast executions and one slow: percentile_cont(0.95) lies three quarters of
        // the way from the fifth to the sixth.
        let samples = [3.0, 3.5, 4.0, 4.2, 5.0, 40.0];
        let mut hist = BTreeMap::new();
        for ms in samples {
            *hist.entry(bucket_of(ms)).or_insert(0) += 1;
        }
        for (q, want) in [(0.5, 4.1), (0.95, 5.0 + 0.75 * 35.0), (0.0, 3.0), (1.0, 40.0)] {
            let got = histogram_quantile(&hist, q).unwrap();
            assert!((got - want).abs() / want < 0.1, "q {q}: {got} vs {want}");
        }
        let one = BTreeMap::from([(bucket_of(12.0), 1)]);
        assert!((histogram_quantile(&one, 0.95).unwrap() - 12.0).abs() / 12.0 < 0.1);
    }
}
