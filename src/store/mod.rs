//! PostgreSQL: the pool, migrations, the embedded server and the journal.
pub mod embedded;
