//! `delay`: a durable wait, for a `duration` ("10m", "1h30m") from when the step starts
//! or `until` a fixed time. The executor ends the attempt there; the supervisor writes
//! the wait and the execution goes on when it is due, on this node or any other.

use super::{Effects, Scope, StepError, StepField, StepInput, StepOutcome};
use crate::workflow::duration::parse_duration;
use crate::workflow::error::ValidationError;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub const MAX_DELAY: Duration = Duration::from_secs(30 * 86_400);

// The fields of a `delay` step (documented through `Step`'s schema).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// When a delay step ends: relative to when the step starts, or at a fixed instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelaySpec {
    For(Duration),
    Until(DateTime<Utc>),
}

#[derive(Debug, Clone)]
pub struct Compiled {
    pub until: DelaySpec,
}

impl Spec {
    pub(crate) fn compile(&self, at: &StepField, _scope: &Scope<'_>) -> Result<Compiled, ValidationError> {
        let until = match (&self.duration, &self.until) {
            (None, None) => return Err(ValidationError::new(at.whole(), "a delay needs duration or until")),
            (Some(_), Some(_)) => return Err(ValidationError::new(at.at("until"), "give either duration or until, not both")),
            (Some(duration), None) => {
                let parsed = parse_duration(duration).map_err(|m| ValidationError::new(at.at("duration"), m))?;
                if parsed > MAX_DELAY {
                    return Err(ValidationError::new(at.at("duration"), "must be at most 30 days"));
                }
                DelaySpec::For(parsed)
            }
            (None, Some(until)) => {
                let at_time = DateTime::parse_from_rfc3339(until).map_err(|e| {
                    ValidationError::new(
                        at.at("until"),
                        format!("must be an RFC 3339 timestamp such as 2026-11-25T10:00:00Z ({e})"),
                    )
                })?;
                DelaySpec::Until(at_time.with_timezone(&Utc))
            }
        };
        Ok(Compiled { until })
    }
}

impl Compiled {
    pub(crate) async fn run<E: Effects>(&self, input: &StepInput<'_>, _fx: &E) -> Result<StepOutcome, StepError> {
        Ok(StepOutcome::Delay(self.due(input.started_at)))
    }

    /// When a step that started at `started_at` ends.
    pub fn due(&self, started_at: DateTime<Utc>) -> DateTime<Utc> {
        match self.until {
            DelaySpec::For(d) => started_at + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::zero()),
            DelaySpec::Until(t) => t,
        }
    }
}
