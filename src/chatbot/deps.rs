//! What every chatbot supervisor and its executors share: the store, the journal, the
//! outbox, the HTTP client and the limits and timeouts from the configuration. Built
//! once by the daemon; the supervisor keeps it, the executor takes what it needs.

use super::limits::Defaults;
use crate::config::RetryConfig;
use crate::notify::Notifier;
use crate::outbox::Outbox;
use crate::store::journal::Journal;
use crate::store::leases::LeaseHealth;
use crate::store::Store;
use actix::Addr;
use std::time::Duration;
use uuid::Uuid;

/// What every supervisor shares.
pub struct SupervisorDeps {
    pub store: Store,
    pub journal: Journal,
    pub outbox: Addr<Outbox>,
    pub notifier: Addr<Notifier>,
    pub egress: crate::egress::Egress,
    pub node: Uuid,
    pub health: LeaseHealth,
    pub concurrency: usize,
    pub queue_capacity: usize,
    pub unavailable_after: Duration,
    pub notify_url: Option<String>,
    /// Reaches `notify_url` (the operator's channel, trusted) and nothing tenants name.
    pub notify_egress: crate::egress::Egress,
    pub step_timeout: Duration,
    pub max_request_body_bytes: usize,
    pub stored_response_bytes: usize,
    pub ack_timeout: Duration,
    pub execution_timeout: Duration,
    pub retry: RetryConfig,
    pub limit_defaults: Defaults,
    /// Chatbots with series of their own.
    pub watchlist: std::collections::HashSet<Uuid>,
}
