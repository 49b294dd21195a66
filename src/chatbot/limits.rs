//! A chatbot's rate limits, as its supervisor applies them: events per second with a
//! burst, executions started per second, and executions running at once.
//!
//! The two rates are governor limiters (GCRA). Limits change while the daemon runs; a
//! new governor limiter starts full, which would hand a chatbot a fresh burst at every
//! change. So the cells a limiter has used (its burst minus what is left now) are
//! carried over: the new limiter starts with the same number used.

use crate::config::Config;
use crate::store::limits::Overrides;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde::Serialize;
use std::num::NonZeroU32;
use std::time::Duration;

/// The limits in force for one chatbot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Limits {
    pub events_per_second: u32,
    pub burst: u32,
    pub executions_per_second: u32,
    pub max_concurrent: u32,
}

/// The daemon's defaults, from the configuration, and whether rates are limited at all.
#[derive(Debug, Clone, Copy)]
pub struct Defaults(pub Limits, pub bool);

impl Defaults {
    pub fn from_config(config: &Config) -> Defaults {
        Defaults(
            Limits {
                events_per_second: config.limits.events_per_second,
                burst: config.limits.burst,
                executions_per_second: config.limits.executions_per_second,
                max_concurrent: config.executor.concurrency_per_chatbot.min(u32::MAX as usize) as u32,
            },
            config.limits.enabled,
        )
    }

    pub fn enabled(&self) -> bool {
        self.1
    }

    /// The limits in force for a chatbot: its own values, these defaults for the rest.
    pub fn resolve(&self, own: &Overrides) -> Limits {
        Limits {
            events_per_second: own.events_per_second.unwrap_or(self.0.events_per_second),
            burst: own.burst.unwrap_or(self.0.burst),
            executions_per_second: own.executions_per_second.unwrap_or(self.0.executions_per_second),
            max_concurrent: own.max_concurrent.unwrap_or(self.0.max_concurrent),
        }
    }
}

/// What a chatbot is using of its limits right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Usage {
    /// Events it may send at once now.
    pub events_available: u32,
    /// Executions it may start at once now.
    pub executions_available: u32,
    pub running: u32,
    /// Committed executions waiting in memory for an executor.
    pub waiting: u32,
}

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

/// One rate: a limiter plus what is needed to carry its state over.
struct Rate<C: Clock> {
    burst: u32,
    limiter: Limiter<C>,
    clock: C,
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN)
}

impl<C: Clock + Clone> Rate<C> {
    fn new(per_second: u32, burst: u32, clock: &C, used: u32) -> Rate<C> {
        let quota = Quota::per_second(nz(per_second)).allow_burst(nz(burst));
        let limiter = RateLimiter::direct_with_clock(quota, clock.clone()).with_middleware::<StateInformationMiddleware>();
        let burst = burst.max(1);
        if let Some(n) = NonZeroU32::new(used.min(burst)) {
            // Cannot fail: `used` is within the burst of a limiter that is full.
            let _ = limiter.check_n(n);
        }
        Rate { burst, limiter, clock: clock.clone() }
    }

    /// Lets one cell through, or says how long until one may pass. The hot path: one
    /// clock read and one compare-and-swap.
    fn check(&self) -> Result<(), Duration> {
        match self.limiter.check() {
            Ok(_) => Ok(()),
            Err(not_until) => Err(not_until.wait_time_from(self.clock.now())),
        }
    }

    /// Cells available now. Governor has no way to look without taking, so this takes
    /// one cell and counts it back: a probe for carrying state over and for reports.
    fn available(&self) -> u32 {
        match self.limiter.check() {
            Ok(snapshot) => (snapshot.remaining_burst_capacity() + 1).min(self.burst),
            Err(_) => 0,
        }
    }

    fn used(&self) -> u32 {
        self.burst - self.available()
    }
}

/// The limiters of one chatbot.
pub struct Limiters<C: Clock + Clone = DefaultClock> {
    limits: Limits,
    clock: C,
    events: Rate<C>,
    executions: Rate<C>,
}

impl Limiters<DefaultClock> {
    pub fn new(limits: Limits) -> Limiters<DefaultClock> {
        Limiters::with_clock(limits, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Limiters<C> {
    pub fn with_clock(limits: Limits, clock: C) -> Limiters<C> {
        Limiters {
            events: Rate::new(limits.events_per_second, limits.burst, &clock, 0),
            // Executions may start in a burst of one second's worth.
            executions: Rate::new(limits.executions_per_second, limits.executions_per_second, &clock, 0),
            limits,
            clock,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// An event may pass, or must wait this long.
    pub fn check_event(&mut self) -> Result<(), Duration> {
        self.events.check()
    }

    /// An execution may start, or must wait this long.
    pub fn check_execution(&mut self) -> Result<(), Duration> {
        self.executions.check()
    }

    /// Applies new limits, carrying over what each rate has used.
    pub fn update(&mut self, limits: Limits) {
        if limits == self.limits {
            return;
        }
        let (ev_used, ex_used) = (self.events.used(), self.executions.used());
        self.events = Rate::new(limits.events_per_second, limits.burst, &self.clock, ev_used);
        self.executions = Rate::new(limits.executions_per_second, limits.executions_per_second, &self.clock, ex_used);
        self.limits = limits;
    }

    pub fn usage(&self, running: u32, waiting: u32) -> Usage {
        Usage {
            events_available: self.events.available(),
            executions_available: self.executions.available(),
            running,
            waiting,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limits(eps: u32, burst: u32) -> Limits {
        Limits { events_per_second: eps, burst, executions_per_second: 2, max_concurrent: 8 }
    }

    #[test]
    fn a_burst_then_the_rate() {
        let clock = FakeRelativeClock::default();
        let mut l = Limiters::with_clock(limits(5, 5), clock.clone());
        let passed = (0..50).filter(|_| l.check_event().is_ok()).count();
        assert_eq!(passed, 5, "exactly the burst passes at once");
        let wait = l.check_event().unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(200), "{wait:?}");
        clock.advance(Duration::from_millis(200));
        assert!(l.check_event().is_ok(), "one more after 1/5 s");
        assert!(l.check_event().is_err());
        clock.advance(Duration::from_secs(1));
        assert_eq!((0..50).filter(|_| l.check_event().is_ok()).count(), 5);
    }

    #[test]
    fn raising_the_limit_does_not_hand_out_a_fresh_burst() {
        let clock = FakeRelativeClock::default();
        let mut l = Limiters::with_clock(limits(5, 5), clock.clone());
        assert_eq!((0..10).filter(|_| l.check_event().is_ok()).count(), 5);
        // Burst 5 used up; raising to burst 8 leaves 3, not 8.
        l.update(limits(100, 8));
        assert_eq!((0..20).filter(|_| l.check_event().is_ok()).count(), 3);
        // And the new rate applies from now on: 100/s is one every 10 ms.
        clock.advance(Duration::from_millis(100));
        assert_eq!((0..20).filter(|_| l.check_event().is_ok()).count(), 8, "capped by the burst");
    }

    #[test]
    fn lowering_the_limit_keeps_what_was_used() {
        let clock = FakeRelativeClock::default();
        let mut l = Limiters::with_clock(limits(10, 10), clock.clone());
        assert_eq!((0..4).filter(|_| l.check_event().is_ok()).count(), 4);
        l.update(limits(1, 5));
        assert_eq!((0..10).filter(|_| l.check_event().is_ok()).count(), 1, "5 - 4 used");
        assert_eq!(l.usage(0, 0).events_available, 0);
    }

    #[test]
    fn executions_have_their_own_rate() {
        let clock = FakeRelativeClock::default();
        let mut l = Limiters::with_clock(limits(100, 100), clock.clone());
        assert!(l.check_execution().is_ok() && l.check_execution().is_ok());
        let wait = l.check_execution().unwrap_err();
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
        assert!(l.check_event().is_ok(), "events are not affected");
        assert_eq!(l.usage(3, 4), Usage { events_available: 99, executions_available: 0, running: 3, waiting: 4 });
    }
}
