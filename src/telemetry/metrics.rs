//! Metric names, help texts, histogram buckets and the handles the hot paths use.
//!
//! Every name is a constant here and `dashboards/` uses exactly these strings. Labels
//! are bounded: event types collapse custom ones into `custom`, nack reasons and
//! statuses are fixed sets; no chatbot, conversation or event id ever becomes a label.
//! Hot paths hold pre-registered handles (`hot()`), so counting is an atomic add, and
//! they count per batch rather than per event.

use crate::event::EventType;
use crate::wire::NackCode;
use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const EVENTS_RECEIVED: &str = "botflow_events_received_total";
pub const EVENTS_REJECTED: &str = "botflow_events_rejected_total";
pub const EVENTS_ACKED: &str = "botflow_events_acked_total";
pub const FRAMES_REJECTED: &str = "botflow_frames_rejected_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "botflow_tls_handshake_failures_total";
pub const TLS_CERT_RELOADS: &str = "botflow_tls_cert_reloads_total";
pub const TLS_CERT_FAILING: &str = "botflow_tls_cert_reload_failing";
pub const TRIGGER_MATCHES: &str = "botflow_trigger_matches_total";
pub const EXECUTIONS: &str = "botflow_executions_total";
pub const EXECUTION_DURATION: &str = "botflow_execution_duration_seconds";
pub const STEP_DURATION: &str = "botflow_step_duration_seconds";
pub const STEPS: &str = "botflow_steps_total";
pub const ACK_LATENCY: &str = "botflow_ack_latency_seconds";
pub const RATE_LIMITED: &str = "botflow_rate_limited_total";
pub const JOURNAL_BATCH_SIZE: &str = "botflow_journal_batch_size";
pub const JOURNAL_COMMIT_DURATION: &str = "botflow_journal_commit_duration_seconds";
pub const DB_ERRORS: &str = "botflow_db_errors_total";
pub const SUPERVISORS_ACTIVE: &str = "botflow_supervisors_active";
pub const CONNECTIONS_ACTIVE: &str = "botflow_connections_active";
pub const COMMANDS_SENT: &str = "botflow_commands_sent_total";
pub const WORKFLOW_RELOADS: &str = "botflow_workflow_reloads_total";
pub const DEAD_LETTERS: &str = "botflow_dead_letters";
pub const RETRIES: &str = "botflow_retries_total";
pub const NOTIFICATIONS: &str = "botflow_notifications_total";
pub const EGRESS_REFUSED: &str = "botflow_egress_refused_total";
pub const PRUNED: &str = "botflow_pruned_rows_total";
/// The `rule` labels of `EGRESS_REFUSED` (`egress::Rule::label`; a test there keeps
/// the two lists equal).
pub const EGRESS_RULES: [&str; 11] = [
    "loopback",
    "private",
    "unique_local",
    "link_local",
    "shared_address_space",
    "unspecified",
    "multicast",
    "broadcast",
    "reserved",
    "deny",
    "own_listener",
];
pub const CLAIMS: &str = "botflow_executions_claimed_total";
pub const EVENTS_IN_FLIGHT: &str = "botflow_events_in_flight";
pub const CONNECTION_IN_FLIGHT: &str = "botflow_connection_in_flight";
pub const LIMIT_CHANGES: &str = "botflow_limit_changes_total";
/// Per-chatbot series, only for chatbots on `metrics.watchlist`.
pub const CHATBOT_EVENTS: &str = "botflow_chatbot_events_received_total";
pub const CHATBOT_EXECUTIONS: &str = "botflow_chatbot_executions_total";
pub const CHATBOT_RATE_LIMITED: &str = "botflow_chatbot_rate_limited_total";

/// Seconds: from a millisecond to a minute.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Seconds: executions may wait on slow webhooks.
const EXECUTION_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0];
/// Rows per journal transaction.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];
/// Unanswered events of one connection.
const IN_FLIGHT_BUCKETS: &[f64] = &[0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns the handle that renders
/// `/metrics`. Later calls (a second daemon in one test process) share it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(EXECUTION_DURATION.into()), EXECUTION_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(JOURNAL_BATCH_SIZE.into()), BATCH_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(CONNECTION_IN_FLIGHT.into()), IN_FLIGHT_BUCKETS))
                .expect("bucket lists are non-empty");
            let handle = match builder.install_recorder() {
                Ok(h) => h,
                // Another recorder is installed (embedding); render from a private one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(EVENTS_RECEIVED, Unit::Count, "Events accepted by the codec, by event type.");
    describe_counter!(EVENTS_REJECTED, Unit::Count, "Events answered with a nack, by reason.");
    describe_counter!(EVENTS_ACKED, Unit::Count, "Events acknowledged (after their executions were committed).");
    describe_counter!(FRAMES_REJECTED, Unit::Count, "Client frames answered with an error line, by reason.");
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        Unit::Count,
        "Connections to the TLS listener closed before the protocol began, by reason (plaintext, handshake, timeout)."
    );
    describe_counter!(
        TLS_CERT_RELOADS,
        Unit::Count,
        "Changes of the TLS certificate files seen by the listener, by outcome (loaded, failed: the previous certificate is kept)."
    );
    describe_gauge!(
        TLS_CERT_FAILING,
        Unit::Count,
        "1 while the changed TLS certificate files do not load (the previous certificate is served), else 0."
    );
    describe_counter!(TRIGGER_MATCHES, Unit::Count, "Workflow triggers that matched an event.");
    describe_counter!(EXECUTIONS, Unit::Count, "Executions by status: created when committed, then their final status.");
    describe_histogram!(EXECUTION_DURATION, Unit::Seconds, "Time from an execution's start to its final status.");
    describe_histogram!(STEP_DURATION, Unit::Seconds, "Time one step attempt took, by action.");
    describe_counter!(STEPS, Unit::Count, "Step attempts by action and outcome.");
    describe_histogram!(
        ACK_LATENCY,
        Unit::Seconds,
        "Time from reading events to writing their acks or nacks (one sample per batch read)."
    );
    describe_counter!(
        RATE_LIMITED,
        Unit::Count,
        "Rate limit hits: events refused (kind=events), executions held back (kind=executions)."
    );
    describe_histogram!(JOURNAL_BATCH_SIZE, Unit::Count, "Rows written by one journal transaction.");
    describe_histogram!(JOURNAL_COMMIT_DURATION, Unit::Seconds, "Time one journal transaction took to commit.");
    describe_counter!(DB_ERRORS, Unit::Count, "Database operations that failed, by kind (transient or permanent).");
    describe_gauge!(SUPERVISORS_ACTIVE, Unit::Count, "Chatbot supervisors running.");
    describe_gauge!(CONNECTIONS_ACTIVE, Unit::Count, "Client connections open.");
    describe_counter!(COMMANDS_SENT, Unit::Count, "Commands written to subscribed connections, by kind.");
    describe_counter!(WORKFLOW_RELOADS, Unit::Count, "Trigger index rebuilds after a workflow change.");
    describe_counter!(RETRIES, Unit::Count, "Attempts that failed and were scheduled to run again.");
    describe_counter!(NOTIFICATIONS, Unit::Count, "Operator notifications sent, by kind.");
    describe_counter!(PRUNED, Unit::Count, "Rows deleted past their retention or of a deleted chatbot, by kind (executions, dead_letters, acked_commands, rollups, chatbots).");
    describe_counter!(
        EGRESS_REFUSED,
        Unit::Count,
        "Webhook and notification requests the egress policy refused, by rule (loopback, private, deny, own_listener, ...)."
    );
    describe_counter!(CLAIMS, Unit::Count, "Executions claimed from PostgreSQL (resumed, taken over, or past the memory bound).");
    describe_gauge!(DEAD_LETTERS, Unit::Count, "Dead letters neither replayed nor discarded.");
    describe_gauge!(EVENTS_IN_FLIGHT, Unit::Count, "Events read and not yet answered, over all connections.");
    describe_histogram!(CONNECTION_IN_FLIGHT, Unit::Count, "Unanswered events of a connection, seen at each read.");
    describe_counter!(LIMIT_CHANGES, Unit::Count, "Rate limit changes applied by this daemon's supervisors.");
    describe_counter!(CHATBOT_EVENTS, Unit::Count, "Events accepted, for chatbots on metrics.watchlist.");
    describe_counter!(CHATBOT_EXECUTIONS, Unit::Count, "Executions by status, for chatbots on metrics.watchlist.");
    describe_counter!(CHATBOT_RATE_LIMITED, Unit::Count, "Rate limit hits, for chatbots on metrics.watchlist.");
}

/// Pre-registered handles for the per-event paths.
pub struct Hot {
    received: Vec<(EventType, Counter)>,
    received_custom: Counter,
    rejected: Vec<(NackCode, Counter)>,
    pub acked: Counter,
    pub trigger_matches: Counter,
    pub executions_created: Counter,
    pub ack_latency: Histogram,
    pub rate_limited_events: Counter,
    pub rate_limited_executions: Counter,
    pub journal_batch: Histogram,
    pub journal_commit: Histogram,
    pub in_flight: metrics::Gauge,
    pub connection_in_flight: Histogram,
}

impl Hot {
    pub fn received(&self, kind: &EventType) -> &Counter {
        self.received.iter().find(|(k, _)| k == kind).map(|(_, c)| c).unwrap_or(&self.received_custom)
    }

    /// Counts a batch of events by type with one add per type.
    pub fn count_received(&self, events: &[crate::event::Event]) {
        let mut counts = [0u64; 7];
        for e in events {
            let i = EventType::NATIVE.iter().position(|k| *k == e.kind).unwrap_or(6);
            counts[i] += 1;
        }
        for (i, n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
            match self.received.get(i) {
                Some((_, c)) => c.increment(*n),
                None => self.received_custom.increment(*n),
            }
        }
    }

    pub fn rejected(&self, code: NackCode) -> &Counter {
        // ALL lists every code, so the lookup always succeeds.
        &self.rejected.iter().find(|(c, _)| *c == code).unwrap_or(&self.rejected[0]).1
    }
}

static HOT: OnceLock<Hot> = OnceLock::new();

/// The hot-path handles, bound to the recorder installed at the time of the first
/// call (none when metrics are disabled: then they cost nothing).
pub fn hot() -> &'static Hot {
    HOT.get_or_init(|| {
        let hot = Hot {
            received: EventType::NATIVE
                .iter()
                .map(|k| (k.clone(), metrics::counter!(EVENTS_RECEIVED, "type" => k.metric_label())))
                .collect(),
            received_custom: metrics::counter!(EVENTS_RECEIVED, "type" => "custom"),
            rejected: NackCode::ALL
                .iter()
                .map(|c| (*c, metrics::counter!(EVENTS_REJECTED, "reason" => c.as_str())))
                .collect(),
            acked: metrics::counter!(EVENTS_ACKED),
            trigger_matches: metrics::counter!(TRIGGER_MATCHES),
            executions_created: metrics::counter!(EXECUTIONS, "status" => "created"),
            ack_latency: metrics::histogram!(ACK_LATENCY),
            rate_limited_events: metrics::counter!(RATE_LIMITED, "kind" => "events"),
            rate_limited_executions: metrics::counter!(RATE_LIMITED, "kind" => "executions"),
            journal_batch: metrics::histogram!(JOURNAL_BATCH_SIZE),
            journal_commit: metrics::histogram!(JOURNAL_COMMIT_DURATION),
            in_flight: metrics::gauge!(EVENTS_IN_FLIGHT),
            connection_in_flight: metrics::histogram!(CONNECTION_IN_FLIGHT),
        };
        register_all();
        hot
    })
}

/// Every series with a bounded label set exists from the start, at zero: a dashboard
/// or an alert reads 0 rather than "no data" for what has not happened yet.
fn register_all() {
    for status in ["created", "succeeded", "failed", "dead"] {
        metrics::counter!(EXECUTIONS, "status" => status).absolute(0);
    }
    for kind in ["transient", "permanent"] {
        metrics::counter!(DB_ERRORS, "kind" => kind).absolute(0);
    }
    for &action in crate::workflow::Step::ACTIONS {
        for outcome in ["succeeded", "failed"] {
            metrics::counter!(STEPS, "action" => action, "outcome" => outcome).absolute(0);
        }
        let _ = metrics::histogram!(STEP_DURATION, "action" => action);
    }
    for kind in crate::wire::CommandKind::ALL {
        metrics::counter!(COMMANDS_SENT, "kind" => kind.as_str()).absolute(0);
    }
    for kind in ["dead_execution", "workflow_failing", "database_unreachable"] {
        metrics::counter!(NOTIFICATIONS, "kind" => kind).absolute(0);
    }
    for kind in ["executions", "dead_letters", "acked_commands", "rollups", "chatbots"] {
        metrics::counter!(PRUNED, "kind" => kind).absolute(0);
    }
    for rule in EGRESS_RULES {
        metrics::counter!(EGRESS_REFUSED, "rule" => rule).absolute(0);
    }
    for code in crate::wire::ErrorCode::ALL {
        metrics::counter!(FRAMES_REJECTED, "reason" => code.as_str()).absolute(0);
    }
    for reason in ["plaintext", "handshake", "timeout"] {
        metrics::counter!(TLS_HANDSHAKE_FAILURES, "reason" => reason).absolute(0);
    }
    for outcome in ["loaded", "failed"] {
        metrics::counter!(TLS_CERT_RELOADS, "outcome" => outcome).absolute(0);
    }
    metrics::gauge!(TLS_CERT_FAILING).set(0.0);
    for name in [RETRIES, CLAIMS, WORKFLOW_RELOADS, LIMIT_CHANGES] {
        metrics::counter!(name).absolute(0);
    }
    for name in [SUPERVISORS_ACTIVE, CONNECTIONS_ACTIVE, DEAD_LETTERS] {
        metrics::gauge!(name).increment(0.0);
    }
    let _ = metrics::histogram!(EXECUTION_DURATION);
}

/// Per-chatbot counters for the chatbots on `metrics.watchlist`; everyone else has
/// none, so the number of series stays bounded by the configuration.
#[derive(Clone)]
pub struct Watched {
    pub events: Counter,
    pub rate_limited: Counter,
    chatbot: String,
}

impl Watched {
    pub fn new(chatbot: uuid::Uuid) -> Watched {
        let label = chatbot.to_string();
        Watched {
            events: metrics::counter!(CHATBOT_EVENTS, "chatbot" => label.clone()),
            rate_limited: metrics::counter!(CHATBOT_RATE_LIMITED, "chatbot" => label.clone()),
            chatbot: label,
        }
    }

    pub fn execution(&self, status: &'static str) {
        metrics::counter!(CHATBOT_EXECUTIONS, "chatbot" => self.chatbot.clone(), "status" => status).increment(1);
    }
}
