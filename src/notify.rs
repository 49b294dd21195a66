//! The Notifier actor: error notifications for operators, deduplicated.
//!
//! Dead executions, workflows that keep failing and a database that stays away are
//! reported on the `notify.webhook_url` channel (when set), in the log and in
//! `botflow_notifications_total{kind}`. One notification per (kind, workflow) per
//! window: the first occurrence is sent at once, and if more follow within the window
//! one summary with their count is sent when it closes, never one per failure.

use crate::egress::Egress;
use crate::telemetry::metrics as m;
use actix::prelude::*;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An execution used up its attempts and became a dead letter.
    Dead,
    /// A workflow's executions failed `failing_threshold` times within a window.
    Failing,
    /// The database has been unreachable longer than the configured threshold.
    DatabaseUnreachable,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Dead => "dead_execution",
            Kind::Failing => "workflow_failing",
            Kind::DatabaseUnreachable => "database_unreachable",
        }
    }
}

/// Sent by supervisors and the scheduler: something an operator should know.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Report {
    pub kind: Kind,
    pub workflow_id: Option<Uuid>,
    pub chatbot_id: Option<Uuid>,
    pub execution_id: Option<Uuid>,
    pub message: String,
}

struct Window {
    /// Occurrences after the one that was sent at once.
    more: u64,
    /// For `Failing`: failures seen in this window, and whether it was reported.
    failures: u32,
    reported: bool,
    last: Report,
}

pub struct Notifier {
    egress: Egress,
    url: Option<String>,
    window: Duration,
    failing_threshold: u32,
    windows: HashMap<(Kind, Option<Uuid>), Window>,
}

impl Notifier {
    pub fn new(egress: Egress, url: Option<String>, window: Duration, failing_threshold: u32) -> Notifier {
        Notifier { egress, url, window, failing_threshold, windows: HashMap::new() }
    }

    fn send(&self, report: &Report, count: u64, ctx: &mut Context<Self>) {
        metrics::counter!(m::NOTIFICATIONS, "kind" => report.kind.as_str()).increment(1);
        tracing::warn!(
            kind = report.kind.as_str(),
            count,
            workflow_id = ?report.workflow_id,
            chatbot_id = ?report.chatbot_id,
            execution_id = ?report.execution_id,
            "operator notification: {}",
            report.message
        );
        let Some(url) = self.url.clone() else { return };
        let body = json!({
            "kind": report.kind.as_str(),
            "count": count,
            "window_seconds": self.window.as_secs(),
            "workflow_id": report.workflow_id,
            "chatbot_id": report.chatbot_id,
            "execution_id": report.execution_id,
            "message": report.message,
        });
        // The refusal was counted and logged by the policy.
        let Ok(http) = self.egress.client_for(&url) else { return };
        let request = http.post(url).timeout(Duration::from_secs(10)).json(&body);
        ctx.spawn(
            async move {
                match request.send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => tracing::warn!(status = %r.status(), "the notification channel refused a notification"),
                    Err(error) => tracing::warn!(%error, "cannot send a notification"),
                }
            }
            .into_actor(self),
        );
    }
}

impl Actor for Notifier {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(0);
    }
}

impl Handler<Report> for Notifier {
    type Result = ();

    fn handle(&mut self, report: Report, ctx: &mut Context<Self>) {
        let key = (report.kind, report.workflow_id);
        let threshold = self.failing_threshold;
        if let Some(w) = self.windows.get_mut(&key) {
            w.last = report.clone();
            if report.kind == Kind::Failing {
                w.failures += 1;
                if w.failures >= threshold && !w.reported {
                    w.reported = true;
                    let count = w.failures as u64;
                    self.send(&report, count, ctx);
                } else if w.reported {
                    w.more += 1;
                }
            } else {
                w.more += 1;
            }
            return;
        }
        // A new window: the first occurrence goes out now (for Failing, once the
        // threshold is reached), a summary of the rest when the window closes.
        let mut w = Window { more: 0, failures: 1, reported: false, last: report.clone() };
        if report.kind != Kind::Failing || threshold <= 1 {
            w.reported = true;
            self.send(&report, 1, ctx);
        }
        self.windows.insert(key, w);
        ctx.run_later(self.window, move |act, ctx| {
            if let Some(w) = act.windows.remove(&key) {
                if w.reported && w.more > 0 {
                    let mut summary = w.last.clone();
                    summary.message = format!("{} more in the last {} s; latest: {}", w.more, act.window.as_secs(), w.last.message);
                    act.send(&summary, w.more, ctx);
                }
            }
        });
    }
}
