//! The Scheduler: this node's heartbeat, and the work no in-memory timer knows about.
//!
//! Retries and delays a supervisor schedules itself fire from its own timers. What
//! this task finds is the rest, by asking PostgreSQL every `scheduler.scan_interval_ms`
//! (one indexed query over the small set of unfinished executions, never a tight
//! loop): executions freed by a restart or a dead-letter replay, queued ones that did
//! not fit in memory, waits too long to hold, and the executions of nodes whose
//! heartbeat stopped. For each chatbot with such work it wakes the chatbot's
//! supervisor (through the Router) with the earliest due time, and the supervisor
//! claims it.
//!
//! It also keeps the open dead-letter gauge, and reports a database that stays
//! unreachable to the operators.

use crate::notify::{Kind, Notifier, Report};
use crate::router::{Router, Wake};
use crate::store::leases::{self, LeaseHealth};
use crate::store::Store;
use crate::telemetry::metrics as m;
use actix::Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub struct Scheduler {
    pub store: Store,
    pub node: Uuid,
    pub router: Addr<Router>,
    pub notifier: Addr<Notifier>,
    pub health: LeaseHealth,
    pub ttl: Duration,
    pub scan_interval: Duration,
    pub unreachable_after: Duration,
}

impl Scheduler {
    pub async fn run(self, cancel: CancellationToken) {
        let beat_every = self.ttl / 3;
        let tick = beat_every.min(self.scan_interval).max(Duration::from_millis(50));
        let mut next_beat = Instant::now();
        let mut next_scan = Instant::now();
        let mut unreachable_since: Option<Instant> = None;
        let mut reported_unreachable = false;
        let mut scans = 0u64;
        loop {
            let now = Instant::now();
            if now >= next_beat {
                next_beat = now + beat_every;
                match leases::heartbeat(&self.store, self.node).await {
                    Ok(()) => {
                        self.health.beat(now);
                        if unreachable_since.take().is_some() && reported_unreachable {
                            tracing::info!("the database is reachable again");
                        }
                        reported_unreachable = false;
                    }
                    Err(error) => {
                        metrics::counter!(m::DB_ERRORS, "kind" => error.kind()).increment(1);
                        let since = *unreachable_since.get_or_insert(now);
                        tracing::warn!(%error, "heartbeat failed");
                        if since.elapsed() >= self.unreachable_after && !reported_unreachable {
                            reported_unreachable = true;
                            self.notifier.do_send(Report {
                                kind: Kind::DatabaseUnreachable,
                                workflow_id: None,
                                chatbot_id: None,
                                execution_id: None,
                                message: format!(
                                    "the database has been unreachable for {} s: {error}",
                                    since.elapsed().as_secs()
                                ),
                            });
                        }
                    }
                }
            }
            if now >= next_scan {
                next_scan = now + self.scan_interval;
                scans += 1;
                if let Err(error) = self.scan(scans).await {
                    metrics::counter!(m::DB_ERRORS, "kind" => error.kind()).increment(1);
                    tracing::debug!(%error, "scheduler scan failed");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
        }
    }

    async fn scan(&self, n: u64) -> Result<(), crate::store::StoreError> {
        let dead = leases::dead_nodes(&self.store, self.node, self.ttl).await?;
        // Look a little ahead, so supervisors set exact timers for what is due soon.
        let due = leases::due_chatbots(&self.store, &dead, self.scan_interval * 2).await?;
        if !due.is_empty() {
            let dead = Arc::new(dead.clone());
            for (chatbot_id, due_at) in due {
                self.router.do_send(Wake { chatbot_id, due_at, dead: dead.clone() });
            }
        }
        // Housekeeping that need not run every scan.
        if n % 10 == 1 {
            leases::forget_dead(&self.store, &dead).await?;
            let client = self.store.pool().get().await?;
            let open: i64 = client
                .query_one("SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL AND discarded_at IS NULL", &[])
                .await?
                .get(0);
            metrics::gauge!(m::DEAD_LETTERS).set(open as f64);
        }
        Ok(())
    }
}
