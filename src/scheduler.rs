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
//! unreachable to the operators. (The node's heartbeat has a task and a connection of
//! its own: `store::leases::keep_heartbeat`.)

use crate::notify::{Kind, Notifier, Report};
use crate::router::{Router, Wake};
use crate::store::leases;
use crate::store::Store;
use crate::telemetry::metrics as m;
use actix::Addr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub struct Scheduler {
    pub store: Store,
    pub router: Addr<Router>,
    pub notifier: Addr<Notifier>,
    pub ttl: Duration,
    pub scan_interval: Duration,
    pub unreachable_after: Duration,
}

impl Scheduler {
    pub async fn run(self, cancel: CancellationToken) {
        let mut unreachable_since: Option<Instant> = None;
        let mut reported_unreachable = false;
        let mut scans = 0u64;
        loop {
            scans += 1;
            match self.scan(scans).await {
                Ok(()) => {
                    if unreachable_since.take().is_some() && reported_unreachable {
                        tracing::info!("the database is reachable again");
                    }
                    reported_unreachable = false;
                }
                Err(error) => {
                    metrics::counter!(m::DB_ERRORS, "kind" => error.kind()).increment(1);
                    tracing::debug!(%error, "scheduler scan failed");
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if error.is_transient() && since.elapsed() >= self.unreachable_after && !reported_unreachable {
                        reported_unreachable = true;
                        self.notifier.do_send(Report {
                            kind: Kind::DatabaseUnreachable,
                            workflow_id: None,
                            chatbot_id: None,
                            execution_id: None,
                            message: format!("the database has been unreachable for {} s: {error}", since.elapsed().as_secs()),
                        });
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.scan_interval) => {}
            }
        }
    }

    async fn scan(&self, n: u64) -> Result<(), crate::store::StoreError> {
        // Look a little ahead, so supervisors set exact timers for what is due soon.
        let due = leases::due_chatbots(&self.store, self.ttl, self.scan_interval * 2).await?;
        for (chatbot_id, due_at) in due {
            self.router.do_send(Wake { chatbot_id, due_at });
        }
        // Housekeeping that need not run every scan.
        if n % 10 == 1 {
            leases::forget_dead(&self.store, self.ttl).await?;
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
