//! What `/metrics` shows. The recorder is process-wide, so these tests run one at a
//! time in a binary of their own: a gauge set by another daemon in the same process
//! would otherwise show through.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};
use uuid::Uuid;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[actix_rt::test]
async fn idle_supervisors_stop_and_restart_on_demand() {
    let _one = ONE_AT_A_TIME.lock().await;
    let daemon = TestDaemon::start_with(DaemonOptions {
        tweak: Box::new(|c| c.executor.idle_supervisor_seconds = 1),
        ..Default::default()
    })
    .await;
    let t = tenant(&daemon.store, "acme", 1).await;
    let bot = t.chatbots[0];
    apply(
        &daemon.store,
        bot,
        json!({"name": "w", "trigger": {"event": "x.a"}, "steps": [{"id": "r", "action": "delay", "duration": "0s"}]}),
    )
    .await;
    let mut c = Client::tcp(daemon.tcp()).await.hello(&t.key, &[]).await;
    c.send(&event("e1", bot, "x.a", json!({}))).await;
    assert_eq!(c.recv().await["op"], "ack");
    async fn supervisors(d: &TestDaemon) -> f64 {
        metric(&d.metrics().await, "botflow_supervisors_active", None)
    }
    assert_eq!(supervisors(&daemon).await, 1.0);
    eventually("the idle supervisor stops", || async { supervisors(&daemon).await == 0.0 }).await;
    c.send(&event("e2", bot, "x.a", json!({}))).await;
    let a = c.recv().await;
    assert_eq!(a["executions"].as_array().unwrap().len(), 1, "a new supervisor loads the workflows: {a}");
    assert_eq!(supervisors(&daemon).await, 1.0);
}

#[actix_rt::test]
async fn metrics_count_what_happened() {
    let _one = ONE_AT_A_TIME.lock().await;
    let daemon = TestDaemon::start().await;
    let t = tenant(&daemon.store, "acme", 1).await;
    let bot = t.chatbots[0];
    apply(
        &daemon.store,
        bot,
        json!({"name": "w", "trigger": {"event": "intent.detected", "intent": {"names": ["refund"], "min_confidence": 0.5}},
               "steps": [{"id": "r", "action": "delay", "duration": "0s"}]}),
    )
    .await;
    // The recorder is process-wide: compare before and after.
    let before = daemon.metrics().await;
    let mut c = Client::tcp(daemon.tcp()).await.hello(&t.key, &[]).await;
    for i in 0..5 {
        c.send(&event(&format!("i{i}"), bot, "intent.detected", json!({"name": "refund", "confidence": 0.9}))).await;
    }
    c.send(&event("bad", bot, "intent.detected", json!({"name": "refund", "confidence": "high"}))).await;
    c.send(&event("u1", Uuid::new_v4(), "x.a", json!({}))).await;
    let _ = c.answers(7).await;
    let db = daemon.db().await;
    eventually("executions finish", || async {
        let n: i64 = db.query_one("SELECT count(*) FROM executions WHERE status = 'succeeded'", &[]).await.unwrap().get(0);
        n == 5
    })
    .await;
    let delta = |after: &str, name: &str, label: Option<&str>| metric(after, name, label) - metric(&before, name, label);
    let mut after = daemon.metrics().await;
    let start = Instant::now();
    while delta(&after, "botflow_executions_total", Some("status=\"succeeded\"")) < 5.0 {
        assert!(start.elapsed() < DEADLINE, "metrics did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = daemon.metrics().await;
    }
    assert_eq!(delta(&after, "botflow_events_received_total", Some("type=\"intent.detected\"")), 5.0);
    assert_eq!(delta(&after, "botflow_events_rejected_total", Some("reason=\"invalid_event\"")), 1.0);
    assert_eq!(delta(&after, "botflow_events_rejected_total", Some("reason=\"unknown_chatbot\"")), 1.0);
    assert_eq!(delta(&after, "botflow_trigger_matches_total", None), 5.0);
    assert_eq!(delta(&after, "botflow_executions_total", Some("status=\"created\"")), 5.0);
    assert!(after.contains("botflow_execution_duration_seconds_bucket{le=\"0.005\"}"), "histograms have explicit buckets");
    assert!(after.contains("# HELP botflow_events_received_total"), "metrics are described");
    assert!(metric(&after, "botflow_journal_batch_size_count", None) >= 1.0);
    assert!(metric(&after, "botflow_connections_active", None) >= 1.0);
    // No unbounded labels: no chatbot or event id appears anywhere.
    assert!(!after.contains(&bot.to_string()));
    assert!(!after.contains("\"i1\""));
}

#[actix_rt::test]
async fn another_accounts_events_do_not_start_its_chatbots_supervisor() {
    let _one = ONE_AT_A_TIME.lock().await;
    let daemon = TestDaemon::start().await;
    let a = tenant(&daemon.store, "acme", 1).await;
    let b = tenant(&daemon.store, "globex", 1).await;
    let mut c = Client::tcp(daemon.tcp()).await.hello(&a.key, &[]).await;
    c.send(&event("x1", b.chatbots[0], "x.a", json!({}))).await;
    let n = c.recv().await;
    assert_eq!(n["error"]["code"], "unknown_chatbot", "{n}");
    assert_eq!(metric(&daemon.metrics().await, "botflow_supervisors_active", None), 0.0);
    c.send(&event("x2", a.chatbots[0], "x.a", json!({}))).await;
    assert_eq!(c.recv().await["op"], "ack");
    assert_eq!(metric(&daemon.metrics().await, "botflow_supervisors_active", None), 1.0);
}
