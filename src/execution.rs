//! An execution's states, the one list every layer uses: the journal writes them, the
//! history filters on them, the API documents them.
//!
//! `queued → running → succeeded | failed`, or `running → retrying → running …` and
//! `running → waiting → running …` (a `delay` step), ending `dead` once its attempts
//! are used up; `cancelled` is set from outside. A leaf: it uses nothing of the crate.

/// The state of an execution, as stored in `executions.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Recorded, not started (or free again, to be claimed).
    Queued,
    Running,
    /// A step failed; the next attempt is due at `run_after`.
    Retrying,
    /// A `delay` step; the execution goes on at `run_after`.
    Waiting,
    Succeeded,
    /// A step failed in a way a retry would not fix.
    Failed,
    /// The last attempt failed: a dead letter is written with it.
    Dead,
    Cancelled,
}

impl Status {
    /// Every state, in the order of the life of an execution.
    pub const ALL: [Status; 8] = [
        Status::Queued,
        Status::Running,
        Status::Retrying,
        Status::Waiting,
        Status::Succeeded,
        Status::Failed,
        Status::Dead,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Retrying => "retrying",
            Status::Waiting => "waiting",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Dead => "dead",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Finished for good (by running: `cancelled` is not an outcome the executor writes).
    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Dead)
    }

    /// Every state's name, for messages that list them.
    pub fn names() -> impl Iterator<Item = &'static str> {
        Status::ALL.into_iter().map(Status::as_str)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_from_its_name() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("Running"), None);
        assert_eq!(Status::names().collect::<Vec<_>>().join(","), "queued,running,retrying,waiting,succeeded,failed,dead,cancelled");
    }
}
