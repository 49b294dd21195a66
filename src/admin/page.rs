//! Pagination: `limit` and an opaque `cursor`, the same for every list; and the checks
//! of the filters lists share (a time window, text to search for).
//!
//! A cursor is the position of the last row of a page (a sort key and an id) plus a
//! digest of the query it belongs to, base64url-encoded with a checksum. Lists are
//! keyset-paginated, so a cursor stays valid while rows are inserted: no row of the
//! original list is skipped or shown twice. A cursor that was edited, truncated, or
//! is used with other filters than the ones it came from answers 400. (The checksum
//! catches edits, it is not a secret: a forged cursor can only reach rows the caller
//! may read anyway.)
//!
//! `by_account` is the one shape of the lists of an account's things (chatbots, keys,
//! the audit log): an admin's own account, an operator's every account or the one named.

use super::auth::Caller;
use super::error::ApiError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Datelike, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;

/// `since` must come before `until` when both are given, and both must lie in years 1
/// to 9999 (PostgreSQL's range is wider, but no history is older, and time arithmetic
/// near chrono's limits would overflow).
pub fn check_window(since: Option<DateTime<Utc>>, until: Option<DateTime<Utc>>) -> Result<(), ApiError> {
    for (name, t) in [("since", since), ("until", until)] {
        if t.is_some_and(|t| !(1..=9999).contains(&t.year())) {
            return Err(ApiError::bad_request(format!("{name} must be a time in the years 1 to 9999")).field(name));
        }
    }
    match (since, until) {
        (Some(s), Some(u)) if s >= u => Err(ApiError::bad_request("since must be before until").field("since")),
        _ => Ok(()),
    }
}

/// Text to search for (`q`): at most 200 characters, no NUL (PostgreSQL cannot hold it).
/// Empty text searches for nothing: `None`.
pub fn search_text(q: &Option<String>) -> Result<Option<String>, ApiError> {
    if q.as_ref().is_some_and(|t| t.chars().count() > 200 || t.contains('\0')) {
        return Err(ApiError::bad_request("q must be at most 200 characters, without NUL").field("q"));
    }
    Ok(q.clone().filter(|t| !t.is_empty()))
}

/// One page of a list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T: utoipa::ToSchema> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Where a page ends: a sort key (microseconds since the epoch, or a version) and an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub key: i64,
    pub id: Uuid,
}

impl Position {
    pub fn at(t: chrono::DateTime<chrono::Utc>, id: Uuid) -> Position {
        Position { key: t.timestamp_micros(), id }
    }

    /// The timestamp and id, for a keyset query.
    pub fn time(&self) -> Result<(chrono::DateTime<chrono::Utc>, Uuid), ApiError> {
        chrono::DateTime::from_timestamp_micros(self.key)
            .map(|t| (t, self.id))
            .ok_or_else(|| ApiError::bad_request("the cursor is not valid").field("cursor"))
    }
}

const VERSION: u8 = 1;
const LEN: usize = 1 + 8 + 16 + 8 + 4;

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"botflow cursor");
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// `query` names the list and its filters (any stable text); a cursor only works for
/// the same text.
pub fn encode(pos: Position, query: &str) -> String {
    let mut buf = Vec::with_capacity(LEN);
    buf.push(VERSION);
    buf.extend_from_slice(&pos.key.to_be_bytes());
    buf.extend_from_slice(pos.id.as_bytes());
    buf.extend_from_slice(&digest(&[query.as_bytes()])[..8]);
    let check = digest(&[&buf]);
    buf.extend_from_slice(&check[..4]);
    URL_SAFE_NO_PAD.encode(buf)
}

pub fn decode(cursor: &str, query: &str) -> Result<Position, ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("the cursor is not valid: {why}")).field("cursor");
    if cursor.len() > 128 {
        return Err(bad("too long"));
    }
    let buf = URL_SAFE_NO_PAD.decode(cursor.as_bytes()).map_err(|_| bad("not base64url"))?;
    if buf.len() != LEN || buf[0] != VERSION {
        return Err(bad("unknown format"));
    }
    let (body, check) = buf.split_at(LEN - 4);
    if digest(&[body])[..4] != *check {
        return Err(bad("it was altered"));
    }
    if body[25..33] != digest(&[query.as_bytes()])[..8] {
        return Err(bad("it belongs to another list or other filters"));
    }
    let key = i64::from_be_bytes(body[1..9].try_into().expect("8 bytes"));
    let id = Uuid::from_slice(&body[9..25]).map_err(|_| bad("unknown format"))?;
    Ok(Position { key, id })
}

/// The page size asked for: 1 to `MAX_LIMIT`, `DEFAULT_LIMIT` when absent.
pub fn limit(asked: Option<i64>) -> Result<i64, ApiError> {
    match asked {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!("limit {n} is out of range (1 to {MAX_LIMIT})")).field("limit")),
    }
}

/// The query of a list of an account's things.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AccountQuery {
    /// Operators: only this account's. (An admin key lists its own account's; naming
    /// another lists nothing.)
    pub account_id: Option<Uuid>,
    /// 1 to 500 (default 50).
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

/// A page of the list `name` of the caller's account (an operator's: every account's,
/// or the one named), fetched by `fetch(account, position, limit + 1)` and ordered as
/// `pos` says.
pub async fn by_account<T, Fut>(
    caller: &Caller,
    q: &AccountQuery,
    name: &str,
    pos: impl Fn(&T) -> Position,
    fetch: impl FnOnce(Option<Uuid>, Option<(DateTime<Utc>, Uuid)>, i64) -> Fut,
) -> Result<actix_web::HttpResponse, ApiError>
where
    T: utoipa::ToSchema + Serialize,
    Fut: std::future::Future<Output = crate::store::StoreResult<Vec<T>>>,
{
    caller.require_admin()?;
    let limit = limit(q.limit)?;
    let Some(account) = caller.listed_account(q.account_id) else {
        return Ok(actix_web::HttpResponse::Ok().json(Page::<T> { items: vec![], next_cursor: None }));
    };
    let query = format!("{name}:{account:?}");
    let at = q.cursor.as_deref().map(|c| decode(c, &query)?.time()).transpose()?;
    let rows = fetch(account, at, limit + 1).await?;
    Ok(actix_web::HttpResponse::Ok().json(page(rows, limit, &query, pos)))
}

/// Builds a page from `limit + 1` rows fetched: the extra row only says there is more.
pub fn page<T: utoipa::ToSchema>(mut rows: Vec<T>, limit: i64, query: &str, pos: impl Fn(&T) -> Position) -> Page<T> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if more { rows.last().map(|r| encode(pos(r), query)) } else { None };
    Page { items: rows, next_cursor }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_edits_and_other_queries() {
        let pos = Position { key: 1_764_000_000_000_000, id: Uuid::now_v7() };
        let c = encode(pos, "executions?status=failed");
        assert_eq!(decode(&c, "executions?status=failed").unwrap(), pos);
        assert!(decode(&c, "executions?status=dead").is_err());
        let mut bytes = URL_SAFE_NO_PAD.decode(&c).unwrap();
        bytes[5] ^= 1;
        let edited = URL_SAFE_NO_PAD.encode(bytes);
        let err = decode(&edited, "executions?status=failed").unwrap_err();
        assert!(err.message.contains("altered"), "{}", err.message);
        for junk in ["", "x", "!!!", &"A".repeat(300), "' OR 1=1 --"] {
            assert_eq!(decode(junk, "q").unwrap_err().status, 400);
        }
    }

    #[test]
    fn limits_are_bounded() {
        assert_eq!(limit(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit(Some(MAX_LIMIT)).unwrap(), MAX_LIMIT);
        assert!(limit(Some(0)).is_err());
        assert!(limit(Some(-5)).is_err());
        assert!(limit(Some(MAX_LIMIT + 1)).is_err());
    }
}
