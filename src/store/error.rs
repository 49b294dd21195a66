//! Database errors, classified where they are defined: transient errors (the server is
//! away, the pool is exhausted, a deadlock) are worth retrying; permanent ones are not.

use tokio_postgres::error::SqlState;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no database connection available: {}", chain(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error: {}", describe_db(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    #[error("migration failed: {0}")]
    Migrate(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {id} does not exist")]
    NotFound { what: &'static str, id: String },
    /// The change clashes with the current state (a name taken, a letter already replayed).
    #[error("{0}")]
    Conflict(String),
}

impl StoreError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Pool(_) | StoreError::Connect(_) => true,
            StoreError::Db(e) => is_transient_db(e),
            StoreError::Migrate(_) | StoreError::Invalid(_) | StoreError::NotFound { .. } | StoreError::Conflict(_) => false,
        }
    }

    /// A short, bounded label for `botflow_db_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        if self.is_transient() {
            "transient"
        } else {
            "permanent"
        }
    }
}

/// Connection loss has no SQLSTATE; server-side codes say whether the server is
/// going away (class 08, 57P0x), out of connections (53300) or resolving contention
/// (40001, 40P01). Everything else (constraints, syntax) will fail again.
pub fn is_transient_db(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true,
        Some(code) => {
            code.code().starts_with("08")
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || *code == SqlState::QUERY_CANCELED
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// An error with its causes: tokio-postgres says only "error performing TLS handshake"
/// and keeps the reason (an unknown issuer, a wrong name) in its source.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// The server's message when it refused a value itself (SQLSTATE class 22, data
/// exception: a NUL in text, a number out of range): the caller's input is at fault,
/// not the database.
pub fn rejected_value(e: &StoreError) -> Option<&str> {
    match e {
        StoreError::Db(db) => db.as_db_error().filter(|d| d.code().code().starts_with("22")).map(|d| d.message()),
        _ => None,
    }
}

/// Whether the server refused a row because a unique index already holds its key.
pub fn is_unique_violation(e: &StoreError) -> bool {
    matches!(e, StoreError::Db(db) if db.code() == Some(&SqlState::UNIQUE_VIOLATION))
}

/// tokio-postgres prints "db error" for every server error; the server's message (and
/// SQLSTATE) is what tells an operator what happened.
fn describe_db(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} ({})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            s.push_str(": ");
            s.push_str(detail);
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
