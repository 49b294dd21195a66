//! Dead letters: executions that used up their attempts, kept for an operator to
//! replay (one more attempt of the same execution, from the step that failed) or to
//! discard (recording who did it and when).

use super::listen::WAKE_CHANNEL;
use super::{Store, StoreError, StoreResult};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    pub id: Uuid,
    pub execution_id: Uuid,
    pub chatbot_id: Uuid,
    pub workflow_id: Uuid,
    /// The workflow's name now (`null` if it cannot be read).
    pub workflow_name: Option<String>,
    pub workflow_version: i32,
    pub event: serde_json::Value,
    pub last_error: Option<String>,
    pub attempts: i32,
    pub history: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub replayed_at: Option<DateTime<Utc>>,
    pub replayed_by: Option<String>,
    pub discarded_at: Option<DateTime<Utc>>,
    pub discarded_by: Option<String>,
}

impl DeadLetter {
    pub fn state(&self) -> &'static str {
        if self.replayed_at.is_some() {
            "replayed"
        } else if self.discarded_at.is_some() {
            "discarded"
        } else {
            "open"
        }
    }
}

/// The workflow's name is its current one (`workflow_id` inside the subquery is the
/// outer row's: `workflows` has no such column).
const COLUMNS: &str = "id, execution_id, chatbot_id, workflow_id, workflow_version, event, last_error, attempts, history,
                       created_at, replayed_at, replayed_by, discarded_at, discarded_by,
                       (SELECT w.name FROM workflows w WHERE w.id = workflow_id) AS workflow_name";

fn from_row(r: &tokio_postgres::Row) -> DeadLetter {
    DeadLetter {
        id: r.get(0),
        execution_id: r.get(1),
        chatbot_id: r.get(2),
        workflow_id: r.get(3),
        workflow_version: r.get(4),
        event: r.get(5),
        last_error: r.get(6),
        attempts: r.get(7),
        history: r.get(8),
        created_at: r.get(9),
        replayed_at: r.get(10),
        replayed_by: r.get(11),
        discarded_at: r.get(12),
        discarded_by: r.get(13),
        workflow_name: r.get(14),
    }
}

/// Which dead letters a list or a bulk action covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Neither replayed nor discarded (the default).
    #[default]
    Open,
    Replayed,
    Discarded,
    All,
}

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub chatbot_id: Option<Uuid>,
    pub workflow_id: Option<Uuid>,
    pub state: State,
    /// Died at or after.
    pub since: Option<DateTime<Utc>>,
    /// Died before.
    pub until: Option<DateTime<Utc>>,
    /// Text in the last error (case-insensitive, taken literally).
    pub q: Option<String>,
}

impl Filter {
    /// The WHERE clause (over `dead_letters`) and its parameters, numbered from 1.
    fn sql(&self) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut sql = String::from(match self.state {
            State::Open => "replayed_at IS NULL AND discarded_at IS NULL",
            State::Replayed => "replayed_at IS NOT NULL",
            State::Discarded => "discarded_at IS NOT NULL",
            State::All => "true",
        });
        let mut and = |clause: &str, value: Box<dyn ToSql + Sync + Send>| {
            params.push(value);
            sql.push_str(&clause.replace("$?", &format!("${}", params.len())));
        };
        if let Some(c) = self.chatbot_id {
            and(" AND chatbot_id = $?", Box::new(c));
        }
        if let Some(w) = self.workflow_id {
            and(" AND workflow_id = $?", Box::new(w));
        }
        if let Some(t) = self.since {
            and(" AND created_at >= $?", Box::new(t));
        }
        if let Some(t) = self.until {
            and(" AND created_at < $?", Box::new(t));
        }
        if let Some(q) = &self.q {
            and(" AND last_error ILIKE $? ESCAPE '\\'", Box::new(super::executions::like_literal(q)));
        }
        (sql, params)
    }
}

fn refs(params: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
}

/// A page of dead letters, newest first, older than the `(created_at, id)` given.
pub async fn list(
    store: &Store,
    filter: &Filter,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> StoreResult<Vec<DeadLetter>> {
    let (mut clause, mut params) = filter.sql();
    if let Some((at, id)) = after {
        params.push(Box::new(at));
        params.push(Box::new(id));
        clause.push_str(&format!(" AND (created_at, id) < (${}, ${})", params.len() - 1, params.len()));
    }
    params.push(Box::new(limit));
    let sql = format!("SELECT {COLUMNS} FROM dead_letters WHERE {clause} ORDER BY created_at DESC, id DESC LIMIT ${}", params.len());
    let client = store.pool().get().await?;
    let rows = client.query(&sql, &refs(&params)).await?;
    Ok(rows.iter().map(from_row).collect())
}

pub async fn get(store: &Store, id: Uuid) -> StoreResult<DeadLetter> {
    let client = store.pool().get().await?;
    let row = client.query_opt(&format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1"), &[&id]).await?;
    row.as_ref().map(from_row).ok_or_else(|| StoreError::NotFound { what: "dead letter", id: id.to_string() })
}

/// Replays the open letters among `ids`: one more attempt of each dead execution, from
/// the step that failed. The rollups forget the death (the execution counts again when
/// it ends). Running daemons hear of it through NOTIFY and pick the work up at once.
/// The replayed run's duration counts from its own start, not from the first attempt's
/// (the time the letter waited is no one's run time).
/// Returns the letters replayed.
const REPLAY_SQL: &str = "
WITH dl AS (
    SELECT id, execution_id FROM dead_letters
    WHERE id = ANY($1) AND replayed_at IS NULL AND discarded_at IS NULL
      -- not of a chatbot deleted meanwhile (one that raced the deletion is cancelled by
      -- the pruner's sweep)
      AND chatbot_id IN (SELECT id FROM chatbots WHERE deleted_at IS NULL)
    FOR UPDATE SKIP LOCKED
), ex AS (
    UPDATE executions e
    SET status = 'queued', attempt = e.attempt + 1, run_after = now(), lease_owner = NULL,
        error = NULL, started_at = NULL, finished_at = NULL, duration_ms = NULL
    FROM dl, executions prev
    WHERE e.id = dl.execution_id AND e.status = 'dead' AND prev.id = e.id
    RETURNING e.id, e.chatbot_id, e.workflow_id, e.created_at, prev.duration_ms
), marked AS (
    UPDATE dead_letters d SET replayed_at = now(), replayed_by = $2
    FROM dl JOIN ex ON ex.id = dl.execution_id
    WHERE d.id = dl.id
    RETURNING d.id, d.chatbot_id
), stats AS (
    -- The rollups are sums over shards: the correction goes to shard -1, which no
    -- journal lane writes, so it never waits for a lane's commit.
    INSERT INTO execution_stats (chatbot_id, workflow_id, minute, shard, dead)
    SELECT chatbot_id, workflow_id, date_trunc('minute', created_at), -1, -count(*) FROM ex GROUP BY 1, 2, 3
    ON CONFLICT (chatbot_id, workflow_id, minute, shard) DO UPDATE SET dead = execution_stats.dead + EXCLUDED.dead
), durations AS (
    INSERT INTO execution_durations (chatbot_id, workflow_id, minute, bucket, shard, count)
    SELECT chatbot_id, workflow_id, date_trunc('minute', created_at),
           CASE WHEN duration_ms < 1 THEN 0
                ELSE least(191, floor(8 * log(duration_ms) / log(2.0::float8))::int + 1) END,
           -1, -count(*)
    FROM ex WHERE duration_ms IS NOT NULL GROUP BY 1, 2, 3, 4
    ON CONFLICT (chatbot_id, workflow_id, minute, bucket, shard) DO UPDATE
        SET count = execution_durations.count + EXCLUDED.count
), woken AS (
    SELECT pg_notify($3, chatbot_id::text) FROM (SELECT DISTINCT chatbot_id FROM marked) m
)
SELECT id FROM marked, (SELECT count(*) FROM woken) w";

const DISCARD_SQL: &str = "
UPDATE dead_letters SET discarded_at = now(), discarded_by = $2
WHERE id = ANY($1) AND replayed_at IS NULL AND discarded_at IS NULL
RETURNING id";

/// Replays (`true`) or discards the open letters among `ids`; returns those acted on.
async fn act(store: &Store, replay: bool, ids: &[Uuid], by: &str) -> StoreResult<Vec<Uuid>> {
    let client = store.pool().get().await?;
    let rows = if replay {
        client.query(REPLAY_SQL, &[&ids, &by, &WAKE_CHANNEL]).await?
    } else {
        client.query(DISCARD_SQL, &[&ids, &by]).await?
    };
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Why an action on one letter did nothing.
async fn not_open(store: &Store, id: Uuid) -> StoreError {
    match get(store, id).await {
        Ok(dl) if dl.state() == "open" => {
            StoreError::Conflict(format!("dead letter {id} is being acted on by someone else; try again"))
        }
        Ok(dl) => StoreError::Conflict(format!("dead letter {id} was already {}", dl.state())),
        Err(e) => e,
    }
}

/// Starts one more attempt of the dead execution, from the step that failed.
pub async fn replay(store: &Store, id: Uuid, by: &str) -> StoreResult<DeadLetter> {
    if act(store, true, &[id], by).await?.is_empty() {
        return Err(not_open(store, id).await);
    }
    get(store, id).await
}

/// Gives up on the dead execution for good, recording who did it.
pub async fn discard(store: &Store, id: Uuid, by: &str) -> StoreResult<DeadLetter> {
    if act(store, false, &[id], by).await?.is_empty() {
        return Err(not_open(store, id).await);
    }
    get(store, id).await
}

/// Replays (or discards) every open letter the filter matches, at most `max`, in
/// batches; returns how many.
pub async fn act_matching(store: &Store, filter: &Filter, replay: bool, by: &str, max: i64) -> StoreResult<i64> {
    let filter = Filter { state: State::Open, ..filter.clone() };
    let (clause, mut params) = filter.sql();
    let mut done = 0i64;
    let mut after: Option<(DateTime<Utc>, Uuid)> = None;
    let base = params.len();
    while done < max {
        let batch = (max - done).min(500);
        params.truncate(base);
        let mut page = clause.clone();
        if let Some((at, id)) = after {
            params.push(Box::new(at));
            params.push(Box::new(id));
            page.push_str(&format!(" AND (created_at, id) < (${}, ${})", params.len() - 1, params.len()));
        }
        params.push(Box::new(batch));
        let sql = format!(
            "SELECT id, created_at FROM dead_letters WHERE {page} ORDER BY created_at DESC, id DESC LIMIT ${}",
            params.len()
        );
        let rows = {
            let client = store.pool().get().await?;
            client.query(&sql, &refs(&params)).await?
        };
        if rows.is_empty() {
            break;
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
        after = rows.last().map(|r| (r.get(1), r.get(0)));
        let acted = act(store, replay, &ids, by).await?;
        done += acted.len() as i64;
        if (rows.len() as i64) < batch {
            break;
        }
    }
    Ok(done)
}
