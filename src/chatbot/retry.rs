//! The retry policy: how many attempts an execution gets and how long it waits between
//! them. Exponential backoff with full jitter (a random wait between zero and the
//! exponential bound), so executions that failed together do not retry together.

use crate::config::RetryConfig;
use crate::execution::Status;
use crate::workflow::RetryPolicy;
use chrono::{DateTime, Utc};
use rand::Rng;
use std::time::Duration;

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Attempt number `attempt` runs at `due`, `wait` from now.
    Retry { attempt: i32, due: DateTime<Utc>, wait: Duration },
    /// No more attempts: `Dead` (a dead letter) when a retry might have helped,
    /// `Failed` when the failure was of a kind no retry fixes.
    GiveUp(Status),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_attempts: i32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub jitter: bool,
}

impl Policy {
    /// The workflow's policy, with the daemon's defaults for what it leaves out.
    pub fn resolve(workflow: Option<&RetryPolicy>, defaults: &RetryConfig) -> Policy {
        let max_attempts = workflow.and_then(|r| r.max_attempts).unwrap_or(defaults.max_attempts);
        let initial = workflow.and_then(|r| r.initial_backoff_ms).unwrap_or(defaults.initial_backoff_ms);
        let max = workflow.and_then(|r| r.max_backoff_ms).unwrap_or(defaults.max_backoff_ms).max(initial);
        Policy {
            max_attempts: max_attempts.min(i32::MAX as u32) as i32,
            initial_backoff: Duration::from_millis(initial),
            max_backoff: Duration::from_millis(max),
            jitter: workflow.is_none_or(|r| r.jitter),
        }
    }

    /// The upper bound of the wait after attempt `attempt` (1-based) failed:
    /// `initial × 2^(attempt-1)`, capped at `max_backoff`.
    pub fn bound(&self, attempt: i32) -> Duration {
        let doublings = attempt.saturating_sub(1).clamp(0, 40) as u32;
        self.initial_backoff.saturating_mul(1u32 << doublings.min(31)).min(self.max_backoff)
    }

    /// The wait after attempt `attempt` failed.
    pub fn backoff(&self, attempt: i32, rng: &mut impl Rng) -> Duration {
        let bound = self.bound(attempt);
        if !self.jitter || bound.is_zero() {
            return bound;
        }
        Duration::from_millis(rng.gen_range(0..=bound.as_millis() as u64))
    }

    /// Whether another attempt is allowed after attempt `attempt` failed.
    pub fn allows_another(&self, attempt: i32) -> bool {
        attempt < self.max_attempts
    }

    /// What follows attempt `attempt` failing at `now`: another attempt after the
    /// backoff (at least `retry_after`, when the receiver asked for it), or the end.
    pub fn after_failure(
        &self,
        attempt: i32,
        retryable: bool,
        retry_after: Option<Duration>,
        now: DateTime<Utc>,
        rng: &mut impl Rng,
    ) -> AfterFailure {
        if !retryable {
            return AfterFailure::GiveUp(Status::Failed);
        }
        if !self.allows_another(attempt) {
            return AfterFailure::GiveUp(Status::Dead);
        }
        let wait = self.backoff(attempt, rng).max(retry_after.unwrap_or_default());
        let due = now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::zero());
        AfterFailure::Retry { attempt: attempt + 1, due, wait }
    }

    /// Why an execution claimed after its run was interrupted (its step crashed the
    /// daemon, say) ends before it starts: it has used up its attempts. `None`: it runs.
    pub fn gives_up_before(&self, interrupted: bool, attempt: i32) -> Option<String> {
        (interrupted && attempt > self.max_attempts)
            .then(|| format!("gave up after {} attempts that were interrupted or failed", attempt - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn defaults() -> RetryConfig {
        RetryConfig { max_attempts: 5, initial_backoff_ms: 500, max_backoff_ms: 60_000 }
    }

    #[test]
    fn workflow_values_win_over_defaults() {
        let p = Policy::resolve(None, &defaults());
        assert_eq!((p.max_attempts, p.initial_backoff, p.jitter), (5, Duration::from_millis(500), true));
        let w = RetryPolicy { max_attempts: Some(3), initial_backoff_ms: Some(100), max_backoff_ms: None, jitter: false };
        let p = Policy::resolve(Some(&w), &defaults());
        assert_eq!((p.max_attempts, p.initial_backoff, p.max_backoff, p.jitter), (3, Duration::from_millis(100), Duration::from_millis(60_000), false));
    }

    #[test]
    fn exponential_and_capped() {
        let p = Policy { max_attempts: 10, initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_millis(1000), jitter: false };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let waits: Vec<u64> = (1..=6).map(|a| p.backoff(a, &mut rng).as_millis() as u64).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.bound(1000), Duration::from_millis(1000), "no overflow for large attempts");
        assert!(p.allows_another(9) && !p.allows_another(10));
    }

    #[test]
    fn full_jitter_stays_within_the_bound_and_varies() {
        let p = Policy { max_attempts: 5, initial_backoff: Duration::from_millis(1000), max_backoff: Duration::from_secs(60), jitter: true };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let waits: Vec<Duration> = (0..200).map(|_| p.backoff(3, &mut rng)).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(4000)));
        assert!(waits.iter().any(|w| *w < Duration::from_millis(1000)) && waits.iter().any(|w| *w > Duration::from_millis(3000)));
    }

    #[test]
    fn a_failure_is_retried_while_attempts_remain_then_the_execution_is_dead() {
        let p = Policy { max_attempts: 3, initial_backoff: Duration::from_millis(500), max_backoff: Duration::from_secs(60), jitter: false };
        let now = Utc::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(
            p.after_failure(1, true, None, now, &mut rng),
            AfterFailure::Retry { attempt: 2, due: now + chrono::Duration::milliseconds(500), wait: Duration::from_millis(500) }
        );
        // The receiver's Retry-After wins over a shorter backoff.
        match p.after_failure(2, true, Some(Duration::from_secs(7)), now, &mut rng) {
            AfterFailure::Retry { attempt: 3, wait, .. } => assert_eq!(wait, Duration::from_secs(7)),
            other => panic!("{other:?}"),
        }
        assert_eq!(p.after_failure(3, true, None, now, &mut rng), AfterFailure::GiveUp(Status::Dead));
        assert_eq!(p.after_failure(1, false, None, now, &mut rng), AfterFailure::GiveUp(Status::Failed));
    }

    #[test]
    fn an_interrupted_execution_past_its_attempts_ends_before_it_starts() {
        let p = Policy { max_attempts: 2, initial_backoff: Duration::ZERO, max_backoff: Duration::ZERO, jitter: false };
        assert_eq!(p.gives_up_before(true, 2), None);
        assert_eq!(p.gives_up_before(false, 3), None, "only interrupted runs count here");
        assert_eq!(p.gives_up_before(true, 3).as_deref(), Some("gave up after 2 attempts that were interrupted or failed"));
    }
}
