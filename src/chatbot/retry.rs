//! The retry policy: how many attempts an execution gets and how long it waits between
//! them. Exponential backoff with full jitter (a random wait between zero and the
//! exponential bound), so executions that failed together do not retry together.

use crate::config::RetryConfig;
use crate::workflow::RetryPolicy;
use rand::Rng;
use std::time::Duration;

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
}
